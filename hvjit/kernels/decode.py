"""Table-driven x86 instruction decoder (16/32/64-bit modes), after bhyve's ``struct vie``.

One instruction becomes one record of ``VIE_DTYPE``: prefixes, REX/VEX/EVEX/XOP fields,
opcode map and byte, ModRM/SIB, the memory operand (base, index, scale, displacement),
immediates, operand and address sizes, and an ``OpClass`` a VM-exit handler dispatches on.

The decoder is a *length and operand* decoder, permissive about semantics: it flags as
INVALID only what has no defined length (undefined opcodes, opcodes removed from 64-bit
mode, malformed VEX/EVEX/XOP prefixes, more than 15 bytes). A CPU that exits to the
hypervisor has already accepted the instruction, so rejecting e.g. a LOCK prefix on a
non-lockable instruction is the emulator's business, not the decoder's.

Numba does no bounds checking: every input byte is read through an explicit check against
the buffer end and the 15-byte limit, so a short or hostile buffer gives TRUNCATED/INVALID
and never an over-read.
"""

from __future__ import annotations

import time
from enum import IntEnum

import numpy as np

from hvjit.kernels._jit import kernel
from hvjit.kernels.decode_tables import (
    F_BYTE,
    F_D64,
    F_F64,
    F_I64,
    F_INVALID,
    F_LOCKABLE,
    F_MEMORY_ONLY,
    F_MODRM,
    F_W32,
    FLAGS,
    GROUP,
    GROUP_0F01,
    GROUP_CLASS,
    GROUP_FLAGS,
    IMM_B,
    IMM_BB,
    IMM_D,
    IMM_ENTER,
    IMM_GRP3,
    IMM_MASK,
    IMM_MOFFS,
    IMM_NONE,
    IMM_PTR,
    IMM_REL8,
    IMM_RELZ,
    IMM_SHIFT,
    IMM_V,
    IMM_W,
    IMM_Z,
    MAP_0F,
    MAP_0F38,
    MAP_0F3A,
    MAP_3DNOW,
    MAP_ONE_BYTE,
    OPCLASS,
    REGISTER_FORMS_0F01,
    VEX_MAP1_HAS_IMM8,
    OpClass,
)

__all__ = [
    "VIE_DTYPE",
    "DecodeStatus",
    "OpClass",
    "VexKind",
    "Segment",
    "REG_NONE",
    "REG_RIP",
    "MAX_INSTRUCTION_LENGTH",
    "decode_one",
    "decode_buffer_kernel",
    "decode_buffer",
    "decode",
    "bench_decode",
]

MAX_INSTRUCTION_LENGTH = 15
REG_NONE = -1
REG_RIP = 16  # base_reg of a RIP-relative operand (disp is relative to the next instruction)


class DecodeStatus(IntEnum):
    OK = 0
    TRUNCATED = 1  # the buffer ends inside the instruction
    INVALID = 2  # undefined encoding, or longer than 15 bytes


class VexKind(IntEnum):
    NONE = 0
    VEX2 = 2
    VEX3 = 3
    EVEX = 4
    XOP = 5


class Segment(IntEnum):
    """Segment override prefix (``segment`` is -1 without one)."""

    ES = 0
    CS = 1
    SS = 2
    DS = 3
    FS = 4
    GS = 5


VIE_DTYPE = np.dtype(
    [
        ("address", np.uint64),
        ("disp", np.int64),  # sign-extended (EVEX disp8 already scaled by N); moffs unsigned
        ("imm", np.int64),  # sign-extended from imm_bytes; far offset; enter size
        ("imm2", np.int64),  # enter nesting level; far selector; second SSE4a imm8
        ("length", np.uint8),
        ("status", np.uint8),  # DecodeStatus
        ("lock", np.uint8),
        ("rep", np.uint8),  # F3
        ("repne", np.uint8),  # F2
        ("opsize_prefix", np.uint8),  # 66
        ("addrsize_prefix", np.uint8),  # 67
        ("segment", np.int8),  # Segment or -1
        ("rex", np.uint8),  # the REX byte that reached the opcode, 0 if none
        ("rex_w", np.uint8),  # W/R/X/B from REX, VEX, EVEX or XOP
        ("rex_r", np.uint8),
        ("rex_x", np.uint8),
        ("rex_b", np.uint8),
        ("vex", np.uint8),  # VexKind
        ("vex_vvvv", np.uint8),  # un-inverted; 0-31 with EVEX V'
        ("vex_l", np.uint8),  # VEX.L, or EVEX L'L
        ("vex_pp", np.uint8),  # 0 none, 1 66, 2 F3, 3 F2
        ("vex_map", np.uint8),  # mmmmm as encoded
        ("evex_aaa", np.uint8),
        ("evex_z", np.uint8),
        ("evex_b", np.uint8),
        ("opcode_map", np.uint8),  # 0 1-byte, 1 0F, 2 0F38, 3 0F3A, 4 3DNow!, 5/6 EVEX, 8-10 XOP
        ("opcode", np.uint8),
        ("opcode_offset", np.uint8),  # offset of the opcode byte from the instruction start
        ("has_modrm", np.uint8),
        ("modrm", np.uint8),
        ("mod", np.uint8),
        ("reg", np.uint8),  # ModRM.reg extended by REX.R (and EVEX R')
        ("rm", np.uint8),  # ModRM.rm extended by REX.B (and EVEX X for registers)
        ("has_sib", np.uint8),
        ("sib", np.uint8),
        ("scale", np.uint8),  # 1, 2, 4, 8 from SIB.ss (kept even without an index), else 1
        ("index_reg", np.int8),  # REG_NONE, GPR 0-15, or vector 0-31 for VSIB
        ("base_reg", np.int8),  # REG_NONE, GPR 0-15, REG_RIP
        ("disp_bytes", np.uint8),
        ("imm_bytes", np.uint8),
        ("imm2_bytes", np.uint8),
        ("operand_size", np.uint8),  # bytes: 1, 2, 4, 8
        ("address_size", np.uint8),  # bytes: 2, 4, 8
        ("op_class", np.uint8),  # OpClass
    ]
)

_OK = np.uint8(DecodeStatus.OK)
_TRUNCATED = np.uint8(DecodeStatus.TRUNCATED)
_INVALID = np.uint8(DecodeStatus.INVALID)

# 16-bit addressing (SDM Table 2-1): base and index registers for ModRM.rm 0-7.
_BASE16 = np.array([3, 3, 5, 5, 6, 7, 5, 3], dtype=np.int8)  # bx bx bp bp si di bp bx
_INDEX16 = np.array([6, 7, 6, 7, -1, -1, -1, -1], dtype=np.int8)  # si di si di - - - -

_SEGMENT_OF_PREFIX = np.full(256, -1, dtype=np.int8)
_SEGMENT_OF_PREFIX[[0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65]] = [0, 1, 2, 3, 4, 5]

# Legacy prefix kinds, so the prefix loop is one table lookup per byte.
_PFX_NONE, _PFX_SEG, _PFX_66, _PFX_67, _PFX_LOCK, _PFX_REPNE, _PFX_REP = range(7)
_PREFIX_KIND = np.zeros(256, dtype=np.uint8)
_PREFIX_KIND[[0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65]] = _PFX_SEG
_PREFIX_KIND[0x66] = _PFX_66
_PREFIX_KIND[0x67] = _PFX_67
_PREFIX_KIND[0xF0] = _PFX_LOCK
_PREFIX_KIND[0xF2] = _PFX_REPNE
_PREFIX_KIND[0xF3] = _PFX_REP


@kernel
def _fail(out, out_index, address, status, length):
    """Store a record for an instruction that did not decode."""
    rec = out[out_index]
    rec["address"] = address
    rec["disp"] = 0
    rec["imm"] = 0
    rec["imm2"] = 0
    rec["length"] = length
    rec["status"] = status
    rec["lock"] = 0
    rec["rep"] = 0
    rec["repne"] = 0
    rec["opsize_prefix"] = 0
    rec["addrsize_prefix"] = 0
    rec["segment"] = -1
    rec["rex"] = 0
    rec["rex_w"] = 0
    rec["rex_r"] = 0
    rec["rex_x"] = 0
    rec["rex_b"] = 0
    rec["vex"] = 0
    rec["vex_vvvv"] = 0
    rec["vex_l"] = 0
    rec["vex_pp"] = 0
    rec["vex_map"] = 0
    rec["evex_aaa"] = 0
    rec["evex_z"] = 0
    rec["evex_b"] = 0
    rec["opcode_map"] = 0
    rec["opcode"] = 0
    rec["opcode_offset"] = 0
    rec["has_modrm"] = 0
    rec["modrm"] = 0
    rec["mod"] = 0
    rec["reg"] = 0
    rec["rm"] = 0
    rec["has_sib"] = 0
    rec["sib"] = 0
    rec["scale"] = 1
    rec["index_reg"] = -1
    rec["base_reg"] = -1
    rec["disp_bytes"] = 0
    rec["imm_bytes"] = 0
    rec["imm2_bytes"] = 0
    rec["operand_size"] = 0
    rec["address_size"] = 0
    rec["op_class"] = 0
    return length


@kernel
def _out_of_bytes(out, out_index, address, start, needed_end, n):
    """The instruction needs bytes up to needed_end: too long, or the buffer is short."""
    if needed_end - start > MAX_INSTRUCTION_LENGTH:
        return _fail(out, out_index, address, _INVALID, 1)
    return _fail(out, out_index, address, _TRUNCATED, n - start)


@kernel
def _read_le(buf, pos, nbytes):
    """Little-endian unsigned read of nbytes (caller has checked the bounds)."""
    value = np.uint64(0)
    for k in range(nbytes):
        value |= np.uint64(buf[pos + k]) << np.uint64(8 * k)
    return value


@kernel
def _sign_extend(value, nbytes):
    if nbytes == 0:
        return np.int64(0)
    if nbytes >= 8:
        return np.int64(value)
    shift = np.uint64(64 - 8 * nbytes)
    return np.int64(value << shift) >> np.int64(shift)


@kernel
def _is_vsib(vex, opcode_map, opcode):
    """Gathers/scatters: the SIB index is a vector register (Intel SDM 2.3.12)."""
    if opcode_map != MAP_0F38 or vex == 0 or vex == 5:
        return False
    if 0x90 <= opcode <= 0x93:
        return True
    return vex == 4 and (0xA0 <= opcode <= 0xA3 or opcode == 0xC6 or opcode == 0xC7)


@kernel
def _evex_disp8_scale(opcode_map, opcode, pp, w, vector_length, broadcast):
    """N of the EVEX compressed disp8*N (SDM 2.7.5), approximated from the common tuple
    types: broadcast -> element size, scalar moves/arithmetic -> element size,
    otherwise the full vector length."""
    element = 8 if w else 4
    if broadcast:
        return element
    if opcode_map == MAP_0F and pp >= 2:
        # F3/F2 scalar forms: movss/movsd, arithmetic, conversions, comparisons (Tuple1)
        if opcode in (0x10, 0x11, 0x51, 0x58, 0x59, 0x5C, 0x5D, 0x5E, 0x5F, 0xC2):
            return 4 if pp == 2 else 8
        if opcode in (0x2A, 0x2C, 0x2D, 0x7B, 0x79, 0x78, 0x7A):
            return element if opcode == 0x2A or opcode == 0x7B else (4 if pp == 2 else 8)
    if opcode_map == MAP_0F and pp == 0 and opcode in (0x2E, 0x2F):
        return 4  # ucomiss/comiss
    if opcode_map == MAP_0F and pp == 1 and opcode in (0x2E, 0x2F):
        return 8  # ucomisd/comisd
    if opcode_map == MAP_0F and pp == 1 and opcode in (0x6E, 0x7E):
        return element  # movd/movq
    if opcode_map == MAP_0F and pp == 2 and opcode == 0x7E:
        return 8  # movq xmm, m64
    if opcode_map == MAP_0F and pp == 1 and opcode == 0xD6:
        return 8
    if opcode_map == MAP_0F38 and opcode in (0x18, 0x58, 0x78):
        return 4  # vbroadcastss / vpbroadcastd / vpbroadcastb? (Tuple1 scalar)
    if opcode_map == MAP_0F38 and opcode in (0x19, 0x59):
        return 8
    if opcode_map == MAP_0F38 and opcode == 0x79:
        return 2
    if opcode_map == MAP_0F38 and opcode == 0x7A:
        return 1
    return 16 << vector_length


# OpClass values as plain ints: Numba cannot unify IntEnum members with table bytes.
_OC_CLFLUSHOPT = int(OpClass.CLFLUSHOPT)
_OC_CLWB = int(OpClass.CLWB)
_OC_CMPXCHG16B = int(OpClass.CMPXCHG16B)
_OC_CMPXCHG8B = int(OpClass.CMPXCHG8B)
_OC_CRC32 = int(OpClass.CRC32)
_OC_FSGSBASE = int(OpClass.FSGSBASE)
_OC_GROUP1 = int(OpClass.GROUP1)
_OC_LFENCE = int(OpClass.LFENCE)
_OC_MFENCE = int(OpClass.MFENCE)
_OC_OTHER = int(OpClass.OTHER)
_OC_PAUSE = int(OpClass.PAUSE)
_OC_RDPID = int(OpClass.RDPID)
_OC_RDRAND = int(OpClass.RDRAND)
_OC_RDSEED = int(OpClass.RDSEED)
_OC_SFENCE = int(OpClass.SFENCE)
_OC_SSE_AVX = int(OpClass.SSE_AVX)
_OC_XCHG = int(OpClass.XCHG)


@kernel
def decode_one(buf, offset, bitness, address, out, out_index):
    """Decode the instruction at buf[offset] into out[out_index]; return its length.

    address is the linear address of buf[offset] (RIP-relative operands are relative to
    address + length). The return value is the number of bytes the record covers: the
    instruction length, 1 for INVALID, the bytes left for TRUNCATED (0 if offset is at or
    past the end). Returns -1 without writing if out_index is outside out.
    """
    if out_index < 0 or out_index >= out.shape[0]:
        return -1
    n = buf.shape[0]
    if offset < 0 or offset >= n:
        return _fail(out, out_index, address, _TRUNCATED, 0)
    start = offset
    limit = min(n, start + MAX_INSTRUCTION_LENGTH)
    mode64 = bitness == 64

    lock = 0
    rep = 0
    repne = 0
    last_rep = 0  # the last of F2/F3 is the mandatory prefix
    opsize_prefix = 0
    addrsize_prefix = 0
    segment = -1
    rex = 0
    pos = start
    # Legacy prefixes and REX: a REX counts only when the opcode follows it directly.
    while True:
        if pos >= limit:
            return _out_of_bytes(out, out_index, address, start, pos + 1, n)
        b = buf[pos]
        kind = _PREFIX_KIND[b]
        if kind == _PFX_NONE:
            if mode64 and (b & 0xF0) == 0x40:
                rex = b
                pos += 1
                continue
            break
        rex = 0
        if kind == _PFX_SEG:
            segment = _SEGMENT_OF_PREFIX[b]
        elif kind == _PFX_66:
            opsize_prefix = 1
        elif kind == _PFX_67:
            addrsize_prefix = 1
        elif kind == _PFX_LOCK:
            lock = 1
        elif kind == _PFX_REPNE:
            repne = 1
            last_rep = 0xF2
        else:
            rep = 1
            last_rep = 0xF3
        pos += 1

    rex_w = (rex >> 3) & 1
    rex_r = (rex >> 2) & 1
    rex_x = (rex >> 1) & 1
    rex_b = rex & 1
    r_prime = 0  # EVEX R' (reg bit 4)
    vex = 0
    vex_vvvv = 0
    vex_l = 0
    vex_pp = 0
    vex_map = 0
    evex_aaa = 0
    evex_z = 0
    evex_b = 0
    evex_v_prime = 0
    opcode_map = MAP_ONE_BYTE
    three_dnow = False
    b = buf[pos]

    if b == 0x0F:
        pos += 1
        if pos >= limit:
            return _out_of_bytes(out, out_index, address, start, pos + 1, n)
        b = buf[pos]
        if b == 0x38 or b == 0x3A:
            opcode_map = MAP_0F38 if b == 0x38 else MAP_0F3A
            pos += 1
            if pos >= limit:
                return _out_of_bytes(out, out_index, address, start, pos + 1, n)
            b = buf[pos]
        elif b == 0x0F:
            opcode_map = MAP_3DNOW
            three_dnow = True
        else:
            opcode_map = MAP_0F
    elif b == 0xC4 or b == 0xC5 or b == 0x62 or b == 0x8F:
        # VEX/EVEX/XOP or LES/LDS/BOUND/POP: decided by the next byte.
        if pos + 1 >= limit:
            # Both readings (prefix or legacy opcode with ModRM) need the next byte.
            return _out_of_bytes(out, out_index, address, start, pos + 2, n)
        p0 = buf[pos + 1]
        if b == 0x8F:
            is_extended = (p0 & 0x1F) >= 8
        else:
            is_extended = mode64 or (p0 >> 6) == 3
        if is_extended:
            if opsize_prefix or last_rep != 0 or lock or rex != 0:
                return _fail(out, out_index, address, _INVALID, 1)
            if b == 0xC5:
                vex = 2
                vex_map = 1
                rex_r = 1 - (p0 >> 7)
                rex_x = 0
                rex_b = 0
                rex_w = 0
                vex_vvvv = (~p0 >> 3) & 0xF
                vex_l = (p0 >> 2) & 1
                vex_pp = p0 & 3
                pos += 2
            elif b == 0xC4 or b == 0x8F:
                if pos + 2 >= limit:
                    return _out_of_bytes(out, out_index, address, start, pos + 3, n)
                p1 = buf[pos + 2]
                vex = 3 if b == 0xC4 else 5
                vex_map = p0 & 0x1F
                if b == 0xC4 and (vex_map == 0 or vex_map > 3):
                    return _fail(out, out_index, address, _INVALID, 1)
                if b == 0x8F and vex_map > 10:
                    return _fail(out, out_index, address, _INVALID, 1)
                rex_r = 1 - (p0 >> 7)
                rex_x = 1 - ((p0 >> 6) & 1)
                rex_b = 1 - ((p0 >> 5) & 1)
                rex_w = p1 >> 7
                vex_vvvv = (~p1 >> 3) & 0xF
                vex_l = (p1 >> 2) & 1
                vex_pp = p1 & 3
                pos += 3
            else:
                if pos + 3 >= limit:
                    return _out_of_bytes(out, out_index, address, start, pos + 4, n)
                p1 = buf[pos + 2]
                p2 = buf[pos + 3]
                vex = 4
                vex_map = p0 & 7
                # P0 bit 3 must be 0, P1 bit 2 must be 1; maps 1-3 and 5-6 exist.
                if (p0 & 0x08) != 0 or (p1 & 0x04) == 0 or vex_map == 0 or vex_map == 4 or vex_map == 7:
                    return _fail(out, out_index, address, _INVALID, 1)
                rex_r = 1 - (p0 >> 7)
                rex_x = 1 - ((p0 >> 6) & 1)
                rex_b = 1 - ((p0 >> 5) & 1)
                r_prime = 1 - ((p0 >> 4) & 1)
                rex_w = p1 >> 7
                evex_v_prime = 1 - ((p2 >> 3) & 1)
                vex_vvvv = ((~p1 >> 3) & 0xF) | (evex_v_prime << 4)
                vex_pp = p1 & 3
                evex_z = p2 >> 7
                vex_l = (p2 >> 5) & 3
                evex_b = (p2 >> 4) & 1
                evex_aaa = p2 & 7
                pos += 4
            if not mode64:
                # Outside 64-bit mode the inverted R/X/B (and EVEX R'/V') bits are ignored.
                rex_r = 0
                rex_x = 0
                rex_b = 0
                r_prime = 0
            opcode_map = vex_map
            if pos >= limit:
                return _out_of_bytes(out, out_index, address, start, pos + 1, n)
            b = buf[pos]

    opcode = b
    opcode_offset = pos - start
    pos += 1

    # Table lookup: flags give ModRM presence, immediate kind and mode rules.
    imm_kind = IMM_NONE
    has_modrm = 1
    is_byte_op = False
    group = 0
    if vex == 0:
        flags = np.int64(FLAGS[opcode_map, opcode])
        if flags & F_INVALID:
            return _fail(out, out_index, address, _INVALID, 1)
        if mode64 and (flags & F_I64):
            return _fail(out, out_index, address, _INVALID, 1)
        has_modrm = 1 if flags & F_MODRM else 0
        imm_kind = (flags >> IMM_SHIFT) & IMM_MASK
        is_byte_op = (flags & F_BYTE) != 0
        if opcode_map == MAP_0F:
            if opcode == 0xB8 and last_rep != 0xF3:
                return _fail(out, out_index, address, _INVALID, 1)  # JMPE (IA-64 only)
            if opcode == 0x78 and (last_rep == 0xF2 or (last_rep == 0 and opsize_prefix)):
                imm_kind = IMM_BB  # SSE4a extrq/insertq with two imm8
    else:
        flags = 0
        if opcode_map == MAP_0F:
            has_modrm = 0 if (opcode == 0x77 and vex != 4) else 1
            if VEX_MAP1_HAS_IMM8[opcode]:
                imm_kind = IMM_B
        elif opcode_map == MAP_0F3A:
            imm_kind = IMM_B
        elif vex == 5:
            imm_kind = (FLAGS[opcode_map, opcode] >> IMM_SHIFT) & IMM_MASK

    # Operand and address sizes (SDM 2.2.1.2, Table 2-4 / 3-4).
    if mode64:
        address_size = 4 if addrsize_prefix else 8
        if vex != 0:
            operand_size = 8 if rex_w else 4
        elif rex_w:
            operand_size = 8
        elif opsize_prefix:
            operand_size = 2
        else:
            operand_size = 4
        if flags & F_D64 and not rex_w:
            operand_size = 2 if opsize_prefix else 8
        if flags & F_F64:
            operand_size = 8
        if flags & F_W32 and operand_size == 8:
            operand_size = 4
    elif bitness == 32:
        address_size = 2 if addrsize_prefix else 4
        operand_size = 2 if opsize_prefix else 4
    else:
        address_size = 4 if addrsize_prefix else 2
        operand_size = 4 if opsize_prefix else 2

    modrm = 0
    mod = 0
    reg = 0
    rm = 0
    has_sib = 0
    sib = 0
    scale = 1
    index_reg = -1
    base_reg = -1
    disp_bytes = 0
    if has_modrm:
        if pos >= limit:
            return _out_of_bytes(out, out_index, address, start, pos + 1, n)
        modrm = buf[pos]
        pos += 1
        mod = modrm >> 6
        reg3 = (modrm >> 3) & 7
        rm3 = modrm & 7
        reg = reg3 | (rex_r << 3) | (r_prime << 4)
        rm = rm3 | (rex_b << 3)
        if opcode_map == MAP_0F and vex == 0 and 0x20 <= opcode <= 0x23:
            mod = 3  # mov to/from CR/DR: the mod field is ignored, always registers
        if mod == 3:
            if vex == 4:
                rm |= rex_x << 4
        elif address_size == 2:
            if mod == 0 and rm3 == 6:
                disp_bytes = 2
            else:
                base_reg = _BASE16[rm3]
                index_reg = _INDEX16[rm3]
                disp_bytes = 1 if mod == 1 else (2 if mod == 2 else 0)
        else:
            if rm3 == 4:
                has_sib = 1
                if pos >= limit:
                    return _out_of_bytes(out, out_index, address, start, pos + 1, n)
                sib = buf[pos]
                pos += 1
                scale = 1 << (sib >> 6)
                index = ((sib >> 3) & 7) | (rex_x << 3)
                if _is_vsib(vex, opcode_map, opcode):
                    index_reg = index | (evex_v_prime << 4)
                elif index != 4:
                    index_reg = index
                base3 = sib & 7
                if base3 == 5 and mod == 0:
                    disp_bytes = 4
                else:
                    base_reg = base3 | (rex_b << 3)
            elif rm3 == 5 and mod == 0:
                disp_bytes = 4
                if mode64:
                    base_reg = REG_RIP
            else:
                base_reg = rm
            if mod == 1:
                disp_bytes = 1
            elif mod == 2:
                disp_bytes = 4

    # Group opcodes: validity, LOCK, immediates and operand sizes depend on ModRM.reg.
    reg3 = (modrm >> 3) & 7
    if vex == 0:
        group = GROUP[opcode_map, opcode]
        if group != 0 and has_modrm:
            group_flags = GROUP_FLAGS[group, reg3]
            if group_flags & F_INVALID:
                return _fail(out, out_index, address, _INVALID, 1)
            flags |= group_flags
            if opcode_map == MAP_ONE_BYTE and reg3 == 7 and (opcode == 0xC6 or opcode == 0xC7) and modrm != 0xF8:
                return _fail(out, out_index, address, _INVALID, 1)  # only xabort/xbegin
        if (flags & F_MEMORY_ONLY) and mod == 3:
            return _fail(out, out_index, address, _INVALID, 1)
        if lock and not ((flags & F_LOCKABLE) and mod != 3 and has_modrm):
            return _fail(out, out_index, address, _INVALID, 1)  # LOCK needs a memory destination
    if imm_kind == IMM_GRP3:
        imm_kind = (IMM_B if is_byte_op else IMM_Z) if reg3 < 2 else IMM_NONE
    if vex == 0 and opcode_map == MAP_ONE_BYTE and opcode == 0xFF and mode64:
        if reg3 == 2 or reg3 == 4:
            operand_size = 8  # near call/jmp
        elif reg3 == 6 and not rex_w:
            operand_size = 2 if opsize_prefix else 8  # push

    disp = np.int64(0)
    if imm_kind == IMM_MOFFS:
        disp_bytes = address_size
    if disp_bytes:
        if pos + disp_bytes > limit:
            return _out_of_bytes(out, out_index, address, start, pos + disp_bytes, n)
        raw = _read_le(buf, pos, disp_bytes)
        pos += disp_bytes
        if imm_kind == IMM_MOFFS:
            disp = np.int64(raw)  # an absolute address: zero-extended
        else:
            disp = _sign_extend(raw, disp_bytes)
            if vex == 4 and disp_bytes == 1:
                disp *= _evex_disp8_scale(opcode_map, opcode, vex_pp, rex_w, vex_l, evex_b)

    imm_bytes = 0
    imm2_bytes = 0
    if imm_kind == IMM_B or imm_kind == IMM_REL8:
        imm_bytes = 1
    elif imm_kind == IMM_W:
        imm_bytes = 2
    elif imm_kind == IMM_Z:
        imm_bytes = 2 if operand_size == 2 else 4
    elif imm_kind == IMM_V:
        imm_bytes = operand_size
    elif imm_kind == IMM_RELZ:
        imm_bytes = 2 if (operand_size == 2 and not mode64) else 4
    elif imm_kind == IMM_ENTER:
        imm_bytes = 2
        imm2_bytes = 1
    elif imm_kind == IMM_PTR:
        imm_bytes = 2 if operand_size == 2 else 4
        imm2_bytes = 2
    elif imm_kind == IMM_D:
        imm_bytes = 4
    elif imm_kind == IMM_BB:
        imm_bytes = 1
        imm2_bytes = 1
    if three_dnow:
        imm2_bytes = 1  # the opcode suffix, read below like an immediate
    total = pos + imm_bytes + imm2_bytes - start
    if total > MAX_INSTRUCTION_LENGTH:
        return _fail(out, out_index, address, _INVALID, 1)
    if start + total > n:
        return _fail(out, out_index, address, _TRUNCATED, n - start)
    imm = _sign_extend(_read_le(buf, pos, imm_bytes), imm_bytes)
    pos += imm_bytes
    imm2 = np.int64(0)
    if three_dnow:
        opcode = buf[pos]
        pos += 1
        imm2_bytes = 0
    elif imm2_bytes:
        imm2 = np.int64(_read_le(buf, pos, imm2_bytes))
        pos += imm2_bytes

    # Operation class: the table row, refined by ModRM.reg for groups and by prefixes.
    if vex != 0:
        op_class = _OC_OTHER if (opcode_map == MAP_0F38 and opcode >= 0xF0) else _OC_SSE_AVX
    else:
        op_class = np.int64(OPCLASS[opcode_map, opcode])
        if group != 0:
            op_class = np.int64(GROUP_CLASS[group, reg3])
            if group == GROUP_0F01 and mod == 3 and reg3 != 4 and reg3 != 6:
                op_class = np.int64(REGISTER_FORMS_0F01[modrm])
            if opcode_map == MAP_ONE_BYTE and opcode >= 0x80 and opcode <= 0x83:
                op_class = _OC_GROUP1
        if opcode_map == MAP_ONE_BYTE:
            if opcode == 0x90 and last_rep == 0xF3:
                op_class = _OC_PAUSE
            elif opcode == 0x90 and rex_b:
                op_class = _OC_XCHG
        elif opcode_map == MAP_0F:
            if opcode == 0xC7:
                if mod != 3 and reg3 == 1 and rex_w:
                    op_class = _OC_CMPXCHG16B
                elif mod == 3 and reg3 == 6:
                    op_class = _OC_RDRAND
                elif mod == 3 and reg3 == 7:
                    op_class = _OC_RDPID if last_rep == 0xF3 else _OC_RDSEED
            elif opcode == 0xAE:
                if mod == 3:
                    if last_rep == 0xF3 and reg3 < 4:
                        op_class = _OC_FSGSBASE
                    elif reg3 == 5:
                        op_class = _OC_LFENCE
                    elif reg3 == 6:
                        op_class = _OC_MFENCE
                    elif reg3 == 7:
                        op_class = _OC_SFENCE
                    else:
                        op_class = _OC_OTHER
                elif opsize_prefix and reg3 == 6:
                    op_class = _OC_CLWB
                elif opsize_prefix and reg3 == 7:
                    op_class = _OC_CLFLUSHOPT
        elif opcode_map == MAP_0F38 and (opcode == 0xF0 or opcode == 0xF1) and last_rep == 0xF2:
            op_class = _OC_CRC32
    if is_byte_op:
        operand_size = 1
    elif vex == 0 and opcode_map == MAP_ONE_BYTE and opcode == 0x63 and not mode64:
        operand_size = 2  # arpl (movsxd only exists in 64-bit mode)
        op_class = _OC_OTHER
    if op_class == _OC_CMPXCHG16B:
        operand_size = 16
    elif op_class == _OC_CMPXCHG8B:
        operand_size = 8

    rec = out[out_index]
    rec["address"] = address
    rec["disp"] = disp
    rec["imm"] = imm
    rec["imm2"] = imm2
    rec["length"] = total
    rec["status"] = _OK
    rec["lock"] = lock
    rec["rep"] = rep
    rec["repne"] = repne
    rec["opsize_prefix"] = opsize_prefix
    rec["addrsize_prefix"] = addrsize_prefix
    rec["segment"] = segment
    rec["rex"] = rex
    rec["rex_w"] = rex_w
    rec["rex_r"] = rex_r
    rec["rex_x"] = rex_x
    rec["rex_b"] = rex_b
    rec["vex"] = vex
    rec["vex_vvvv"] = vex_vvvv
    rec["vex_l"] = vex_l
    rec["vex_pp"] = vex_pp
    rec["vex_map"] = vex_map
    rec["evex_aaa"] = evex_aaa
    rec["evex_z"] = evex_z
    rec["evex_b"] = evex_b
    rec["opcode_map"] = opcode_map
    rec["opcode"] = opcode
    rec["opcode_offset"] = opcode_offset
    rec["has_modrm"] = has_modrm
    rec["modrm"] = modrm
    rec["mod"] = mod
    rec["reg"] = reg
    rec["rm"] = rm
    rec["has_sib"] = has_sib
    rec["sib"] = sib
    rec["scale"] = scale
    rec["index_reg"] = index_reg
    rec["base_reg"] = base_reg
    rec["disp_bytes"] = disp_bytes
    rec["imm_bytes"] = imm_bytes
    rec["imm2_bytes"] = imm2_bytes
    rec["operand_size"] = operand_size
    rec["address_size"] = address_size
    rec["op_class"] = op_class
    return total


@kernel
def decode_buffer_kernel(buf, offset, bitness, address, out):
    """Decode buf[offset:] sequentially into out[0:]; return the number of records.

    address is the linear address of buf[0]. An INVALID record covers one byte and decoding
    resumes at the next; a TRUNCATED record ends the run. Stops early when out is full: the
    caller resumes at the end of the last record.
    """
    n = buf.shape[0]
    count = 0
    while offset < n and count < out.shape[0]:
        length = decode_one(buf, offset, bitness, address + offset, out, count)
        truncated = out[count]["status"] == _TRUNCATED
        count += 1
        if truncated:
            break
        offset += length
    return count


_BITNESSES = (16, 32, 64)


def _as_uint8_array(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"expected a 1-D uint8 array, got {data.dtype} with {data.ndim} dims")
        return np.ascontiguousarray(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            raise TypeError("expected a flat byte buffer")
        return np.frombuffer(view, dtype=np.uint8)
    raise TypeError(f"expected bytes, bytearray, memoryview or a uint8 array, not {type(data).__name__}")


def _check_mode(bitness, address) -> None:
    if isinstance(bitness, bool) or not isinstance(bitness, (int, np.integer)) or bitness not in _BITNESSES:
        raise ValueError(f"bitness must be one of {_BITNESSES}, not {bitness!r}")
    if isinstance(address, bool) or not isinstance(address, (int, np.integer)) or not 0 <= int(address) < 1 << 64:
        raise ValueError(f"address must be an integer in [0, 2**64), not {address!r}")


def decode_buffer(data, bitness: int = 64, address: int = 0) -> np.ndarray:
    """Decode every instruction in data; returns a VIE_DTYPE record array.

    Undecodable bytes give one-byte INVALID records; a cut-off last instruction gives a
    final TRUNCATED record covering the remaining bytes.
    """
    buf = _as_uint8_array(data)
    _check_mode(bitness, address)
    chunks = []
    offset = 0
    base = np.uint64(address)
    while offset < buf.shape[0]:
        # x86 code averages 3-4 bytes per instruction; a full chunk just means another pass.
        out = np.empty((buf.shape[0] - offset) // 3 + 16, dtype=VIE_DTYPE)
        count = decode_buffer_kernel(buf, offset, int(bitness), base, out)
        records = out[:count]
        chunks.append(records)
        last = records[count - 1]
        if last["status"] == DecodeStatus.TRUNCATED:
            break
        offset = int(last["address"] - base) + int(last["length"])
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=VIE_DTYPE)


def decode(data, bitness: int = 64, address: int = 0):
    """Decode the first instruction of data; returns one VIE_DTYPE record."""
    buf = _as_uint8_array(data)
    _check_mode(bitness, address)
    out = np.empty(1, dtype=VIE_DTYPE)
    decode_one(buf, 0, int(bitness), np.uint64(address), out, 0)
    return out[0]


def bench_decode(corpus_bytes: bytes | None = None, seconds: float = 2.0) -> dict:
    """Decode throughput of hvjit vs iced-x86's Python Decoder on the same bytes (64-bit).

    corpus_bytes defaults to a few MB of .text from this machine's binaries. Each decoder
    gets about half of the time budget; iced may cover only a prefix of a large corpus,
    its rate is measured on what it decoded.
    """
    from hvjit.kernels.corpus import require_iced, text_corpus

    iced_x86 = require_iced()
    if corpus_bytes is None:
        corpus_bytes = text_corpus(4 << 20)
    buf = _as_uint8_array(corpus_bytes)
    if buf.shape[0] == 0:
        raise ValueError("empty corpus")
    budget = max(float(seconds), 0.02) / 2
    decode_buffer(buf[:64])  # compile or load from cache outside the timing

    runs = 0
    instructions = 0
    t0 = time.perf_counter()
    while True:
        instructions = len(decode_buffer(buf))
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            break
    hvjit_mb_s = buf.shape[0] * runs / elapsed / 1e6

    decoded_bytes = 0
    decoded_instructions = 0
    step = 64 << 10
    t0 = time.perf_counter()
    for start in range(0, buf.shape[0], step):
        decoder = iced_x86.Decoder(64, bytes(buf[start : start + step]))
        for _ in decoder:
            decoded_instructions += 1
        decoded_bytes += min(step, buf.shape[0] - start)
        if time.perf_counter() - t0 >= budget:
            break
    iced_elapsed = time.perf_counter() - t0
    iced_mb_s = decoded_bytes / iced_elapsed / 1e6
    return {
        "corpus_bytes": int(buf.shape[0]),
        "instructions": int(instructions),
        "hvjit_mb_s": hvjit_mb_s,
        "hvjit_instructions_s": instructions * runs / elapsed,
        "iced_mb_s": iced_mb_s,
        "iced_instructions_s": decoded_instructions / iced_elapsed,
        "hvjit_over_iced": hvjit_mb_s / iced_mb_s,
    }
