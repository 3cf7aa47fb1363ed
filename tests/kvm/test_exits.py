"""Exits that reach Python: HLT, MMIO handlers, triple faults, timeouts, unclaimed ports."""

import time

import pytest

from hvjit.abi import SuspendHow, VmExitCode

from .guests import load


def test_hlt_is_an_exit(session):
    vm = session.create_vm("hlt", memory=2 << 20)
    load(vm, ".code64\n mov $0x1234, %rbx\n hlt\n", "long", 0)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.HLT
    assert ex.rip == 0x1000 + 8  # after the 7-byte mov and the 1-byte hlt
    assert vm.vcpu(0).get_register("rbx") == 0x1234


def test_mmio_to_unmapped_range_goes_to_a_python_handler(session):
    vm = session.create_vm("mmio", memory=2 << 20)
    seen = []

    def device(gpa, size, is_write, value):
        seen.append((gpa, size, is_write, value))
        return 0x1122334455667788 if not is_write else None

    vm.add_mmio_handler(0xD0000000, 0x1000, device)
    load(vm, """
.code64
    mov $0xd0000010, %rbx
    movl $0xcafe, (%rbx)          # MMIO write
    mov 8(%rbx), %rax             # MMIO read (8 bytes)
    mov %rax, %rcx
    shr $32, %rcx
    xor %eax, %ecx                # fold into 32 bits for the exit code
    mov %ecx, %eax
    outl %eax, $0xf4
""", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.SUSPENDED
    assert ex.code == (0x11223344 ^ 0x55667788)
    assert seen == [(0xD0000010, 4, True, 0xCAFE), (0xD0000018, 8, False, 0)]
    stats = vm.vcpu(0).stats()
    assert stats["kvm_mmio"] == 2 and stats["escalated"] == 2


def test_unclaimed_mmio_is_returned_to_the_caller(session):
    vm = session.create_vm("mmio2", memory=2 << 20)
    load(vm, ".code64\n mov $0xe0000000, %ebx\n movb $0x5a, (%rbx)\n", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.INST_EMUL
    assert (ex.gpa, ex.bytes, ex.is_write, ex.data) == (0xE0000000, 1, True, 0x5A)


def test_native_testdev_mmio_scratch_ram(session):
    vm = session.create_vm("testdev", memory=2 << 20)
    load(vm, """
.code64
    mov $0xff000100, %ebx         # pc-testdev MMIO scratch RAM
    movl $0xdeadbeef, (%rbx)
    movl (%rbx), %eax
    outl %eax, $0xe0              # pc-testdev scratch port
    inl $0xe0, %eax
    outl %eax, $0xf4
""", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.code == 0xDEADBEEF
    assert vm.testdev.scratch == 0xDEADBEEF
    assert bytes(vm.testdev.iomem[0x100:0x104]) == (0xDEADBEEF).to_bytes(4, "little")
    assert vm.vcpu(0).stats()["escalated"] == 0


def test_python_port_handler_in_and_out(session):
    vm = session.create_vm("ports", memory=2 << 20)
    log = []

    def handler(port, size, is_write, value):
        log.append((port, size, is_write, value))
        return 0x77 if not is_write else None

    vm.add_port_handler(0x500, handler, count=2)
    load(vm, """
.code64
    mov $0x99, %al
    mov $0x501, %dx
    outb %al, %dx
    dec %dx
    inb %dx, %al
    movzx %al, %eax
    outl %eax, $0xf4
""", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.code == 0x77
    assert log == [(0x501, 1, True, 0x99), (0x500, 1, False, 0)]


def test_unclaimed_port_is_returned_to_the_caller(session):
    vm = session.create_vm("inout", memory=2 << 20)
    load(vm, ".code64\n mov $0xab, %al\n outb %al, $0x99\n", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.INOUT
    assert (ex.port, ex.bytes, ex.is_in, ex.data) == (0x99, 1, False, 0xAB)


def test_triple_fault_is_suspended_triplefault(session):
    vm = session.create_vm("tf", memory=2 << 20)
    # No IDT: the #GP from a privileged instruction at CPL3 escalates to a triple fault.
    load(vm, ".code64\n cli\n", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.SUSPENDED
    assert ex.how == SuspendHow.TRIPLEFAULT


def test_timeout_stops_a_spinning_guest(session):
    vm = session.create_vm("spin", memory=2 << 20)
    load(vm, ".code64\n1: jmp 1b\n", "long", 3)
    t0 = time.monotonic()
    ex = vm.run(timeout=0.5)
    elapsed = time.monotonic() - t0
    assert ex.exitcode == VmExitCode.TIMEOUT
    assert ex.rip == 0x1000
    assert elapsed < 10
    # The vCPU is usable afterwards: point it at a guest that exits.
    load(vm, ".code64\n mov $5, %eax\n outl %eax, $0xf4\n", "long", 3, at=0x2000)
    assert vm.run(timeout=10).code == 5


def test_kick_from_another_thread(session):
    import threading

    vm = session.create_vm("kick", memory=2 << 20)
    load(vm, ".code64\n1: jmp 1b\n", "long", 3)
    v = vm.vcpu(0)
    timer = threading.Timer(0.3, v.kick)
    timer.start()
    ex = v.run(timeout=20)
    timer.join()
    assert ex.exitcode == VmExitCode.BOGUS


def test_uart_lsr_reports_transmitter_empty(session):
    vm = session.create_vm("lsr", memory=2 << 20)
    load(vm, """
.code64
    mov $0x3fd, %dx
    inb %dx, %al
    movzx %al, %eax
    outl %eax, $0xf4
""", "long", 3)
    assert vm.run(timeout=10).code & 0x60 == 0x60


def test_user_device_through_a_registered_factory(session):
    """A research user's own device: a factory under a name, attached by that name."""
    from hvjit.factory import DEVICE_INTERFACE_UUID, SimpleFactory

    class Doubler:
        def __init__(self, port):
            self.port, self.slot, self.last = port, 0, None

        def attach(self, bus, memory=None):
            self.slot = bus.add_port_handler(self.port, 4, self.io, name="doubler")

        def detach(self, bus):
            bus.remove_slot(self.slot)

        def io(self, port, size, is_write, value):
            if is_write:
                self.last = value
                return None
            return 2 * self.last

    session.register_factory(SimpleFactory("doubler", {DEVICE_INTERFACE_UUID: lambda s: Doubler}))
    vm = session.create_vm("userdev", memory=2 << 20)
    dev = vm.add_device("doubler", port=0x6f0)
    load(vm, """
.code64
    mov $0x6f0, %dx
    mov $21, %eax
    outl %eax, %dx
    inl %dx, %eax
    outl %eax, $0xf4
""", "long", 3)
    assert vm.run(timeout=10).code == 42
    assert dev in vm.devices
    vm.destroy()
    assert dev.slot not in vm.bus.slots  # detached with the VM


def test_unknown_device_name_is_a_clear_error(session):
    from hvjit.errors import FactoryNotFoundError

    vm = session.create_vm("nodev", memory=1 << 20)
    with pytest.raises(FactoryNotFoundError, match="no-such-device"):
        vm.add_device("no-such-device")


def test_unknown_msrs_exit_to_user_space_and_python_handlers(session):
    vm = session.create_vm("msrexit", memory=2 << 20)
    writes = []
    vm.add_msr_handler(0x4B564D99, lambda i, w, v: writes.append(v) if w else 0x1234_5678_9ABC)
    load(vm, """
.code64
    mov $0x4b564d99, %ecx
    mov $0x11, %eax
    mov $0x22, %edx
    wrmsr
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rbx
    mov $0x4b564d98, %ecx       # no handler: the exit goes to the caller
    rdmsr
""", "long", 0)
    ex = vm.run(timeout=20)
    assert ex.exitcode == VmExitCode.RDMSR and ex.msr_index == 0x4B564D98
    assert writes == [0x22_0000_0011]
    assert vm.vcpu(0).get_register("rbx") == 0x1234_5678_9ABC


def test_console_input_reaches_the_guest_receiver(session):
    vm = session.create_vm("rx", memory=2 << 20)
    assert vm.send_console_input(b"hey") == 3
    load(vm, """
.code64
    mov $3, %ecx
1:  mov $0x3fd, %dx          # LSR: wait for data ready
2:  inb %dx, %al
    test $1, %al
    jz 2b
    mov $0x3f8, %dx          # RBR -> THR: echo it in upper case
    inb %dx, %al
    sub $0x20, %al
    outb %al, %dx
    loop 1b
    mov $0x3fd, %dx
    inb %dx, %al
    and $1, %eax             # no more data
    outl %eax, $0xf4
""", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.code == 0 and vm.console == b"HEY"
