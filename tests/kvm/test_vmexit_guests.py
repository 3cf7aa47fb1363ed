"""The exit micro-benchmark guest (hvjit.benchmarks.vmexit): every test in it runs under hvjit
and prints a well-formed result line; the identical image does the same under QEMU where QEMU
is installed. Correctness, not speed: a few iterations each, every run bounded in time.
"""

from __future__ import annotations

import shutil

import pytest

from hvjit.benchmarks import vmexit

pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                reason="GNU as/ld (binutils) not installed")

ITERATIONS = 20
# Start-up, the hypercall probe's 0.25 s watchdog, and a self-IPI that may wait for a host
# tick (~1-2 ms on PVM) per iteration: seconds at most; the bound only catches a hang.
TIMEOUT = 60.0
# Set-ups that can decline, with a reason (no xAPIC, a hypercall that never completes, ...).
MAY_BE_UNAVAILABLE = {"hypercall", "hlt", "self-ipi"}
USER_SPACE_EXIT_COUNTER = {"pio-read": "pio", "pio-write": "pio", "mmio-read": "mmio", "mmio-write": "mmio"}


@pytest.fixture(scope="module")
def image():
    return vmexit.build_guest()


def check_line(result: vmexit.TestResult, iterations: int) -> None:
    if result.status == "ok":
        assert result.iterations == iterations
        assert result.batch == min(iterations, 50)
        assert 0 < result.best_batch_cycles <= result.cycles
        assert result.best_cycles_per_iter <= result.cycles_per_iter * 1.000001
    else:
        assert result.name in MAY_BE_UNAVAILABLE, f"{result.name}: {result.status}: {result.reason}"
        assert result.status == "unavailable" and result.reason


def flavour() -> str:
    from hvjit.system import Kvm

    return Kvm.instance().flavour


@pytest.mark.parametrize("name", list(vmexit.TESTS))
def test_each_guest_test_runs_under_hvjit(session, image, name):
    run = vmexit.run_hvjit(session, image, [name], ITERATIONS, timeout=TIMEOUT)
    results = vmexit.parse_output(run.output)
    assert list(results) == [name]
    check_line(results[name], ITERATIONS)
    counter = USER_SPACE_EXIT_COUNTER.get(name)
    if counter:  # each iteration (and warm-up iteration) really reached hvjit's device model
        assert run.exit_counts[counter] >= ITERATIONS + ITERATIONS // 8 + 1
        assert run.exit_counts["escalated"] == 0  # all dispatched natively, none in Python
    if name == "hypercall" and flavour() == "pvm":
        # KVM's emulator (all of ring 0 on PVM) rewrites vmcall/vmmcall and re-executes it
        # forever: the guest's watchdog must catch that and say so.
        assert results[name].status == "unavailable"
        assert "did not complete" in results[name].reason


def test_guest_runs_every_test_without_run_and_ignores_the_image_name(session, image):
    run = vmexit.boot_hvjit(session, image, "n=3", timeout=TIMEOUT)
    results = vmexit.parse_output(run.output)
    assert list(results) == list(vmexit.TESTS)  # the guest's table order
    for result in results.values():
        check_line(result, 3)


def test_guest_reports_an_unknown_test_and_goes_on(session, image):
    run = vmexit.boot_hvjit(session, image, "n=2 run=nosuch,cpuid", timeout=TIMEOUT)
    assert "vmexit nosuch unknown\n" in run.output
    assert "vmexit cpuid 2 " in run.output and run.output.endswith("vmexit done\n")
    with pytest.raises(vmexit.GuestOutputError, match="nosuch"):
        vmexit.parse_output(run.output)


@pytest.mark.skipif(vmexit.find_qemu() is None,
                    reason="qemu-system-x86_64 not installed (Debian: apt-get install qemu-system-x86)")
def test_every_guest_test_runs_under_qemu_as_under_hvjit(session, image):
    tests = list(vmexit.TESTS)
    under_qemu = vmexit.parse_output(vmexit.run_qemu(vmexit.find_qemu(), image, tests, ITERATIONS,
                                                     timeout=TIMEOUT).output)
    under_hvjit = vmexit.parse_output(vmexit.run_hvjit(session, image, tests, ITERATIONS, timeout=TIMEOUT).output)
    assert list(under_qemu) == tests
    for result in under_qemu.values():
        check_line(result, ITERATIONS)
    # Both VMMs handle these exits in the same KVM: what runs in one runs in the other.
    assert {n: r.status for n, r in under_qemu.items()} == {n: r.status for n, r in under_hvjit.items()}


def test_measure_document(session):
    doc = vmexit.measure(session, tests=("cpuid", "pio-read"), iterations=10, rounds=2)
    assert doc["benchmark"] == "vmexit" and doc["iterations"] == 10 and doc["rounds"] == 2
    assert set(doc["tests"]) == {"cpuid", "pio-read"}
    for name, t in doc["tests"].items():
        assert t["handled_by"] == vmexit.TESTS[name][0]
        assert t["hvjit"]["status"] == "ok" and len(t["hvjit"]["samples"]) == 2
        assert t["hvjit"]["best_cycles_per_iter"] <= max(t["hvjit"]["samples"])
        if doc["qemu"]["available"]:
            assert t["qemu"]["status"] == "ok", t["qemu"]
            # The document rounds the ratio to 3 decimals.
            assert t["ratio"] == pytest.approx(t["hvjit"]["cycles_per_iter"] / t["qemu"]["cycles_per_iter"], abs=6e-4)
            paired = sorted(h / q for h, q in zip(t["hvjit"]["samples"], t["qemu"]["samples"]))
            assert t["paired_ratio"] == pytest.approx((paired[0] + paired[1]) / 2, abs=6e-4)  # median of 2
        else:
            assert t["qemu"]["status"] == "not installed" and t["ratio"] is None
    assert "pio-read" in vmexit.format_table(doc)
