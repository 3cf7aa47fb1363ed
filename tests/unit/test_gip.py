"""The global info page: calibration, per-CPU deltas, TSC->ns, seqlock, session mappings."""

from __future__ import annotations

import os
import sys
import threading
import time

import numba
import numpy as np
import pytest

from hvjit import gip as gip_module
from hvjit.errors import InvalidHandleError, SessionClosedError
from hvjit.gip import (
    GIP_DTYPE,
    GIP_MODE_ASYNC_TSC,
    GIP_MODE_SYNC_TSC,
    PAGE_SIZE,
    Gip,
    SimulatedTsc,
    read_consistent,
)
from hvjit.kernels.gipclock import GIP_MAGIC, gip_nanotime, gip_tsc_delta, ticks_to_ns
from hvjit.session import Session

ALLOWED_CPUS = sorted(os.sched_getaffinity(0))


def python_version(kernel):
    """The kernel's Python source function (the kernel itself when JIT is disabled)."""
    return getattr(kernel, "py_func", kernel)


def raw_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)


def simulated_gip(**kwargs):
    kwargs.setdefault("calibration_ns", 5_000_000)
    return Gip(tsc_source=kwargs.pop("tsc_source", SimulatedTsc()), **kwargs)


@pytest.fixture
def process_gip():
    """A simulated-TSC GIP installed as the process GIP for the test."""
    gip = simulated_gip()
    old = gip_module.set_process_gip(gip)
    yield gip
    gip_module.set_process_gip(old)


def test_record_fits_one_page_and_is_aligned():
    assert GIP_DTYPE.itemsize <= PAGE_SIZE
    assert GIP_DTYPE.isalignedstruct
    for name in ("transaction_id", "tsc_khz", "anchor_tsc", "anchor_ns", "tsc_deltas"):
        assert GIP_DTYPE.fields[name][1] % 8 == 0, name


def test_measured_frequency_matches_the_simulated_tsc():
    gip = simulated_gip(tsc_source=SimulatedTsc(ticks_per_ns=3))
    record = gip.snapshot()
    assert record["magic"] == GIP_MAGIC
    assert abs(int(record["tsc_khz_measured"]) - 3_000_000) < 3_000_000 * 2e-4
    assert record["tsc_khz"] == record["tsc_khz_measured"] and record["tsc_khz_kvm"] == 0
    assert record["transaction_id"] % 2 == 0 and record["update_count"] >= 1


@pytest.mark.parametrize("kvm_khz", [2_445_000, lambda: 2_445_000])
def test_kvm_frequency_overrides_the_measurement(kvm_khz):
    gip = simulated_gip(kvm_tsc_khz=kvm_khz)
    record = gip.snapshot()
    assert record["tsc_khz"] == 2_445_000 == record["tsc_khz_kvm"]
    assert abs(int(record["tsc_khz_measured"]) - 3_000_000) < 600  # still measured


def test_kvm_frequency_unknown_falls_back_to_measurement():
    gip = simulated_gip(kvm_tsc_khz=lambda: 0)
    assert gip.snapshot()["tsc_khz_kvm"] == 0
    assert abs(gip.tsc_khz - 3_000_000) < 600


def test_synchronised_cpus_give_sync_mode_and_small_deltas():
    gip = simulated_gip()
    record = gip.snapshot()
    assert record["mode"] == GIP_MODE_SYNC_TSC
    assert record["reference_cpu"] == ALLOWED_CPUS[0]
    assert [bool(record["cpu_measured"][c]) for c in ALLOWED_CPUS] == [True] * len(ALLOWED_CPUS)
    assert all(abs(gip.tsc_delta(c)) < 3 * 20_000 for c in ALLOWED_CPUS)  # < 20 us
    assert os.sched_getaffinity(0) == set(ALLOWED_CPUS)  # affinity restored


@pytest.mark.skipif(len(ALLOWED_CPUS) < 2, reason="needs two CPUs this process may run on")
def test_offset_cpu_is_measured_and_switches_to_async_mode():
    offset = 5_000_000  # ticks: 1.67 ms at 3 GHz
    other = ALLOWED_CPUS[1]
    gip = simulated_gip(tsc_source=SimulatedTsc(cpu_offsets={other: offset}))
    assert gip.mode == GIP_MODE_ASYNC_TSC
    assert abs(gip.tsc_delta(other) - offset) < 3 * 20_000
    assert gip.tsc_delta(ALLOWED_CPUS[0]) == 0
    view = gip.record
    assert abs(gip_tsc_delta(view, other) - offset) < 3 * 20_000
    assert gip_tsc_delta(view, -1) == 0 and gip_tsc_delta(view, 10_000) == 0
    # nanotime() corrects for the CPU it runs on: the same answer pinned to either CPU.
    original = os.sched_getaffinity(0)
    try:
        for cpu in ALLOWED_CPUS[:2]:
            os.sched_setaffinity(0, {cpu})
            before = raw_ns()
            now = gip.nanotime()
            after = raw_ns()
            assert before - 20_000 <= now <= after + 20_000, cpu
    finally:
        os.sched_setaffinity(0, original)


def test_nanotime_tracks_clock_monotonic_raw():
    gip = simulated_gip()
    for _ in range(20):
        before = raw_ns()
        now = gip.nanotime()
        after = raw_ns()
        assert before - 20_000 <= now <= after + 20_000
        time.sleep(0.002)


def test_nanotime_refreshes_a_stale_anchor():
    gip = simulated_gip(update_interval_ns=1_000_000)
    first = gip.snapshot()
    time.sleep(0.005)
    gip.nanotime()
    second = gip.snapshot()
    assert second["anchor_ns"] > first["anchor_ns"]
    assert second["update_count"] == first["update_count"] + 1


class AcceleratingTsc(SimulatedTsc):
    """3 ticks/ns, speeding up by 0.0002 ticks/ns every millisecond."""

    def __init__(self):
        super().__init__()
        self.start_ns = raw_ns()

    def read_with_cpu(self):
        tsc, cpu = super().read_with_cpu()
        elapsed = raw_ns() - self.start_ns
        return tsc + elapsed * elapsed // 10**10, cpu


def test_refresh_refines_the_frequency_over_the_long_baseline():
    gip = simulated_gip(tsc_source=AcceleratingTsc(), calibration_ns=1_000_000)
    first = gip.snapshot()
    time.sleep(0.02)
    gip.refresh()
    second = gip.snapshot()
    long_baseline_khz = (int(second["anchor_tsc"]) - int(first["anchor_tsc"])) * 10**6 // (
        int(second["anchor_ns"]) - int(first["anchor_ns"])
    )
    assert long_baseline_khz - int(first["tsc_khz"]) > 1_000  # the TSC really sped up
    assert second["tsc_khz"] == long_baseline_khz
    assert second["tsc_khz_measured"] == first["tsc_khz_measured"]


def test_kvm_frequency_is_not_refined_away():
    gip = simulated_gip(kvm_tsc_khz=2_445_000, calibration_ns=1_000_000)
    time.sleep(0.02)
    gip.refresh()
    assert gip.tsc_khz == 2_445_000


@pytest.mark.parametrize(
    "ticks,khz",
    [(0, 1), (2_445_000, 2_445_000), (-1, 3_000_000), (2**62, 2_445_123), (-(2**40), 999_999)],
)
def test_ticks_to_ns_is_exact_floor_division(ticks, khz):
    assert ticks_to_ns(ticks, khz) == (ticks * 1_000_000) // khz
    assert python_version(ticks_to_ns)(ticks, khz) == (ticks * 1_000_000) // khz


def test_kernel_nanotime_matches_the_definition():
    gip = simulated_gip()
    record = gip.snapshot()
    view = gip.record
    for tsc in (int(record["anchor_tsc"]), int(record["anchor_tsc"]) + 123_456_789, 10**15):
        expected = int(record["anchor_ns"]) + (tsc - int(record["anchor_tsc"])) * 10**6 // int(record["tsc_khz"])
        assert gip_nanotime(view, tsc) == expected
        assert python_version(gip_nanotime)(view, tsc) == expected


def test_kernel_refuses_invalid_pages():
    assert gip_nanotime(np.zeros(1, GIP_DTYPE), 12345) == -1
    assert gip_nanotime(np.zeros(0, GIP_DTYPE), 12345) == -1
    page = simulated_gip().record.copy()
    page["tsc_khz"] = 0
    assert gip_nanotime(page, 12345) == -1


def test_readers_never_see_a_torn_update():
    """A nogil kernel reads while a writer flips between two equivalent anchors.

    Both anchors describe ns == tsc; a reader mixing one anchor's tsc with the other's ns
    would be 1,000,000 ns off.
    """
    gip = simulated_gip()
    view = gip.record
    first = {"tsc_khz": 1_000_000, "anchor_tsc": 0, "anchor_ns": 0}
    second = {"tsc_khz": 1_000_000, "anchor_tsc": 1_000_000, "anchor_ns": 1_000_000}
    gip._publish(**first)

    @numba.njit(nogil=True)
    def count_wrong(page, rounds):
        wrong = 0
        for i in range(rounds):
            tsc = 5_000_000 + i
            if gip_nanotime(page, tsc) != tsc:
                wrong += 1
        return wrong

    count_wrong(view, 1)  # compile before timing matters
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            gip._publish(**second)
            gip._publish(**first)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        rounds = 2_000 if numba.config.DISABLE_JIT else 200_000
        wrong = sum(count_wrong(view, rounds) for _ in range(20))
        snapshots = [read_consistent(view) for _ in range(20_000)]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert wrong == 0
    assert all(int(s["anchor_tsc"]) == int(s["anchor_ns"]) for s in snapshots)
    assert gip.snapshot()["update_count"] > 100  # the writer really ran


# -- session mappings ----------------------------------------------------------------------------


def test_session_mapping_is_read_only_live_and_shared_per_session(process_gip):
    with Session() as session:
        view = session.map_gip()
        assert view.shape == (1,) and view.dtype == GIP_DTYPE
        assert session.map_gip() is view
        assert process_gip.mapping_count == 1
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view.flags.writeable = True
        with pytest.raises(ValueError):
            view["tsc_khz"] = 1
        before = int(view["update_count"][0])
        process_gip.update()
        assert int(view["update_count"][0]) == before + 1
        assert view["anchor_ns"][0] == process_gip.snapshot()["anchor_ns"]
        now = gip_nanotime(view, process_gip._tsc.read())
        assert abs(now - raw_ns()) < 1_000_000


def test_unmap_and_close_invalidate_the_view(process_gip):
    session = Session()
    view = session.map_gip()
    tsc = process_gip._tsc.read()
    assert gip_nanotime(view, tsc) > 0
    session.unmap_gip()
    assert view["magic"][0] == 0 and gip_nanotime(view, tsc) == -1
    assert not view.view(np.uint8).any()
    assert process_gip.mapping_count == 0
    with pytest.raises(InvalidHandleError):
        session.unmap_gip()
    again = session.map_gip()
    assert again is not view and again["magic"][0] == GIP_MAGIC
    session.close()
    assert again["magic"][0] == 0 and process_gip.mapping_count == 0
    with pytest.raises(SessionClosedError):
        session.map_gip()


def test_sessions_get_separate_pages_of_one_gip(process_gip):
    with Session() as a, Session() as b:
        view_a, view_b = a.map_gip(), b.map_gip()
        assert process_gip.mapping_count == 2
        a.close()
        assert view_a["magic"][0] == 0 and view_b["magic"][0] == GIP_MAGIC


def test_process_gip_takes_a_kvm_frequency_later(process_gip):
    assert gip_module.process_gip() is process_gip
    assert gip_module.process_gip(kvm_tsc_khz=lambda: 2_000_000) is process_gip
    assert process_gip.tsc_khz == 2_000_000


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Gip(tsc_source=SimulatedTsc(), calibration_ns=0)


# -- the real TSC, through the trampoline ---------------------------------------------------------


def _trampoline_problem():
    try:
        from hvjit import _trampoline

        _trampoline.lib.hvt_sys_rdtsc()
        _trampoline.ffi.new("uint32_t *")
    except Exception as exc:  # missing library, symbol or build
        return f"trampoline rdtsc unavailable: {exc}"
    return None


needs_trampoline = pytest.mark.skipif(
    _trampoline_problem() is not None, reason=str(_trampoline_problem())
)


@needs_trampoline
def test_real_tsc_gives_a_plausible_frequency_and_clock():
    gip = Gip()
    khz = gip.tsc_khz
    assert 100_000 < khz < 10_000_000  # 0.1 .. 10 GHz
    for _ in range(10):
        before = raw_ns()
        now = gip.nanotime()
        after = raw_ns()
        assert before - 50_000 <= now <= after + 50_000
        time.sleep(0.01)


@needs_trampoline
def test_real_rdtscp_reports_a_cpu_we_may_run_on():
    tsc_source = gip_module.TrampolineTsc()
    tsc, cpu = tsc_source.read_with_cpu()
    assert tsc > 0 and cpu in ALLOWED_CPUS
    assert tsc_source.read() >= tsc or gip_module.process_gip().mode == GIP_MODE_ASYNC_TSC
