"""Instruction emulation for MMIO-class instructions, after bhyve's ``vie_emulate``.

Executes one decoded instruction (a ``VIE_DTYPE`` record from ``decode``) against a register
file and at most two memory operands. Covered: bhyve's MMIO set — MOV, MOVZX, MOVSX (and
MOVSXD), MOVS, STOS, AND, OR, XOR, ADD, ADC, SUB, SBB, CMP, TEST, BT, PUSH, POP, GROUP1
(80/81/83) — plus the instructions a CPL0 PVM guest needs emulated that are pure data
operations: POPCNT, MOVBE, CMPXCHG8B and CMPXCHG16B. Flags CF/PF/AF/ZF/SF/OF are computed as
the architecture defines them (undefined flags: AF of logic ops is cleared, BT leaves
everything but CF alone), operand sizes 8/16/32/64 with AH..BH without REX and 32-bit
writes zero-extending, RIP advanced (wrapped to the code size) when the instruction is done.

**Register file**: ``uint64[18]`` in *encoding* order — rax rcx rdx rbx rsp rbp rsi rdi
r8..r15, then rip (16) and rflags (17). (KVM's ``kvm_regs`` order differs: use
``regs_from_kvm`` / ``regs_to_kvm``.)

**Memory model** (Numba has no cheap callbacks, so memory access is a two-phase protocol):

1. ``step(..., phase=PHASE_PLAN)`` fills ``mops[i] = (linear address, size, kind)`` for each
   memory operand (``kind``: MEM_READ, MEM_WRITE or both) and returns how many there are;
2. the caller reads every MEM_READ operand into ``mdata[i, :size]`` (little-endian) — from a
   flat byte array, from guest RAM through a page walk, or from a device (MMIO read);
3. ``step(..., phase=PHASE_EXECUTE)`` updates the registers and leaves the bytes to write in
   ``mdata[i, :size]`` for every MEM_WRITE operand; it returns an ``EmulateStatus``;
4. the caller stores them (RAM, or a device MMIO write).

``emulate_flat`` runs the whole protocol in one kernel against a flat byte array whose
index 0 is linear address 0 (pure tests, memory dumps); ``hvjit.emulation`` runs it against
guest memory and devices. A REP MOVS/STOS does one iteration per ``step`` and returns
``REPEAT`` (RIP unchanged) until rCX reaches 0, as bhyve does; ``emulate_flat`` loops.

Every index that comes from the record or from guest values (registers, slots, sizes,
memory offsets) is checked: a malformed record gives BAD_RECORD, an operand outside the
flat array gives MEMORY, never an out-of-bounds access.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from hvjit._jit import kernel
from hvjit.kernels.decode import VIE_DTYPE, OpClass

__all__ = [
    "EmulateStatus", "MemKind", "NREGS", "R_RIP", "R_RFLAGS", "REG_NAMES", "MAX_MOPS",
    "PHASE_PLAN", "PHASE_EXECUTE", "step", "emulate_flat", "emulate", "new_buffers",
    "regs_from_kvm", "regs_to_kvm", "EMULATED_CLASSES", "FLAG_CF", "FLAG_PF", "FLAG_AF",
    "FLAG_ZF", "FLAG_SF", "FLAG_DF", "FLAG_OF", "ARITH_FLAGS",
]

REG_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
NREGS = 18
R_RIP = 16
R_RFLAGS = 17
MAX_MOPS = 2
MOP_BYTES = 16

PHASE_PLAN = 0
PHASE_EXECUTE = 1


class EmulateStatus(IntEnum):
    OK = 0  # executed, RIP advanced
    UNSUPPORTED = 1  # not an instruction (or form) this kernel executes
    MEMORY = 2  # a memory operand is outside the memory given (emulate_flat)
    EXCEPTION = 3  # the instruction raises an exception: info[0] vector, info[1] error code
    REPEAT = 4  # one REP iteration done, RIP unchanged: run again
    BAD_RECORD = 5  # the record did not decode, or holds out-of-range fields


class MemKind(IntEnum):
    READ = 1
    WRITE = 2


_ST_OK = 0
_ST_UNSUPPORTED = 1
_ST_MEMORY = 2
_ST_EXCEPTION = 3
_ST_REPEAT = 4
_ST_BAD = 5
_PLANNED = 100  # internal: plan phase finished (the caller sees the operand count)

_MEM_R = 1
_MEM_W = 2

FLAG_CF = 1 << 0
FLAG_PF = 1 << 2
FLAG_AF = 1 << 4
FLAG_ZF = 1 << 6
FLAG_SF = 1 << 7
FLAG_DF = 1 << 10
FLAG_OF = 1 << 11
ARITH_FLAGS = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF

_U0 = np.uint64(0)
_U1 = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_ARITH = np.uint64(ARITH_FLAGS)

_OC_MOV = int(OpClass.MOV)
_OC_MOVZX = int(OpClass.MOVZX)
_OC_MOVSX = int(OpClass.MOVSX)
_OC_MOVSXD = int(OpClass.MOVSXD)
_OC_MOVS = int(OpClass.MOVS)
_OC_STOS = int(OpClass.STOS)
_OC_AND = int(OpClass.AND)
_OC_OR = int(OpClass.OR)
_OC_XOR = int(OpClass.XOR)
_OC_ADD = int(OpClass.ADD)
_OC_SUB = int(OpClass.SUB)
_OC_CMP = int(OpClass.CMP)
_OC_ADC = int(OpClass.ADC)
_OC_SBB = int(OpClass.SBB)
_OC_TEST = int(OpClass.TEST)
_OC_BT = int(OpClass.BT)
_OC_PUSH = int(OpClass.PUSH)
_OC_POP = int(OpClass.POP)
_OC_GROUP1 = int(OpClass.GROUP1)
_OC_POPCNT = int(OpClass.POPCNT)
_OC_MOVBE = int(OpClass.MOVBE)
_OC_CMPXCHG8B = int(OpClass.CMPXCHG8B)
_OC_CMPXCHG16B = int(OpClass.CMPXCHG16B)

EMULATED_CLASSES = frozenset({
    OpClass.MOV, OpClass.MOVZX, OpClass.MOVSX, OpClass.MOVSXD, OpClass.MOVS, OpClass.STOS,
    OpClass.AND, OpClass.OR, OpClass.XOR, OpClass.ADD, OpClass.SUB, OpClass.CMP, OpClass.ADC,
    OpClass.SBB, OpClass.TEST, OpClass.BT, OpClass.PUSH, OpClass.POP, OpClass.GROUP1,
    OpClass.POPCNT, OpClass.MOVBE, OpClass.CMPXCHG8B, OpClass.CMPXCHG16B,
})

# ALU operation numbers: the opcode's bits 5:3 in 00-3F, ModRM.reg in group 1.
_ADD, _OR, _ADC, _SBB, _AND, _SUB, _XOR, _CMP = range(8)
_TESTOP = 8  # AND without write-back

_SEG_ES, _SEG_CS, _SEG_SS, _SEG_DS, _SEG_FS = 0, 1, 2, 3, 4


# ---- small helpers ------------------------------------------------------------------------


@kernel
def _mask(size):
    if size >= 8:
        return _ALL
    return (np.uint64(1) << np.uint64(8 * size)) - np.uint64(1)


@kernel
def _sx(value, size):
    """Sign-extend the low ``size`` bytes of value to 64 bits (as uint64)."""
    if size >= 8:
        return value
    m = _mask(size)
    v = value & m
    if (v >> np.uint64(8 * size - 1)) & np.uint64(1):
        return v | ~m
    return v


@kernel
def _bool(cond):
    return np.uint64(1) if cond else np.uint64(0)


@kernel
def _parity_flag(result):
    v = result & np.uint64(0xFF)
    v ^= v >> np.uint64(4)
    v &= np.uint64(0xF)
    odd = (np.uint64(0x6996) >> v) & np.uint64(1)
    return np.uint64(FLAG_PF) if odd == 0 else np.uint64(0)


@kernel
def _szp(result, size):
    """ZF, SF and PF of a result."""
    m = _mask(size)
    r = result & m
    f = _parity_flag(r)
    if r == 0:
        f |= np.uint64(FLAG_ZF)
    if (r >> np.uint64(8 * size - 1)) & np.uint64(1):
        f |= np.uint64(FLAG_SF)
    return f


@kernel
def _alu(op, a, b, size, flags):
    """One ALU operation on masked operands: returns (result, new rflags)."""
    m = _mask(size)
    a &= m
    b &= m
    sb = np.uint64(8 * size - 1)
    cin = flags & np.uint64(1)
    cf = np.uint64(0)
    of = np.uint64(0)
    af = np.uint64(0)
    if op == _ADD or op == _ADC:
        c = cin if op == _ADC else np.uint64(0)
        r = (a + b + c) & m
        cf = _bool(r < a or (c != 0 and r == a))
        of = (((a ^ r) & (b ^ r)) >> sb) & np.uint64(1)
        af = ((a ^ b ^ r) >> np.uint64(4)) & np.uint64(1)
    elif op == _SUB or op == _CMP or op == _SBB:
        c = cin if op == _SBB else np.uint64(0)
        r = (a - b - c) & m
        cf = _bool(a < b or (c != 0 and a == b))
        of = (((a ^ b) & (a ^ r)) >> sb) & np.uint64(1)
        af = ((a ^ b ^ r) >> np.uint64(4)) & np.uint64(1)
    elif op == _OR:
        r = a | b
    elif op == _XOR:
        r = a ^ b
    else:  # AND, TEST
        r = a & b
    f = (flags & ~_ARITH) | _szp(r, size) | cf | (af << np.uint64(4)) | (of << np.uint64(11))
    return r, f


@kernel
def _read_reg(regs, reg, size, rex):
    """A register operand of ``size`` bytes (AH/CH/DH/BH for reg 4-7 without REX)."""
    if size == 1 and rex == 0 and reg >= 4 and reg < 8:
        return (regs[reg - 4] >> np.uint64(8)) & np.uint64(0xFF)
    return regs[reg] & _mask(size)


@kernel
def _write_reg(regs, reg, size, value, rex):
    """Write a register operand: 8/16-bit merge, 32-bit zero-extends, 64-bit replaces."""
    if size == 1:
        if rex == 0 and reg >= 4 and reg < 8:
            r = reg - 4
            regs[r] = (regs[r] & ~np.uint64(0xFF00)) | ((value & np.uint64(0xFF)) << np.uint64(8))
        else:
            regs[reg] = (regs[reg] & ~np.uint64(0xFF)) | (value & np.uint64(0xFF))
    elif size == 2:
        regs[reg] = (regs[reg] & ~np.uint64(0xFFFF)) | (value & np.uint64(0xFFFF))
    elif size == 4:
        regs[reg] = value & np.uint64(0xFFFFFFFF)
    else:
        regs[reg] = value


@kernel
def _load(mdata, slot, size):
    v = np.uint64(0)
    for k in range(min(size, 8)):
        v |= np.uint64(mdata[slot, k]) << np.uint64(8 * k)
    return v


@kernel
def _store(mdata, slot, size, value):
    for k in range(min(size, 8)):
        mdata[slot, k] = np.uint8((value >> np.uint64(8 * k)) & np.uint64(0xFF))


@kernel
def _linear(seg, offset, bitness, seg_bases):
    """Segment base + offset: only FS/GS have a base in 64-bit mode; 32-bit wrap otherwise."""
    if bitness == 64:
        if seg == 4 or seg == 5:
            return seg_bases[seg] + offset
        return offset
    return (seg_bases[seg] + offset) & np.uint64(0xFFFFFFFF)


@kernel
def _effective(rec, regs, rsp_adjust):
    """The ModRM memory operand's offset (address-size wrapped) and its default segment."""
    asz = rec["address_size"]
    ea = np.uint64(rec["disp"])
    base = rec["base_reg"]
    index = rec["index_reg"]
    seg = _SEG_DS
    if base == 16:
        ea += regs[R_RIP] + np.uint64(rec["length"])
    elif base >= 0:
        b = regs[base]
        if base == 4:
            b += rsp_adjust
        ea += b
        if base == 4 or base == 5:
            seg = _SEG_SS
    if index >= 0:
        ea += regs[index] * np.uint64(rec["scale"])
    ea &= _mask(asz)
    if rec["segment"] >= 0:
        seg = rec["segment"]
    return ea, seg


@kernel
def _advance(regs, rec, bitness):
    rip = regs[R_RIP] + np.uint64(rec["length"])
    if bitness == 32:
        rip &= np.uint64(0xFFFFFFFF)
    elif bitness == 16:
        rip &= np.uint64(0xFFFF)
    regs[R_RIP] = rip


@kernel
def _write_sized(regs, reg, asz, value):
    """Write an address-sized register (rSI, rDI, rCX, rSP)."""
    _write_reg(regs, reg, asz, value, 1)


@kernel
def _valid(rec, bitness):
    """Every record field used as an index is in range."""
    if rec["status"] != 0:
        return False
    if bitness != 16 and bitness != 32 and bitness != 64:
        return False
    if rec["reg"] > 15 or rec["rm"] > 15:
        return False
    if rec["base_reg"] < -1 or rec["base_reg"] > 16:
        return False
    if rec["index_reg"] < -1 or rec["index_reg"] > 15:
        return False
    if rec["segment"] < -1 or rec["segment"] > 5:
        return False
    osz = rec["operand_size"]
    if osz != 1 and osz != 2 and osz != 4 and osz != 8 and osz != 16:
        return False
    asz = rec["address_size"]
    if asz != 2 and asz != 4 and asz != 8:
        return False
    if rec["scale"] != 1 and rec["scale"] != 2 and rec["scale"] != 4 and rec["scale"] != 8:
        return False
    if rec["vex"] != 0:
        return False
    return True


@kernel
def _plan_rm(rec, regs, bitness, seg_bases, mops, size, kind, rsp_adjust):
    """Slot 0 = the ModRM memory operand; returns 1 (memory) or 0 (register)."""
    if rec["mod"] == 3:
        return 0
    ea, seg = _effective(rec, regs, rsp_adjust)
    mops[0, 0] = _linear(seg, ea, bitness, seg_bases)
    mops[0, 1] = size
    mops[0, 2] = kind
    return 1


# ---- the step ----------------------------------------------------------------------------


@kernel
def step(rec, regs, bitness, seg_bases, stack_asz, mops, mdata, info, phase):
    """Plan (phase 0) or execute (phase 1) one instruction; see the module docstring.

    Plan returns the number of memory operands (>= 0) or a negative EmulateStatus;
    execute returns an EmulateStatus. ``regs`` is uint64[18], ``seg_bases`` uint64[6]
    (ES CS SS DS FS GS), ``stack_asz`` the stack address size (2, 4 or 8), ``mops``
    uint64[MAX_MOPS, 3], ``mdata`` uint8[MAX_MOPS, 16], ``info`` int64[>= 2].
    """
    if (regs.shape[0] < NREGS or seg_bases.shape[0] < 6 or mops.shape[0] < MAX_MOPS
            or mops.shape[1] < 3 or mdata.shape[0] < MAX_MOPS or mdata.shape[1] < MOP_BYTES
            or info.shape[0] < 2):
        return -_ST_BAD
    if not _valid(rec, bitness):
        return -_ST_BAD
    if stack_asz != 2 and stack_asz != 4 and stack_asz != 8:
        return -_ST_BAD
    for i in range(MAX_MOPS):
        if phase == PHASE_PLAN:
            mops[i, 0] = 0
            mops[i, 1] = 0
            mops[i, 2] = 0
    r = _step(rec, regs, bitness, seg_bases, stack_asz, mops, mdata, info, phase)
    if phase == PHASE_PLAN:
        if r == _PLANNED:
            n = 0
            for i in range(MAX_MOPS):
                if mops[i, 1] != 0:
                    n = i + 1
            return n
        return -r if r != 0 else 0
    return r


@kernel
def _step(rec, regs, bitness, seg_bases, stack_asz, mops, mdata, info, phase):
    oc = rec["op_class"]
    omap = rec["opcode_map"]
    opc = rec["opcode"]
    osz = np.int64(rec["operand_size"])
    rex = rec["rex"]
    mod = rec["mod"]
    reg = np.int64(rec["reg"])
    rm = np.int64(rec["rm"])
    flags = regs[R_RFLAGS]
    imm = np.uint64(rec["imm"])
    one_byte = omap == 0

    # ---- ALU: add/or/adc/sbb/and/sub/xor/cmp in 00-3F, group 1, test -----------------------
    if one_byte and ((opc < 0x40 and (opc & 7) < 6 and (oc == _OC_ADD or oc == _OC_OR or oc == _OC_ADC
                      or oc == _OC_SBB or oc == _OC_AND or oc == _OC_SUB or oc == _OC_XOR
                      or oc == _OC_CMP))
                     or (opc >= 0x80 and opc <= 0x83 and oc == _OC_GROUP1)
                     or ((opc == 0x84 or opc == 0x85 or opc == 0xA8 or opc == 0xA9) and oc == _OC_TEST)
                     or ((opc == 0xF6 or opc == 0xF7) and oc == _OC_TEST)):
        form = 0  # 0: r/m op= reg, 1: reg op= r/m, 2: acc op= imm, 3: r/m op= imm
        if opc < 0x40:
            op = (opc >> 3) & 7
            low = opc & 7
            form = 0 if low < 2 else (1 if low < 4 else 2)
        elif opc <= 0x83:
            op = (rec["modrm"] >> 3) & 7
            form = 3
        elif opc == 0x84 or opc == 0x85:
            op = _TESTOP
            form = 0
        elif opc == 0xA8 or opc == 0xA9:
            op = _TESTOP
            form = 2
        else:
            op = _TESTOP
            form = 3
        writes = op != _CMP and op != _TESTOP
        rm_is_dst = form == 0 or form == 3
        if form != 2:
            kind = _MEM_R | (_MEM_W if (writes and rm_is_dst) else 0)
            mem = _plan_rm(rec, regs, bitness, seg_bases, mops, osz, kind, _U0)
        else:
            mem = 0
        if phase == PHASE_PLAN:
            return _PLANNED
        if form == 2:
            a = _read_reg(regs, 0, osz, 1)
            b = imm
        else:
            rmv = _load(mdata, 0, osz) if mem else _read_reg(regs, rm, osz, rex)
            if form == 0:
                a = rmv
                b = _read_reg(regs, reg, osz, rex)
            elif form == 1:
                a = _read_reg(regs, reg, osz, rex)
                b = rmv
            else:
                a = rmv
                b = imm
        res, nf = _alu(op, a, b, osz, flags)
        regs[R_RFLAGS] = nf
        if writes:
            if form == 2:
                _write_reg(regs, 0, osz, res, 1)
            elif form == 1:
                _write_reg(regs, reg, osz, res, rex)
            elif mem:
                _store(mdata, 0, osz, res)
            else:
                _write_reg(regs, rm, osz, res, rex)
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- MOV ------------------------------------------------------------------------------
    if oc == _OC_MOV and one_byte:
        if opc >= 0x88 and opc <= 0x8B:
            store = opc <= 0x89
            mem = _plan_rm(rec, regs, bitness, seg_bases, mops, osz, _MEM_W if store else _MEM_R, _U0)
            if phase == PHASE_PLAN:
                return _PLANNED
            if store:
                v = _read_reg(regs, reg, osz, rex)
                if mem:
                    _store(mdata, 0, osz, v)
                else:
                    _write_reg(regs, rm, osz, v, rex)
            else:
                v = _load(mdata, 0, osz) if mem else _read_reg(regs, rm, osz, rex)
                _write_reg(regs, reg, osz, v, rex)
        elif opc == 0xC6 or opc == 0xC7:
            mem = _plan_rm(rec, regs, bitness, seg_bases, mops, osz, _MEM_W, _U0)
            if phase == PHASE_PLAN:
                return _PLANNED
            if mem:
                _store(mdata, 0, osz, imm)
            else:
                _write_reg(regs, rm, osz, imm, rex)
        elif opc >= 0xA0 and opc <= 0xA3:
            store = opc >= 0xA2
            seg = rec["segment"] if rec["segment"] >= 0 else _SEG_DS
            off = np.uint64(rec["disp"]) & _mask(rec["address_size"])
            mops[0, 0] = _linear(seg, off, bitness, seg_bases)
            mops[0, 1] = osz
            mops[0, 2] = _MEM_W if store else _MEM_R
            if phase == PHASE_PLAN:
                return _PLANNED
            if store:
                _store(mdata, 0, osz, _read_reg(regs, 0, osz, 1))
            else:
                _write_reg(regs, 0, osz, _load(mdata, 0, osz), 1)
        elif opc >= 0xB0 and opc <= 0xBF:
            if phase == PHASE_PLAN:
                return _PLANNED
            r = np.int64((opc & 7) | (rec["rex_b"] << 3))
            _write_reg(regs, r, osz, imm, rex)
        else:
            return _ST_UNSUPPORTED
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- MOVZX / MOVSX / MOVSXD -----------------------------------------------------------
    if ((oc == _OC_MOVZX or oc == _OC_MOVSX) and omap == 1) or (oc == _OC_MOVSXD and one_byte and bitness == 64):
        if oc == _OC_MOVSXD:
            ssz = 4 if osz >= 4 else osz
        else:
            ssz = 1 if (opc == 0xB6 or opc == 0xBE) else 2
        mem = _plan_rm(rec, regs, bitness, seg_bases, mops, ssz, _MEM_R, _U0)
        if phase == PHASE_PLAN:
            return _PLANNED
        v = _load(mdata, 0, ssz) if mem else _read_reg(regs, rm, ssz, rex)
        if oc != _OC_MOVZX:
            v = _sx(v, ssz)
        _write_reg(regs, reg, osz, v & _mask(osz), rex)
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- MOVS / STOS ----------------------------------------------------------------------
    if (oc == _OC_MOVS or oc == _OC_STOS) and one_byte:
        asz = np.int64(rec["address_size"])
        am = _mask(asz)
        rep = rec["rep"] != 0 or rec["repne"] != 0
        count = regs[1] & am
        if rep and count == 0:
            if phase == PHASE_PLAN:
                return _PLANNED
            _advance(regs, rec, bitness)
            return _ST_OK
        di = regs[7] & am
        si = regs[6] & am
        if oc == _OC_MOVS:
            seg = rec["segment"] if rec["segment"] >= 0 else _SEG_DS
            mops[0, 0] = _linear(seg, si, bitness, seg_bases)
            mops[0, 1] = osz
            mops[0, 2] = _MEM_R
            mops[1, 0] = _linear(_SEG_ES, di, bitness, seg_bases)
            mops[1, 1] = osz
            mops[1, 2] = _MEM_W
        else:
            mops[0, 0] = _linear(_SEG_ES, di, bitness, seg_bases)
            mops[0, 1] = osz
            mops[0, 2] = _MEM_W
        if phase == PHASE_PLAN:
            return _PLANNED
        delta = np.uint64(osz)
        down = (flags & np.uint64(FLAG_DF)) != 0
        if oc == _OC_MOVS:
            for k in range(osz):
                mdata[1, k] = mdata[0, k]
            _write_sized(regs, 6, asz, (si - delta) if down else (si + delta))
        else:
            _store(mdata, 0, osz, regs[0] & _mask(osz))
        _write_sized(regs, 7, asz, (di - delta) if down else (di + delta))
        if rep:
            count -= np.uint64(1)
            _write_sized(regs, 1, asz, count)
            if count != 0:
                return _ST_REPEAT
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- BT -------------------------------------------------------------------------------
    if oc == _OC_BT and omap == 1 and (opc == 0xA3 or opc == 0xBA):
        bits = np.int64(8 * osz)
        adjust = np.uint64(0)
        if opc == 0xA3:
            src = _read_reg(regs, reg, osz, rex)
            if mod != 3:
                off = np.int64(_sx(src, osz))
                shift = 4 if osz == 2 else (5 if osz == 4 else 6)
                adjust = np.uint64((off >> shift) * osz)
            bit = np.int64(src & np.uint64(bits - 1))
        else:
            bit = np.int64(imm & np.uint64(bits - 1))
        mem = 0
        if mod != 3:
            ea, seg = _effective(rec, regs, _U0)
            mops[0, 0] = _linear(seg, (ea + adjust) & _mask(rec["address_size"]), bitness, seg_bases)
            mops[0, 1] = osz
            mops[0, 2] = _MEM_R
            mem = 1
        if phase == PHASE_PLAN:
            return _PLANNED
        v = _load(mdata, 0, osz) if mem else _read_reg(regs, rm, osz, rex)
        cf = (v >> np.uint64(bit)) & np.uint64(1)
        regs[R_RFLAGS] = (flags & ~np.uint64(FLAG_CF)) | cf
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- PUSH / POP -----------------------------------------------------------------------
    if oc == _OC_PUSH and (one_byte and ((opc >= 0x50 and opc <= 0x57) or opc == 0x68 or opc == 0x6A
                                         or (opc == 0xFF and ((rec["modrm"] >> 3) & 7) == 6))):
        sm = _mask(stack_asz)
        sp = regs[4] & sm
        nsp = (sp - np.uint64(osz)) & sm
        mem = 0
        if opc == 0xFF:
            mem = _plan_rm(rec, regs, bitness, seg_bases, mops, osz, _MEM_R, _U0)
        slot = mem
        mops[slot, 0] = _linear(_SEG_SS, nsp, bitness, seg_bases)
        mops[slot, 1] = osz
        mops[slot, 2] = _MEM_W
        if phase == PHASE_PLAN:
            return _PLANNED
        if opc == 0xFF:
            v = _load(mdata, 0, osz) if mem else _read_reg(regs, rm, osz, rex)
        elif opc == 0x68 or opc == 0x6A:
            v = imm & _mask(osz)
        else:
            v = _read_reg(regs, np.int64((opc & 7) | (rec["rex_b"] << 3)), osz, 1)
        _store(mdata, slot, osz, v)
        _write_sized(regs, 4, stack_asz, nsp)
        _advance(regs, rec, bitness)
        return _ST_OK

    if oc == _OC_POP and one_byte and ((opc >= 0x58 and opc <= 0x5F)
                                       or (opc == 0x8F and ((rec["modrm"] >> 3) & 7) == 0)):
        sm = _mask(stack_asz)
        sp = regs[4] & sm
        nsp = (sp + np.uint64(osz)) & sm
        mem = 0
        if opc == 0x8F:
            # The destination's address is computed after rSP is incremented.
            mem = _plan_rm(rec, regs, bitness, seg_bases, mops, osz, _MEM_W, np.uint64(osz))
        slot = mem
        mops[slot, 0] = _linear(_SEG_SS, sp, bitness, seg_bases)
        mops[slot, 1] = osz
        mops[slot, 2] = _MEM_R
        if phase == PHASE_PLAN:
            return _PLANNED
        v = _load(mdata, slot, osz)
        _write_sized(regs, 4, stack_asz, nsp)
        if opc == 0x8F:
            if mem:
                _store(mdata, 0, osz, v)
            else:
                _write_reg(regs, rm, osz, v, rex)
        else:
            _write_reg(regs, np.int64((opc & 7) | (rec["rex_b"] << 3)), osz, v, 1)
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- POPCNT ---------------------------------------------------------------------------
    if oc == _OC_POPCNT and omap == 1 and opc == 0xB8 and rec["rep"] != 0:
        mem = _plan_rm(rec, regs, bitness, seg_bases, mops, osz, _MEM_R, _U0)
        if phase == PHASE_PLAN:
            return _PLANNED
        v = _load(mdata, 0, osz) if mem else _read_reg(regs, rm, osz, rex)
        n = np.uint64(0)
        while v != 0:
            v &= v - np.uint64(1)
            n += np.uint64(1)
        _write_reg(regs, reg, osz, n, rex)
        regs[R_RFLAGS] = (flags & ~_ARITH) | (np.uint64(FLAG_ZF) if n == 0 else np.uint64(0))
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- MOVBE ----------------------------------------------------------------------------
    if oc == _OC_MOVBE and omap == 2 and (opc == 0xF0 or opc == 0xF1) and rec["repne"] == 0:
        if mod == 3 or osz == 1:
            return _ST_UNSUPPORTED  # #UD on a CPU; the decoder's business to flag
        store = opc == 0xF1
        _plan_rm(rec, regs, bitness, seg_bases, mops, osz, _MEM_W if store else _MEM_R, _U0)
        if phase == PHASE_PLAN:
            return _PLANNED
        if store:
            v = _read_reg(regs, reg, osz, rex)
            for k in range(osz):
                mdata[0, k] = np.uint8((v >> np.uint64(8 * (osz - 1 - k))) & np.uint64(0xFF))
        else:
            v = np.uint64(0)
            for k in range(osz):
                v |= np.uint64(mdata[0, k]) << np.uint64(8 * (osz - 1 - k))
            _write_reg(regs, reg, osz, v, rex)
        _advance(regs, rec, bitness)
        return _ST_OK

    # ---- CMPXCHG8B / CMPXCHG16B -----------------------------------------------------------
    if (oc == _OC_CMPXCHG8B or oc == _OC_CMPXCHG16B) and omap == 1 and opc == 0xC7 and mod != 3:
        wide = oc == _OC_CMPXCHG16B
        size = 16 if wide else 8
        _plan_rm(rec, regs, bitness, seg_bases, mops, size, _MEM_R | _MEM_W, _U0)
        if wide and (mops[0, 0] & np.uint64(15)) != 0:
            info[0] = 13  # #GP(0): CMPXCHG16B needs a 16-byte aligned operand
            info[1] = 0
            return _ST_EXCEPTION
        if phase == PHASE_PLAN:
            return _PLANNED
        if wide:
            lo = _load(mdata, 0, 8)
            hi = np.uint64(0)
            for k in range(8):
                hi |= np.uint64(mdata[0, 8 + k]) << np.uint64(8 * k)
            equal = lo == regs[0] and hi == regs[2]
            if equal:
                _store(mdata, 0, 8, regs[3])
                for k in range(8):
                    mdata[0, 8 + k] = np.uint8((regs[1] >> np.uint64(8 * k)) & np.uint64(0xFF))
            else:
                regs[0] = lo
                regs[2] = hi
        else:
            m = _load(mdata, 0, 8)
            lo = m & np.uint64(0xFFFFFFFF)
            hi = m >> np.uint64(32)
            equal = lo == (regs[0] & np.uint64(0xFFFFFFFF)) and hi == (regs[2] & np.uint64(0xFFFFFFFF))
            if equal:
                _store(mdata, 0, 8, (regs[3] & np.uint64(0xFFFFFFFF)) | (regs[1] << np.uint64(32)))
            else:
                regs[0] = lo
                regs[2] = hi
            # (on failure the CPU writes the old value back: mdata still holds it)
        zf = np.uint64(FLAG_ZF)
        regs[R_RFLAGS] = (flags | zf) if equal else (flags & ~zf)
        _advance(regs, rec, bitness)
        return _ST_OK

    return _ST_UNSUPPORTED


# ---- whole instruction against a flat array -------------------------------------------------


@kernel
def emulate_flat(rec, regs, bitness, seg_bases, stack_asz, mem, max_iterations, info):
    """Run one instruction (all its REP iterations, up to max_iterations) against ``mem``.

    ``mem`` is a uint8 array whose index is the linear address. Returns an EmulateStatus;
    ``info[0]``/``info[1]`` hold an exception's vector/error code, ``info[2]`` the number of
    iterations run. Operands outside ``mem`` give MEMORY with nothing written for that step.
    """
    mops = np.zeros((MAX_MOPS, 3), np.uint64)
    mdata = np.zeros((MAX_MOPS, MOP_BYTES), np.uint8)
    if info.shape[0] < 3:
        return _ST_BAD
    n_mem = np.uint64(mem.shape[0])
    iterations = 0
    while True:
        n = step(rec, regs, bitness, seg_bases, stack_asz, mops, mdata, info, PHASE_PLAN)
        if n < 0:
            return -n
        for i in range(n):
            size = mops[i, 1]
            gla = mops[i, 0]
            if size > np.uint64(MOP_BYTES) or size > n_mem or gla > n_mem - size:
                return _ST_MEMORY
            for k in range(np.int64(size)):
                mdata[i, k] = mem[gla + np.uint64(k)] if mops[i, 2] & np.uint64(_MEM_R) else np.uint8(0)
        status = step(rec, regs, bitness, seg_bases, stack_asz, mops, mdata, info, PHASE_EXECUTE)
        if status != _ST_OK and status != _ST_REPEAT:
            return status
        for i in range(n):
            if mops[i, 2] & np.uint64(_MEM_W):
                gla = mops[i, 0]
                for k in range(np.int64(mops[i, 1])):
                    mem[gla + np.uint64(k)] = mdata[i, k]
        iterations += 1
        info[2] = iterations
        if status == _ST_OK or iterations >= max_iterations:
            return status


# ---- Python wrappers -----------------------------------------------------------------------

_KVM_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


def regs_from_kvm(kvm_regs) -> np.ndarray:
    """A KVM_REGS_DTYPE record -> uint64[18] in encoding order (+ rip, rflags)."""
    return np.array([int(kvm_regs[n]) for n in _KVM_ORDER], dtype=np.uint64)


def regs_to_kvm(regs: np.ndarray, kvm_regs) -> None:
    """Store a uint64[18] register file back into a KVM_REGS_DTYPE record."""
    for i, n in enumerate(_KVM_ORDER):
        kvm_regs[n] = regs[i]


def new_buffers():
    """(mops, mdata, info) scratch arrays for ``step``."""
    return (np.zeros((MAX_MOPS, 3), np.uint64), np.zeros((MAX_MOPS, MOP_BYTES), np.uint8),
            np.zeros(4, np.int64))


def _as_record(rec):
    if isinstance(rec, np.ndarray):
        if rec.dtype != VIE_DTYPE or rec.size != 1:
            raise TypeError("expected one VIE_DTYPE record")
        return rec.reshape(1)[0]
    if getattr(rec, "dtype", None) != VIE_DTYPE:
        raise TypeError("expected a VIE_DTYPE record from hvjit.kernels.decode")
    return rec


def _seg_bases(seg_bases) -> np.ndarray:
    if seg_bases is None:
        return np.zeros(6, np.uint64)
    arr = np.ascontiguousarray(seg_bases, dtype=np.uint64)
    if arr.shape != (6,):
        raise ValueError("seg_bases must hold 6 bases (ES CS SS DS FS GS)")
    return arr


def emulate(rec, regs: np.ndarray, mem: np.ndarray, *, bitness: int = 64, seg_bases=None,
            stack_size: int | None = None, max_iterations: int = 1 << 20):
    """Execute one decoded instruction against ``regs`` (uint64[18], updated in place) and
    ``mem`` (uint8 array indexed by linear address, updated in place).

    Returns ``(EmulateStatus, info)``; info is (vector, error code, iterations).
    """
    rec = _as_record(rec)
    if not (isinstance(regs, np.ndarray) and regs.dtype == np.uint64 and regs.shape == (NREGS,)):
        raise TypeError("regs must be a uint64[18] array (encoding order, rip, rflags)")
    if not (isinstance(mem, np.ndarray) and mem.dtype == np.uint8 and mem.ndim == 1):
        raise TypeError("mem must be a 1-D uint8 array")
    if bitness not in (16, 32, 64):
        raise ValueError(f"bitness must be 16, 32 or 64, not {bitness!r}")
    if stack_size is None:
        stack_size = 8 if bitness == 64 else bitness // 8
    if stack_size not in (2, 4, 8):
        raise ValueError("stack_size must be 2, 4 or 8 bytes")
    info = np.zeros(4, np.int64)
    status = emulate_flat(rec, regs, int(bitness), _seg_bases(seg_bases), int(stack_size), mem,
                          int(max_iterations), info)
    return EmulateStatus(int(status)), tuple(int(x) for x in info[:3])
