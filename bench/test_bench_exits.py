"""Exit round trips: the Numba run loop against the trampoline's C loop and a Python loop.

The three loops run the same guest alternately in one process (hvjit.exitbench); each test
records ns/exit and the ratios in ``extra_info`` and benchmarks the Numba loop itself.

    python -m pytest bench/test_bench_exits.py --benchmark-enable -s
"""

import os

import pytest

from hvjit.benchmarks import exits as exitbench

EXITS = int(os.environ.get("HVJIT_BENCH_EXITS", "20000"))
ROUNDS = int(os.environ.get("HVJIT_BENCH_ROUNDS", "7"))


@pytest.mark.parametrize("kind", ["pio", "mmio", "hlt"])
def test_exit_round_trip(benchmark, kvm_session, kind):
    result = exitbench.measure(kvm_session, kind, exits=EXITS, rounds=ROUNDS)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "all_ns"})
    bench = exitbench.ExitBench(kvm_session, kind)
    try:
        benchmark.pedantic(bench.run_numba, args=(EXITS,), rounds=3, iterations=1)
    finally:
        bench.close()
    print(f"\n{kind}: C {result['c_ns']:.0f} ns, Numba {result['numba_ns']:.0f} ns "
          f"({result['numba_over_c']:.3f}x C), Python {result['python_ns']:.0f} ns "
          f"({result['python_over_c']:.3f}x C)")
