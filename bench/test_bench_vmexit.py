"""Exit micro-benchmarks against QEMU: one multiboot guest (hvjit.benchmarks.vmexit), the same
image under hvjit and QEMU in alternating rounds of one run. Each test records both VMMs' guest
TSC cycles per iteration (median of the rounds and the fastest batch) and the ratios hvjit/QEMU
in ``extra_info``, and benchmarks hvjit's whole run of that guest test (boot included). Without
QEMU the hvjit figures are still recorded. Ratios are reported, never asserted.

    python -m pytest bench/test_bench_vmexit.py --benchmark-enable -s
"""

import os
import shutil

import pytest

from hvjit.benchmarks import vmexit

ITERATIONS = int(os.environ.get("HVJIT_BENCH_VMEXIT_ITERATIONS", "1000"))
ROUNDS = int(os.environ.get("HVJIT_BENCH_VMEXIT_ROUNDS", "5"))

pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                reason="GNU as/ld (binutils) not installed")


@pytest.fixture(scope="module")
def comparison(kvm_session):
    return vmexit.measure(kvm_session, iterations=ITERATIONS, rounds=ROUNDS)


def _figure(result: dict, key: str = "cycles_per_iter") -> str:
    return f"{result[key]:,.0f}" if result["status"] == "ok" else f"{result['status']} ({result.get('reason')})"


@pytest.mark.parametrize("name", list(vmexit.TESTS))
def test_vmexit(benchmark, kvm_session, comparison, name):
    t = comparison["tests"][name]
    benchmark.extra_info.update({
        "test": name, "handled_by": t["handled_by"], "iterations": ITERATIONS, "rounds": ROUNDS,
        "hvjit": t["hvjit"], "qemu": t["qemu"], "ratio": t["ratio"], "paired_ratio": t["paired_ratio"],
        "best_ratio": t["best_ratio"],
        "qemu_version": comparison["qemu"]["version"], "host_flavour": comparison["host"]["flavour"],
    })
    image = vmexit.build_guest()
    benchmark.pedantic(vmexit.run_hvjit, args=(kvm_session, image, [name], ITERATIONS), rounds=1, iterations=1)
    print(f"\n{name}: hvjit {_figure(t['hvjit'])}, QEMU {_figure(t['qemu'])} cycles/iteration "
          f"(ratio {t['ratio']}, paired {t['paired_ratio']}); best {_figure(t['hvjit'], 'best_cycles_per_iter')} vs "
          f"{_figure(t['qemu'], 'best_cycles_per_iter')} (ratio {t['best_ratio']})")
