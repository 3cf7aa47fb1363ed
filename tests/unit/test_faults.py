"""Which instructions the CPU refuses, decided from the instruction and the vCPU's state
(hvjit.emulation.faults), without KVM: every rule, each way it can go."""

import pytest

from hvjit.emulation import faults as F
from hvjit.kernels.decode import decode

UD, NM, GP = F.VEC_UD, F.VEC_NM, F.VEC_GP
PE, EM, TS = F.CR0_PE, F.CR0_EM, F.CR0_TS
OSFXSR, OSXSAVE, FSGSBASE, TSD, PKE = F.CR4_OSFXSR, F.CR4_OSXSAVE, F.CR4_FSGSBASE, F.CR4_TSD, F.CR4_PKE
ALL = frozenset({"sse", "sse2", "sse3", "ssse3", "sse4_1", "sse4_2", "mmx", "avx", "avx512f", "bmi1",
                 "bmi2", "movbe", "invpcid", "rdpru", "rdpid", "rdtscp", "smap", "fsgsbase", "popcnt",
                 "cx8", "cx16", "clwb", "clflush", "clflushopt", "rdrand", "rdseed", "aes", "pclmulqdq"})


def cpu(*, cr0=PE, cr4=OSFXSR | OSXSAVE, cpl=0, bitness=64, without=(), xcr0=0xE7, rflags=2):
    return F.CpuView(cr0, cr4, 0x500, rflags, cpl, bitness, ALL - set(without), lambda: xcr0)


def vector(code: bytes, state, bitness=64):
    rec = decode(code, bitness, 0x1000)
    assert rec["status"] == 0, code.hex()
    r = F.refusal(rec, state)
    return None if r is None else (r.vector, r.error_code)


MOVBE_REG, MOVBE_MEM = bytes.fromhex("0f38f0c3"), bytes.fromhex("0f38f003")
VZEROALL = bytes.fromhex("c5fc77")
VADDPS_ZMM = bytes.fromhex("62f17c4858c1")
ANDN, ANDN_L1 = bytes.fromhex("c4e270f2c2"), bytes.fromhex("c4e274f2c2")
ADDPS, PADDB, PSHUFB, CRC32 = (bytes.fromhex(h) for h in ("0f58c1", "0ffcc1", "660f3800c1", "f20f38f1c3"))
INVPCID, INVPCID_REG = bytes.fromhex("660f388203"), bytes.fromhex("660f3882c3")
RDPRU, RDPID, RDTSCP, CLAC, UD2 = (bytes.fromhex(h) for h in ("0f01fd", "f30fc7f8", "0f01f9", "0f01ca", "0f0b"))
RDFSBASE, POPCNT, CMPXCHG16B = bytes.fromhex("f3480faec0"), bytes.fromhex("f30fb8c3"), bytes.fromhex("480fc70f")


def test_movbe():
    assert vector(MOVBE_REG, cpu()) == (UD, None)
    assert vector(MOVBE_MEM, cpu()) is None
    assert vector(MOVBE_MEM, cpu(without={"movbe"})) == (UD, None)


@pytest.mark.parametrize(("state", "want"), [
    (cpu(cr4=OSFXSR), (UD, None)),  # CR4.OSXSAVE clear
    (cpu(xcr0=0x3), (UD, None)),  # XCR0 without AVX state
    (cpu(without={"avx"}), (UD, None)),
    (cpu(cr0=PE | TS), (NM, None)),
    (cpu(cr0=0), (UD, None)),  # real mode
    (cpu(rflags=2 | F.RFLAGS_VM, bitness=16), (UD, None)),  # virtual-8086 mode
    (cpu(), None),
])
def test_vex(state, want):
    assert vector(VZEROALL, state, state.bitness if state.bitness != 16 else 32) == want


def test_evex_and_vex_general_purpose():
    assert vector(VADDPS_ZMM, cpu()) is None
    assert vector(VADDPS_ZMM, cpu(xcr0=0x7)) == (UD, None)  # no opmask/ZMM state
    assert vector(VADDPS_ZMM, cpu(without={"avx512f"})) == (UD, None)
    assert vector(ANDN, cpu(cr4=0, xcr0=1)) is None  # BMI needs no OSXSAVE or AVX state
    assert vector(ANDN, cpu(without={"bmi1"})) == (UD, None)
    assert vector(ANDN_L1, cpu()) == (UD, None)


def test_legacy_sse_and_mmx():
    assert vector(ADDPS, cpu()) is None
    assert vector(ADDPS, cpu(cr0=PE | EM)) == (UD, None)
    assert vector(ADDPS, cpu(cr4=0)) == (UD, None)  # CR4.OSFXSR clear
    assert vector(ADDPS, cpu(without={"sse"})) == (UD, None)
    assert vector(ADDPS, cpu(cr0=PE | TS)) == (NM, None)
    assert vector(PADDB, cpu(cr4=0)) is None  # MMX: no XMM state needed
    assert vector(PADDB, cpu(cr0=PE | EM)) == (UD, None)
    assert vector(PADDB, cpu(cr0=PE | TS)) == (NM, None)
    assert vector(PSHUFB, cpu(without={"ssse3"})) == (UD, None)
    assert vector(CRC32, cpu(without={"sse4_2"})) == (UD, None)
    assert vector(CRC32, cpu()) is None
    assert F.legacy_vector_kind(decode(bytes.fromhex("660f3a44c100"), 64)) == (True, "pclmulqdq")
    assert F.legacy_vector_kind(decode(bytes.fromhex("f20ff008"), 64)) == (True, "sse3")  # lddqu
    assert F.legacy_vector_kind(decode(bytes.fromhex("0f5ac1"), 64)) == (True, "sse2")  # cvtps2pd
    assert F.legacy_vector_kind(decode(bytes.fromhex("0f0f c1 9e".replace(" ", "")), 64)) == (False, "3dnow")


def test_system_instructions():
    assert vector(INVPCID, cpu()) is None
    assert vector(INVPCID, cpu(without={"invpcid"})) == (UD, None)
    assert vector(INVPCID, cpu(cpl=3)) == (GP, 0)
    assert vector(INVPCID, cpu(cpl=3, without={"invpcid"})) == (UD, None)  # #UD comes first
    assert vector(INVPCID_REG, cpu()) == (UD, None)
    assert vector(RDPRU, cpu(without={"rdpru"})) == (UD, None)
    assert vector(RDPRU, cpu(cpl=3, cr4=TSD)) == (GP, 0)
    assert vector(RDPRU, cpu(cpl=3)) is None
    assert vector(RDPID, cpu(without={"rdpid"})) == (UD, None)
    assert vector(RDTSCP, cpu(without={"rdtscp"})) == (UD, None)
    assert vector(RDTSCP, cpu(cpl=3, cr4=TSD)) == (GP, 0)
    assert vector(RDTSCP, cpu(cr4=TSD)) is None  # CPL0 may
    assert vector(CLAC, cpu(cpl=3)) == (UD, None)
    assert vector(CLAC, cpu(without={"smap"})) == (UD, None)
    assert vector(CLAC, cpu()) is None
    assert vector(UD2, cpu()) == (UD, None)
    assert vector(RDFSBASE, cpu(cr4=FSGSBASE)) is None
    assert vector(RDFSBASE, cpu()) == (UD, None)  # CR4.FSGSBASE clear
    assert vector(bytes.fromhex("f30faec0"), cpu(cr4=FSGSBASE, bitness=32), 32) == (UD, None)
    assert vector(POPCNT, cpu(without={"popcnt"})) == (UD, None)
    assert vector(CMPXCHG16B, cpu(without={"cx16"})) == (UD, None)
    assert vector(CMPXCHG16B, cpu()) is None
    assert vector(bytes.fromhex("0f01ee"), cpu()) == (UD, None)  # rdpkru, CR4.PKE clear
    assert vector(bytes.fromhex("0f01ee"), cpu(cr4=PKE)) is None
    assert vector(bytes.fromhex("660f388003"), cpu()) == (UD, None)  # invept outside VMX


@pytest.mark.parametrize(("code", "want"), [
    ("f090", (UD, None)),  # lock nop
    ("f089d8", (UD, None)),  # lock mov %ebx, %eax: no memory destination
    ("f0c5fc77", (UD, None)),  # LOCK before VEX
    ("0f04", (UD, None)),  # undefined opcode
    ("06", (UD, None)),  # push %es does not exist in 64-bit mode
    ("66" * 14 + "0501000000", (GP, 0)),  # 19 bytes
])
def test_encodings_the_decoder_rejects(code, want):
    raw = bytes.fromhex(code)
    assert decode(raw, 64)["status"] != 0
    r = F.invalid_encoding(raw[:15], 64)
    assert (r.vector, r.error_code) == want


def test_too_few_bytes_to_tell():
    assert F.invalid_encoding(bytes.fromhex("0f38"), 64) is None


def test_features_of_a_cpuid_table():
    import numpy as np

    from hvjit.abi import KVM_CPUID_ENTRY2_DTYPE

    table = np.zeros(3, KVM_CPUID_ENTRY2_DTYPE)
    table["function"] = [1, 7, 0x80000008]
    table[0]["ecx"] = 1 << 22  # movbe
    table[1]["ebx"] = 1 << 10  # invpcid
    table[2]["ebx"] = 1 << 4  # rdpru
    assert {"movbe", "invpcid", "rdpru"} <= F.features_of(table)
    assert "avx" not in F.features_of(table)
