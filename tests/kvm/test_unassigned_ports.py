"""Ports nobody claims: an INOUT exit for the caller by default; on a PC guest (Linux,
multiboot) all ones on reads and writes dropped, as a PC bus answers."""

from hvjit.abi import VmExitCode

from .guests import load

PROBE = """
.code64
    inb $0x87, %al            # an ISA DMA page register: nobody here decodes it
    movzbl %al, %ebx
    mov $0x2e8, %dx           # COM4's data port
    inw %dx, %ax
    shl $8, %ebx
    movzwl %ax, %eax
    add %eax, %ebx            # 0xff << 8 + 0xffff
    mov $0x55, %al
    outb %al, %dx             # dropped
    mov %ebx, %eax
    outl %eax, $0xf4
"""


def test_an_unclaimed_port_is_the_callers_by_default(session):
    vm = session.create_vm("ports-exit", memory=2 << 20)
    load(vm, PROBE, "long", 3)
    result = vm.run(timeout=10)
    assert result.exitcode == VmExitCode.INOUT and result.exit.port == 0x87, str(result)


def test_a_pc_guest_reads_all_ones(session):
    vm = session.create_vm("ports-ones", memory=2 << 20)
    vm.unassigned_ports = "ones"
    load(vm, PROBE, "long", 3)
    result = vm.run(timeout=10)
    assert result.code == (0xFF << 8) + 0xFFFF, str(result)
    assert vm.unassigned_port_accesses == 3
