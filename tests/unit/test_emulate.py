"""The emulation kernel against unicorn (QEMU's x86 semantics) on random operands.

Each *form* is one encoding (instruction, operand size, register or memory operand,
addressing shape); every form runs against many random register files, flags and memory
windows, on both sides, and the registers, RIP, the defined flags and the memory window
must agree. ``FORMS_64``/``FORMS_32`` and ``random_state`` are shared with the real-CPU
test (tests/kvm/test_emulate_cpu.py).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hvjit.kernels import emulate as E
from hvjit.kernels.decode import decode
from hvjit.kernels.emulate import EmulateStatus

CODE = 0x1000
WINDOW = 0x8000  # random memory window the memory operands point into (below 64 KiB for a16)
WINDOW_SIZE = 0x400
MEM_SIZE = 0x10000
BASE_VALUE = WINDOW + 0x200  # value of base registers (and rsp) in memory forms

CF, PF, AF, ZF, SF, DF, OF = 1, 4, 0x10, 0x40, 0x80, 0x400, 0x800
ARITH = CF | PF | AF | ZF | SF | OF
EDGE = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
        (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x100, 0x10000, 0x100000000]
PATTERNS = [0x00, 0xFF, 0x80, 0x7F, 0x01]


@dataclass
class Form:
    name: str
    code: bytes
    bitness: int = 64
    fixed: dict = field(default_factory=dict)  # encoding-order register -> value
    flag_mask: int = ARITH | DF
    string: bool = False  # MOVS/STOS: small rcx, random DF
    mem_addr: int | None = None  # the memory operand's address, when a form wants it known
    cmpxchg: int = 0  # 8 or 16: make the comparison succeed half the time


def _d8(v):
    return (v & 0xFF).to_bytes(1, "little")


def encode(opcode: bytes, *, size: int, reg: int = 0, rm: int = 0, mem=None, imm: bytes = b"",
           prefixes: bytes = b"", force_rex: bool = False, bitness: int = 64, length_hint: int = 0):
    """Encode prefixes/REX/opcode/ModRM/SIB/disp/imm; returns (bytes, fixed registers)."""
    pfx = bytearray(prefixes)
    if size == 2:
        pfx.append(0x66)
    w = 1 if size == 8 else 0
    r, x, b = reg >> 3, 0, 0
    fixed = {}
    if mem is None:
        b = rm >> 3
        modrm = 0xC0 | (reg & 7) << 3 | (rm & 7)
        tail = b""
    else:
        kind = mem[0]
        if kind == "bd":
            base, disp = mem[1], mem[2]
            b = base >> 3
            fixed[base] = BASE_VALUE
            if base & 7 == 4:
                modrm, tail = 0x44 | (reg & 7) << 3, bytes([0x24]) + _d8(disp)
            else:
                modrm, tail = 0x40 | (reg & 7) << 3 | (base & 7), _d8(disp)
        elif kind == "sib":
            base, index, ss, disp, index_value = mem[1:]
            x, b = index >> 3, base >> 3
            fixed[base] = WINDOW + 0x100
            fixed[index] = index_value
            modrm = 0x44 | (reg & 7) << 3
            tail = bytes([ss << 6 | (index & 7) << 3 | (base & 7)]) + _d8(disp)
        elif kind == "rip":
            modrm = 0x05 | (reg & 7) << 3
            tail = (mem[1] & 0xFFFFFFFF).to_bytes(4, "little")
        elif kind == "a16":  # 16-bit addressing (67 prefix in 32-bit mode): rm3, disp8
            rm3, disp = mem[1], mem[2]
            pfx.append(0x67)
            modrm = 0x40 | (reg & 7) << 3 | rm3
            tail = _d8(disp)
            regs16 = {0: (3, 6), 1: (3, 7), 2: (5, 6), 3: (5, 7), 4: (6,), 5: (7,), 6: (5,), 7: (3,)}[rm3]
            for i, rr in enumerate(regs16):
                fixed[rr] = (0x8100 if i == 0 else 0x40) | random.getrandbits(16) << 16
        else:
            raise ValueError(kind)
    rex = 0x40 | w << 3 | r << 2 | x << 1 | b
    rexb = bytes([rex]) if (rex != 0x40 or force_rex) else b""
    if rexb and bitness != 64:
        raise ValueError("REX outside 64-bit mode")
    return bytes(pfx) + rexb + opcode + bytes([modrm]) + tail + imm, fixed


def _imm(size, rng):
    return rng.getrandbits(8 * size).to_bytes(size, "little")


def _mem_shapes(rng, bitness):
    """A few memory operand shapes for a form family."""
    if bitness == 64:
        base = rng.choice([0, 1, 2, 3, 5, 6, 7, 8, 9, 12, 13, 15, 4])
        sib_base = rng.choice([0, 3, 6, 8, 11, 14])
        index = rng.choice([i for i in range(16) if i not in (4, sib_base)])
        return [("bd", base, rng.randrange(-0x80, 0x70)),
                ("sib", sib_base, index, rng.randrange(4), rng.randrange(-0x40, 0x40), rng.randrange(0, 0x20)),
                ("rip", None)]
    return [("bd", rng.choice([0, 1, 2, 3, 5, 6, 7]), rng.randrange(-0x80, 0x70)),
            ("a16", rng.choice([0, 1, 2, 3, 4, 5, 7]), rng.randrange(-0x40, 0x40))]


def _make(name, opcode, *, size, reg, rm=0, mem=None, imm=b"", prefixes=b"", force_rex=False,
          bitness=64, **kw):
    if mem is not None and mem[0] == "rip":
        code, fixed = encode(opcode, size=size, reg=reg, mem=("rip", 0), imm=imm, prefixes=prefixes,
                             force_rex=force_rex, bitness=bitness)
        target = WINDOW + 0x180 + random.randrange(0, 0x100)
        mem = ("rip", target - (CODE + len(code)))
    code, fixed = encode(opcode, size=size, reg=reg, rm=rm, mem=mem, imm=imm, prefixes=prefixes,
                         force_rex=force_rex, bitness=bitness)
    return Form(name, code, bitness, fixed, **kw)


def _sizes(bitness):
    return (1, 2, 4, 8) if bitness == 64 else (1, 2, 4)


def _regs(rng, bitness):
    return rng.randrange(16 if bitness == 64 else 8)


def build_forms(bitness: int = 64, seed: int = 1) -> list[Form]:
    rng = random.Random(seed)
    random.seed(seed)
    forms: list[Form] = []
    nregs = 16 if bitness == 64 else 8

    def rm_variants(name, opcode, size, imm_size=0, byte_op=None, **kw):
        """Register form(s) and memory forms of one ModRM instruction."""
        variants = []
        for _ in range(2):
            reg, rm = rng.randrange(nregs), rng.randrange(nregs)
            if rm == 4 and not kw.get("allow_rsp_rm"):
                rm = 0
            force = bitness == 64 and size == 1 and rng.random() < 0.5
            variants.append(_make(f"{name}/{size * 8} r", opcode, size=size, reg=reg, rm=rm,
                                  imm=_imm(imm_size, rng), force_rex=force, bitness=bitness,
                                  **{k: v for k, v in kw.items() if k != "allow_rsp_rm"}))
        for mem in _mem_shapes(rng, bitness):
            reg = rng.randrange(nregs)
            variants.append(_make(f"{name}/{size * 8} {mem[0]}", opcode, size=size, reg=reg, mem=mem,
                                  imm=_imm(imm_size, rng), bitness=bitness,
                                  **{k: v for k, v in kw.items() if k != "allow_rsp_rm"}))
        return variants

    alu = ["add", "or", "adc", "sbb", "and", "sub", "xor", "cmp"]
    for op in range(8):
        logic = alu[op] in ("or", "and", "xor")
        mask = (ARITH & ~AF) | DF if logic else ARITH | DF
        for size in _sizes(bitness):
            byte = size == 1
            forms += rm_variants(f"{alu[op]} rm,r", bytes([op * 8 + (0 if byte else 1)]), size, flag_mask=mask)
            forms += rm_variants(f"{alu[op]} r,rm", bytes([op * 8 + (2 if byte else 3)]), size, flag_mask=mask)
            isz = 1 if byte else min(size, 4)
            forms.append(_make(f"{alu[op]} acc,imm/{size * 8}", bytes([op * 8 + (4 if byte else 5)]), size=size,
                               reg=0, bitness=bitness, flag_mask=mask))
            forms[-1].code = forms[-1].code[:-1] + _imm(isz, rng)  # no ModRM: replace it by the imm
            vs = rm_variants(f"grp1 {alu[op]} rm,imm", bytes([0x80 if byte else 0x81]), size,
                             imm_size=isz, flag_mask=mask)
            if not byte:
                vs += rm_variants(f"grp1 {alu[op]} rm,imm8", b"\x83", size, imm_size=1, flag_mask=mask)
            for f in vs:
                f.code = _set_reg_field(f.code, op, 1)
            forms += vs
    for size in _sizes(bitness):
        byte = size == 1
        tmask = (ARITH & ~AF) | DF
        forms += rm_variants("test rm,r", bytes([0x84 if byte else 0x85]), size, flag_mask=tmask)
        vs = rm_variants("test rm,imm", bytes([0xF6 if byte else 0xF7]), size, imm_size=1 if byte else min(size, 4),
                         flag_mask=tmask)
        forms += [_with_code(f, _set_reg_field(f.code, 0, 1)) for f in vs]
        forms.append(_make(f"test acc,imm/{size * 8}", bytes([0xA8 if byte else 0xA9]), size=size, reg=0,
                           bitness=bitness, flag_mask=tmask))
        forms[-1].code = forms[-1].code[:-1] + _imm(1 if byte else min(size, 4), rng)
        # MOV
        forms += rm_variants("mov rm,r", bytes([0x88 if byte else 0x89]), size, allow_rsp_rm=True)
        forms += rm_variants("mov r,rm", bytes([0x8A if byte else 0x8B]), size)
        vs = rm_variants("mov rm,imm", bytes([0xC6 if byte else 0xC7]), size, imm_size=1 if byte else min(size, 4))
        forms += [_with_code(f, _set_reg_field(f.code, 0, 1)) for f in vs]
        r = rng.randrange(nregs)
        forms.append(_make(f"mov r,imm/{size * 8}", bytes([(0xB0 if byte else 0xB8) + (r & 7)]), size=size, reg=0,
                           bitness=bitness))
        forms[-1].code = _strip_modrm_add_b(forms[-1].code, r, size, bitness) + _imm(size, rng)
        # moffs
        asz = 8 if bitness == 64 else 4
        for opc in ((0xA0, 0xA2) if byte else (0xA1, 0xA3)):
            addr = WINDOW + 0x100 + rng.randrange(0x100)
            pre = (b"\x66" if size == 2 else b"") + (b"\x48" if size == 8 else b"")
            forms.append(Form(f"mov moffs {opc:#x}/{size * 8}", pre + bytes([opc]) + addr.to_bytes(asz, "little"),
                              bitness))
        # MOVS / STOS (with and without REP)
        for opc, nm in (((0xA4 if byte else 0xA5), "movs"), ((0xAA if byte else 0xAB), "stos")):
            for rep in (b"", b"\xf3"):
                pre = rep + (b"\x66" if size == 2 else b"") + (b"\x48" if size == 8 else b"")
                forms.append(Form(f"{'rep ' if rep else ''}{nm}/{size * 8}", pre + bytes([opc]), bitness,
                                  {6: WINDOW + 0x100 + rng.randrange(0x40), 7: WINDOW + 0x200 + rng.randrange(0x40)},
                                  string=True))
    for size in [s for s in _sizes(bitness) if s > 1]:
        # MOVZX / MOVSX / MOVSXD
        for opc, nm in ((0xB6, "movzx8"), (0xB7, "movzx16"), (0xBE, "movsx8"), (0xBF, "movsx16")):
            if opc in (0xB7, 0xBF) and size == 2:
                continue
            forms += rm_variants(f"{nm}", bytes([0x0F, opc]), size)
        if bitness == 64:
            forms += rm_variants("movsxd", b"\x63", 8)
        # BT
        for f in rm_variants("bt rm,r", b"\x0f\xa3", size, flag_mask=CF | DF):
            reg = _reg_field(f.code, 2)
            if not f.name.endswith(" r"):
                if reg in f.fixed:
                    continue
                f.fixed[reg] = ("bt", size)  # a bounded signed bit offset (memory forms)
            forms.append(f)
        vs = rm_variants("bt rm,imm", b"\x0f\xba", size, imm_size=1, flag_mask=CF | DF)
        for f in vs:
            f.code = _set_reg_field(f.code, 4, 2)
        forms += vs
        # POPCNT, MOVBE
        forms += rm_variants("popcnt", b"\x0f\xb8", size, prefixes=b"\xf3")
        for opc, nm in ((0xF0, "movbe load"), (0xF1, "movbe store")):
            for mem in _mem_shapes(rng, bitness):
                forms.append(_make(f"{nm}/{size * 8} {mem[0]}", bytes([0x0F, 0x38, opc]), size=size,
                                   reg=rng.randrange(nregs), mem=mem, bitness=bitness))
    # PUSH / POP
    stack_sizes = (8, 2) if bitness == 64 else (4, 2)
    for size in stack_sizes:
        pre = b"\x66" if size == 2 else b""
        for _ in range(3):
            r = rng.randrange(nregs)
            rex = bytes([0x41]) if r >= 8 else b""
            forms.append(Form(f"push r/{size * 8}", pre + rex + bytes([0x50 + (r & 7)]), bitness, {4: BASE_VALUE}))
            r = rng.randrange(nregs)
            rex = bytes([0x41]) if r >= 8 else b""
            forms.append(Form(f"pop r/{size * 8}", pre + rex + bytes([0x58 + (r & 7)]), bitness, {4: BASE_VALUE}))
        forms.append(Form(f"push imm8/{size * 8}", pre + b"\x6a" + _imm(1, rng), bitness, {4: BASE_VALUE}))
        forms.append(Form(f"push imm/{size * 8}", pre + b"\x68" + _imm(2 if size == 2 else 4, rng), bitness,
                          {4: BASE_VALUE}))
        for f in rm_variants("push rm", b"\xff", 4 if size != 2 else 2, allow_rsp_rm=True):
            f.code = _set_reg_field(f.code, 6, 1)
            if size == 2 and bitness == 64:
                pass
            f.fixed.setdefault(4, BASE_VALUE)
            f.name = f.name.replace("/32", f"/{size * 8}")
            forms.append(f)
        for f in rm_variants("pop rm", b"\x8f", 4 if size != 2 else 2, allow_rsp_rm=True):
            f.code = _set_reg_field(f.code, 0, 1)
            f.fixed.setdefault(4, BASE_VALUE)
            f.name = f.name.replace("/32", f"/{size * 8}")
            forms.append(f)
    # CMPXCHG8B / CMPXCHG16B
    for wide in ((False, True) if bitness == 64 else (False,)):
        for base in (3, 6, 9 if bitness == 64 else 7):
            disp = rng.randrange(-4, 4) * 16
            code, fixed = encode(b"\x0f\xc7", size=8 if wide else 4, reg=1, mem=("bd", base, disp),
                                 bitness=bitness)
            forms.append(Form(f"cmpxchg{16 if wide else 8}b", code, bitness, fixed, mem_addr=BASE_VALUE + disp,
                              cmpxchg=16 if wide else 8))
    return forms


def _modrm_pos(code: bytes, opcode_len: int) -> int:
    i = 0
    while code[i] in (0x66, 0x67, 0xF2, 0xF3):
        i += 1
    if 0x40 <= code[i] <= 0x4F:
        i += 1
    return i + opcode_len


def _set_reg_field(code: bytes, value: int, opcode_len: int) -> bytes:
    """Put a /digit into ModRM.reg (and clear REX.R)."""
    pos = _modrm_pos(code, opcode_len)
    b = bytearray(code)
    b[pos] = (b[pos] & ~0x38) | value << 3
    rexpos = pos - opcode_len - 1
    if rexpos >= 0 and 0x40 <= b[rexpos] <= 0x4F:
        b[rexpos] &= ~0x04
    return bytes(b)


def _with_code(form: Form, code: bytes) -> Form:
    form.code = code
    return form


def _reg_field(code: bytes, opcode_len: int):
    pos = _modrm_pos(code, opcode_len)
    reg = (code[pos] >> 3) & 7
    rexpos = pos - opcode_len - 1
    if rexpos >= 0 and 0x40 <= code[rexpos] <= 0x4F and code[rexpos] & 4:
        reg |= 8
    return reg


def _strip_modrm_add_b(code: bytes, r: int, size: int, bitness: int) -> bytes:
    """Turn the encoder's ``opcode ModRM`` into ``[REX] opcode+r`` (B0-BF forms)."""
    pfx = b"\x66" if size == 2 else b""
    rex = 0x40 | (8 if size == 8 else 0) | (1 if r >= 8 else 0)
    opc = code[-2]
    return pfx + (bytes([rex]) if rex != 0x40 else b"") + bytes([opc])


FORMS_64 = build_forms(64)
FORMS_32 = build_forms(32, seed=2)


def _value(rng, bits=64):
    c = rng.random()
    if c < 0.3:
        v = rng.choice(EDGE)
    elif c < 0.45:
        v = rng.randrange(0, 0x100)
    else:
        v = rng.getrandbits(64)
    return v & ((1 << bits) - 1)


def random_state(form: Form, rng: random.Random):
    """(regs uint64[18], window bytes) for one case of a form."""
    bits = 64 if form.bitness == 64 else 32
    regs = np.zeros(18, np.uint64)
    for i in range(16 if form.bitness == 64 else 8):
        regs[i] = _value(rng, bits)
    regs[4] = BASE_VALUE
    for r, v in form.fixed.items():
        if isinstance(v, tuple):  # a bounded signed bit offset for BT with memory
            size = v[1]
            off = rng.randrange(-0x300, 0x300) & ((1 << (8 * size)) - 1)
            high = regs[r] & np.uint64(~((1 << (8 * size)) - 1) & ((1 << 64) - 1)) if size < 4 else 0
            regs[r] = np.uint64(off) | np.uint64(high)
        else:
            regs[r] = v
    flags = 0x2
    for bit in (CF, PF, AF, ZF, SF, OF):
        if rng.random() < 0.5:
            flags |= bit
    if form.string:
        regs[1] = rng.randrange(0, 9)
        if rng.random() < 0.5:
            flags |= DF
    regs[17] = flags
    regs[16] = CODE
    if rng.random() < 0.3:
        window = bytes([rng.choice(PATTERNS)]) * WINDOW_SIZE
    else:
        window = rng.randbytes(WINDOW_SIZE)
    if form.cmpxchg and rng.random() < 0.5:
        off = form.mem_addr - WINDOW
        lo = int.from_bytes(window[off:off + 8], "little")
        if form.cmpxchg == 16:
            regs[0] = lo
            regs[2] = int.from_bytes(window[off + 8:off + 16], "little")
        else:
            regs[0] = (lo & 0xFFFFFFFF) | (int(regs[0]) & ~0xFFFFFFFF & ((1 << 64) - 1))
            regs[2] = (lo >> 32) | (int(regs[2]) & ~0xFFFFFFFF & ((1 << 64) - 1))
    return regs, window


def run_hvjit(form: Form, regs: np.ndarray, window: bytes):
    mem = np.zeros(MEM_SIZE, np.uint8)
    mem[WINDOW:WINDOW + WINDOW_SIZE] = np.frombuffer(window, np.uint8)
    rec = decode(form.code, form.bitness, CODE)
    out = regs.copy()
    status, info = E.emulate(rec, out, mem, bitness=form.bitness)
    return status, out, mem[WINDOW:WINDOW + WINDOW_SIZE].tobytes()


# ---- unicorn ---------------------------------------------------------------------------------

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X  # noqa: E402

_UC_REGS = [X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX, X.UC_X86_REG_RSP,
            X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI] + [
    getattr(X, f"UC_X86_REG_R{i}") for i in range(8, 16)]
_UC_REGS32 = [X.UC_X86_REG_EAX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX, X.UC_X86_REG_EBX, X.UC_X86_REG_ESP,
              X.UC_X86_REG_EBP, X.UC_X86_REG_ESI, X.UC_X86_REG_EDI]


class Unicorn:
    def __init__(self, bitness):
        mode = unicorn.UC_MODE_64 if bitness == 64 else unicorn.UC_MODE_32
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        self.uc.ctl_set_cpu_model(X.UC_CPU_X86_EPYC)  # movbe, popcnt, cmpxchg16b
        self.uc.mem_map(0, MEM_SIZE)
        self.bitness = bitness
        self.code = None

    def run(self, form: Form, regs: np.ndarray, window: bytes):
        uc = self.uc
        if self.code != form.code:
            uc.mem_write(CODE, form.code + b"\xf4" * 16)
            self.code = form.code
        uc.mem_write(WINDOW, window)
        names = _UC_REGS if self.bitness == 64 else _UC_REGS32
        for i, r in enumerate(names):
            uc.reg_write(r, int(regs[i]))
        uc.reg_write(X.UC_X86_REG_EFLAGS, int(regs[17]))
        pc = X.UC_X86_REG_RIP if self.bitness == 64 else X.UC_X86_REG_EIP
        try:
            uc.emu_start(CODE, CODE + len(form.code), count=100000)
        except unicorn.UcError as e:
            return str(e), None, None
        out = np.zeros(18, np.uint64)
        for i, r in enumerate(names):
            out[i] = uc.reg_read(r)
        out[16] = uc.reg_read(pc)
        out[17] = uc.reg_read(X.UC_X86_REG_EFLAGS)
        return None, out, bytes(uc.mem_read(WINDOW, WINDOW_SIZE))


def compare(form: Form, got, want, bits):
    """A list of differences between two (regs, window) results."""
    diffs = []
    mask = (1 << bits) - 1
    for i in range(17):
        if int(got[0][i]) & mask != int(want[0][i]) & mask:
            diffs.append(f"{E.REG_NAMES[i]} {int(got[0][i]):#x} != {int(want[0][i]):#x}")
    fm = form.flag_mask
    if int(got[0][17]) & fm != int(want[0][17]) & fm:
        diffs.append(f"rflags {int(got[0][17]) & fm:#x} != {int(want[0][17]) & fm:#x}")
    if got[1] != want[1]:
        diffs.append("memory window differs")
    return diffs


def _agreement(forms, cases, bitness):
    uc = Unicorn(bitness)
    rng = random.Random(1234 + bitness)
    total = 0
    failures = []
    per_class = {}
    for form in forms:
        rec = decode(form.code, bitness, CODE)
        assert rec["status"] == 0 and rec["length"] == len(form.code), (form.name, form.code.hex())
        for _ in range(cases):
            regs, window = random_state(form, rng)
            err, uregs, uwin = uc.run(form, regs, window)
            assert err is None, (form.name, form.code.hex(), err)
            status, hregs, hwin = run_hvjit(form, regs, window)
            total += 1
            key = form.name.split("/")[0]
            per_class[key] = per_class.get(key, 0) + 1
            if status != EmulateStatus.OK:
                failures.append((form.name, form.code.hex(), f"status {status.name}"))
                continue
            d = compare(form, (hregs, hwin), (uregs, uwin), 64 if bitness == 64 else 32)
            if d:
                failures.append((form.name, form.code.hex(), [hex(int(x)) for x in regs], d))
    return total, failures, per_class


CASES = int(os.environ.get("HVJIT_EMULATE_CASES", "60"))


def test_forms_cover_every_class():
    names = {f.name.split(" ")[0].split("/")[0] for f in FORMS_64}
    for want in ("add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "grp1", "test", "mov", "movs",
                 "stos", "rep", "movzx8", "movsx16", "movsxd", "bt", "push", "pop", "popcnt", "movbe",
                 "cmpxchg8b", "cmpxchg16b"):
        assert want in names, want


def test_against_unicorn_64bit():
    total, failures, per_class = _agreement(FORMS_64, CASES, 64)
    print(f"\n64-bit: {len(FORMS_64)} forms, {total} cases, {total - len(failures)} agree")
    assert total == CASES * len(FORMS_64)
    assert not failures, failures[:5]


def test_against_unicorn_32bit():
    total, failures, per_class = _agreement(FORMS_32, CASES, 32)
    print(f"\n32-bit: {len(FORMS_32)} forms, {total} cases, {total - len(failures)} agree")
    assert not failures, failures[:5]


# ---- edge cases, hostile records, bounds ---------------------------------------------------


def _one(code, regs=None, mem=None, bitness=64, **kw):
    regs = np.zeros(18, np.uint64) if regs is None else regs
    regs[16] = CODE if regs[16] == 0 else regs[16]
    mem = np.zeros(MEM_SIZE, np.uint8) if mem is None else mem
    status, info = E.emulate(decode(code, bitness, int(regs[16])), regs, mem, bitness=bitness, **kw)
    return status, info, regs, mem


def test_high_byte_registers_and_zero_extension():
    regs = np.zeros(18, np.uint64)
    regs[0] = 0x1111111111111111
    regs[3] = 0x2222222222223344
    st, _, regs, _ = _one(bytes.fromhex("88fc"), regs)  # mov ah, bh
    assert st == EmulateStatus.OK and regs[0] == 0x1111111111113311
    st, _, regs, _ = _one(bytes.fromhex("4088fc"), regs)  # mov spl, dil (REX)
    assert regs[4] == int(regs[7]) & 0xFF
    regs[1] = 0xFFFFFFFFFFFFFFFF
    st, _, regs, _ = _one(bytes.fromhex("01c1"), regs)  # add ecx, eax: 32-bit write zero-extends
    assert st == EmulateStatus.OK and regs[1] == 0x11113310 and regs[16] == CODE + 2 + 3 + 2


def test_cmpxchg16b_misaligned_is_gp():
    regs = np.zeros(18, np.uint64)
    regs[3] = WINDOW + 8
    st, info, regs2, _ = _one(bytes.fromhex("480fc70b"), regs)  # cmpxchg16b [rbx]
    assert st == EmulateStatus.EXCEPTION and info[0] == 13 and regs2[16] == CODE


def test_memory_outside_the_array_is_reported_not_read():
    regs = np.zeros(18, np.uint64)
    regs[3] = MEM_SIZE - 2
    st, _, _, _ = _one(bytes.fromhex("8b03"), regs)  # mov eax, [rbx]: 2 bytes short
    assert st == EmulateStatus.MEMORY
    regs[3] = (1 << 64) - 2
    st, _, _, _ = _one(bytes.fromhex("8b03"), regs)
    assert st == EmulateStatus.MEMORY


def test_unsupported_and_bad_records():
    st, *_ = _one(bytes.fromhex("0f05"))  # syscall
    assert st == EmulateStatus.UNSUPPORTED
    st, *_ = _one(bytes.fromhex("ff"))  # truncated
    assert st == EmulateStatus.BAD_RECORD
    rec = decode(bytes.fromhex("8b03"), 64, CODE)
    for field_, value in (("reg", 40), ("rm", 200), ("base_reg", 60), ("index_reg", 33), ("segment", 9),
                          ("operand_size", 3), ("address_size", 5), ("scale", 3)):
        bad = rec.copy()
        bad[field_] = value
        regs = np.zeros(18, np.uint64)
        regs[16] = CODE
        st, _ = E.emulate(bad, regs, np.zeros(16, np.uint8))
        assert st == EmulateStatus.BAD_RECORD, field_


def test_rep_stos_iterates_and_rep_with_zero_count_only_advances():
    regs = np.zeros(18, np.uint64)
    regs[0], regs[1], regs[7] = 0xAB, 5, WINDOW
    st, info, regs, mem = _one(bytes.fromhex("f3aa"), regs)
    assert st == EmulateStatus.OK and info[2] == 5 and bytes(mem[WINDOW:WINDOW + 6]) == b"\xab" * 5 + b"\0"
    assert regs[1] == 0 and regs[7] == WINDOW + 5 and regs[16] == CODE + 2
    st, info, regs2, _ = _one(bytes.fromhex("f3aa"), regs)
    assert st == EmulateStatus.OK and regs2[16] == CODE + 4


def test_random_bytes_never_crash():
    rng = random.Random(7)
    mem = np.zeros(0x100, np.uint8)
    for _ in range(3000):
        code = rng.randbytes(15)
        for bitness in (16, 32, 64):
            regs = np.array([rng.getrandbits(64) for _ in range(18)], np.uint64)
            st, _ = E.emulate(decode(code, bitness, 0x10), regs, mem, bitness=bitness, max_iterations=4)
            assert st in tuple(EmulateStatus)


_BOUNDSCHECK_SCRIPT = """
import random, numpy as np
from tests.unit.test_emulate import FORMS_64, FORMS_32, random_state, run_hvjit, _one
from hvjit.kernels import emulate as E
from hvjit.kernels.decode import decode
rng = random.Random(5)
n = 0
for forms in (FORMS_64[::7], FORMS_32[::9]):
    for form in forms:
        regs, window = random_state(form, rng)
        status, _, _ = run_hvjit(form, regs, window)
        assert status == E.EmulateStatus.OK, form.name
        n += 1
mem = np.zeros(0x40, np.uint8)
for _ in range(500):
    code = rng.randbytes(15)
    regs = np.array([rng.getrandbits(64) for _ in range(18)], np.uint64)
    E.emulate(decode(code, 64, 0), regs, mem, max_iterations=4)
print("ok", n)
"""


def test_under_numba_boundscheck():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", PYTHONPATH=str(root),
               HVJIT_CACHE_DIR=os.environ.get("HVJIT_BOUNDSCHECK_CACHE", "/tmp/hvjit-boundscheck-cache"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_BOUNDSCHECK_SCRIPT)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
