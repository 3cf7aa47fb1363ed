"""A guest finds pci-testdev by PCI enumeration, sizes and moves its BARs, and runs the
kvm-unit-tests pci-testdev protocol through both (long mode; CPL0 runs in KVM's emulator
on a PVM host, CPL3 natively)."""

import struct

import pytest

from hvjit.abi import SuspendHow, VmExitCode

from .guests import load

RESULTS = 0x9000
MEM_BAR = 0xD0000000
IO_BAR = 0xE000

GUEST = f"""
.code64
.macro cfgaddr reg
    mov %ebx, %eax
    shl $11, %eax
    or $(0x80000000 | \\reg), %eax
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
.endm
.macro cfgw reg, val
    cfgaddr \\reg
    mov $\\val, %eax
    outl %eax, %dx
.endm
.macro cfgr reg, at
    cfgaddr \\reg
    inl %dx, %eax
    mov %eax, \\at(%rdi)
.endm
    mov ${RESULTS}, %edi
    xor %ebx, %ebx                  # scan bus 0 for 1b36:0005
1:  cfgaddr 0
    inl %dx, %eax
    cmp $0x00051b36, %eax
    je 2f
    inc %ebx
    cmp $32, %ebx
    jb 1b
    mov $0xee, %eax
    outl %eax, $0xf4
2:  mov %ebx, (%rdi)
    cfgw 0x04, 0                    # decoding off, size both BARs, place them, decoding on
    cfgw 0x10, 0xffffffff
    cfgr 0x10, 4
    cfgw 0x14, 0xffffffff
    cfgr 0x14, 8
    cfgw 0x10, {MEM_BAR:#x}
    cfgw 0x14, {IO_BAR:#x}
    cfgw 0x04, 3
    cfgr 0x10, 12
    cfgr 0x14, 16

    mov ${MEM_BAR:#x}, %r13d        # the memory BAR: tests 0, 1, 2, ... until one fails
    xor %r12d, %r12d
3:  movb %r12b, (%r13)
    mov 12(%r13), %eax
    test %eax, %eax
    jnz 6f
    movzbl 1(%r13), %eax
    cmp $1, %eax
    jne 6f
    mov 8(%r13), %eax
    mov 4(%r13), %r14d
    mov $16, %ecx
4:  mov %al, (%r13,%r14)
    loop 4b
    cmpl $16, 12(%r13)
    jne 6f
    mov %r12d, %esi                 # its name at RESULTS + 0x40 + 32 * n
    shl $5, %esi
    lea 0x40(%rdi,%rsi), %rsi
    xor %ecx, %ecx
5:  movb 16(%r13,%rcx), %al
    mov %al, (%rsi,%rcx)
    inc %ecx
    test %al, %al
    jnz 5b
    inc %r12d
    cmp $4, %r12d
    jb 3b
6:  mov %r12d, 20(%rdi)

    xor %r12d, %r12d                # the I/O BAR, the same way
7:  mov ${IO_BAR:#x}, %dx
    mov %r12d, %eax
    outb %al, %dx
    add $12, %dx
    inl %dx, %eax
    test %eax, %eax
    jnz 10f
    mov ${IO_BAR + 1:#x}, %dx
    inb %dx, %al
    cmp $1, %al
    jne 10f
    mov ${IO_BAR + 8:#x}, %dx
    inl %dx, %eax
    mov %eax, %r15d
    mov ${IO_BAR + 4:#x}, %dx
    inl %dx, %eax
    lea {IO_BAR:#x}(%rax), %edx
    mov %r15d, %eax
    mov $16, %ecx
8:  outb %al, %dx
    loop 8b
    mov ${IO_BAR + 12:#x}, %dx
    inl %dx, %eax
    cmp $16, %eax
    jne 10f
    mov %r12d, %esi
    shl $5, %esi
    lea 0x100(%rdi,%rsi), %rsi
    mov ${IO_BAR + 16:#x}, %dx
9:  inb %dx, %al
    mov %al, (%rsi)
    inc %rsi
    inc %dx
    test %al, %al
    jnz 9b
    inc %r12d
    cmp $4, %r12d
    jb 7b
10: mov %r12d, 24(%rdi)
    mov $0x2a, %eax
    outl %eax, $0xf4
"""


def names(raw: bytes) -> list[str]:
    return [raw[32 * i:32 * i + 32].split(b"\0")[0].decode() for i in range(3)]


@pytest.mark.parametrize("cpl", [0, 3])
def test_guest_enumerates_sizes_programs_and_runs_pci_testdev(session, cpl):
    vm = session.create_vm(f"pcitest{cpl}", memory=4 << 20)
    dev = next(d for d in vm.devices if d.name == "pci-testdev")
    load(vm, GUEST, "long", cpl)
    ex = vm.run(timeout=120)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.POWEROFF, str(ex)
    assert ex.code == 0x2A
    device, bar0_mask, bar1_mask, bar0, bar1, mem_ok, io_ok = struct.unpack("<7I", vm.memory.read(RESULTS, 28))
    assert device == dev.pci_device == 2
    assert (bar0_mask, bar1_mask) == (0xFFFFF000, 0xFFFFFF01)
    assert (bar0, bar1) == (MEM_BAR, IO_BAR | 1)
    assert dev.bar_addresses == {0: MEM_BAR, 1: IO_BAR}
    assert (mem_ok, io_ok) == (3, 3)
    assert names(vm.memory.read(RESULTS + 0x40, 96)) == [
        "mmio-no-eventfd", "mmio-wildcard-eventfd", "mmio-datamatch-eventfd"]
    assert names(vm.memory.read(RESULTS + 0x100, 96)) == [
        "portio-no-eventfd", "portio-wildcard-eventfd", "portio-datamatch-eventfd"]
    assert [dev.count(i) for i in range(6)] == [16] * 6
    stats = vm.vcpu(0).stats()
    assert stats["mmio"] > 0 and stats["escalated"] == 0  # all of it in the native loop
