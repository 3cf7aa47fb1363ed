"""Page-walk throughput (``hvjit bench pagewalk``): the Numba walker against the same
algorithm run by the Python interpreter, on random page tables larger than L2."""

from __future__ import annotations

import time
import types

import numpy as np

from hvjit.kernels import pagewalk as pw
from hvjit.kernels.pagewalk import PagingMode

from .pagetables import random_page_tables

BENCH_TABLES = 512  # 2 MiB of random tables: larger than L2, so walks miss like real ones


def _interpreted_walk():
    """``walk`` run by the Python interpreter: the same algorithm without the JIT."""
    namespace = dict(vars(pw))
    for name, value in vars(pw).items():
        if hasattr(value, "py_func"):
            namespace[name] = types.FunctionType(value.py_func.__code__, namespace, name)
    return namespace["walk"]


def _bench_case(mode: PagingMode, count: int, seed: int = 0):

    rng = np.random.default_rng(seed)
    mem, cr3 = random_page_tables(rng, mode, tables=BENCH_TABLES, present=1.0, large=0.02,
                                  no_execute=0.0, reserved=0.0, outside=0.0)
    bits = 47 if mode == PagingMode.LEVEL4 else 56
    glas = rng.integers(0, 1 << bits, count, dtype=np.uint64)
    cr4 = pw.CR4_PAE | (pw.CR4_LA57 if mode == PagingMode.LEVEL5 else 0)
    registers = dict(cr3=cr3, cr0=pw.CR0_PG | pw.CR0_WP, cr4=cr4, efer=pw.EFER_LMA | pw.EFER_NXE)
    return mem, glas, registers


def _rate(run, count: int, seconds: float) -> float:
    """Best translations/s over repeated runs within ``seconds``."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() >= deadline:
            return count / best


def bench_pagewalk(seconds: float = 3.0) -> dict:
    """Translations/s of the batch kernel (4- and 5-level) and of the interpreted walk."""
    share = max(seconds, 0.3) / 3
    result = {}
    for key, mode in (("level4_per_s", PagingMode.LEVEL4), ("level5_per_s", PagingMode.LEVEL5)):
        mem, glas, registers = _bench_case(mode, 1 << 20)
        pw.translate_batch(mem, glas[:16], **registers)  # compile or load from cache
        result[key] = _rate(lambda m=mem, g=glas, r=registers: pw.translate_batch(m, g, **r), glas.size, share)
    mem, glas, registers = _bench_case(PagingMode.LEVEL4, 2000)
    walker = pw._walker(mem, **registers)
    slow_walk = _interpreted_walk()
    out = np.zeros(pw.OUT_LEN, np.uint64)

    def naive():
        for gla in glas:
            slow_walk(mem, walker.segs, walker.cr3, walker.mode, walker.cr0, walker.cr4,
                      walker.efer, walker.rflags, gla, pw.ACCESS_READ, 0, False, 52, out)

    result["naive_per_s"] = _rate(naive, glas.size, share)
    return result
