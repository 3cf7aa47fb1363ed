"""Decoder throughput: hvjit vs iced-x86's Python Decoder on the same real .text bytes,
and the Numba cold-compile vs warm-cache cost of the decode module.

Figures go to benchmark.extra_info; nothing here asserts on time.
Run: PYTHONPATH=. python -m pytest bench/test_bench_decode.py --benchmark-only -s

What each side produces (see hvjit.benchmarks.decode.bench_decode for the exact code):

* hvjit: ``decode_buffer(bytes, 64)``, one VIE_DTYPE record per instruction (length,
  prefixes, REX/VEX/EVEX fields, opcode, ModRM/SIB, memory base/index/scale/displacement,
  immediates and their sizes, operand/address size, OpClass), and the kernel alone
  (``decode_buffer_kernel``) into a preallocated record array.
* hvjit compact and length-only: ``decode_buffer(bytes, 64, fields="compact")`` (8-byte
  COMPACT_DTYPE records: length, status, opcode map and byte, OpClass, ModRM, operand
  size) and ``fields="length"`` (a uint8 length an instruction); the kernel alone likewise.
  ``compact_over_iced`` and ``length_over_iced`` are their public calls over iced iterating.
* iced (reference 1, ``iced_mb_s``): ``for _ in iced_x86.Decoder(64, data)``, reading
  nothing — iced's fastest Python use and the conservative reference.
* iced (reference 2, ``iced_fields_mb_s``): the same loop reading the comparable fields:
  len, code, op_count, memory base/index/scale/displacement, constant offsets
  (displacement and immediate sizes) and the immediate value.

All rates are medians of repeated runs on the same sample of the corpus.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from hvjit.benchmarks.corpus import text_corpus
from hvjit.benchmarks.decode import bench_decode
from hvjit.kernels.decode import decode_buffer

iced_x86 = pytest.importorskip("iced_x86")

CORPUS_MB = float(os.environ.get("HVJIT_BENCH_CORPUS_MB", "4"))
SECONDS = float(os.environ.get("HVJIT_BENCH_DECODE_SECONDS", "6"))


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    data = np.frombuffer(text_corpus(int(CORPUS_MB * (1 << 20))), dtype=np.uint8)
    for fields in ("full", "compact", "length"):
        decode_buffer(data[:64], fields=fields)  # compile / load the kernels outside the timings
    return data


def test_decode_throughput_vs_iced(benchmark, corpus):
    records = benchmark(decode_buffer, corpus, 64)
    result = bench_decode(corpus, seconds=SECONDS)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        result["hvjit_full_corpus_mb_s"] = corpus.shape[0] / median / 1e6
    benchmark.extra_info.update(
        {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()}
    )
    print(f"\n{benchmark.extra_info}")
    assert len(records) > corpus.shape[0] // 8  # real code decoded, not an early stop
    assert result["instructions"] == len(records)


_LOAD_SCRIPT = """
import time
t0 = time.perf_counter()
import numba, numpy
t1 = time.perf_counter()
from hvjit.kernels.decode import decode_buffer
t2 = time.perf_counter()
decode_buffer(bytes.fromhex("4889e5c3"), 64)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def _first_decode_seconds(cache_dir) -> tuple[float, float, float]:
    """(import numba+numpy, import hvjit.kernels.decode, first decode_buffer call) in a
    fresh interpreter whose kernel cache is cache_dir."""
    env = dict(os.environ, HVJIT_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    numba_import, module_import, first_call = (float(x) for x in out.stdout.split()[-3:])
    return numba_import, module_import, first_call


def test_compile_cold_vs_warm_cache(benchmark, tmp_path):
    # Empty cache directory: full Numba compile of the decode kernels.
    cold = _first_decode_seconds(tmp_path)
    warm_runs = []

    def warm():
        warm_runs.append(_first_decode_seconds(tmp_path))

    benchmark.pedantic(warm, rounds=3, iterations=1)
    warm_median = sorted(warm_runs, key=lambda r: r[1] + r[2])[len(warm_runs) // 2]
    benchmark.extra_info.update(
        numba_import_s=round(cold[0], 3),
        cold_module_import_s=round(cold[1], 3),
        cold_first_decode_s=round(cold[2], 3),
        cold_total_s=round(cold[1] + cold[2], 3),
        warm_module_import_s=round(warm_median[1], 3),
        warm_first_decode_s=round(warm_median[2], 3),
        warm_total_s=round(warm_median[1] + warm_median[2], 3),
    )
    print(f"\ncold: import {cold[1]:.2f} s + first decode (compile) {cold[2]:.2f} s; "
          f"warm: import {warm_median[1]:.2f} s + first decode (cache load) {warm_median[2]:.2f} s; "
          f"(import numba+numpy alone {cold[0]:.2f} s)")
    assert any(tmp_path.rglob("*.nbi")), "the warm run should have a Numba cache index to load"
    assert warm_median[2] < cold[2], "the warm run should load from the cache, not compile"
