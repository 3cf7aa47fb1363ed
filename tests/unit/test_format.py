"""The report formatter against iced-x86's Intel formatter (normalised: iced prints the
memory size only when ambiguous, so "<size> ptr" is dropped on both sides, and segment
overrides that 64-bit mode ignores are dropped)."""

import re

import pytest

from hvjit.benchmarks.corpus import text_corpus
from hvjit.kernels.decode import decode, decode_buffer
from hvjit.kernels.format import format_instruction

iced_x86 = pytest.importorskip("iced_x86")


def iced_text(data: bytes, bitness: int, address: int = 0) -> str:
    formatter = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
    formatter.hex_prefix = "0x"
    formatter.hex_suffix = ""
    formatter.uppercase_hex = False
    formatter.small_hex_numbers_in_decimal = False
    formatter.rip_relative_addresses = True
    formatter.show_branch_size = False
    formatter.branch_leading_zeros = False
    formatter.space_after_operand_separator = True
    decoder = iced_x86.Decoder(bitness, data, ip=address)
    return formatter.format(decoder.decode())


def normalise(text: str) -> str:
    text = re.sub(r"\b(byte|word|dword|qword|tbyte|xmmword|fword) ptr ", "", text.lower())
    text = re.sub(r"\b[cdes]s:", "", text)
    return " ".join(text.split())


COMMON = [
    (64, "4889e5"), (64, "488b0424"), (64, "8b4c8dfc"), (64, "48c7c0ffffffff"), (64, "c6000a"),
    (64, "66c740060100"), (64, "48b8efcdab8967452301"), (64, "4801d8"), (64, "4883ec28"),
    (64, "4883e4f0"), (64, "29c8"), (64, "3b0d10000000"), (64, "4839c7"), (64, "55"), (64, "415f"),
    (64, "6a08"), (64, "ff7508"), (64, "8f00"), (64, "e8fbffffff"), (64, "e900000000"), (64, "eb00"),
    (64, "7405"), (64, "0f8500010000"), (64, "ffd0"), (64, "ff1500100000"), (64, "ff24c500000000"),
    (64, "c3"), (64, "c20800"), (64, "488d0c8d00000000"), (64, "488d05f0ffffff"), (64, "e460"),
    (64, "ec"), (64, "66ef"), (64, "e680"), (64, "cc"), (64, "cd80"), (64, "f4"), (64, "90"),
    (64, "0f1f4000"), (64, "31c0"), (64, "4531c9"), (64, "21d0"), (64, "0bc1"), (64, "85c0"),
    (64, "a801"), (64, "f6c202"), (64, "0fb6c0"), (64, "480fbe00"), (64, "4863c7"),
    (64, "0fb7442402"), (64, "f348a5"), (64, "f3ab"), (64, "aa"), (64, "f3a4"), (64, "0fa2"),
    (64, "0f32"), (64, "0f30"), (64, "0fc70f"), (64, "480fc70f"), (64, "f00fb10a"),
    (64, "0f01d0"), (64, "0f01d1"), (64, "0fae20"), (64, "480fae28"), (64, "0fc72f"),
    (64, "0f38f007"), (64, "0f38f107"), (64, "660fae37"), (64, "660fae3f"), (64, "0fae3f"),
    (64, "0f05"), (64, "480f07"), (64, "48cf"), (64, "cf"), (64, "0f01f8"), (64, "0f0138"),
    (64, "0f20d8"), (64, "0f22c0"), (64, "d1e0"), (64, "d3f8"), (64, "c1e803"), (64, "f7d8"),
    (64, "48f7f1"), (64, "fec0"), (64, "48ffc8"), (64, "0fafc1"), (64, "6bc00c"), (64, "480f44c1"),
    (64, "0f94c0"), (64, "c8100001"), (64, "c9"), (64, "9c"), (64, "9d"), (64, "4899"), (64, "98"),
    (64, "fa"), (64, "fb"), (64, "0fa3c8"), (64, "0fbae305"), (64, "f30fb8c0"), (64, "0fc8"),
    (64, "87d8"), (64, "f00fc101"), (64, "0f0b"), (64, "f30f1efa"), (64, "0f01f9"),
    (32, "8b4508"), (32, "c745fc00000000"), (32, "50"), (32, "e800000000"),
    (32, "cd80"), (32, "a1e8030000"), (32, "66b83412"), (32, "0fc70e"), (32, "ee"), (32, "6d"),
    (16, "8b4702"), (16, "b80010"), (16, "cd10"), (16, "e460"), (16, "8b00"), (16, "e90000"),
]


@pytest.mark.parametrize("bitness,hex_bytes", COMMON, ids=[f"{b}-{h}" for b, h in COMMON])
def test_common_instructions_match_iced(bitness, hex_bytes):
    data = bytes.fromhex(hex_bytes)
    record = decode(data, bitness, 0x1000)
    assert int(record["length"]) == len(data)
    ours = format_instruction(record, data)
    assert not ours.startswith("db ")
    assert normalise(ours) == normalise(iced_text(data, bitness, 0x1000))


def test_memory_operands_carry_their_size():
    data = bytes.fromhex("c7442408efbeadde")
    assert format_instruction(decode(data, 64), data) == "mov dword ptr [rsp+0x8], 0xdeadbeef"
    data = bytes.fromhex("64488b042528000000")
    assert format_instruction(decode(data, 64), data) == "mov rax, qword ptr fs:[0x28]"


def test_rare_and_undecodable_fall_back_to_bytes():
    data = bytes.fromhex("c5f877")
    assert format_instruction(decode(data, 64), data) == "db 0xc5, 0xf8, 0x77"
    data = bytes.fromhex("0fc7f0")
    assert format_instruction(decode(data, 64), data) == "rdrand eax"
    data = bytes.fromhex("06")
    assert format_instruction(decode(data, 64), data) == "db 0x06  ; invalid"
    data = bytes.fromhex("488b")
    assert format_instruction(decode(data, 64), data) == "db 0x48, 0x8b  ; truncated"


def test_real_code_formats_like_iced():
    """Of the instructions the formatter renders (not db), almost all match iced; the
    known differences are naming choices (66 90 'nop' vs 'xchg ax, ax', far pointers as
    sel:off, 'retf' vs 'ret far')."""
    data = text_corpus(128 << 10)
    records = decode_buffer(data, 64)
    rendered = matched = 0
    for record in records[:20_000]:
        start = int(record["address"])
        raw = data[start : start + int(record["length"])]
        ours = format_instruction(record, raw)
        if ours.startswith("db "):
            continue
        rendered += 1
        matched += normalise(ours) == normalise(iced_text(raw, 64, start))
    assert rendered > 15_000
    assert matched / rendered > 0.97, f"{matched}/{rendered}"
