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


@pytest.mark.parametrize("kind", ["pio", "mmio"])
def test_trace_overhead(benchmark, kvm_session, kind):
    """Tracing off and on against a loop compiled without tracing, in the same run: ratios
    are recorded, never asserted (a timed assertion fails on a busy host, not on a bug)."""
    result = exitbench.measure(kvm_session, kind, exits=EXITS, rounds=ROUNDS, trace=True)
    keys = [k for k in result if k.startswith(("untraced", "trace_"))]
    benchmark.extra_info.update({k: result[k] for k in keys})
    bench = exitbench.ExitBench(kvm_session, kind)
    try:
        on = bench.trace_loops()["trace_on"]
        benchmark.pedantic(on, args=(EXITS,), rounds=3, iterations=1)
        assert len(bench.last_trace) == min(EXITS + 1, exitbench._trace.DEFAULT_SIZE)  # every exit traced
    finally:
        bench.close()
    print(f"\n{kind}: untraced {result['untraced_ns']:.0f} ns/exit; tracing off "
          f"{result['trace_off_over_untraced']:.3f}x (CPU {result['trace_off_cpu_over_untraced']:.3f}x), on "
          f"{result['trace_on_over_untraced']:.3f}x (CPU {result['trace_on_cpu_over_untraced']:.3f}x), "
          f"on without rip {result['trace_on_norip_over_untraced']:.3f}x; one record {result['trace_record_ns']:.0f} ns")
