"""Decoder throughput: hvjit vs iced-x86's Python Decoder on the same real .text bytes,
and the Numba cold-compile vs warm-cache cost of the decode module.

Figures go to benchmark.extra_info; nothing here asserts on time.
Run: PYTHONPATH=. python -m pytest bench/test_bench_decode.py --benchmark-only -s
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from hvjit.kernels.corpus import require_iced, text_corpus
from hvjit.kernels.decode import decode_buffer

iced_x86 = pytest.importorskip("iced_x86")

CORPUS_MB = float(os.environ.get("HVJIT_BENCH_CORPUS_MB", "4"))


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    data = np.frombuffer(text_corpus(int(CORPUS_MB * (1 << 20))), dtype=np.uint8)
    decode_buffer(data[:64])  # compile / load the kernels outside the timings
    return data


def _iced_rate(data: bytes, seconds: float = 3.0):
    """(MB/s, instructions/s) of iced's Python Decoder iterating over data (or a prefix)."""
    iced = require_iced()
    decoded_bytes = decoded = 0
    step = 256 << 10
    t0 = time.perf_counter()
    for start in range(0, len(data), step):
        for _ in iced.Decoder(64, data[start : start + step]):
            decoded += 1
        decoded_bytes += min(step, len(data) - start)
        if time.perf_counter() - t0 > seconds:
            break
    elapsed = time.perf_counter() - t0
    return decoded_bytes / elapsed / 1e6, decoded / elapsed


def test_decode_throughput_vs_iced(benchmark, corpus):
    records = benchmark(decode_buffer, corpus, 64)
    if benchmark.stats is not None:
        mean = benchmark.stats.stats.mean
    else:  # --benchmark-disable: still report figures from a few plain timings
        timings = []
        for _ in range(3):
            t0 = time.perf_counter()
            decode_buffer(corpus, 64)
            timings.append(time.perf_counter() - t0)
        mean = min(timings)
    hvjit_mb_s = corpus.shape[0] / mean / 1e6
    hvjit_instr_s = len(records) / mean
    iced_mb_s, iced_instr_s = _iced_rate(corpus.tobytes())
    benchmark.extra_info.update(
        corpus_bytes=int(corpus.shape[0]),
        instructions=len(records),
        hvjit_mb_s=round(hvjit_mb_s, 1),
        hvjit_instructions_s=round(hvjit_instr_s),
        iced_mb_s=round(iced_mb_s, 2),
        iced_instructions_s=round(iced_instr_s),
        hvjit_over_iced=round(hvjit_mb_s / iced_mb_s, 1),
    )
    print(f"\n{benchmark.extra_info}")
    assert len(records) > corpus.shape[0] // 8  # real code decoded, not an early stop


_LOAD_SCRIPT = """
import time
t0 = time.perf_counter()
from hvjit.kernels.decode import decode_buffer
decode_buffer(bytes.fromhex("4889e5c3"), 64)
print(time.perf_counter() - t0)
"""


def _first_decode_seconds(cache_dir) -> float:
    env = dict(os.environ, HVJIT_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    return float(out.stdout.split()[-1])


def test_compile_cold_vs_warm_cache(benchmark, tmp_path):
    cold = _first_decode_seconds(tmp_path)  # empty cache directory: full Numba compile
    warm = benchmark.pedantic(_first_decode_seconds, args=(tmp_path,), rounds=3, iterations=1)
    benchmark.extra_info.update(cold_compile_s=round(cold, 2), warm_cache_load_s=round(warm, 2))
    print(f"\ncold compile {cold:.2f} s, warm cache load {warm:.2f} s")
    assert any(tmp_path.rglob("*.nbi")), "the warm run should have a Numba cache index to load"
