"""The vCPU-state instructions hvjit runs itself (hvjit.emulation.special) on a stand-in vCPU:
RDPRU, INVPCID's checks and TLB flush, RD/WR FS/GS BASE, RDRAND."""

import numpy as np
import pytest

from hvjit.abi import KVM_REGS_DTYPE, KVM_SREGS_DTYPE
from hvjit.emulation import special as S
from hvjit.emulation.guest import Fault, NotEmulated
from hvjit.kernels.decode import decode
from hvjit.memory import GuestMemory, MemorySegment, allocate_segment


class FakeVcpu:
    def __init__(self):
        self.vm = type("Vm", (), {})()
        self.vm.memory = GuestMemory()
        host, array = allocate_segment(0x10000)
        self.vm.memory._add(MemorySegment(0, 0x10000, 0, False, "ram", host, array))
        self.msrs = {S.MSR_MPERF: 0x1122334455667788}
        self.sregs_set = []

    def get_msrs(self, indices):
        return {i: self.msrs.get(i) for i in indices}

    def set_sregs(self, sregs):
        self.sregs_set.append(sregs.copy())

    def get_regs(self):
        raise AssertionError("the handlers work on the registers they are given")


def state(**gprs):
    regs = np.zeros(1, KVM_REGS_DTYPE)[0]
    regs["rflags"] = 0x2 | 0x8D5  # arithmetic flags set: the handlers must clear them
    for k, v in gprs.items():
        regs[k] = v
    sregs = np.zeros(1, KVM_SREGS_DTYPE)[0]
    sregs["cr0"], sregs["cr4"] = 1, 0  # protected mode, no paging: linear = physical
    return regs, sregs


def rec(hexcode):
    return decode(bytes.fromhex(hexcode), 64, 0x1000)


def test_rdpru():
    v = FakeVcpu()
    regs, sregs = state(rcx=0)
    S.rdpru(v, rec("0f01fd"), regs, sregs, 64)
    assert (regs["rdx"], regs["rax"], regs["rflags"] & 0x8D5) == (0x11223344, 0x55667788, 1)
    regs, sregs = state(rcx=1)  # APERF: KVM has none here
    S.rdpru(v, rec("0f01fd"), regs, sregs, 64)
    assert (regs["rdx"], regs["rax"], regs["rflags"] & 0x8D5) == (0, 0, 1)
    regs, sregs = state(rcx=7, rax=5)  # no such register: 0, CF clear
    S.rdpru(v, rec("0f01fd"), regs, sregs, 64)
    assert (regs["rax"], regs["rflags"] & 0x8D5) == (0, 0)


def _invpcid(kind, low, high, cr4=0):
    v = FakeVcpu()
    v.vm.memory.write(0x800, low.to_bytes(8, "little") + high.to_bytes(8, "little"))
    regs, sregs = state(rax=kind, rbx=0x800)
    sregs["cr4"] = cr4
    S.invpcid(v, rec("660f388203"), regs, sregs, 64)  # invpcid (%rbx), %rax
    return v


@pytest.mark.parametrize(("kind", "low", "high", "cr4"), [
    (4, 0, 0, 0),  # no such type
    (0, 1 << 12, 0, 0),  # reserved descriptor bits
    (0, 0, 1 << 47, 0),  # type 0: a non-canonical address
    (1, 5, 0, 0),  # a PCID with CR4.PCIDE clear
])
def test_invpcid_general_protection(kind, low, high, cr4):
    with pytest.raises(Fault) as e:
        _invpcid(kind, low, high, cr4)
    assert (e.value.vector, e.value.error_code) == (13, 0)


def test_invpcid_flushes_through_an_mmu_reset():
    v = _invpcid(2, 0, 0, cr4=S.CR4_PGE)
    assert [int(s["cr4"]) for s in v.sregs_set] == [0, S.CR4_PGE]  # PGE off and on again
    v = _invpcid(1, 5, 0, cr4=S.CR4_PCIDE)
    assert [int(s["cr3"]) for s in v.sregs_set] == [0x1000, 0]  # else CR3 changed and back
    assert _invpcid(0, 0, 0xFFFF_8000_0000_0000).sregs_set  # canonical


def test_invpcid_under_legacy_pae_without_pge_is_not_guessed():
    with pytest.raises(NotEmulated):
        _invpcid(2, 0, 0, cr4=S.CR4_PAE)


def test_fs_gs_base():
    v = FakeVcpu()
    regs, sregs = state(rax=0x7000)
    S.fsgsbase(v, rec("f3480faed0"), regs, sregs, 64)  # wrfsbase %rax
    assert int(v.sregs_set[-1]["fs"]["base"]) == 0x7000
    S.fsgsbase(v, rec("f30faec9"), regs, sregs, 64)  # rdgsbase %ecx (32 bits, zero-extended)
    assert regs["rcx"] == 0
    sregs["gs"]["base"] = 0xFFFF_FFFF_1234_5678
    regs["rcx"] = 0xAAAA_AAAA_AAAA_AAAA
    S.fsgsbase(v, rec("f30faec9"), regs, sregs, 64)
    assert regs["rcx"] == 0x1234_5678
    regs["rax"] = 1 << 47
    with pytest.raises(Fault):
        S.fsgsbase(v, rec("f3480faed8"), regs, sregs, 64)  # wrgsbase: non-canonical
    sregs["cr4"] = 1 << 12  # LA57: 57-bit canonical addresses
    S.fsgsbase(v, rec("f3480faed8"), regs, sregs, 64)
    assert int(v.sregs_set[-1]["gs"]["base"]) == 1 << 47


def test_rdrand():
    v = FakeVcpu()
    seen = set()
    for _ in range(8):
        regs, sregs = state(rax=0xDEAD_BEEF_0000_0000)
        S.random_number(v, rec("660fc7f0"), regs, sregs, 64)  # rdrand %ax
        assert regs["rax"] >> 16 == 0xDEAD_BEEF_0000 and regs["rflags"] & 0x8D5 == 1
        seen.add(int(regs["rax"]) & 0xFFFF)
    assert len(seen) > 1
