"""Trapping MSRs KVM handles itself (an MSR filter plus user-space MSR exits) at CPL0."""

from __future__ import annotations

import pytest

from hvjit.errors import MsrTrapError

from .guests import load

IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_PAT = 0x174, 0x175, 0x277
OUT = 0x7000
GUEST = f"""
.code64
    mov ${IA32_PAT:#x}, %ecx
    rdmsr                          # trapped: the handler's value
    mov %eax, {OUT}
    mov %edx, {OUT + 4}
    mov $0x11, %eax
    mov $0x22, %edx
    wrmsr                          # trapped: KVM's PAT keeps its value
    mov ${IA32_SYSENTER_CS:#x}, %ecx
    mov $0x5, %eax
    xor %edx, %edx
    wrmsr                          # trapped for reads only: KVM takes the write
    rdmsr                          # trapped read
    mov %eax, {OUT + 8}
    mov ${IA32_SYSENTER_ESP:#x}, %ecx
    rdmsr                          # not trapped: KVM's value
    mov %eax, {OUT + 12}
    mov $0x66, %eax
    outl %eax, $0xf4
"""


def test_trapped_msrs_reach_python_and_the_rest_stay_with_kvm(session):
    vm = session.create_vm("msrtrap", memory=2 << 20)
    load(vm, GUEST, "long", 0)
    v = vm.vcpu(0)
    pat = v.get_msr(IA32_PAT)
    v.set_msr(IA32_SYSENTER_ESP, 0x1234)
    log = []

    def handler(index, is_write, value):
        log.append((index, is_write, value))
        return None if is_write else {IA32_PAT: 0xAABBCCDD_11223344, IA32_SYSENTER_CS: 0x99}[index]

    vm.trap_msrs({IA32_PAT: handler})
    vm.trap_msrs({IA32_SYSENTER_CS: handler}, write=False)
    ex = vm.run(timeout=20)
    assert ex.code == 0x66, ex
    mem = vm.memory
    assert [mem.read_u32(OUT + 4 * i) for i in range(4)] == [0x11223344, 0xAABBCCDD, 0x99, 0x1234]
    assert log == [(IA32_PAT, False, 0), (IA32_PAT, True, 0x22_00000011), (IA32_SYSENTER_CS, False, 0)]
    assert v.get_msr(IA32_PAT) == pat  # the guest's write never reached KVM
    assert v.get_msr(IA32_SYSENTER_CS) == 5  # the untrapped write did


def test_a_none_handler_gives_the_msr_back_to_kvm(session):
    vm = session.create_vm("msruntrap", memory=2 << 20)
    load(vm, f".code64\n mov ${IA32_PAT:#x}, %ecx\n rdmsr\n outl %eax, $0xf4\n", "long", 0)
    pat = vm.vcpu(0).get_msr(IA32_PAT)
    calls = []
    vm.trap_msrs({IA32_PAT: lambda i, w, v: calls.append(i) or 7})
    vm.trap_msrs({IA32_PAT: None})
    assert vm.run(timeout=20).code == pat & 0xFFFFFFFF
    assert calls == []


@pytest.mark.parametrize("index,match", [(0x830, "x2APIC"), (1 << 32, "32-bit"), (-1, "32-bit")])
def test_untrappable_msrs_are_typed_errors(session, index, match):
    vm = session.create_vm("msrbad", memory=2 << 20)
    with pytest.raises(MsrTrapError, match=match):
        vm.trap_msrs({index: lambda i, w, v: 0})
