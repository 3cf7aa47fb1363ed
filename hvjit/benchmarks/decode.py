"""Decoder throughput: hvjit's decode_buffer (full, compact and length-only records) against
iced-x86's Python Decoder on the same real .text bytes (``hvjit bench decode``,
bench/test_bench_decode.py)."""

from __future__ import annotations

import time

import numpy as np

from hvjit.benchmarks.corpus import require_iced, text_corpus
from hvjit.kernels.decode import COMPACT_DTYPE, VIE_DTYPE, decode_buffer, decode_buffer_kernel, record_dtype


def _iced_iterate(iced_x86, data: bytes) -> int:
    """iced reference 1: iterate the Decoder, read nothing (each step still builds a fully
    decoded Instruction object; this is iced's fastest Python use)."""
    count = 0
    for _ in iced_x86.Decoder(64, data):
        count += 1
    return count


def _iced_fields(iced_x86, data: bytes) -> int:
    """iced reference 2: iterate and read what an hvjit record gives for the same
    instruction: length, the instruction code (opcode and operation), operand count, memory
    base / index / scale / displacement, displacement and immediate sizes (constant offsets)
    and the immediate value (from the bytes at its offset, sign-extended like hvjit's imm)."""
    decoder = iced_x86.Decoder(64, data)
    constant_offsets = decoder.get_constant_offsets
    count = 0
    position = 0
    for instr in decoder:
        length = instr.len
        _code = instr.code
        _operands = instr.op_count
        _base = instr.memory_base
        _index = instr.memory_index
        _scale = instr.memory_index_scale
        _disp = instr.memory_displacement
        offsets = constant_offsets(instr)
        _disp_bytes = offsets.displacement_size
        imm_bytes = offsets.immediate_size
        if imm_bytes:
            at = position + offsets.immediate_offset
            _imm = int.from_bytes(data[at : at + imm_bytes], "little", signed=True)
        position += length
        count += 1
    return count


def _median_rate(run, nbytes: int, budget: float, min_runs: int = 3) -> tuple[float, int]:
    """(median seconds per run, result of the last run): runs until the budget is spent,
    at least min_runs times."""
    times = []
    result = 0
    t_end = time.perf_counter() + budget
    while len(times) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], result


def bench_decode(corpus_bytes: bytes | None = None, seconds: float = 2.0) -> dict:
    """Decode throughput of hvjit and of iced-x86's Python Decoder on the same bytes (64-bit).

    corpus_bytes defaults to 4 MB of .text from this machine's binaries. iced decodes in
    Python at a few MB/s, so every measurement runs on the same sample: the whole corpus,
    or its first N bytes where N lets the slowest (iced with fields) run three times within
    its share of ``seconds``. Every figure is the median of repeated runs (at least three),
    wall-clock time.

    hvjit's three outputs (``decode_buffer(data, 64, fields=...)``):
      full     one VIE_DTYPE record (72 bytes) an instruction: address, length, status,
               prefixes, REX/VEX/EVEX/XOP fields, opcode map and byte, ModRM/SIB, memory
               base/index/scale and displacement, immediates and their sizes,
               operand/address size and an OpClass
      compact  COMPACT_DTYPE (8 bytes): length, status, opcode map and byte, OpClass, ModRM,
               operand size
      length   one uint8 length an instruction

    Keys:
      corpus_bytes, instructions   the corpus and hvjit's record count for it
      sample_bytes                 bytes every rate below was measured on
      hvjit_mb_s, hvjit_instr_s    ``decode_buffer(sample)``: the public call, end to end
                                   (allocates and fills the full record array)
      hvjit_kernel_mb_s, hvjit_kernel_instr_s, hvjit_ns_per_instr
                                   ``decode_buffer_kernel`` into a preallocated array
      hvjit_compact_mb_s, hvjit_length_mb_s
                                   ``decode_buffer(sample, fields="compact" / "length")``,
                                   end to end
      hvjit_kernel_compact_mb_s, hvjit_kernel_length_mb_s
                                   the kernel alone into preallocated compact / length
                                   records
      iced_mb_s, iced_instr_s      **iced iterating only**: ``for _ in Decoder(64, data)``
                                   reading nothing — iced's fastest Python use, the
                                   conservative reference
      iced_fields_mb_s, iced_fields_instr_s
                                   iced iterating and reading the comparable fields
                                   (see _iced_fields): same information as hvjit's record
      hvjit_over_iced              hvjit_mb_s / iced_mb_s
      hvjit_over_iced_fields       hvjit_mb_s / iced_fields_mb_s
      compact_over_iced            hvjit_compact_mb_s / iced_mb_s
      length_over_iced             hvjit_length_mb_s / iced_mb_s
    """
    iced_x86 = require_iced()
    if corpus_bytes is None:
        corpus_bytes = text_corpus(4 << 20)
    buf = np.frombuffer(corpus_bytes, dtype=np.uint8)  # bytes, bytearray, memoryview or uint8 array
    if buf.shape[0] == 0:
        raise ValueError("empty corpus")
    budget = max(float(seconds), 0.04)
    for fields in ("full", "compact", "length"):
        decode_buffer(buf[:64], fields=fields)  # compile or load from cache outside the timings
    instructions = len(decode_buffer(buf))

    # Size the sample from a probe of the slowest measurement (iced reading fields).
    probe = bytes(buf[: 64 << 10])
    t0 = time.perf_counter()
    _iced_fields(iced_x86, probe)
    probe_rate = len(probe) / max(time.perf_counter() - t0, 1e-9)
    sample_bytes = int(min(buf.shape[0], max(len(probe), probe_rate * budget * 0.35 / 3)))
    sample = buf[:sample_bytes]
    data = bytes(sample)
    base = np.uint64(0)
    full_out = np.empty(sample_bytes // 2 + 16, dtype=VIE_DTYPE)
    compact_out = np.empty(sample_bytes // 2 + 16, dtype=COMPACT_DTYPE)
    length_out = np.empty(sample_bytes, dtype=record_dtype(["length"]))

    def public(fields):
        return lambda: len(decode_buffer(sample, 64, fields=fields))

    def kernel_into(out):
        return lambda: decode_buffer_kernel(sample, 0, 64, base, out)

    hvjit_s, hvjit_count = _median_rate(public("full"), sample_bytes, budget * 0.1)
    kernel_s, kernel_count = _median_rate(kernel_into(full_out), sample_bytes, budget * 0.1)
    compact_s, _ = _median_rate(public("compact"), sample_bytes, budget * 0.1)
    kernel_compact_s, _ = _median_rate(kernel_into(compact_out), sample_bytes, budget * 0.05)
    length_s, _ = _median_rate(public("length"), sample_bytes, budget * 0.1)
    kernel_length_s, _ = _median_rate(kernel_into(length_out), sample_bytes, budget * 0.05)
    iced_s, iced_count = _median_rate(lambda: _iced_iterate(iced_x86, data), sample_bytes, budget * 0.15)
    fields_s, _ = _median_rate(lambda: _iced_fields(iced_x86, data), sample_bytes, budget * 0.35)

    def mb_s(seconds_per_run):
        return sample_bytes / seconds_per_run / 1e6

    iced_mb_s = mb_s(iced_s)
    return {
        "corpus_bytes": int(buf.shape[0]),
        "instructions": int(instructions),
        "sample_bytes": sample_bytes,
        "hvjit_mb_s": mb_s(hvjit_s),
        "hvjit_instr_s": hvjit_count / hvjit_s,
        "hvjit_kernel_mb_s": mb_s(kernel_s),
        "hvjit_kernel_instr_s": kernel_count / kernel_s,
        "hvjit_ns_per_instr": kernel_s / max(kernel_count, 1) * 1e9,
        "hvjit_compact_mb_s": mb_s(compact_s),
        "hvjit_kernel_compact_mb_s": mb_s(kernel_compact_s),
        "hvjit_length_mb_s": mb_s(length_s),
        "hvjit_kernel_length_mb_s": mb_s(kernel_length_s),
        "iced_mb_s": iced_mb_s,
        "iced_instr_s": iced_count / iced_s,
        "iced_fields_mb_s": mb_s(fields_s),
        "iced_fields_instr_s": iced_count / fields_s,
        "hvjit_over_iced": mb_s(hvjit_s) / iced_mb_s,
        "hvjit_over_iced_fields": mb_s(hvjit_s) / mb_s(fields_s),
        "compact_over_iced": mb_s(compact_s) / iced_mb_s,
        "length_over_iced": mb_s(length_s) / iced_mb_s,
    }
