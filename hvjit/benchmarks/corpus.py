"""Real x86-64 code for decoder tests and benchmarks: the .text sections of this machine's
binaries and shared libraries, read straight from their ELF section headers."""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterator

DEFAULT_GLOBS = ("/usr/lib/x86_64-linux-gnu/*.so*", "/usr/bin/*", "/usr/sbin/*")

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_EM_X86_64 = 62


def require_iced():
    """Import iced-x86 (the reference decoder), with a clear error when it is missing."""
    try:
        import iced_x86
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "iced-x86 is needed for decoder comparisons and benchmarks: pip install iced-x86"
        ) from exc
    return iced_x86


def elf_text_section(path: str) -> bytes | None:
    """The .text section of a little-endian x86-64 ELF file, or None if it has none."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != _ELF_MAGIC:
                return None
            if header[4] != _ELFCLASS64 or header[5] != _ELFDATA2LSB:
                return None
            if struct.unpack_from("<H", header, 18)[0] != _EM_X86_64:
                return None
            shoff = struct.unpack_from("<Q", header, 40)[0]
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 58)
            if shoff == 0 or shentsize < 64 or shnum == 0 or shstrndx >= shnum:
                return None
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            if len(table) < shentsize * shnum:
                return None
            sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
            _, _, _, _, names_offset, names_size = sections[shstrndx]
            f.seek(names_offset)
            names = f.read(names_size)
            for name_index, _type, _flags, _addr, offset, size in sections:
                end = names.find(b"\0", name_index)
                if names[name_index:end] == b".text" and size > 0:
                    f.seek(offset)
                    data = f.read(size)
                    return data if len(data) == size else None
    except OSError:
        return None
    return None


def text_sections(max_bytes: int, patterns=DEFAULT_GLOBS) -> Iterator[tuple[str, bytes]]:
    """(path, .text bytes) of distinct files in sorted order until max_bytes are yielded
    (the last section is cut to fit)."""
    seen = set()
    remaining = max_bytes
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if remaining <= 0:
                return
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            text = elf_text_section(real)
            if text:
                yield path, text[:remaining]
                remaining -= min(len(text), remaining)


def text_corpus(max_bytes: int, patterns=DEFAULT_GLOBS) -> bytes:
    """Up to max_bytes of concatenated .text sections (deterministic for a given machine)."""
    corpus = b"".join(text for _, text in text_sections(max_bytes, patterns))
    if not corpus:
        raise RuntimeError(f"no x86-64 ELF .text found under {patterns}")
    return corpus


# --- comparison against iced-x86 ---------------------------------------------------------

# How disagreements are counted (see ComparisonReport):
#   * iced valid            -> hvjit must be OK with the same length and the same fields.
#   * hvjit INVALID         -> iced must not decode it either.
#   * iced INVALID, hvjit OK -> allowed ("iced stricter"): iced also rejects encodings that
#     have a well-defined length but #UD semantically (LOCK on a non-lockable instruction,
#     register-only/memory-only forms, reserved VEX.L/W/vvvv/EVEX bits, undefined rows
#     inside groups or mandatory-prefix columns). hvjit is a length decoder for exits the CPU
#     already took, so these are counted but not failures.
#   * the is4 byte of 4-operand VEX/XOP instructions is a register for iced and an imm8
#     for hvjit (counted as is4_register_bytes).
#   * iced NO_MORE_BYTES at the end of the data -> hvjit TRUNCATED, or INVALID when iced
#     reads further before giving up (e.g. an undefined 0F opcode followed by nothing).
FIELDS = ("length", "disp", "disp_bytes", "imm", "imm_bytes", "imm2", "imm2_bytes",
          "base_reg", "index_reg", "scale", "operand_size", "validity")

# Op classes whose first general-purpose register operand has the operand size.
_SIZED_CLASSES = frozenset(
    (
        "MOV", "MOVZX", "MOVSX", "MOVSXD", "AND", "OR", "XOR", "ADD", "SUB", "CMP", "TEST",
        "ADC", "SBB", "PUSH", "POP", "XCHG", "CMPXCHG", "XADD", "INC", "DEC", "NEG", "NOT",
        "IMUL", "SHIFT", "BT", "BTS", "BTR", "BTC", "LEA", "IN", "OUT", "BSWAP", "POPCNT",
        "BSF_BSR", "CMOVCC", "SHLD_SHRD", "GROUP1",
    )
)


class ComparisonReport:
    """Counts and the first few disagreements of one hvjit-vs-iced run."""

    def __init__(self, bitness: int, max_examples: int):
        self.bitness = bitness
        self.max_examples = max_examples
        self.records = 0
        self.both_valid = 0
        self.both_invalid = 0
        self.iced_stricter = 0
        self.truncated_tail = 0
        self.is4_register_bytes = 0
        self.mismatches = dict.fromkeys(FIELDS, 0)
        self.examples: list[str] = []
        self.stricter_examples: list[str] = []

    def mismatch(self, field: str, data: bytes, offset: int, ours, theirs, text: str) -> None:
        self.mismatches[field] += 1
        if len(self.examples) < self.max_examples:
            raw = data[offset : offset + 15].hex(" ")
            self.examples.append(
                f"{self.bitness}-bit @{offset:#x} [{raw}] {field}: hvjit={ours} iced={theirs} ({text})"
            )

    @property
    def disagreements(self) -> int:
        return sum(self.mismatches.values())

    @property
    def length_agreement(self) -> float:
        if not self.both_valid:
            return 1.0
        return 1.0 - self.mismatches["length"] / self.both_valid

    def merge(self, other: "ComparisonReport") -> None:
        self.records += other.records
        self.both_valid += other.both_valid
        self.both_invalid += other.both_invalid
        self.iced_stricter += other.iced_stricter
        self.truncated_tail += other.truncated_tail
        self.is4_register_bytes += other.is4_register_bytes
        for field, count in other.mismatches.items():
            self.mismatches[field] += count
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])
        room = self.max_examples - len(self.stricter_examples)
        self.stricter_examples.extend(other.stricter_examples[: max(room, 0)])

    def summary(self) -> str:
        bad = {k: v for k, v in self.mismatches.items() if v}
        return (
            f"{self.bitness}-bit: {self.records} records, {self.both_valid} valid in both, "
            f"{self.both_invalid} invalid in both, {self.iced_stricter} iced-stricter, "
            f"{self.truncated_tail} truncated tail, length agreement "
            f"{100 * self.length_agreement:.4f}%, mismatches {bad or 'none'}"
        )


def _register_number(iced_x86, register) -> int:
    from hvjit.kernels.decode import REG_NONE, REG_RIP

    ext = iced_x86.RegisterExt
    if register == iced_x86.Register.NONE:
        return REG_NONE
    if ext.is_ip(register):
        return REG_RIP
    return ext.number(register)


def _first_operand_size(iced_x86, instr, op_class: str) -> int:
    """Size in bytes of the operand whose width is the operand size (0: not comparable)."""
    which = 1 if op_class == "OUT" else 0
    if instr.op_count <= which:
        return 0
    kind = instr.op_kind(which)
    if kind == iced_x86.OpKind.REGISTER:
        register = instr.op_register(which)
        return iced_x86.RegisterExt.size(register) if iced_x86.RegisterExt.is_gpr(register) else 0
    if kind == iced_x86.OpKind.MEMORY:
        size = iced_x86.MemorySizeExt.size(instr.memory_size)
        return size if size in (1, 2, 4, 8) else 0
    return 0


def compare_with_iced(data: bytes, bitness: int, max_examples: int = 20) -> ComparisonReport:
    """Decode data with hvjit, then decode iced-x86 at every hvjit record offset, and
    compare length, validity, displacement, immediates, memory base/index/scale and the
    operand size of general-purpose instructions."""

    from hvjit.kernels.decode import REG_RIP, DecodeStatus, OpClass, decode_buffer

    iced_x86 = require_iced()
    OpKind = iced_x86.OpKind
    no_more_bytes = iced_x86.DecoderError.NO_MORE_BYTES

    records = decode_buffer(data, bitness)
    report = ComparisonReport(bitness, max_examples)
    report.records = len(records)
    decoder = iced_x86.Decoder(bitness, data)
    instr = iced_x86.Instruction()
    address_mask = {16: 0xFFFF, 32: 0xFFFFFFFF, 64: (1 << 64) - 1}
    columns = {name: records[name].tolist() for name in records.dtype.names}
    for k in range(len(records)):
        offset = columns["address"][k]
        status = columns["status"][k]
        decoder.position = offset
        decoder.ip = offset
        decoder.decode_out(instr)
        error = decoder.last_error
        if error == no_more_bytes:
            if status == DecodeStatus.OK:
                report.mismatch("length", data, offset, columns["length"][k], "more bytes", "iced wants more bytes")
            else:
                report.truncated_tail += 1
            continue
        if instr.is_invalid:
            if status == DecodeStatus.OK:
                report.iced_stricter += 1
                if len(report.stricter_examples) < max_examples:
                    report.stricter_examples.append(
                        f"{bitness}-bit @{offset:#x} [{data[offset:offset + columns['length'][k]].hex(' ')}]"
                    )
            elif status == DecodeStatus.INVALID:
                report.both_invalid += 1
            else:
                report.mismatch("validity", data, offset, "TRUNCATED", "invalid", "")
            continue
        text = str(instr)
        if status != DecodeStatus.OK:
            report.mismatch("validity", data, offset, DecodeStatus(status).name, "valid", text)
            continue
        report.both_valid += 1
        length = columns["length"][k]
        if length != instr.len:
            report.mismatch("length", data, offset, length, instr.len, text)
            continue
        offsets = decoder.get_constant_offsets(instr)
        immediate_size = offsets.immediate_size
        if immediate_size == 0 and columns["imm_bytes"][k] == 1 and columns["vex"][k] in (3, 5):
            # 4-operand VEX/XOP: the last byte names a register (is4); hvjit keeps it as imm8.
            report.is4_register_bytes += 1
            immediate_size = 1
        expected = {
            "disp_bytes": offsets.displacement_size,
            "imm_bytes": immediate_size,
            "imm2_bytes": offsets.immediate_size2,
        }
        for field, value in expected.items():
            if columns[field][k] != value:
                report.mismatch(field, data, offset, columns[field][k], value, text)
        for field, size_field, at, size in (
            ("imm", "imm_bytes", offsets.immediate_offset, offsets.immediate_size),
            ("imm2", "imm2_bytes", offsets.immediate_offset2, offsets.immediate_size2),
        ):
            if size and columns[size_field][k] == size:
                raw = int.from_bytes(data[offset + at : offset + at + size], "little")
                ours = columns[field][k] & ((1 << (8 * size)) - 1)
                if ours != raw:
                    report.mismatch(field, data, offset, hex(ours), hex(raw), text)
        # Implicit memory operands (xlat) are not described by base/index/disp.
        explicit = columns["has_modrm"][k] or columns["disp_bytes"][k]
        has_memory = any(instr.op_kind(i) == OpKind.MEMORY for i in range(instr.op_count))
        if has_memory and explicit:
            mask = address_mask[columns["address_size"][k] * 8] if columns["address_size"][k] else 0
            disp = columns["disp"][k]
            if columns["base_reg"][k] == REG_RIP:
                disp += offset + length
            if (disp & mask) != (instr.memory_displacement & mask):
                report.mismatch("disp", data, offset, hex(disp & mask), hex(instr.memory_displacement & mask), text)
            base = _register_number(iced_x86, instr.memory_base)
            if columns["base_reg"][k] != base:
                report.mismatch("base_reg", data, offset, columns["base_reg"][k], base, text)
            index = _register_number(iced_x86, instr.memory_index)
            if columns["index_reg"][k] != index:
                report.mismatch("index_reg", data, offset, columns["index_reg"][k], index, text)
            if columns["scale"][k] != instr.memory_index_scale:
                report.mismatch("scale", data, offset, columns["scale"][k], instr.memory_index_scale, text)
        op_class = OpClass(columns["op_class"][k]).name
        if op_class in _SIZED_CLASSES:
            size = _first_operand_size(iced_x86, instr, op_class)
            if size and columns["operand_size"][k] != size:
                report.mismatch("operand_size", data, offset, columns["operand_size"][k], size, text)
    return report
