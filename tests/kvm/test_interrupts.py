"""Device interrupts through the in-kernel IOAPIC and LAPIC into a guest's IDT."""

import struct

from hvjit.abi import VmExitCode
from hvjit.asm import assemble

from .guests import load

IDT_GPA = 0x3000
HANDLER_GPA = 0x4000
VECTOR = 0x24


def _install_idt(vm, vector, handler):
    """Gate `vector` to a CPL0 handler, and start the guest with IF set (this PVM host
    ignores IOPL at CPL3, so the guest cannot `sti` itself)."""
    low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48)
    vm.memory.write(IDT_GPA + 16 * vector, struct.pack("<QQ", low, handler >> 32))
    v = vm.vcpu(0)
    v.set_desc("idtr", IDT_GPA, 16 * 256 - 1)
    v.set_register("rflags", v.get_register("rflags") | 0x200)


def test_uart_thre_interrupt_reaches_the_guest_handler(session):
    vm = session.create_vm("irq", memory=2 << 20, irqchip=True)
    # The handler (CPL0): say 'I', read IIR (clears THRE), report it through the exit port.
    vm.memory.write(HANDLER_GPA, assemble("""
.code64
    mov $0x3f8, %dx
    mov $'I', %al
    outb %al, %dx
    mov $0x3fa, %dx
    inb %dx, %al
    movzbl %al, %eax
    or $0x100, %eax
    outl %eax, $0xf4
""", HANDLER_GPA))
    load(vm, f"""
.code64
    mov $0xff, %al                 # mask the 8259s: KVM wires the BSP's LINT0 as ExtINT,
    outb %al, $0x21                # so an unprogrammed PIC would deliver IRQ4 as vector 4
    outb %al, $0xa1
    mov $0xfee00000, %rbx
    movl $0x1ff, 0xf0(%rbx)        # LAPIC: software enable
    mov $0xfec00000, %rbx
    movl $0x18, (%rbx)             # IOAPIC redirection entry 4 (COM1), low half
    movl ${VECTOR:#x}, 0x10(%rbx)  # vector, fixed, edge, unmasked
    movl $0x19, (%rbx)
    movl $0, 0x10(%rbx)            # destination APIC 0
    mov $0x3fc, %dx
    mov $0x08, %al                 # MCR.OUT2: the UART's interrupt reaches the bus
    outb %al, %dx
    mov $0x3f9, %dx
    mov $0x02, %al                 # IER: transmitter-empty interrupt
    outb %al, %dx
1:  jmp 1b                         # wait (CPL3: hlt would fault)
""", "long", 3)
    _install_idt(vm, VECTOR, HANDLER_GPA)
    ex = vm.run(timeout=20)
    assert ex.exitcode == VmExitCode.SUSPENDED, ex
    assert ex.code == 0x100 | 0x02  # IIR said: THRE interrupt
    assert vm.console == b"I"


def test_no_interrupt_without_out2(session):
    vm = session.create_vm("noirq", memory=2 << 20, irqchip=True)
    vm.memory.write(HANDLER_GPA, assemble(".code64\n mov $0xbad, %eax\n outl %eax, $0xf4\n", HANDLER_GPA))
    load(vm, f"""
.code64
    mov $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    mov $0xfee00000, %rbx
    movl $0x1ff, 0xf0(%rbx)
    mov $0xfec00000, %rbx
    movl $0x18, (%rbx)
    movl ${VECTOR:#x}, 0x10(%rbx)
    mov $0x3f9, %dx
    mov $0x02, %al                 # THRE interrupt enabled, but OUT2 left clear
    outb %al, %dx
    mov $20000, %ecx
1:  loop 1b
    mov $7, %eax
    outl %eax, $0xf4
""", "long", 3)
    _install_idt(vm, VECTOR, HANDLER_GPA)
    assert vm.run(timeout=20).code == 7


def _timer_guest(vm, setup: str):
    """A CPL0 handler reporting 0x100|vector-ish marker; a CPL3 main that arms a timer and spins."""
    vm.memory.write(HANDLER_GPA, assemble("""
.code64
    mov $0x3f8, %dx
    mov $'T', %al
    outb %al, %dx
    mov $0x1234, %eax
    outl %eax, $0xf4
""", HANDLER_GPA))
    load(vm, f"""
.code64
    mov $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    mov $0xfee00000, %rbx
    movl $0x1ff, 0xf0(%rbx)        # LAPIC: software enable
{setup}
1:  jmp 1b
""", "long", 3)
    _install_idt(vm, VECTOR, HANDLER_GPA)


def test_lapic_timer_interrupt(session):
    vm = session.create_vm("lapic-timer", memory=2 << 20, irqchip=True)
    _timer_guest(vm, f"""
    movl $0xb, 0x3e0(%rbx)         # divide by 1
    movl ${VECTOR:#x}, 0x320(%rbx) # LVT timer: one-shot, our vector
    movl $100000, 0x380(%rbx)      # initial count
""")
    result = vm.run(timeout=20)
    assert result.code == 0x1234 and vm.console == b"T"


def test_pit_interrupt_through_ioapic_pin_2(session):
    vm = session.create_vm("pit", memory=2 << 20, irqchip=True)
    _timer_guest(vm, f"""
    mov $0xfec00000, %rbx
    movl $0x14, (%rbx)             # IOAPIC pin 2: where PCs wire the PIT (GSI 0 -> pin 2)
    movl ${VECTOR:#x}, 0x10(%rbx)
    movl $0x15, (%rbx)
    movl $0, 0x10(%rbx)
    mov $0x34, %al                 # PIT channel 0, lobyte/hibyte, rate generator
    outb %al, $0x43
    mov $0x00, %al
    outb %al, $0x40
    mov $0x10, %al
    outb %al, $0x40                # divisor 0x1000: ~290 Hz
""")
    result = vm.run(timeout=20)
    assert result.code == 0x1234 and vm.console == b"T"


def test_pc_testdev_irq_lines(session):
    vm = session.create_vm("testdev-irq", memory=2 << 20, irqchip=True)
    _timer_guest(vm, f"""
    mov $0xfec00000, %rbx
    movl $0x1a, (%rbx)             # IOAPIC pin 5, level-triggered
    movl ${VECTOR:#x} | 0x8000, 0x10(%rbx)
    movl $0x1b, (%rbx)
    movl $0, 0x10(%rbx)
    mov $0x2005, %dx               # pc-testdev: raise IRQ line 5
    mov $1, %al
    outb %al, %dx
""")
    result = vm.run(timeout=20)
    assert result.code == 0x1234 and vm.console == b"T"
