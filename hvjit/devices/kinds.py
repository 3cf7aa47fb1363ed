"""Numbers shared by the native device handlers and the run loop's dispatch switch.

Each native device owns one slot on the VM's bus: a row of ``STATE_WORDS`` int64 registers
and a row of ``BUFFER_BYTES`` bytes (a UART's transmit ring, pc-testdev's MMIO scratch RAM).
"""

# Device kinds: the dispatch switch in hvjit.kernels.dispatch has one arm per native kind.
NONE = 0
PYTHON = 1  # a Python handler: the exit goes back to Python (slow path)
UART16550 = 2
DEBUG_EXIT = 3
TESTDEV = 4
PORT_SINK = 5  # port 0x80 and friends: writes dropped, reads all-ones

MAX_DEVICES = 32
STATE_WORDS = 64
BUFFER_BYTES = 1 << 16

# What a handler asks of the run loop after an access.
ACT_CONTINUE = 0
ACT_POWEROFF = 1  # leave: SUSPENDED / POWEROFF with state[STATE_EXIT_CODE]
ACT_RESET = 2  # leave: SUSPENDED / RESET
ACT_DRAIN = 3  # handled, but return to Python to drain a buffer before going on
ACT_PYTHON = 4  # not handled natively after all: hand the exit to Python

# State words every device may use the same way.
STATE_EXIT_CODE = 0
# The last three words wire a device to an interrupt line; the run loop tells KVM (through
# KVM_IRQ_LINE, when the VM has an in-kernel irqchip) whenever the wanted level changes.
STATE_IRQ_REPORTED = STATE_WORDS - 3  # the level KVM was last told
STATE_IRQ_LEVEL = STATE_WORDS - 2  # the level the device wants now (0/1)
STATE_IRQ_GSI = STATE_WORDS - 1  # the GSI it is wired to, -1 for none

# PC platform devices (hvjit.devices.i8042, cmos, fw_cfg, pci, pm_timer).
I8042 = 6  # keyboard controller 0x60/0x64 (+ system control port B 0x61)
CMOS = 7  # CMOS RAM / RTC 0x70/0x71
FW_CFG = 8  # QEMU fw_cfg legacy ports 0x510/0x511
PCI_HOST = 9  # PCI configuration mechanism #1 0xcf8/0xcfc with an i440FX host bridge
PM_TIMER = 10  # ACPI PM1a event/control blocks and the PM timer
