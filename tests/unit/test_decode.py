"""Unit tests of the x86 decoder kernel: hand-checked encodings, random and mutated byte
streams against iced-x86, truncation, the 15-byte limit, the compact and length-only
outputs against the full record, and the Python wrappers."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba.core.errors import TypingError

from hvjit.benchmarks.corpus import compare_with_iced, text_corpus
from hvjit.kernels.decode import (
    COMPACT_DTYPE,
    REG_NONE,
    REG_RIP,
    VIE_DTYPE,
    DecodeStatus,
    OpClass,
    Segment,
    VexKind,
    decode,
    decode_buffer,
    decode_buffer_kernel,
    decode_one,
    record_dtype,
)

iced_x86 = pytest.importorskip("iced_x86")

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)


def fields(hex_bytes: str, bitness: int = 64, address: int = 0, **expected):
    record = decode(bytes.fromhex(hex_bytes), bitness, address)
    got = {name: int(record[name]) for name in expected}
    assert got == expected, f"{hex_bytes} ({bitness}-bit)"
    return record


# (hex, bitness, expected fields) — checked by hand against the SDM.
KNOWN = [
    ("90", 64, dict(length=1, op_class=OpClass.NOP, has_modrm=0)),
    ("f390", 64, dict(length=2, op_class=OpClass.PAUSE, rep=1)),
    ("488b8408f0ffffff", 64, dict(length=8, rex=0x48, rex_w=1, operand_size=8, op_class=OpClass.MOV,
                                  has_sib=1, base_reg=RAX, index_reg=RCX, scale=1, disp=-16, disp_bytes=4)),
    ("8b05f0ffffff", 64, dict(length=6, base_reg=REG_RIP, index_reg=REG_NONE, disp=-16, disp_bytes=4)),
    ("8b05f0ffffff", 32, dict(length=6, base_reg=REG_NONE, disp=-16, disp_bytes=4)),
    ("678b00", 64, dict(length=3, addrsize_prefix=1, address_size=4, base_reg=RAX)),
    ("8b4702", 16, dict(length=3, base_reg=RBX, index_reg=REG_NONE, disp=2, disp_bytes=1, operand_size=2)),
    ("8b00", 16, dict(length=2, base_reg=RBX, index_reg=RSI, address_size=2)),
    ("8b0e3412", 16, dict(length=4, base_reg=REG_NONE, disp=0x1234, disp_bytes=2)),
    ("66b83412", 32, dict(length=4, imm=0x1234, imm_bytes=2, operand_size=2)),
    ("66b878563412", 16, dict(length=6, imm=0x12345678, imm_bytes=4, operand_size=4)),
    ("48b8efcdab8967452301", 64, dict(length=10, imm=0x0123456789ABCDEF, imm_bytes=8, operand_size=8)),
    ("b8efcdab89", 64, dict(length=5, imm_bytes=4, operand_size=4)),
    ("a01122334455667788", 64, dict(length=9, disp_bytes=8, imm_bytes=0, operand_size=1, op_class=OpClass.MOV)),
    ("67a011223344", 64, dict(length=6, disp=0x44332211, disp_bytes=4)),
    ("a11122", 16, dict(length=3, disp=0x2211, disp_bytes=2)),
    ("c8100001", 64, dict(length=4, op_class=OpClass.ENTER, imm=0x10, imm_bytes=2, imm2=1, imm2_bytes=1)),
    ("9a112233445566", 32, dict(length=7, imm=0x44332211, imm_bytes=4, imm2=0x6655, imm2_bytes=2)),
    ("ea11223344", 16, dict(length=5, imm=0x2211, imm_bytes=2, imm2=0x4433, imm2_bytes=2)),
    ("66e800000000", 64, dict(length=6, imm_bytes=4, op_class=OpClass.CALL, operand_size=8)),
    ("66e80000", 32, dict(length=4, imm_bytes=2)),
    ("50", 64, dict(length=1, op_class=OpClass.PUSH, operand_size=8)),
    ("6650", 64, dict(length=2, operand_size=2)),
    ("4150", 64, dict(length=2, rex_b=1, operand_size=8)),
    ("f6c001", 64, dict(length=3, op_class=OpClass.TEST, imm=1, imm_bytes=1, operand_size=1)),
    ("f7c078563412", 64, dict(length=6, op_class=OpClass.TEST, imm_bytes=4)),
    ("f7d8", 64, dict(length=2, op_class=OpClass.NEG, imm_bytes=0)),
    ("4883e4f0", 64, dict(length=4, op_class=OpClass.GROUP1, imm=-16, imm_bytes=1, operand_size=8)),
    ("26488b00", 64, dict(length=4, segment=Segment.ES, rex_w=1)),
    ("48268b00", 64, dict(length=4, rex=0, rex_w=0, operand_size=4)),  # REX not last: ignored
    ("64f3a4", 64, dict(length=3, segment=Segment.FS, rep=1, op_class=OpClass.MOVS, operand_size=1)),
    ("f348ab", 64, dict(length=3, op_class=OpClass.STOS, operand_size=8)),
    ("cc", 64, dict(length=1, op_class=OpClass.INT3)),
    ("cd80", 64, dict(length=2, op_class=OpClass.INTN, imm=-128, imm_bytes=1)),
    ("e460", 32, dict(length=2, op_class=OpClass.IN, operand_size=1, imm=0x60)),
    ("66ef", 64, dict(length=2, op_class=OpClass.OUT, operand_size=2)),
    ("48ed", 64, dict(length=2, op_class=OpClass.IN, operand_size=4)),  # REX.W ignored
    ("f36d", 64, dict(length=2, op_class=OpClass.INS, rep=1, operand_size=4)),
    ("6e", 64, dict(length=1, op_class=OpClass.OUTS, operand_size=1)),
    ("f4", 64, dict(length=1, op_class=OpClass.HLT)),
    ("0fa2", 64, dict(length=2, op_class=OpClass.CPUID, opcode_map=1)),
    ("0f32", 64, dict(length=2, op_class=OpClass.RDMSR)),
    ("0f30", 64, dict(length=2, op_class=OpClass.WRMSR)),
    ("0f01d0", 64, dict(length=3, op_class=OpClass.XGETBV, mod=3)),
    ("0f01d1", 64, dict(length=3, op_class=OpClass.XSETBV)),
    ("0f01f8", 64, dict(length=3, op_class=OpClass.SWAPGS)),
    ("0f0138", 64, dict(length=3, op_class=OpClass.INVLPG)),
    ("0fae20", 64, dict(length=3, op_class=OpClass.XSAVE_FAMILY, reg=4)),
    ("480fae6c2408", 64, dict(length=6, op_class=OpClass.XSAVE_FAMILY, reg=5, disp=8)),
    ("0fc72f", 64, dict(length=3, op_class=OpClass.XSAVE_FAMILY, reg=5)),
    ("0fc70f", 32, dict(length=3, op_class=OpClass.CMPXCHG8B, operand_size=8)),
    ("f0480fc70f", 64, dict(length=5, op_class=OpClass.CMPXCHG16B, lock=1, operand_size=16)),
    ("0f38f007", 64, dict(length=4, op_class=OpClass.MOVBE, opcode_map=2, opcode=0xF0)),
    ("f20f38f1c1", 64, dict(length=5, op_class=OpClass.CRC32)),
    ("660fae37", 64, dict(length=4, op_class=OpClass.CLWB)),
    ("660fae3f", 64, dict(length=4, op_class=OpClass.CLFLUSHOPT)),
    ("0fae3f", 64, dict(length=3, op_class=OpClass.CLFLUSH)),
    ("0faee8", 64, dict(length=3, op_class=OpClass.LFENCE)),
    ("0f20d8", 64, dict(length=3, op_class=OpClass.MOV_CR, operand_size=8)),
    ("0f2018", 64, dict(length=3, mod=3, disp_bytes=0)),  # mov cr: mod is ignored
    ("0f05", 64, dict(length=2, op_class=OpClass.SYSCALL)),
    ("480f07", 64, dict(length=3, op_class=OpClass.SYSRET)),
    ("48cf", 64, dict(length=2, op_class=OpClass.IRET, operand_size=8)),
    ("0fb6c0", 64, dict(length=3, op_class=OpClass.MOVZX)),
    ("480fbf00", 64, dict(length=4, op_class=OpClass.MOVSX, operand_size=8)),
    ("4863c7", 64, dict(length=3, op_class=OpClass.MOVSXD)),
    ("0fbae305", 64, dict(length=4, op_class=OpClass.BT, imm=5)),
    ("f30fb8c0", 64, dict(length=4, op_class=OpClass.POPCNT)),
    ("0f0f000d", 64, dict(length=4, opcode_map=4, opcode=0x0D, imm_bytes=0)),  # 3DNow! pi2fd
    ("c5f877", 64, dict(length=3, vex=VexKind.VEX2, has_modrm=0, opcode=0x77, opcode_map=1)),
    ("c5f858c2", 32, dict(length=4, vex=VexKind.VEX2, vex_vvvv=0, vex_pp=0)),
    ("c400", 32, dict(length=2, vex=VexKind.NONE, opcode=0xC4, has_modrm=1)),  # les eax,[eax]
    ("c4e27d18c0", 64, dict(length=5, vex=VexKind.VEX3, vex_map=2, opcode_map=2, vex_l=1, vex_pp=1)),
    ("c4e3790fc101", 64, dict(length=6, vex=VexKind.VEX3, opcode_map=3, imm=1, imm_bytes=1)),
    ("62f17c48104001", 64, dict(length=7, vex=VexKind.EVEX, vex_l=2, disp=64, disp_bytes=1)),  # disp8*64
    ("62f1fd58584001", 64, dict(length=7, vex=VexKind.EVEX, evex_b=1, disp=8)),  # broadcast: *8
    ("6200", 32, dict(length=2, vex=VexKind.NONE, opcode=0x62)),  # bound eax,[eax]
    ("8fe878a2c000", 64, dict(length=6, vex=VexKind.XOP, opcode_map=8, imm_bytes=1)),
    ("8fea7810c001000000", 64, dict(length=9, vex=VexKind.XOP, opcode_map=10, imm=1, imm_bytes=4)),
    ("8fc0", 64, dict(length=2, vex=VexKind.NONE, op_class=OpClass.POP)),
    ("660f78c00102", 64, dict(length=6, imm=1, imm2=2, imm_bytes=1, imm2_bytes=1)),  # extrq
    ("c7f800000000", 64, dict(length=6, imm_bytes=4)),  # xbegin
    ("0f0b", 64, dict(length=2, op_class=OpClass.UD)),
    ("ff25f0ffffff", 64, dict(length=6, op_class=OpClass.JMP, base_reg=REG_RIP, operand_size=8)),
    ("ff7508", 64, dict(length=3, op_class=OpClass.PUSH, operand_size=8)),
]


@pytest.mark.parametrize("hex_bytes,bitness,expected", KNOWN, ids=[f"{h}/{b}" for h, b, _ in KNOWN])
def test_known_encodings(hex_bytes, bitness, expected):
    record = fields(hex_bytes, bitness, status=DecodeStatus.OK, **{k: int(v) for k, v in expected.items()})
    assert int(record["length"]) == len(bytes.fromhex(hex_bytes))


INVALID = [
    ("06", 64), ("27", 64), ("60", 64), ("9a112233445566", 64), ("d4 0a", 64), ("ea112233445566", 64),
    ("0f04", 64), ("0f0b".replace("0b", "0a"), 64), ("0fb8c0", 64),  # jmpe without F3
    ("66c5f877", 64), ("f3c5f877", 64), ("48c5f877", 64), ("f0c5f877", 64),  # prefix before VEX
    ("c4e0", 64), ("c4e47d", 64),  # VEX map 0 and 4
    ("62f17848104001", 64),  # EVEX P1 bit 2 clear
    ("f090", 64), ("f0ffc0", 64), ("f00300", 64),  # LOCK without a memory destination
    ("fff8", 64), ("fe10", 64), ("c7f900000000", 64), ("8ec8", 64),  # undefined group rows
    ("8dc0", 64), ("ffd8", 64),  # memory-only forms with mod == 3
]


@pytest.mark.parametrize("hex_bytes,bitness", INVALID)
def test_invalid_encodings(hex_bytes, bitness):
    data = bytes.fromhex(hex_bytes.replace(" ", "")) + b"\x00" * 16
    record = decode(data, bitness)
    assert record["status"] == DecodeStatus.INVALID
    assert record["length"] == 1
    assert iced_x86.Decoder(bitness, data).decode().is_invalid  # iced agrees


def test_address_and_rip_relative_target():
    record = decode(bytes.fromhex("488d05f0ffffff"), 64, address=0x401000)
    assert record["address"] == 0x401000
    assert record["base_reg"] == REG_RIP
    assert int(record["address"]) + int(record["length"]) + int(record["disp"]) == 0x400FF7


def test_fifteen_bytes_is_the_limit():
    valid = bytes.fromhex("66" * 13 + "0590")  # 13 prefixes + add ax, imm16 = 16 bytes
    assert decode(valid[:-1] + b"\x90", 64)["status"] == DecodeStatus.INVALID
    fifteen = bytes.fromhex("66" * 14 + "90")
    record = decode(fifteen, 64)
    assert (record["status"], record["length"]) == (DecodeStatus.OK, 15)
    for run in (15, 16, 40):
        records = decode_buffer(b"\x66" * run + b"\x90", 64)
        assert records[0]["status"] == DecodeStatus.INVALID
        assert records[0]["length"] == 1
    # A 16-byte instruction built from an immediate is invalid too, not truncated.
    long_imm = bytes.fromhex("2e" * 5 + "48c784880000000078563412") + b"\x00" * 4
    assert decode(long_imm, 64)["status"] == DecodeStatus.INVALID


LONG_INSTRUCTIONS = [
    ("26 f0 81 84 88 78 56 34 12 ef cd ab 89", 32),
    ("26 66 67 f0 81 84 78 56 34 12", 32),
    ("f0 48 81 84 c8 78 56 34 12 ef cd ab 89", 64),
    ("48 b8 ef cd ab 89 67 45 23 01", 64),
    ("c8 10 00 01", 64),
    ("9a 11 22 33 44 55 66", 32),
    ("62 f1 7c 48 10 84 c8 00 01 00 00", 64),
    ("c4 e3 79 0f 84 c8 00 01 00 00 05", 64),
    ("8f ea 78 10 84 c8 00 01 00 00 01 00 00 00", 64),
    ("0f 0f 84 c8 00 01 00 00 0d", 64),
    ("66 0f 3a 0f 84 c8 00 01 00 00 05", 64),
    ("a0 11 22 33 44 55 66 77 88", 64),
    ("8b 86 34 12", 16),
]


@pytest.mark.parametrize("hex_bytes,bitness", LONG_INSTRUCTIONS)
def test_every_cut_point_is_truncated(hex_bytes, bitness):
    full = bytes.fromhex(hex_bytes.replace(" ", ""))
    record = decode(full, bitness)
    assert (record["status"], record["length"]) == (DecodeStatus.OK, len(full))
    for cut in range(1, len(full)):
        # An exact-size array: any read past the end would be an out-of-bounds access.
        piece = np.frombuffer(full[:cut], dtype=np.uint8).copy()
        record = decode(piece, bitness)
        assert record["status"] == DecodeStatus.TRUNCATED, f"cut at {cut}"
        assert record["length"] == cut
        records = decode_buffer(piece, bitness)
        assert len(records) == 1 and records[0]["status"] == DecodeStatus.TRUNCATED
        compact = decode_buffer(piece, bitness, fields="compact")
        assert compact.tolist() == [(cut, DecodeStatus.TRUNCATED, 0, 0, 0, 0, 0, 0)]
        assert decode_buffer(piece, bitness, fields="length").tolist() == [cut]
        assert iced_x86.Decoder(bitness, full[:cut]).decode().is_invalid


def test_buffer_continues_after_invalid_and_stops_at_truncated():
    data = bytes.fromhex("90 06 90 48 8b")  # nop, (invalid push es), nop, truncated mov
    records = decode_buffer(data.replace(b" ", b""), 64, address=0x1000)
    assert [int(r["status"]) for r in records] == [DecodeStatus.OK, DecodeStatus.INVALID,
                                                    DecodeStatus.OK, DecodeStatus.TRUNCATED]
    assert [int(r["address"]) for r in records] == [0x1000, 0x1001, 0x1002, 0x1003]
    assert [int(r["length"]) for r in records] == [1, 1, 1, 2]
    assert len(decode_buffer(b"", 64)) == 0
    for fields in ("compact", "length", ["op_class"]):
        assert decode_buffer(b"", 64, fields=fields).dtype == record_dtype(fields)
        assert len(decode_buffer(b"", 64, fields=fields)) == 0
    assert decode_buffer(data.replace(b" ", b""), 64, fields="length").tolist() == [1, 1, 1, 2]


def test_buffer_wrapper_grows_past_its_first_chunk():
    data = b"\x90" * 1000  # one-byte instructions: more records than the first chunk holds
    records = decode_buffer(data, 32)
    assert len(records) == 1000
    assert np.array_equal(records["address"], np.arange(1000, dtype=np.uint64))
    compact = decode_buffer(data + b"\x06", 64, fields="compact")  # ends on an INVALID byte
    assert len(compact) == 1001 and compact.dtype == COMPACT_DTYPE
    assert set(compact["opcode"][:1000].tolist()) == {0x90} and compact[1000]["status"] == DecodeStatus.INVALID
    assert decode_buffer(data, 64, fields=["length", "address"])["address"][-1] == 999


def test_kernels_reject_out_of_range_indices():
    out = np.zeros(1, dtype=VIE_DTYPE)
    buf = np.frombuffer(b"\x90", dtype=np.uint8)
    assert decode_one(buf, 0, 64, 0, out, 1) == -1
    assert decode_one(buf, 0, 64, 0, out, -1) == -1
    assert decode_one(buf, 5, 64, 0, out, 0) == 0
    assert out[0]["status"] == DecodeStatus.TRUNCATED
    assert decode_buffer_kernel(buf, 0, 64, np.uint64(0), out[:0]) == 0


@pytest.mark.parametrize(
    "data,error",
    [
        ([0x90], TypeError),
        ("90", TypeError),
        (np.zeros(4, dtype=np.int16), TypeError),
        (np.zeros((2, 2), dtype=np.uint8), TypeError),
        (memoryview(np.zeros(4, dtype=np.uint32)), TypeError),
    ],
)
def test_wrapper_rejects_bad_data(data, error):
    with pytest.raises(error):
        decode_buffer(data)
    with pytest.raises(error):
        decode(data)


@pytest.mark.parametrize("bitness", [8, 0, 128, True, "64", 64.0])
def test_wrapper_rejects_bad_bitness(bitness):
    with pytest.raises(ValueError):
        decode_buffer(b"\x90", bitness)


@pytest.mark.parametrize("address", [-1, 1 << 64, 1.5])
def test_wrapper_rejects_bad_address(address):
    with pytest.raises(ValueError):
        decode_buffer(b"\x90", 64, address)


def test_wrapper_accepts_all_buffer_kinds():
    raw = bytes.fromhex("4889e5c3")
    for data in (raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, dtype=np.uint8)):
        records = decode_buffer(data, 64)
        assert [int(r["length"]) for r in records] == [3, 1]


def _assert_agrees(data: bytes, bitness: int):
    report = compare_with_iced(data, bitness)
    details = report.summary() + "\n" + "\n".join(report.examples)
    assert report.length_agreement == 1.0, details
    assert report.disagreements == 0, details
    return report


@pytest.mark.parametrize("bitness", [64, 32, 16])
def test_random_bytes_agree_with_iced(bitness):
    rng = np.random.default_rng(20261 + bitness)
    report = _assert_agrees(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes(), bitness)
    assert report.both_valid > 50_000 and report.both_invalid > 500


def _mutations(rng, corpus: bytes, count: int) -> bytes:
    """Real instructions with flipped bytes, inserted prefixes and VEX/EVEX/XOP escapes."""
    records = decode_buffer(corpus, 64)
    prefixes = np.frombuffer(bytes.fromhex("2e3e26366465666767f0f2f340414448494c4f0f0fc4c5628f"), np.uint8)
    pieces = []
    for index in rng.integers(0, len(records), count):
        start = int(records[index]["address"])
        piece = bytearray(corpus[start : start + int(records[index]["length"])])
        action = rng.integers(0, 4)
        if action == 0:
            piece[rng.integers(0, len(piece))] ^= 1 << int(rng.integers(0, 8))
        elif action == 1:
            piece[rng.integers(0, len(piece))] = int(rng.integers(0, 256))
        elif action == 2:
            for _ in range(int(rng.integers(1, 4))):
                piece.insert(int(rng.integers(0, len(piece) + 1)), int(rng.choice(prefixes)))
        else:
            piece = bytearray(rng.choice(prefixes, 1).tobytes()) + piece
        pieces.append(bytes(piece))
    return b"".join(pieces)


@pytest.fixture(scope="module")
def small_corpus() -> bytes:
    return text_corpus(256 << 10)


@pytest.mark.parametrize("bitness", [64, 32, 16])
def test_mutated_real_instructions_agree_with_iced(small_corpus, bitness):
    rng = np.random.default_rng(7 + bitness)
    data = _mutations(rng, small_corpus, 40_000)
    report = _assert_agrees(data, bitness)
    assert report.both_valid > 20_000


BOUNDSCHECK_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from numba.core import config
    assert config.BOUNDSCHECK, "NUMBA_BOUNDSCHECK did not reach numba"
    from hvjit.benchmarks.corpus import compare_with_iced, text_corpus
    from hvjit.kernels.decode import decode_buffer

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 30_000, dtype=np.uint8).tobytes() + text_corpus(30_000)
    for bitness in (64, 32, 16):
        report = compare_with_iced(data, bitness)
        assert report.disagreements == 0, report.summary()
        full = decode_buffer(data, bitness)
        compact = decode_buffer(data, bitness, fields="compact")
        assert all(np.array_equal(compact[name], full[name]) for name in compact.dtype.names)
        assert np.array_equal(decode_buffer(data, bitness, fields="length"), full["length"])
        # Every suffix and prefix of a random window, as exact-size arrays, in every output.
        for cut in range(1, 40):
            for fields in ("full", "compact", "length"):
                decode_buffer(np.frombuffer(data[:cut], np.uint8).copy(), bitness, fields=fields)
                decode_buffer(np.frombuffer(data[-cut:], np.uint8).copy(), bitness, fields=fields)
    print("ok")
    """
)


def test_no_out_of_bounds_access_under_numba_boundscheck(tmp_path):
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", HVJIT_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-c", BOUNDSCHECK_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


CACHED_OUTPUTS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from hvjit.kernels.decode import decode_buffer_kernel, record_dtype

    buf = np.frombuffer(bytes.fromhex("4889e5c390") * 100, dtype=np.uint8)
    for fields in sys.argv[1:]:
        out = np.zeros(len(buf), dtype=record_dtype(fields))
        count = decode_buffer_kernel(buf, 0, 64, np.uint64(0), out)
        print(fields, count, int(out["length"][:count].sum()))
    """
)


def test_outputs_cached_by_different_processes_load_together(tmp_path):
    """Each output dtype compiled and cached in its own process, then both loaded into one:
    their kernels must not take each other's symbols (see _record_mangling_args)."""
    env = dict(os.environ, HVJIT_CACHE_DIR=str(tmp_path / "cache"))

    def run(*fields):
        result = subprocess.run([sys.executable, "-c", CACHED_OUTPUTS_SCRIPT, *fields], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.split("\n")[:-1]

    assert run("full") == ["full 300 500"]
    assert run("compact") == ["compact 300 500"]
    assert run("full", "compact") == ["full 300 500", "compact 300 500"]


PYTHON_MODE_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from numba.core import config
    assert config.DISABLE_JIT, "NUMBA_DISABLE_JIT did not reach numba"
    from hvjit.kernels.decode import decode_buffer

    data = bytes.fromhex(DATA)
    for bitness in (64, 16):
        for fields in ("full", "compact", "length", ("op_class", "disp")):
            print(decode_buffer(data, bitness, 0x1000, fields=fields).tobytes().hex())
    """
)


def test_python_mode_gives_the_same_records(small_corpus):
    """The decoder as plain Python (NUMBA_DISABLE_JIT=1): _put and the word stores have
    Python fallbacks that must give the compiled records byte for byte."""
    rng = np.random.default_rng(8)
    data = small_corpus[:1500] + rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    expected = [decode_buffer(data, bitness, 0x1000, fields=fields).tobytes().hex()
                for bitness in (64, 16) for fields in ("full", "compact", "length", ("op_class", "disp"))]
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    script = PYTHON_MODE_SCRIPT.replace("DATA", repr(data.hex()))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected


def test_bench_decode_reports_both_decoders():
    from hvjit.benchmarks.decode import bench_decode

    result = bench_decode(text_corpus(64 << 10), seconds=0.2)
    assert result["corpus_bytes"] == 64 << 10
    assert result["instructions"] > 8_000
    assert result["hvjit_mb_s"] > 0 and result["iced_mb_s"] > 0
    assert result["hvjit_over_iced"] == pytest.approx(result["hvjit_mb_s"] / result["iced_mb_s"])
    for mode in ("compact", "length"):
        assert result[f"hvjit_kernel_{mode}_mb_s"] > 0
        assert result[f"{mode}_over_iced"] == pytest.approx(result[f"hvjit_{mode}_mb_s"] / result["iced_mb_s"])


@pytest.mark.parametrize("bitness", [64, 32])
def test_fast_path_matches_general_path(small_corpus, bitness):
    """decode_buffer takes the table-driven fast path for plain instructions with bytes to
    spare; decode() of the instruction alone (fewer than 24 bytes) takes the general path.
    Both must give the same record, field for field."""
    rng = np.random.default_rng(11 + bitness)
    data = small_corpus + rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    records = decode_buffer(data, bitness, address=0x1000)
    checked = 0
    for k in rng.choice(len(records) - 8, 20_000, replace=False):
        rec = records[k]
        start = int(rec["address"]) - 0x1000
        alone = decode(data[start : start + int(rec["length"])], bitness, address=int(rec["address"]))
        if rec["status"] == DecodeStatus.INVALID:
            assert alone["status"] in (DecodeStatus.INVALID, DecodeStatus.TRUNCATED)
            continue
        assert alone.tobytes() == rec.tobytes(), data[start : start + 15].hex()
        checked += 1
    assert checked > 10_000


# The outputs other than "full": the presets, and field choices whose fields the fast
# path packs into different words.
PARTIAL_OUTPUTS = ["compact", "length", ["op_class", "length"], ["disp", "base_reg", "imm", "status", "sib"]]


def _assert_partial_outputs_match_full(data: bytes, bitness: int, address: int = 0x7000):
    full = decode_buffer(data, bitness, address)
    for fields in PARTIAL_OUTPUTS:
        part = decode_buffer(data, bitness, address, fields=fields)
        assert part.dtype == record_dtype(fields) and len(part) == len(full), fields
        if fields == "length":
            assert np.array_equal(part, full["length"])
            continue
        for name in part.dtype.names:
            assert np.array_equal(part[name], full[name]), (fields, name)


@pytest.mark.parametrize("bitness", [64, 32, 16])
def test_compact_and_length_outputs_match_the_full_record(small_corpus, bitness):
    """Every output decodes the same way; each field equals the full record's, on real code,
    mutated instructions and random bytes (fast and general path, INVALID and TRUNCATED)."""
    rng = np.random.default_rng(31 + bitness)
    data = (small_corpus + _mutations(rng, small_corpus, 20_000)
            + rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() + b"\x48\x8b")
    _assert_partial_outputs_match_full(data, bitness)


def test_partial_outputs_match_on_short_and_hostile_buffers():
    """Exact-size buffers (no slack: the general path's bounds checks) cut at every length."""
    rng = np.random.default_rng(5)
    pieces = [bytes.fromhex(h.replace(" ", "")) for h, _ in LONG_INSTRUCTIONS]
    pieces += [rng.integers(0, 256, 40, dtype=np.uint8).tobytes() for _ in range(20)]
    for piece in pieces:
        for cut in range(1, len(piece) + 1):
            for bitness in (64, 32, 16):
                _assert_partial_outputs_match_full(np.frombuffer(piece[:cut], np.uint8).copy(), bitness)


def test_output_choices_are_checked():
    assert record_dtype() == VIE_DTYPE and record_dtype("compact").itemsize == 8
    assert record_dtype("length") == np.uint8
    assert record_dtype(("status", "length")).names == ("status", "length")
    for bad in ("short", ["nope"], [], ["length", "length"], [3]):
        with pytest.raises(ValueError):
            decode_buffer(b"\x90", 64, fields=bad)
    buf = np.frombuffer(b"\x90" * 4, dtype=np.uint8)
    # Outputs the decoder cannot fill completely are refused at compile time.
    for dtype in ([("length", np.uint16)], [("length", np.uint8), ("bogus", np.uint8)], np.uint8):
        with pytest.raises(TypingError):
            decode_buffer_kernel(buf, 0, 64, np.uint64(0), np.zeros(4, dtype=dtype))
    lengths = np.zeros(4, dtype=record_dtype(["length"]))
    assert decode_buffer_kernel(buf, 0, 64, np.uint64(0), lengths) == 4 and lengths["length"].tolist() == [1] * 4


def test_strided_and_misaligned_outputs_get_the_same_records(small_corpus):
    buf = np.frombuffer(small_corpus[:100_000], dtype=np.uint8)
    expected = decode_buffer(buf, 64, address=0x4000)
    strided = np.zeros(2 * len(expected) + 2, dtype=VIE_DTYPE)[::2]
    assert decode_buffer_kernel(buf, 0, 64, np.uint64(0x4000), strided) == len(expected)
    assert strided[: len(expected)].tobytes() == expected.tobytes()
    raw = np.zeros(len(expected) * VIE_DTYPE.itemsize + 8, dtype=np.uint8)
    misaligned = raw[3 : 3 + len(expected) * VIE_DTYPE.itemsize].view(VIE_DTYPE)
    assert decode_buffer_kernel(buf, 0, 64, np.uint64(0x4000), misaligned) == len(expected)
    assert misaligned.tobytes() == expected.tobytes()
    compact = np.zeros(2 * len(expected) + 2, dtype=COMPACT_DTYPE)[1::2]
    assert decode_buffer_kernel(buf, 0, 64, np.uint64(0x4000), compact) == len(expected)
    assert all(np.array_equal(compact[: len(expected)][name], expected[name]) for name in COMPACT_DTYPE.names)


def test_addresses_wrap_at_the_top_of_the_address_space():
    records = decode_buffer(b"\x90" * 40, 64, address=(1 << 64) - 16)
    assert len(records) == 40
    assert int(records[15]["address"]) == (1 << 64) - 1 and int(records[16]["address"]) == 0
