"""Instructions that read or change vCPU state rather than memory, run in user space once
:mod:`.faults` has found nothing the CPU would refuse: RDPRU, INVPCID, RD/WR FS/GS BASE,
RDRAND and RDSEED. Each takes the decoded record, the registers and special registers (as
read for the failure) and changes them; the caller writes the registers back and moves RIP.
"""

from __future__ import annotations

import secrets

from ..kernels.emulate import REG_NAMES
from .guest import Fault, GuestLinear, NotEmulated, operand_linear

VEC_GP = 13
MSR_MPERF, MSR_APERF = 0xE7, 0xE8
CR4_PAE, CR4_PGE, CR4_LA57, CR4_PCIDE = 1 << 5, 1 << 7, 1 << 12, 1 << 17
EFER_LMA = 1 << 10
ARITH_FLAGS = 0x8D5  # CF PF AF ZF SF OF
FLAG_CF = 1


def set_gpr(regs, index: int, size: int, value: int) -> None:
    """Write general register ``index`` as an instruction of ``size`` bytes would: a 32-bit
    write zero-extends, 8/16-bit writes keep the upper bits."""
    name = REG_NAMES[index]
    if size >= 4:
        regs[name] = value & ((1 << (8 * size)) - 1)
    else:
        mask = (1 << (8 * size)) - 1
        regs[name] = (int(regs[name]) & ~mask) | (value & mask)


def _set_cf_only(regs, cf: bool) -> None:
    regs["rflags"] = (int(regs["rflags"]) & ~ARITH_FLAGS) | (FLAG_CF if cf else 0)


def rdpru(vcpu, rec, regs, sregs, bitness: int) -> None:
    """ECX 0: MPERF, 1: APERF (through KVM; 0 where it has none), CF=1; others: 0, CF=0."""
    which = int(regs["rcx"]) & 0xFFFFFFFF
    value, known = 0, which in (0, 1)
    if known:
        value = vcpu.get_msrs([MSR_MPERF if which == 0 else MSR_APERF]).popitem()[1] or 0
    regs["rax"], regs["rdx"] = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
    _set_cf_only(regs, known)


def _canonical(address: int, sregs) -> bool:
    """Canonical for the guest's linear-address width (57 bits with CR4.LA57, else 48)."""
    width = 57 if int(sregs["cr4"]) & CR4_LA57 else 48
    top = address >> (width - 1)
    return top in (0, (1 << (65 - width)) - 1)


def invpcid(vcpu, rec, regs, sregs, bitness: int) -> None:
    """Check the type and descriptor as the CPU does (#GP(0)), then flush the guest's TLB
    (all of it: INVPCID may invalidate more than it is asked to)."""
    kind = int(regs[REG_NAMES[int(rec["reg"])]]) & (0xFFFFFFFFFFFFFFFF if bitness == 64 else 0xFFFFFFFF)
    if kind > 3:
        raise Fault(VEC_GP, 0)
    desc = GuestLinear(vcpu, sregs, regs).read(operand_linear(rec, regs, sregs, bitness), 16)
    low, linear = int.from_bytes(desc[:8], "little"), int.from_bytes(desc[8:], "little")
    if low >> 12:
        raise Fault(VEC_GP, 0)
    if kind == 0 and not _canonical(linear, sregs):
        raise Fault(VEC_GP, 0)
    if kind in (0, 1) and not int(sregs["cr4"]) & CR4_PCIDE and low & 0xFFF:
        raise Fault(VEC_GP, 0)
    flush_guest_tlb(vcpu, sregs)


def flush_guest_tlb(vcpu, sregs) -> None:
    """Make KVM drop the guest's translations: KVM_SET_SREGS with CR4.PGE (or CR3) changed
    resets the vCPU's MMU context and flushes its TLB; the second call puts them back."""
    changed = sregs.copy()
    cr4, cr3 = int(sregs["cr4"]), int(sregs["cr3"])
    if cr4 & CR4_PGE:
        changed["cr4"] = cr4 & ~CR4_PGE
    elif cr4 & CR4_PAE and not int(sregs["efer"]) & EFER_LMA:
        raise NotEmulated("a TLB flush under PAE paging without CR4.PGE")  # new PDPTEs would load
    else:
        changed["cr3"] = cr3 ^ 0x1000
    vcpu.set_sregs(changed)
    vcpu.set_sregs(sregs)


def fsgsbase(vcpu, rec, regs, sregs, bitness: int) -> None:
    """RDFSBASE/RDGSBASE/WRFSBASE/WRGSBASE (F3 0F AE /0-3, register operand)."""
    op = (int(rec["modrm"]) >> 3) & 7
    segment = "gs" if op & 1 else "fs"
    size = 8 if rec["rex_w"] else 4
    reg = REG_NAMES[int(rec["rm"])]
    if op < 2:
        set_gpr(regs, int(rec["rm"]), size, int(sregs[segment]["base"]))
        return
    value = int(regs[reg]) & ((1 << (8 * size)) - 1)
    if not _canonical(value, sregs):
        raise Fault(VEC_GP, 0)
    sregs[segment]["base"] = value
    vcpu.set_sregs(sregs)


def random_number(vcpu, rec, regs, sregs, bitness: int) -> None:
    """RDRAND/RDSEED: a random value from the host's CSPRNG, CF=1."""
    size = int(rec["operand_size"])
    set_gpr(regs, int(rec["rm"]), size, secrets.randbits(8 * size))
    _set_cf_only(regs, True)
