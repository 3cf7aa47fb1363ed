"""Table-driven x86 instruction decoder (16/32/64-bit modes), after bhyve's ``struct vie``.

One instruction becomes one record of ``VIE_DTYPE``: prefixes, REX/VEX/EVEX/XOP fields,
opcode map and byte, ModRM/SIB, the memory operand (base, index, scale, displacement),
immediates, operand and address sizes, and an ``OpClass`` a VM-exit handler dispatches on.
Callers that need less choose it (``decode_buffer(..., fields=...)``): the 8-byte
``COMPACT_DTYPE`` (length, status, opcode map and byte, OpClass, ModRM, operand size), the
lengths alone, or any subset of ``VIE_DTYPE``'s fields (``record_dtype``). Every output
comes from the same decoder body, compiled once per output dtype: stores to fields the
output lacks are dropped at compile time (``_put``), and with them the work that only fed
them, so the compact and length-only kernels run at about twice the full record's rate.

The decoder is a *length and operand* decoder, permissive about semantics: it flags as
INVALID only what has no defined length (undefined opcodes, opcodes removed from 64-bit
mode, malformed VEX/EVEX/XOP prefixes, more than 15 bytes). A CPU that exits to the
hypervisor has already accepted the instruction, so rejecting e.g. a LOCK prefix on a
non-lockable instruction is the emulator's business, not the decoder's.

Numba does no bounds checking: every input byte is read through an explicit check against
the buffer end and the 15-byte limit, so a short or hostile buffer gives TRUNCATED/INVALID
and never an over-read.

How it is fast (``_decode_run``; figures and method in ``hvjit.benchmarks.decode``):

* One compiled loop. The decoder is written out inside the loop of ``_decode_run`` rather
  than called per instruction (a Numba-inlined call increfs/decrefs both arrays for every
  instruction); ``decode_one`` and ``decode_buffer_kernel`` are thin wrappers around it,
  with int64 arguments so both share one compilation.
* Everything is int64: bytes are widened as they are read and the tables the kernel reads
  are int64 copies, so no uint8/uint64/int64 mix is silently promoted to float64 (the old
  kernel computed ``mod`` and ``rex_w`` in floating point on some paths).
* A table-driven fast path for plain instructions (no legacy prefix, at most a REX, the
  one-byte or 0F map; about 95% of compiled x86-64 code): ``_FAST_OPCODE`` says whether an
  opcode qualifies and has a ModRM byte, ``_FAST_FORM[.., ModRM.reg]`` gives operand size,
  immediate size and OpClass. It needs 24 bytes of slack so all its reads are in bounds
  without per-byte checks, and stores a full record as nine 8-byte words (a compact one as
  one word) when ``out`` is contiguous and aligned. Everything else (and the last 24 bytes
  of a buffer) goes through the general path; tests check that both paths give identical
  records. About 6% of real 64-bit code takes the general path (66/F2/F3 and segment
  prefixes, VEX), at roughly three times the fast path's cost per instruction.
* Displacement and immediate come from one 8-byte window each (the byte loads are merged),
  masked and sign-extended by table; prefix kinds and immediate sizes are table lookups.
* The general path stores each record field as soon as it is final, so few values stay
  live across the body; failures write their record once, outside the body.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import numpy as np
from numba.core import cgutils, types
from numba.core.errors import TypingError
from numba.extending import lower_builtin, overload, type_callable
from numba.np.numpy_support import as_dtype

from hvjit._jit import kernel
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
    MAP_0F3A,
    MAP_0F38,
    MAP_3DNOW,
    MAP_ONE_BYTE,
    OPCLASS,
    REGISTER_FORMS_0F01,
    VEX_MAP1_HAS_IMM8,
    OpClass,
)

__all__ = [
    "VIE_DTYPE",
    "COMPACT_DTYPE",
    "record_dtype",
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

# VIE_DTYPE as nine little-endian 8-byte words a record, the byte fields packed eight to a
# word (the fast path's stores; checked against the dtype here).
_WORD_LAYOUT = (
    ("address",), ("disp",), ("imm",), ("imm2",),
    ("length", "status", "lock", "rep", "repne", "opsize_prefix", "addrsize_prefix", "segment"),
    ("rex", "rex_w", "rex_r", "rex_x", "rex_b", "vex", "vex_vvvv", "vex_l"),
    ("vex_pp", "vex_map", "evex_aaa", "evex_z", "evex_b", "opcode_map", "opcode", "opcode_offset"),
    ("has_modrm", "modrm", "mod", "reg", "rm", "has_sib", "sib", "scale"),
    ("index_reg", "base_reg", "disp_bytes", "imm_bytes", "imm2_bytes", "operand_size", "address_size", "op_class"),
)
_RECORD_BYTES = VIE_DTYPE.itemsize
assert _RECORD_BYTES == 8 * len(_WORD_LAYOUT)
for _word, _names in enumerate(_WORD_LAYOUT):
    for _byte, _name in enumerate(_names):
        assert VIE_DTYPE.fields[_name][1] == 8 * _word + (0 if len(_names) == 1 else _byte), _name

# The compact record: what instruction-mix statistics, boundary scans and branch finding
# need, in one 8-byte word (fields and meanings as in VIE_DTYPE).
COMPACT_FIELDS = ("length", "status", "opcode_map", "opcode", "op_class", "modrm", "has_modrm", "operand_size")
COMPACT_DTYPE = np.dtype([(name, VIE_DTYPE.fields[name][0]) for name in COMPACT_FIELDS])
assert COMPACT_DTYPE.itemsize == 8  # one word, field k in byte k (the fast path's store)
# What the kernel writes for fields="length": a record of the length alone (a uint8 view).
_LENGTH_RECORD = np.dtype([("length", np.uint8)])


def record_dtype(fields="full") -> np.dtype:
    """The output dtype of ``decode_buffer(..., fields=fields)``.

    "full" is VIE_DTYPE, "compact" COMPACT_DTYPE, "length" uint8 (lengths only); a sequence
    of VIE_DTYPE field names gives a packed record of those fields, in that order.
    """
    if isinstance(fields, str):
        if fields == "full":
            return VIE_DTYPE
        if fields == "compact":
            return COMPACT_DTYPE
        if fields == "length":
            return np.dtype(np.uint8)
        raise ValueError(f'fields must be "full", "compact", "length" or a sequence of VIE_DTYPE field names, '
                         f"not {fields!r}")
    names = tuple(fields)
    unknown = [name for name in names if not isinstance(name, str) or name not in VIE_DTYPE.fields]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"fields must be distinct VIE_DTYPE field names, got {names!r} (unknown: {unknown})")
    return np.dtype([(name, VIE_DTYPE.fields[name][0]) for name in names])


# Numba names a record type in symbols by a per-process counter, so two cached
# specializations of one kernel for different output dtypes, compiled in different
# processes, can get the same symbol names; loaded into one process, one then runs the
# other's code (writing 72-byte records into an 8-byte array). A digest of the layout
# (fields, offsets, size) names each dtype the same everywhere.
def _record_mangling_args(record):
    return type(record).__name__, (int.from_bytes(hashlib.sha256(record.name.encode()).digest()[:6], "little"),)


types.Record.mangling_args = property(_record_mangling_args)


# Output writers. The decoder stores every field with _put; for an output dtype without
# that field the store vanishes at compile time, and LLVM then drops the work that only
# fed it. So one decoder body serves the full record, the compact one and length-only.
def _put(rec, name, value):
    """rec[name] = value if rec's dtype has that field."""
    if name in rec.dtype.names:
        rec[name] = value


# Jitted, _put is lowered straight to the store (or to nothing): a typed builtin rather
# than an @overload, which would compile a function for each of its ~130 call signatures.
@type_callable(_put)
def _type_put(context):
    def typer(rec, name, value):
        if isinstance(rec, types.Record) and isinstance(name, types.StringLiteral):
            return types.none

    return typer


@lower_builtin(_put, types.Record, types.StringLiteral, types.Any)
def _lower_put(context, builder, sig, args):
    rec_type, name_type, value_type = sig.args
    field = name_type.literal_value
    if field in rec_type.fields:  # as numba's own record setattr
        field_type = rec_type.typeof(field)
        pointer = cgutils.get_record_member(builder, args[0], rec_type.offset(field),
                                            context.get_data_type(field_type))
        value = context.cast(builder, args[2], value_type, field_type)
        context.pack_value(builder, field_type, value, pointer, align=None if rec_type.aligned else 1)
    return context.get_dummy_value()


# What the fast path can store as whole 8-byte words (contiguous, 8-byte aligned outputs:
# always, for arrays numpy allocates): full records as nine words (see _WORD_LAYOUT),
# compact ones as one (COMPACT_FIELDS, byte by byte). Other outputs go field by field.
_OUT_FIELDS, _OUT_FULL, _OUT_COMPACT = 0, 1, 2


def _output_kind(out) -> int:
    """_OUT_FULL, _OUT_COMPACT or _OUT_FIELDS for out's dtype (a constant, jitted); raises
    TypeError for records with fields the decoder does not produce (they would be left
    uninitialized)."""
    dtype = out.dtype
    if dtype.names is None or any(VIE_DTYPE.fields.get(name, (None,))[0] != dtype.fields[name][0]
                                  for name in dtype.names):
        raise TypeError(f"output records must hold VIE_DTYPE fields with their types, not {dtype}")
    return _OUT_FULL if dtype == VIE_DTYPE else _OUT_COMPACT if dtype == COMPACT_DTYPE else _OUT_FIELDS


@overload(_output_kind)
def _output_kind_jit(out):
    if not (isinstance(out, types.Array) and isinstance(out.dtype, types.Record)):
        raise TypingError(f"output must be a record array, not {out}")
    try:
        kind = _output_kind(np.empty(0, dtype=as_dtype(out.dtype)))
    except TypeError as exc:
        raise TypingError(str(exc)) from None
    return lambda out: kind


def _record_words(out):
    """Full or compact records as 8-byte words when out is contiguous and 8-byte aligned;
    otherwise an empty array."""
    if out.dtype in (VIE_DTYPE, COMPACT_DTYPE) and out.strides[0] == out.dtype.itemsize and (out.ctypes.data & 7) == 0:
        return out.view(np.uint64)
    return np.empty(0, dtype=np.uint64)


@overload(_record_words)
def _record_words_jit(out):
    dtype = as_dtype(out.dtype)
    if dtype != VIE_DTYPE and dtype != COMPACT_DTYPE:
        return lambda out: np.empty(0, dtype=np.uint64)
    record_bytes = dtype.itemsize

    def words(out):
        packed = out.strides[0] == record_bytes and (out.ctypes.data & 7) == 0
        return (out if packed else np.empty(0, dtype=dtype)).view(np.uint64)

    return words


_OK = np.uint8(DecodeStatus.OK)
_TRUNCATED = np.uint8(DecodeStatus.TRUNCATED)
_INVALID = np.uint8(DecodeStatus.INVALID)

# The decoder body's result when it writes no record (otherwise the result is the length).
_R_INVALID = -1
_R_TRUNCATED = -2

# 16-bit addressing (SDM Table 2-1): base and index registers for ModRM.rm 0-7.
_BASE16 = np.array([3, 3, 5, 5, 6, 7, 5, 3], dtype=np.int64)  # bx bx bp bp si di bp bx
_INDEX16 = np.array([6, 7, 6, 7, -1, -1, -1, -1], dtype=np.int64)  # si di si di - - - -

_SEGMENT_OF_PREFIX = np.full(256, -1, dtype=np.int64)
_SEGMENT_OF_PREFIX[[0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65]] = [0, 1, 2, 3, 4, 5]

# Prefix kinds, so the prefix loop is one table lookup per byte; row 1 (64-bit mode) also
# marks REX. Most instructions start with neither and skip the loop after one lookup.
_PFX_NONE, _PFX_SEG, _PFX_66, _PFX_67, _PFX_LOCK, _PFX_REPNE, _PFX_REP, _PFX_REX = range(8)
_PREFIX_KIND = np.zeros((2, 256), dtype=np.int64)
_PREFIX_KIND[:, [0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65]] = _PFX_SEG
_PREFIX_KIND[:, 0x66] = _PFX_66
_PREFIX_KIND[:, 0x67] = _PFX_67
_PREFIX_KIND[:, 0xF0] = _PFX_LOCK
_PREFIX_KIND[:, 0xF2] = _PFX_REPNE
_PREFIX_KIND[:, 0xF3] = _PFX_REP
_PREFIX_KIND[1, 0x40:0x50] = _PFX_REX

# Table copies as int64 (Numba freezes module-level arrays into the compiled code; int64
# entries keep every derived value int64, so no uint8/uint64/int64 mixing turns into float).
_FLAGS = FLAGS.astype(np.int64)
_OPCLASS = OPCLASS.astype(np.int64)
_GROUP = GROUP.astype(np.int64)
_GROUP_CLASS = GROUP_CLASS.astype(np.int64)
_GROUP_FLAGS = GROUP_FLAGS.astype(np.int64)
_REGISTER_FORMS_0F01 = REGISTER_FORMS_0F01.astype(np.int64)
_VEX_MAP1_HAS_IMM8 = VEX_MAP1_HAS_IMM8.astype(np.int64)


# Immediate sizes by (64-bit mode, immediate kind, operand size) and second-immediate
# sizes by kind, so the immediate length is a lookup rather than a chain of branches.
_IMM_BYTES = np.zeros((2, 16, 9), dtype=np.int64)
_IMM2_BYTES = np.zeros(16, dtype=np.int64)
for _m in (0, 1):
    for _osz in (2, 4, 8):
        _z = 2 if _osz == 2 else 4
        for _kind, _size in ((IMM_B, 1), (IMM_REL8, 1), (IMM_W, 2), (IMM_Z, _z), (IMM_V, _osz),
                             (IMM_RELZ, 2 if (_osz == 2 and not _m) else 4), (IMM_ENTER, 2),
                             (IMM_PTR, _z), (IMM_D, 4), (IMM_BB, 1)):
            _IMM_BYTES[_m, _kind, _osz] = _size
_IMM2_BYTES[IMM_ENTER] = 1
_IMM2_BYTES[IMM_PTR] = 2
_IMM2_BYTES[IMM_BB] = 1
# Low-byte masks and sign bits for 0-8 byte little-endian fields (8: the whole int64).
_BYTE_MASK = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 8)] + [-1], dtype=np.int64)
_SIGN_BIT = np.array([0] + [1 << (8 * k - 1) for k in range(1, 8)] + [0], dtype=np.int64)


@kernel
def _fail(out, out_index, address, status, length):
    """Store a record for an instruction that did not decode."""
    rec = out[out_index]
    _put(rec, "address", address)
    _put(rec, "disp", 0)
    _put(rec, "imm", 0)
    _put(rec, "imm2", 0)
    _put(rec, "length", length)
    _put(rec, "status", status)
    _put(rec, "lock", 0)
    _put(rec, "rep", 0)
    _put(rec, "repne", 0)
    _put(rec, "opsize_prefix", 0)
    _put(rec, "addrsize_prefix", 0)
    _put(rec, "segment", -1)
    _put(rec, "rex", 0)
    _put(rec, "rex_w", 0)
    _put(rec, "rex_r", 0)
    _put(rec, "rex_x", 0)
    _put(rec, "rex_b", 0)
    _put(rec, "vex", 0)
    _put(rec, "vex_vvvv", 0)
    _put(rec, "vex_l", 0)
    _put(rec, "vex_pp", 0)
    _put(rec, "vex_map", 0)
    _put(rec, "evex_aaa", 0)
    _put(rec, "evex_z", 0)
    _put(rec, "evex_b", 0)
    _put(rec, "opcode_map", 0)
    _put(rec, "opcode", 0)
    _put(rec, "opcode_offset", 0)
    _put(rec, "has_modrm", 0)
    _put(rec, "modrm", 0)
    _put(rec, "mod", 0)
    _put(rec, "reg", 0)
    _put(rec, "rm", 0)
    _put(rec, "has_sib", 0)
    _put(rec, "sib", 0)
    _put(rec, "scale", 1)
    _put(rec, "index_reg", -1)
    _put(rec, "base_reg", -1)
    _put(rec, "disp_bytes", 0)
    _put(rec, "imm_bytes", 0)
    _put(rec, "imm2_bytes", 0)
    _put(rec, "operand_size", 0)
    _put(rec, "address_size", 0)
    _put(rec, "op_class", 0)
    return length


@kernel(inline="always")
def _short(start, needed_end):
    """The instruction needs bytes up to needed_end past the limit: too long, or cut off."""
    return _R_INVALID if needed_end - start > MAX_INSTRUCTION_LENGTH else _R_TRUNCATED


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


# Fast path: 32/64-bit mode, no legacy prefix, at most a REX, one-byte or 0F map, and an
# opcode whose length and fields follow from the tables below without the general rules
# (no VEX/EVEX/XOP, moffs, enter/far pointers, SSE4a, CR/DR moves, or ModRM-selected classes
# such as 0F 01/AE/C7). Anything else, or a group row that is undefined or memory-only with
# a register operand, falls through to the general decoder, which gives the same result
# for the eligible cases (the tables are derived with the general decoder's rules).
# _FAST_OPCODE[mode64, map, opcode]: bit 0 eligible without REX, bit 1 eligible after a REX,
# bit 2 has ModRM. _FAST_FORM[mode64, map, opcode, ModRM.reg]: operand size without/with
# REX.W (bits 0-3 / 4-7), immediate bytes without/with REX.W (bits 8-11 / 12-15), OpClass
# (bits 16-23), valid (bit 24), memory-only (bit 25).
_FAST_OK_PLAIN, _FAST_OK_REX, _FAST_MODRM = 1, 2, 4
_FAST_VALID, _FAST_MEMORY_ONLY = 1 << 24, 1 << 25
_FAST_OPCODE = np.zeros((2, 2, 256), dtype=np.int64)
_FAST_FORM = np.zeros((2, 2, 256, 8), dtype=np.int64)


def _build_fast_tables() -> None:
    excluded_0f = {0x01, 0x0F, 0x20, 0x21, 0x22, 0x23, 0x38, 0x3A, 0xAE, 0xB8, 0xC7}
    for m64 in (0, 1):
        for opcode_map in (MAP_ONE_BYTE, MAP_0F):
            for opcode in range(256):
                flags = int(FLAGS[opcode_map, opcode])
                if flags & F_INVALID or (m64 and flags & F_I64):
                    continue
                if opcode_map == MAP_ONE_BYTE and (
                    opcode in (0x0F, 0xC4, 0xC5, 0x62, 0x8F) or _PREFIX_KIND[m64, opcode] != _PFX_NONE
                ):
                    continue
                if opcode_map == MAP_0F and opcode in excluded_0f:
                    continue
                imm_kind = (flags >> IMM_SHIFT) & IMM_MASK
                if imm_kind in (IMM_MOFFS, IMM_ENTER, IMM_PTR, IMM_BB, IMM_D):
                    continue
                has_modrm = flags & F_MODRM
                group = int(GROUP[opcode_map, opcode])
                if group == GROUP_0F01:
                    continue
                # 90 with REX.B is xchg r8, rax: leave REX forms of 90 to the general path.
                ok = _FAST_OK_PLAIN | (0 if (opcode_map == MAP_ONE_BYTE and opcode == 0x90) else _FAST_OK_REX)
                _FAST_OPCODE[m64, opcode_map, opcode] = ok | (_FAST_MODRM if has_modrm else 0)
                is_byte_op = bool(flags & F_BYTE)
                for reg3 in range(8):
                    row_flags = flags
                    valid = True
                    op_class = int(OPCLASS[opcode_map, opcode])
                    if group and has_modrm:
                        group_flags = int(GROUP_FLAGS[group, reg3])
                        valid = not group_flags & F_INVALID
                        row_flags |= group_flags
                        op_class = int(GROUP_CLASS[group, reg3])
                        if opcode_map == MAP_ONE_BYTE and reg3 == 7 and opcode in (0xC6, 0xC7):
                            valid = False  # xabort/xbegin need ModRM F8 exactly
                        if opcode_map == MAP_ONE_BYTE and 0x80 <= opcode <= 0x83:
                            op_class = _OC_GROUP1
                    sizes = []
                    for rex_w in (0, 1):
                        if m64:
                            operand_size = 8 if rex_w else 4
                            if row_flags & F_D64 and not rex_w:
                                operand_size = 8
                            if row_flags & F_F64:
                                operand_size = 8
                            if row_flags & F_W32 and operand_size == 8:
                                operand_size = 4
                        else:
                            operand_size = 4
                        kind = imm_kind
                        if kind == IMM_GRP3:
                            kind = (IMM_B if is_byte_op else IMM_Z) if reg3 < 2 else IMM_NONE
                        near_branch_or_push = reg3 in (2, 4) or (reg3 == 6 and not rex_w)
                        if opcode_map == MAP_ONE_BYTE and opcode == 0xFF and m64 and near_branch_or_push:
                            operand_size = 8
                        imm_bytes = int(_IMM_BYTES[m64, kind, operand_size])
                        cls = op_class
                        if is_byte_op:
                            operand_size = 1
                        elif opcode_map == MAP_ONE_BYTE and opcode == 0x63 and not m64:
                            operand_size = 2  # arpl
                            cls = _OC_OTHER
                        sizes.append((operand_size, imm_bytes, cls))
                    (os0, imm0, cls0), (os1, imm1, cls1) = sizes
                    assert cls0 == cls1
                    _FAST_FORM[m64, opcode_map, opcode, reg3] = (
                        os0 | (os1 << 4) | (imm0 << 8) | (imm1 << 12) | (cls0 << 16)
                        | (_FAST_VALID if valid else 0)
                        | (_FAST_MEMORY_ONLY if row_flags & F_MEMORY_ONLY else 0)
                    )


_build_fast_tables()


@kernel
def _decode_run(buf, offset, bitness, base, out, out_index, max_records):
    """Decode buf[offset:] into out[out_index:], at most max_records records; return the
    number written and the offset after the last record. base is the address of buf[0]
    (uint64). An INVALID record covers one byte and decoding resumes at the next; a
    TRUNCATED record ends the run.

    out holds VIE_DTYPE records or records of some of its fields (COMPACT_DTYPE,
    record_dtype); each output dtype is a compilation of its own, without the stores (see
    _put) and the work for fields the output lacks.

    The decoder body is written out inside the loop (not an inlined call, which would
    incref/decref both arrays per instruction); every value in it is int64, so nothing is
    converted on the hot path. A failure sets result < 0 and leaves the one-pass loop with
    `break`; the failure record is written once, below.
    """
    n = buf.shape[0]
    mode64 = 1 if bitness == 64 else 0
    # The fast path stores whole words when it can (see _OUT_FULL); each output dtype has
    # its own compilation, in which output_kind is a constant.
    output_kind = _output_kind(out)
    words = _record_words(out)
    packed = output_kind != _OUT_FIELDS and words.shape[0] != 0
    end = min(out_index + max_records, out.shape[0])
    i = out_index
    while i < end and offset < n:
        address = base + np.uint64(offset)
        if offset < 0:
            _fail(out, i, address, _TRUNCATED, 0)
            i += 1
            break
        start = offset
        result = 0  # > 0: length of a decoded instruction; _R_INVALID; _R_TRUNCATED
        while True:  # one pass: `break` with result set
            # Fast path (see _FAST_OPCODE): 24 bytes of slack make every read in-bounds
            # without further checks (a fast-path instruction is at most 13 bytes, plus the
            # 8-byte windows for displacement and immediate).
            if bitness != 16 and start + 24 <= n:
                p = start
                b = np.int64(buf[p])
                rex = 0
                if mode64 and (b & 0xF0) == 0x40:
                    rex = b
                    p += 1
                    b = np.int64(buf[p])
                opcode_map = MAP_ONE_BYTE
                if b == 0x0F:
                    opcode_map = MAP_0F
                    p += 1
                    b = np.int64(buf[p])
                eligible = _FAST_OPCODE[mode64, opcode_map, b]
                if eligible & (_FAST_OK_REX if rex else _FAST_OK_PLAIN):
                    opcode_offset = p - start
                    p += 1
                    rex_w = (rex >> 3) & 1
                    rex_r = (rex >> 2) & 1
                    rex_x = (rex >> 1) & 1
                    rex_b = rex & 1
                    modrm = 0
                    mod = 0
                    reg = 0
                    rm = 0
                    reg3 = 0
                    has_sib = 0
                    sib = 0
                    scale = 1
                    index_reg = -1
                    base_reg = -1
                    disp_bytes = 0
                    if eligible & _FAST_MODRM:
                        modrm = np.int64(buf[p])
                        p += 1
                        mod = modrm >> 6
                        reg3 = (modrm >> 3) & 7
                        rm3 = modrm & 7
                        reg = reg3 | (rex_r << 3)
                        rm = rm3 | (rex_b << 3)
                        if mod != 3:
                            if rm3 == 4:
                                has_sib = 1
                                sib = np.int64(buf[p])
                                p += 1
                                scale = 1 << (sib >> 6)
                                index = ((sib >> 3) & 7) | (rex_x << 3)
                                if index != 4:
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
                    form = _FAST_FORM[mode64, opcode_map, b, reg3]
                    if (form & _FAST_VALID) and not ((form & _FAST_MEMORY_ONLY) and mod == 3):
                        raw = (np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16)
                               | (np.int64(buf[p + 3]) << 24) | (np.int64(buf[p + 4]) << 32)
                               | (np.int64(buf[p + 5]) << 40) | (np.int64(buf[p + 6]) << 48)
                               | (np.int64(buf[p + 7]) << 56))
                        sign = _SIGN_BIT[disp_bytes]
                        disp = ((raw & _BYTE_MASK[disp_bytes]) ^ sign) - sign
                        p += disp_bytes
                        shift = 4 * rex_w
                        imm_bytes = (form >> (8 + shift)) & 0xF
                        raw = (np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8) | (np.int64(buf[p + 2]) << 16)
                               | (np.int64(buf[p + 3]) << 24) | (np.int64(buf[p + 4]) << 32)
                               | (np.int64(buf[p + 5]) << 40) | (np.int64(buf[p + 6]) << 48)
                               | (np.int64(buf[p + 7]) << 56))
                        sign = _SIGN_BIT[imm_bytes]
                        imm = ((raw & _BYTE_MASK[imm_bytes]) ^ sign) - sign
                        total = p + imm_bytes - start
                        if packed and output_kind == _OUT_COMPACT:  # one store, not eight
                            words[i] = np.uint64(total | (opcode_map << 16) | (b << 24) | (((form >> 16) & 0xFF) << 32)
                                                 | (modrm << 40) | (((eligible >> 2) & 1) << 48)
                                                 | (((form >> shift) & 0xF) << 56))  # status OK
                            result = total
                            break
                        if packed:  # nine 8-byte stores (see _WORD_LAYOUT) instead of 44 field stores
                            w = i * 9
                            words[w] = address
                            words[w + 1] = np.uint64(disp)
                            words[w + 2] = np.uint64(imm)
                            words[w + 3] = np.uint64(0)
                            words[w + 4] = np.uint64(total | -(1 << 56))  # status OK, no prefix, segment -1 (0xFF)
                            words[w + 5] = np.uint64(rex | (rex_w << 8) | (rex_r << 16) | (rex_x << 24) | (rex_b << 32))
                            words[w + 6] = np.uint64((opcode_map << 40) | (b << 48) | (opcode_offset << 56))
                            words[w + 7] = np.uint64(((eligible >> 2) & 1) | (modrm << 8) | (mod << 16) | (reg << 24)
                                                     | (rm << 32) | (has_sib << 40) | (sib << 48) | (scale << 56))
                            words[w + 8] = np.uint64((index_reg & 0xFF) | ((base_reg & 0xFF) << 8) | (disp_bytes << 16)
                                                     | (imm_bytes << 24) | (((form >> shift) & 0xF) << 40)
                                                     | ((8 if mode64 else 4) << 48) | (((form >> 16) & 0xFF) << 56))
                            result = total
                            break
                        rec = out[i]
                        _put(rec, "address", address)
                        _put(rec, "disp", disp)
                        _put(rec, "imm", imm)
                        _put(rec, "imm2", 0)
                        _put(rec, "length", total)
                        _put(rec, "status", _OK)
                        _put(rec, "lock", 0)
                        _put(rec, "rep", 0)
                        _put(rec, "repne", 0)
                        _put(rec, "opsize_prefix", 0)
                        _put(rec, "addrsize_prefix", 0)
                        _put(rec, "segment", -1)
                        _put(rec, "rex", rex)
                        _put(rec, "rex_w", rex_w)
                        _put(rec, "rex_r", rex_r)
                        _put(rec, "rex_x", rex_x)
                        _put(rec, "rex_b", rex_b)
                        _put(rec, "vex", 0)
                        _put(rec, "vex_vvvv", 0)
                        _put(rec, "vex_l", 0)
                        _put(rec, "vex_pp", 0)
                        _put(rec, "vex_map", 0)
                        _put(rec, "evex_aaa", 0)
                        _put(rec, "evex_z", 0)
                        _put(rec, "evex_b", 0)
                        _put(rec, "opcode_map", opcode_map)
                        _put(rec, "opcode", b)
                        _put(rec, "opcode_offset", opcode_offset)
                        _put(rec, "has_modrm", (eligible >> 2) & 1)
                        _put(rec, "modrm", modrm)
                        _put(rec, "mod", mod)
                        _put(rec, "reg", reg)
                        _put(rec, "rm", rm)
                        _put(rec, "has_sib", has_sib)
                        _put(rec, "sib", sib)
                        _put(rec, "scale", scale)
                        _put(rec, "index_reg", index_reg)
                        _put(rec, "base_reg", base_reg)
                        _put(rec, "disp_bytes", disp_bytes)
                        _put(rec, "imm_bytes", imm_bytes)
                        _put(rec, "imm2_bytes", 0)
                        _put(rec, "operand_size", (form >> shift) & 0xF)
                        _put(rec, "address_size", 8 if mode64 else 4)
                        _put(rec, "op_class", (form >> 16) & 0xFF)
                        result = total
                        break

            # General path: every prefix, map and rule.
            limit = min(n, start + MAX_INSTRUCTION_LENGTH)
            lock = 0
            rep = 0
            repne = 0
            last_rep = 0  # the last of F2/F3 is the mandatory prefix
            opsize_prefix = 0
            addrsize_prefix = 0
            segment = -1
            rex = 0
            pos = start
            b = np.int64(buf[pos])
            kind = _PREFIX_KIND[mode64, b]
            # Legacy prefixes and REX: a REX counts only when the opcode follows it directly.
            while kind != _PFX_NONE:
                if kind == _PFX_REX:
                    rex = b
                else:
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
                if pos >= limit:
                    result = _short(start, pos + 1)
                    break
                b = np.int64(buf[pos])
                kind = _PREFIX_KIND[mode64, b]
            if result != 0:
                break

            # Fields go into the record as soon as they are final (nothing stays live for a
            # store at the end); a failure overwrites the whole record.
            rec = out[i]
            _put(rec, "address", address)
            _put(rec, "lock", lock)
            _put(rec, "rep", rep)
            _put(rec, "repne", repne)
            _put(rec, "opsize_prefix", opsize_prefix)
            _put(rec, "addrsize_prefix", addrsize_prefix)
            _put(rec, "segment", segment)
            _put(rec, "rex", rex)
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

            if b == 0x0F:
                pos += 1
                if pos >= limit:
                    result = _short(start, pos + 1)
                    break
                b = np.int64(buf[pos])
                if b == 0x38 or b == 0x3A:
                    opcode_map = MAP_0F38 if b == 0x38 else MAP_0F3A
                    pos += 1
                    if pos >= limit:
                        result = _short(start, pos + 1)
                        break
                    b = np.int64(buf[pos])
                elif b == 0x0F:
                    opcode_map = MAP_3DNOW
                    three_dnow = True
                else:
                    opcode_map = MAP_0F
            elif b == 0xC4 or b == 0xC5 or b == 0x62 or b == 0x8F:
                # VEX/EVEX/XOP or LES/LDS/BOUND/POP: decided by the next byte.
                if pos + 1 >= limit:
                    # Both readings (prefix or legacy opcode with ModRM) need the next byte.
                    result = _short(start, pos + 2)
                    break
                p0 = np.int64(buf[pos + 1])
                if b == 0x8F:
                    is_extended = (p0 & 0x1F) >= 8
                else:
                    is_extended = mode64 != 0 or (p0 >> 6) == 3
                if is_extended:
                    if opsize_prefix or last_rep != 0 or lock or rex != 0:
                        result = _R_INVALID
                        break
                    if b == 0xC5:
                        vex = 2
                        vex_map = 1
                        rex_r = 1 - (p0 >> 7)
                        rex_x = 0
                        rex_b = 0
                        rex_w = 0
                        vex_vvvv = ((p0 >> 3) & 0xF) ^ 0xF
                        vex_l = (p0 >> 2) & 1
                        vex_pp = p0 & 3
                        pos += 2
                    elif b == 0xC4 or b == 0x8F:
                        if pos + 2 >= limit:
                            result = _short(start, pos + 3)
                            break
                        p1 = np.int64(buf[pos + 2])
                        vex = 3 if b == 0xC4 else 5
                        vex_map = p0 & 0x1F
                        if b == 0xC4 and (vex_map == 0 or vex_map > 3):
                            result = _R_INVALID
                            break
                        if b == 0x8F and vex_map > 10:
                            result = _R_INVALID
                            break
                        rex_r = 1 - (p0 >> 7)
                        rex_x = 1 - ((p0 >> 6) & 1)
                        rex_b = 1 - ((p0 >> 5) & 1)
                        rex_w = p1 >> 7
                        vex_vvvv = ((p1 >> 3) & 0xF) ^ 0xF
                        vex_l = (p1 >> 2) & 1
                        vex_pp = p1 & 3
                        pos += 3
                    else:
                        if pos + 3 >= limit:
                            result = _short(start, pos + 4)
                            break
                        p1 = np.int64(buf[pos + 2])
                        p2 = np.int64(buf[pos + 3])
                        vex = 4
                        vex_map = p0 & 7
                        # P0 bit 3 must be 0, P1 bit 2 must be 1; maps 1-3 and 5-6 exist.
                        if (p0 & 0x08) != 0 or (p1 & 0x04) == 0 or vex_map == 0 or vex_map == 4 or vex_map == 7:
                            result = _R_INVALID
                            break
                        rex_r = 1 - (p0 >> 7)
                        rex_x = 1 - ((p0 >> 6) & 1)
                        rex_b = 1 - ((p0 >> 5) & 1)
                        r_prime = 1 - ((p0 >> 4) & 1)
                        rex_w = p1 >> 7
                        evex_v_prime = 1 - ((p2 >> 3) & 1)
                        vex_vvvv = (((p1 >> 3) & 0xF) ^ 0xF) | (evex_v_prime << 4)
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
                        result = _short(start, pos + 1)
                        break
                    b = np.int64(buf[pos])

            opcode = b
            opcode_offset = pos - start
            _put(rec, "rex_w", rex_w)
            _put(rec, "rex_r", rex_r)
            _put(rec, "rex_x", rex_x)
            _put(rec, "rex_b", rex_b)
            _put(rec, "vex", vex)
            _put(rec, "vex_vvvv", vex_vvvv)
            _put(rec, "vex_l", vex_l)
            _put(rec, "vex_pp", vex_pp)
            _put(rec, "vex_map", vex_map)
            _put(rec, "evex_aaa", evex_aaa)
            _put(rec, "evex_z", evex_z)
            _put(rec, "evex_b", evex_b)
            _put(rec, "opcode_map", opcode_map)
            _put(rec, "opcode_offset", opcode_offset)
            pos += 1

            # Table lookup: flags give ModRM presence, immediate kind and mode rules.
            imm_kind = IMM_NONE
            has_modrm = 1
            is_byte_op = False
            group = 0
            if vex == 0:
                flags = _FLAGS[opcode_map, opcode]
                if flags & F_INVALID:
                    result = _R_INVALID
                    break
                if mode64 and (flags & F_I64):
                    result = _R_INVALID
                    break
                has_modrm = flags & F_MODRM
                imm_kind = (flags >> IMM_SHIFT) & IMM_MASK
                is_byte_op = (flags & F_BYTE) != 0
                if opcode_map == MAP_0F:
                    if opcode == 0xB8 and last_rep != 0xF3:
                        result = _R_INVALID  # JMPE (IA-64 only)
                        break
                    if opcode == 0x78 and (last_rep == 0xF2 or (last_rep == 0 and opsize_prefix)):
                        imm_kind = IMM_BB  # SSE4a extrq/insertq with two imm8
            else:
                flags = 0
                if opcode_map == MAP_0F:
                    has_modrm = 0 if (opcode == 0x77 and vex != 4) else 1
                    if _VEX_MAP1_HAS_IMM8[opcode]:
                        imm_kind = IMM_B
                elif opcode_map == MAP_0F3A:
                    imm_kind = IMM_B
                elif vex == 5:
                    imm_kind = (_FLAGS[opcode_map, opcode] >> IMM_SHIFT) & IMM_MASK

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
                    result = _short(start, pos + 1)
                    break
                modrm = np.int64(buf[pos])
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
                            result = _short(start, pos + 1)
                            break
                        sib = np.int64(buf[pos])
                        pos += 1
                        scale = 1 << (sib >> 6)
                        index = ((sib >> 3) & 7) | (rex_x << 3)
                        # Gathers/scatters: the SIB index is a vector register (SDM 2.3.12).
                        if opcode_map == MAP_0F38 and vex != 0 and vex != 5 and (
                            (0x90 <= opcode <= 0x93)
                            or (vex == 4 and (0xA0 <= opcode <= 0xA3 or opcode == 0xC6 or opcode == 0xC7))
                        ):
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

            _put(rec, "has_modrm", has_modrm)
            _put(rec, "modrm", modrm)
            _put(rec, "mod", mod)
            _put(rec, "reg", reg)
            _put(rec, "rm", rm)
            _put(rec, "has_sib", has_sib)
            _put(rec, "sib", sib)
            _put(rec, "scale", scale)
            _put(rec, "index_reg", index_reg)
            _put(rec, "base_reg", base_reg)
            _put(rec, "address_size", address_size)

            # Group opcodes: validity, LOCK, immediates and operand sizes depend on ModRM.reg.
            reg3 = (modrm >> 3) & 7
            if vex == 0:
                group = _GROUP[opcode_map, opcode]
                if group != 0 and has_modrm:
                    group_flags = _GROUP_FLAGS[group, reg3]
                    if group_flags & F_INVALID:
                        result = _R_INVALID
                        break
                    flags |= group_flags
                    if opcode_map == MAP_ONE_BYTE and reg3 == 7 and (opcode == 0xC6 or opcode == 0xC7) and modrm != 0xF8:
                        result = _R_INVALID  # only xabort/xbegin
                        break
                if (flags & F_MEMORY_ONLY) and mod == 3:
                    result = _R_INVALID
                    break
                if lock and not ((flags & F_LOCKABLE) and mod != 3 and has_modrm):
                    result = _R_INVALID  # LOCK needs a memory destination
                    break
            if imm_kind == IMM_GRP3:
                imm_kind = (IMM_B if is_byte_op else IMM_Z) if reg3 < 2 else IMM_NONE
            if vex == 0 and opcode_map == MAP_ONE_BYTE and opcode == 0xFF and mode64:
                if reg3 == 2 or reg3 == 4:
                    operand_size = 8  # near call/jmp
                elif reg3 == 6 and not rex_w:
                    operand_size = 2 if opsize_prefix else 8  # push

            if imm_kind == IMM_MOFFS:
                disp_bytes = address_size
            if pos + disp_bytes > limit:
                result = _short(start, pos + disp_bytes)
                break
            # Displacement and immediates come from 8-byte windows, masked to their size and
            # sign-extended by table: no branch on their sizes.
            if pos + 8 <= n:  # one unaligned 8-byte load (LLVM merges the byte loads)
                raw = (np.int64(buf[pos]) | (np.int64(buf[pos + 1]) << 8) | (np.int64(buf[pos + 2]) << 16)
                       | (np.int64(buf[pos + 3]) << 24) | (np.int64(buf[pos + 4]) << 32)
                       | (np.int64(buf[pos + 5]) << 40) | (np.int64(buf[pos + 6]) << 48)
                       | (np.int64(buf[pos + 7]) << 56))
            else:  # near the end of the buffer: only the bytes that exist
                raw = np.int64(0)
                for k in range(n - pos):
                    raw |= np.int64(buf[pos + k]) << (8 * k)
            disp = raw & _BYTE_MASK[disp_bytes]
            if imm_kind != IMM_MOFFS:  # a moffs is an absolute address: zero-extended
                sign = _SIGN_BIT[disp_bytes]
                disp = (disp ^ sign) - sign
                if vex == 4 and disp_bytes == 1:
                    disp *= _evex_disp8_scale(opcode_map, opcode, vex_pp, rex_w, vex_l, evex_b)
            pos += disp_bytes
            _put(rec, "disp", disp)
            _put(rec, "disp_bytes", disp_bytes)

            imm_bytes = _IMM_BYTES[mode64, imm_kind, operand_size]
            imm2_bytes = _IMM2_BYTES[imm_kind]
            if three_dnow:
                imm2_bytes = 1  # the opcode suffix, read below like an immediate
            total = pos + imm_bytes + imm2_bytes - start
            if total > MAX_INSTRUCTION_LENGTH:
                result = _R_INVALID
                break
            if start + total > n:
                result = _R_TRUNCATED
                break
            if pos + 8 <= n:  # one unaligned 8-byte load (LLVM merges the byte loads)
                raw = (np.int64(buf[pos]) | (np.int64(buf[pos + 1]) << 8) | (np.int64(buf[pos + 2]) << 16)
                       | (np.int64(buf[pos + 3]) << 24) | (np.int64(buf[pos + 4]) << 32)
                       | (np.int64(buf[pos + 5]) << 40) | (np.int64(buf[pos + 6]) << 48)
                       | (np.int64(buf[pos + 7]) << 56))
            else:  # near the end of the buffer: only the bytes that exist
                raw = np.int64(0)
                for k in range(n - pos):
                    raw |= np.int64(buf[pos + k]) << (8 * k)
            sign = _SIGN_BIT[imm_bytes]
            imm = ((raw & _BYTE_MASK[imm_bytes]) ^ sign) - sign
            imm2 = np.int64(0)
            if three_dnow:
                opcode = np.int64(buf[pos])
                imm2_bytes = 0
            elif imm2_bytes:  # imm2 follows an immediate of at most 4 bytes
                imm2 = (raw >> (8 * imm_bytes)) & _BYTE_MASK[imm2_bytes]

            # Operation class: the table row, refined by ModRM.reg for groups and by prefixes.
            if vex != 0:
                op_class = _OC_OTHER if (opcode_map == MAP_0F38 and opcode >= 0xF0) else _OC_SSE_AVX
            else:
                op_class = _OPCLASS[opcode_map, opcode]
                if group != 0:
                    op_class = _GROUP_CLASS[group, reg3]
                    if group == GROUP_0F01 and mod == 3 and reg3 != 4 and reg3 != 6:
                        op_class = _REGISTER_FORMS_0F01[modrm]
                    if opcode_map == MAP_ONE_BYTE and opcode >= 0x80 and opcode <= 0x83:
                        op_class = _OC_GROUP1
                if opcode_map == MAP_ONE_BYTE:
                    if opcode == 0x90:
                        if last_rep == 0xF3:
                            op_class = _OC_PAUSE
                        elif rex_b:
                            op_class = _OC_XCHG
                    elif opcode == 0x63 and not mode64:
                        op_class = _OC_OTHER  # arpl (movsxd only exists in 64-bit mode)
                        operand_size = 2
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
            if op_class == _OC_CMPXCHG16B:
                operand_size = 16
            elif op_class == _OC_CMPXCHG8B:
                operand_size = 8

            _put(rec, "imm", imm)
            _put(rec, "imm2", imm2)
            _put(rec, "length", total)
            _put(rec, "status", _OK)
            _put(rec, "opcode", opcode)
            _put(rec, "imm_bytes", imm_bytes)
            _put(rec, "imm2_bytes", imm2_bytes)
            _put(rec, "operand_size", operand_size)
            _put(rec, "op_class", op_class)
            result = total
            break

        i += 1
        if result > 0:
            offset += result
        elif result == _R_INVALID:
            _fail(out, i - 1, address, _INVALID, 1)
            offset += 1
        else:
            _fail(out, i - 1, address, _TRUNCATED, n - offset)
            offset = n
            break
    return i - out_index, offset


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
    if offset < 0 or offset >= buf.shape[0]:
        return _fail(out, out_index, np.uint64(address), _TRUNCATED, 0)
    # int64 arguments (not literals) so this reuses decode_buffer_kernel's compilation.
    _, end = _decode_run(buf, np.int64(offset), np.int64(bitness), np.uint64(address) - np.uint64(offset), out,
                         np.int64(out_index), np.int64(1))
    return end - offset


@kernel
def decode_buffer_kernel(buf, offset, bitness, address, out):
    """Decode buf[offset:] sequentially into out[0:]; return the number of records.

    address is the linear address of buf[0]. An INVALID record covers one byte and decoding
    resumes at the next; a TRUNCATED record ends the run. Stops early when out is full: the
    caller resumes at the end of the last record.

    out holds VIE_DTYPE records, or records of some of its fields (COMPACT_DTYPE, or
    ``record_dtype(names)``; lengths only: ``record_dtype(["length"])``); each dtype is
    compiled (and cached) on first use.
    """
    count, _ = _decode_run(buf, np.int64(offset), np.int64(bitness), np.uint64(address), out, np.int64(0),
                           np.int64(out.shape[0]))
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


def decode_buffer(data, bitness: int = 64, address: int = 0, fields="full") -> np.ndarray:
    """Decode every instruction in data, one record per instruction.

    fields chooses the record (``record_dtype(fields)``):
      "full"     VIE_DTYPE, every field (the default)
      "compact"  COMPACT_DTYPE: length, status, opcode_map, opcode, op_class, modrm,
                 has_modrm, operand_size in 8 bytes; several times faster than "full"
      "length"   a uint8 array of instruction lengths (the boundaries only; the status
                 is in "compact")
      names      a sequence of VIE_DTYPE field names: a record of those fields. Each new
                 choice compiles its kernel once (seconds; cached across processes).
    Every mode decodes the same way: the values are those of the full record.

    Undecodable bytes give one-byte INVALID records; a cut-off last instruction gives a
    final TRUNCATED record covering the remaining bytes.
    """
    buf = _as_uint8_array(data)
    _check_mode(bitness, address)
    dtype = record_dtype(fields)
    lengths_only = dtype.names is None
    n = buf.shape[0]
    chunks = []
    offset = 0
    while offset < n:
        # x86 code averages 3-4 bytes per instruction: a full chunk just means another pass.
        # Lengths take a byte a record, so room for every byte costs little.
        capacity = n - offset if lengths_only else (n - offset) // 3 + 16
        out = np.empty(capacity, dtype=dtype)
        count, offset = _decode_run(buf, offset, int(bitness), np.uint64(address),
                                    out.view(_LENGTH_RECORD) if lengths_only else out, 0, capacity)
        chunks.append(out[:count])
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)


def decode(data, bitness: int = 64, address: int = 0):
    """Decode the first instruction of data; returns one VIE_DTYPE record."""
    buf = _as_uint8_array(data)
    _check_mode(bitness, address)
    out = np.empty(1, dtype=VIE_DTYPE)
    decode_one(buf, 0, int(bitness), np.uint64(address), out, 0)
    return out[0]
