"""Opcode property tables for the x86 decoder, written by hand from the Intel SDM Vol. 2
Appendix A opcode maps (and AMD APM Vol. 3 for 3DNow!, SSE4a and XOP).

Each map is a small text table, one row per opcode or opcode range::

    <opcode>[-<opcode>]  <flags...>  <OPCLASS>

and is compiled at import time into flat numpy arrays the jitted decoder indexes:
``FLAGS[map, opcode]`` (uint16: ModRM, immediate kind, mode rules) and
``OPCLASS[map, opcode]``. Group opcodes whose meaning depends on ModRM.reg get a group
number in ``GROUP[map, opcode]`` and their per-reg classes in ``GROUP_CLASS[group, reg]``.

Flags:
    M      has a ModRM byte
    b      byte operation (operand size 1)
    ib iw iz iv     immediate: 8 bit, 16 bit, 16/32 by operand size, 16/32/64 by operand size
    rel8 relz       relative branch (rel8; rel16/32, always rel32 in 64-bit mode)
    moffs  absolute address of address-size bytes (stored as the displacement)
    enter  iw then ib          ptr    far pointer: offset (16/32) then selector (16)
    grp3   F6/F7: immediate (ib or iz) only when ModRM.reg is 0 or 1 (TEST)
    i64    invalid in 64-bit mode
    d64    default operand size 64 in 64-bit mode (push/pop; 0x66 still selects 16)
    f64    operand size forced to 64 in 64-bit mode (near branches, mov cr/dr; Intel rules)
    w32    operand size never 64 (REX.W ignored: in/out/ins/outs)
    inv    undefined opcode
    lk     LOCK allowed (with a memory destination)
    mem    the ModRM operand must be memory (mod == 3 is undefined)

Group rows list a class per ModRM.reg; ``+`` after a class marks it lockable, ``-`` marks an
undefined row (INVALID) and ``@`` a memory-only row.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class OpClass(IntEnum):
    """What an instruction does, at the granularity a VM-exit handler dispatches on."""

    OTHER = 0
    MOV = 1
    MOVZX = 2
    MOVSX = 3
    MOVS = 4
    STOS = 5
    AND = 6
    OR = 7
    XOR = 8
    ADD = 9
    SUB = 10
    CMP = 11
    TEST = 12
    BT = 13
    PUSH = 14
    POP = 15
    GROUP1 = 16  # 80-83: ALU op with immediate, the operation is ModRM.reg (bhyve style)
    INT3 = 17
    INTN = 18
    IN = 19
    OUT = 20
    INS = 21
    OUTS = 22
    CMPXCHG8B = 23
    CMPXCHG16B = 24
    XSAVE_FAMILY = 25  # xsave/xrstor/xsaveopt/xsavec/xsaves/xrstors: ModRM.reg tells which
    XGETBV = 26
    XSETBV = 27
    MOVBE = 28
    CLWB = 29
    CLFLUSHOPT = 30
    CLFLUSH = 31
    HLT = 32
    RDMSR = 33
    WRMSR = 34
    CPUID = 35
    ADC = 36
    SBB = 37
    LODS = 38
    CMPS = 39
    SCAS = 40
    XCHG = 41
    CMPXCHG = 42
    XADD = 43
    INC = 44
    DEC = 45
    NEG = 46
    NOT = 47
    MUL = 48
    IMUL = 49
    DIV = 50
    IDIV = 51
    SHIFT = 52  # group 2 (rol/ror/rcl/rcr/shl/shr/sal/sar): ModRM.reg tells which
    BTS = 53
    BTR = 54
    BTC = 55
    LEA = 56
    MOVSXD = 57
    JMP = 58
    JCC = 59
    CALL = 60
    RET = 61
    IRET = 62
    SYSCALL = 63
    SYSRET = 64
    SYSENTER = 65
    SYSEXIT = 66
    MOV_CR = 67
    MOV_DR = 68
    MOV_SREG = 69
    INVLPG = 70
    INVD = 71
    WBINVD = 72
    RDTSC = 73
    RDTSCP = 74
    RDPMC = 75
    RDPID = 76
    RDRAND = 77
    RDSEED = 78
    POPCNT = 79
    NOP = 80
    CLI = 81
    STI = 82
    DESCRIPTOR_TABLE = 83  # sgdt/sidt/lgdt/lidt/sldt/str/lldt/ltr/smsw/lmsw: ModRM.reg tells
    VMCALL = 84
    VMMCALL = 85
    MONITOR = 86
    MWAIT = 87
    CLAC = 88
    STAC = 89
    SWAPGS = 90
    UD = 91
    FWAIT = 92
    LDMXCSR = 93
    STMXCSR = 94
    FXSAVE = 95
    FXRSTOR = 96
    INT1 = 97
    INTO = 98
    ENTER = 99
    LEAVE = 100
    PUSHF = 101
    POPF = 102
    CLTS = 103
    BSWAP = 104
    SETCC = 105
    CMOVCC = 106
    X87 = 107
    LOOP = 108  # loop/loope/loopne/jcxz
    CALL_FAR = 109
    JMP_FAR = 110
    RET_FAR = 111
    PAUSE = 112
    FSGSBASE = 113  # rd/wr fs/gs base: ModRM.reg tells which
    LFENCE = 114
    MFENCE = 115
    SFENCE = 116
    VMX = 117  # vmread/vmwrite/vmptrld/... (other than vmcall)
    SSE_AVX = 118  # vector instruction (legacy SSE/MMX, VEX, EVEX, XOP, 3DNow!)
    PREFETCH = 119
    CBW_CWD = 120  # cbw/cwde/cdqe/cwd/cdq/cqo
    FLAGS_OP = 121  # clc/stc/cmc/cld/std/sahf/lahf
    SHLD_SHRD = 122
    BSF_BSR = 123
    CRC32 = 124
    WRPKRU_RDPKRU = 125
    SERIALIZE = 126


# Immediate kinds (bits 1-4 of a FLAGS entry).
IMM_NONE = 0
IMM_B = 1
IMM_W = 2
IMM_Z = 3
IMM_V = 4
IMM_REL8 = 5
IMM_RELZ = 6
IMM_MOFFS = 7
IMM_ENTER = 8
IMM_PTR = 9
IMM_GRP3 = 10
IMM_D = 11  # always 32 bits (XOP map 0Ah)
IMM_BB = 12  # two imm8 (SSE4a extrq/insertq)

F_MODRM = 1 << 0
IMM_SHIFT = 1
IMM_MASK = 0xF
F_BYTE = 1 << 5
F_I64 = 1 << 6
F_D64 = 1 << 8
F_F64 = 1 << 9
F_W32 = 1 << 10
F_INVALID = 1 << 11
F_LOCKABLE = 1 << 12
F_MEMORY_ONLY = 1 << 13

_FLAG_BITS = {
    "M": F_MODRM,
    "b": F_BYTE,
    "i64": F_I64,
    "d64": F_D64,
    "f64": F_F64,
    "w32": F_W32,
    "inv": F_INVALID,
    "lk": F_LOCKABLE,
    "mem": F_MEMORY_ONLY,
}
_IMM_KINDS = {
    "ib": IMM_B,
    "iw": IMM_W,
    "iz": IMM_Z,
    "iv": IMM_V,
    "id": IMM_D,
    "ibib": IMM_BB,
    "rel8": IMM_REL8,
    "relz": IMM_RELZ,
    "moffs": IMM_MOFFS,
    "enter": IMM_ENTER,
    "ptr": IMM_PTR,
    "grp3": IMM_GRP3,
}

# Opcode maps (first index of FLAGS/OPCLASS/GROUP). The numbering follows the VEX/EVEX
# "mmmmm" field so a VEX map number indexes the table directly; XOP maps 8-10 follow.
MAP_ONE_BYTE = 0
MAP_0F = 1
MAP_0F38 = 2
MAP_0F3A = 3
MAP_3DNOW = 4  # 0F 0F ModRM ... suffix: the suffix byte is the opcode
MAP_EVEX5 = 5
MAP_EVEX6 = 6
MAP_XOP8 = 8
MAP_XOP9 = 9
MAP_XOPA = 10
N_MAPS = 11

# Table A-2, one-byte opcode map.
_ONE_BYTE_MAP = """
00 M b lk ADD
01 M lk ADD
02 M b ADD
03 M ADD
04 ib b ADD
05 iz ADD
06 i64 PUSH
07 i64 POP
08 M b lk OR
09 M lk OR
0A M b OR
0B M OR
0C ib b OR
0D iz OR
0E i64 PUSH
10 M b lk ADC
11 M lk ADC
12 M b ADC
13 M ADC
14 ib b ADC
15 iz ADC
16 i64 PUSH
17 i64 POP
18 M b lk SBB
19 M lk SBB
1A M b SBB
1B M SBB
1C ib b SBB
1D iz SBB
1E i64 PUSH
1F i64 POP
20 M b lk AND
21 M lk AND
22 M b AND
23 M AND
24 ib b AND
25 iz AND
27 i64 OTHER
28 M b lk SUB
29 M lk SUB
2A M b SUB
2B M SUB
2C ib b SUB
2D iz SUB
2F i64 OTHER
30 M b lk XOR
31 M lk XOR
32 M b XOR
33 M XOR
34 ib b XOR
35 iz XOR
37 i64 OTHER
38 M b CMP
39 M CMP
3A M b CMP
3B M CMP
3C ib b CMP
3D iz CMP
3F i64 OTHER
40-47 INC
48-4F DEC
50-57 d64 PUSH
58-5F d64 POP
60 i64 PUSH
61 i64 POP
62 M mem i64 OTHER
63 M MOVSXD
68 iz d64 PUSH
69 M iz IMUL
6A ib d64 PUSH
6B M ib IMUL
6C b INS
6D w32 INS
6E b OUTS
6F w32 OUTS
70-7F rel8 f64 JCC
80 M ib b GROUP1
81 M iz GROUP1
82 M ib b i64 GROUP1
83 M ib GROUP1
84 M b TEST
85 M TEST
86 M b lk XCHG
87 M lk XCHG
88 M b MOV
89 M MOV
8A M b MOV
8B M MOV
8C M MOV_SREG
8D M mem LEA
8E M MOV_SREG
8F M d64 POP
90 NOP
91-97 XCHG
98-99 CBW_CWD
9A ptr i64 CALL_FAR
9B FWAIT
9C d64 PUSHF
9D d64 POPF
9E-9F FLAGS_OP
A0 moffs b MOV
A1 moffs MOV
A2 moffs b MOV
A3 moffs MOV
A4 b MOVS
A5 MOVS
A6 b CMPS
A7 CMPS
A8 ib b TEST
A9 iz TEST
AA b STOS
AB STOS
AC b LODS
AD LODS
AE b SCAS
AF SCAS
B0-B7 ib b MOV
B8-BF iv MOV
C0 M ib b SHIFT
C1 M ib SHIFT
C2 iw f64 RET
C3 f64 RET
C4 M mem i64 OTHER
C5 M mem i64 OTHER
C6 M ib b MOV
C7 M iz MOV
C8 enter d64 ENTER
C9 d64 LEAVE
CA iw RET_FAR
CB RET_FAR
CC INT3
CD ib INTN
CE i64 INTO
CF IRET
D0 M b SHIFT
D1 M SHIFT
D2 M b SHIFT
D3 M SHIFT
D4 ib i64 OTHER
D5 ib i64 OTHER
D6 i64 OTHER
D7 b OTHER
D8-DF M X87
E0-E3 rel8 f64 LOOP
E4 ib b IN
E5 ib w32 IN
E6 ib b OUT
E7 ib w32 OUT
E8 relz f64 CALL
E9 relz f64 JMP
EA ptr i64 JMP_FAR
EB rel8 f64 JMP
EC b IN
ED w32 IN
EE b OUT
EF w32 OUT
F1 INT1
F4 HLT
F5 FLAGS_OP
F6 M b grp3 OTHER
F7 M grp3 OTHER
F8-F9 FLAGS_OP
FA CLI
FB STI
FC-FD FLAGS_OP
FE M b OTHER
FF M OTHER
"""
# Not in the table: prefixes 26 2E 36 3E 64 65 66 67 F0 F2 F3 (consumed before the opcode
# lookup), 0F (escape), and 40-4F are REX in 64-bit mode; 62/C4/C5/8F may start
# EVEX/VEX/XOP (handled by the decoder before the lookup).

# Table A-3, two-byte opcode map (0F xx). SSE/MMX rows are permissive about the mandatory
# prefix: the length never depends on it except where noted (78, B8).
_MAP_0F = """
00 M OTHER
01 M OTHER
02-03 M OTHER
04 inv OTHER
05 SYSCALL
06 CLTS
07 SYSRET
08 INVD
09 WBINVD
0A inv OTHER
0B UD
0C inv OTHER
0D M PREFETCH
0E SSE_AVX
10-17 M SSE_AVX
18 M PREFETCH
19-1F M NOP
20 M f64 MOV_CR
21 M f64 MOV_DR
22 M f64 MOV_CR
23 M f64 MOV_DR
24-27 inv OTHER
28-2F M SSE_AVX
30 WRMSR
31 RDTSC
32 RDMSR
33 RDPMC
34 SYSENTER
35 SYSEXIT
36 inv OTHER
37 OTHER
39 inv OTHER
3B-3F inv OTHER
40-4F M CMOVCC
50-6F M SSE_AVX
70-73 M ib SSE_AVX
74-76 M SSE_AVX
77 SSE_AVX
78 M VMX
79 M VMX
7A-7B inv OTHER
7C-7F M SSE_AVX
80-8F relz f64 JCC
90-9F M b SETCC
A0 d64 PUSH
A1 d64 POP
A2 CPUID
A3 M BT
A4 M ib SHLD_SHRD
A5 M SHLD_SHRD
A6-A7 M OTHER
A8 d64 PUSH
A9 d64 POP
AA OTHER
AB M lk BTS
AC M ib SHLD_SHRD
AD M SHLD_SHRD
AE M OTHER
AF M IMUL
B0 M b lk CMPXCHG
B1 M lk CMPXCHG
B2 M mem OTHER
B3 M lk BTR
B4-B5 M mem OTHER
B6-B7 M MOVZX
B8 M POPCNT
B9 M UD
BA M ib OTHER
BB M lk BTC
BC-BD M BSF_BSR
BE-BF M MOVSX
C0 M b lk XADD
C1 M lk XADD
C2 M ib SSE_AVX
C3 M mem OTHER
C4-C6 M ib SSE_AVX
C7 M OTHER
C8-CF BSWAP
D0-FE M SSE_AVX
FF M UD
"""

# Table A-4, three-byte map 0F 38: every opcode has ModRM and no immediate. Only the
# general-purpose rows get a class; the rest are vector instructions.
_MAP_0F38 = """
00-EF M SSE_AVX
F0-F1 M MOVBE
F2-FF M OTHER
"""

# Table A-5, three-byte map 0F 3A: ModRM and an imm8 everywhere.
_MAP_0F3A = """
00-FF M ib SSE_AVX
"""

# 3DNow! (0F 0F ModRM ... suffix): the suffix is the opcode and there is no immediate.
_MAP_3DNOW = """
00-FF M SSE_AVX
"""

# EVEX maps 5 and 6 (AVX512-FP16): ModRM, no immediate.
_MAP_EVEX56 = """
00-FF M SSE_AVX
"""

# AMD XOP maps: 8 has an imm8 everywhere, 9 none, 0Ah a 32-bit immediate.
_MAP_XOP8 = """
00-FF M ib SSE_AVX
"""
_MAP_XOP9 = """
00-FF M SSE_AVX
"""
_MAP_XOPA = """
00-FF M id SSE_AVX
"""

# VEX/EVEX map 1 is the 0F map without the legacy-only rows; the decoder uses the 0F row
# for length (ModRM + immediate) except that every VEX/EVEX opcode has a ModRM byte but
# 0F 77 (vzeroupper/vzeroall).

# Groups (SDM Table A-6): opcode -> class for each ModRM.reg value 0..7.
_GROUPS = {
    (MAP_ONE_BYTE, 0x80): "ADD+ OR+ ADC+ SBB+ AND+ SUB+ XOR+ CMP",
    (MAP_ONE_BYTE, 0x8C): "MOV_SREG MOV_SREG MOV_SREG MOV_SREG MOV_SREG MOV_SREG - -",
    (MAP_ONE_BYTE, 0x8E): "MOV_SREG - MOV_SREG MOV_SREG MOV_SREG MOV_SREG - -",  # not cs
    (MAP_ONE_BYTE, 0x8F): "POP - - - - - - -",
    (MAP_ONE_BYTE, 0xC6): "MOV - - - - - - OTHER",  # /7 is xabort (C6 F8 only)
    (MAP_ONE_BYTE, 0xC7): "MOV - - - - - - OTHER",  # /7 is xbegin (C7 F8 only)
    (MAP_ONE_BYTE, 0xF6): "TEST TEST NOT+ NEG+ MUL IMUL DIV IDIV",
    (MAP_ONE_BYTE, 0xFE): "INC+ DEC+ - - - - - -",
    (MAP_ONE_BYTE, 0xFF): "INC+ DEC+ CALL CALL_FAR@ JMP JMP_FAR@ PUSH -",
    (MAP_0F, 0x00): "DESCRIPTOR_TABLE DESCRIPTOR_TABLE DESCRIPTOR_TABLE DESCRIPTOR_TABLE OTHER OTHER - -",
    (MAP_0F, 0x01): "DESCRIPTOR_TABLE DESCRIPTOR_TABLE DESCRIPTOR_TABLE DESCRIPTOR_TABLE DESCRIPTOR_TABLE OTHER DESCRIPTOR_TABLE INVLPG",
    (MAP_0F, 0xAE): "FXSAVE FXRSTOR LDMXCSR STMXCSR XSAVE_FAMILY XSAVE_FAMILY XSAVE_FAMILY CLFLUSH",
    (MAP_0F, 0xBA): "- - - - BT BTS+ BTR+ BTC+",
    (MAP_0F, 0xC7): "- CMPXCHG8B+@ - XSAVE_FAMILY@ XSAVE_FAMILY@ XSAVE_FAMILY@ VMX VMX",
}
# Groups sharing a row with another opcode.
_GROUP_ALIASES = {
    (MAP_ONE_BYTE, 0x81): (MAP_ONE_BYTE, 0x80),
    (MAP_ONE_BYTE, 0x82): (MAP_ONE_BYTE, 0x80),
    (MAP_ONE_BYTE, 0x83): (MAP_ONE_BYTE, 0x80),
    (MAP_ONE_BYTE, 0xF7): (MAP_ONE_BYTE, 0xF6),
}

# 0F 01 with mod == 3: the whole ModRM byte selects the instruction (Table A-6, group 7).
_MAP_0F01_REGISTER_FORMS = {
    0xC1: "VMCALL", 0xC2: "VMX", 0xC3: "VMX", 0xC4: "VMX",
    0xC8: "MONITOR", 0xC9: "MWAIT", 0xCA: "CLAC", 0xCB: "STAC",
    0xD0: "XGETBV", 0xD1: "XSETBV",
    0xD8: "VMX", 0xD9: "VMMCALL", 0xDA: "VMX", 0xDB: "VMX",
    0xDC: "STI", 0xDD: "CLI", 0xDE: "OTHER", 0xDF: "INVLPG",
    0xE8: "SERIALIZE", 0xEE: "WRPKRU_RDPKRU", 0xEF: "WRPKRU_RDPKRU",
    0xF8: "SWAPGS", 0xF9: "RDTSCP", 0xFA: "MONITOR", 0xFB: "MWAIT",
}


def _parse_map(text: str, flags: np.ndarray, classes: np.ndarray) -> None:
    for line in text.strip().splitlines():
        fields = line.split()
        span, tokens, class_name = fields[0], fields[1:-1], fields[-1]
        first, _, last = span.partition("-")
        lo, hi = int(first, 16), int(last or first, 16)
        value = 0
        for token in tokens:
            if token in _FLAG_BITS:
                value |= _FLAG_BITS[token]
            else:
                value |= _IMM_KINDS[token] << IMM_SHIFT
        flags[lo : hi + 1] = value
        classes[lo : hi + 1] = OpClass[class_name]


def _build():
    flags = np.full((N_MAPS, 256), F_INVALID, dtype=np.uint16)
    classes = np.zeros((N_MAPS, 256), dtype=np.uint8)
    # Rows absent from the 1-byte table are prefixes/escapes, never looked up as opcodes.
    for map_index, text in (
        (MAP_ONE_BYTE, _ONE_BYTE_MAP),
        (MAP_0F, _MAP_0F),
        (MAP_0F38, _MAP_0F38),
        (MAP_0F3A, _MAP_0F3A),
        (MAP_3DNOW, _MAP_3DNOW),
        (MAP_EVEX5, _MAP_EVEX56),
        (MAP_EVEX6, _MAP_EVEX56),
        (MAP_XOP8, _MAP_XOP8),
        (MAP_XOP9, _MAP_XOP9),
        (MAP_XOPA, _MAP_XOPA),
    ):
        _parse_map(text, flags[map_index], classes[map_index])

    group_of = np.zeros((N_MAPS, 256), dtype=np.uint8)  # 0 = not a group
    group_class = np.zeros((len(_GROUPS) + 1, 8), dtype=np.uint8)
    group_flags = np.zeros((len(_GROUPS) + 1, 8), dtype=np.uint16)  # F_INVALID, F_LOCKABLE
    for number, (key, row) in enumerate(_GROUPS.items(), start=1):
        group_of[key] = number
        for reg, name in enumerate(row.split()):
            if name == "-":
                group_flags[number, reg] = F_INVALID
                continue
            if "+" in name:
                group_flags[number, reg] |= F_LOCKABLE
            if "@" in name:
                group_flags[number, reg] |= F_MEMORY_ONLY
            group_class[number, reg] = OpClass[name.rstrip("+@")]
    for alias, key in _GROUP_ALIASES.items():
        group_of[alias] = group_of[key]

    register_forms_0f01 = np.zeros(256, dtype=np.uint8)
    for modrm, name in _MAP_0F01_REGISTER_FORMS.items():
        register_forms_0f01[modrm] = OpClass[name]
    return flags, classes, group_of, group_class, group_flags, register_forms_0f01


FLAGS, OPCLASS, GROUP, GROUP_CLASS, GROUP_FLAGS, REGISTER_FORMS_0F01 = _build()
GROUP_0F01 = int(GROUP[MAP_0F, 0x01])

# VEX/EVEX map 1 opcodes that carry an imm8 (same rows as the 0F map).
VEX_MAP1_HAS_IMM8 = np.zeros(256, dtype=np.uint8)
VEX_MAP1_HAS_IMM8[[0x70, 0x71, 0x72, 0x73, 0xC2, 0xC4, 0xC5, 0xC6]] = 1
