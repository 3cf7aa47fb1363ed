"""The global info page (GIP), after SUPDrv's ``SUPGLOBALINFOPAGE``: time from the TSC.

One :class:`Gip` per process measures the TSC frequency (or takes KVM's), the TSC offset of
every host CPU against the reference CPU (CPU 0 unless this process may not run there), and an
anchor pair (TSC, CLOCK_MONOTONIC_RAW ns) from which a TSC value converts to nanoseconds. It
publishes them in a ``GIP_DTYPE`` record that Python and Numba kernels
(:mod:`hvjit.kernels.gipclock`) read without locks: ``transaction_id`` is a seqlock counter,
odd while an update is being written.

Each session that maps the GIP gets its own page, mapped read-only by the MMU (a second
``PROT_READ`` mapping of a memfd), which every update rewrites. Unmapping zeroes that page, so a
view kept past its session's close reads ``magic == 0`` (and ``gip_nanotime`` returns -1)
instead of silently stale times.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from hvjit.errors import HvjitError, InvalidHandleError
from hvjit.handles import HandleKind
from hvjit.kernels.gipclock import GIP_MAGIC, GIP_MAX_CPUS

Session = Any  # hvjit.session.Session: not imported, the session imports this module

GIP_VERSION = 1
PAGE_SIZE = mmap.PAGESIZE

GIP_MODE_SYNC_TSC = 1  # all CPUs' TSCs agree within the measurement error: no correction
GIP_MODE_ASYNC_TSC = 2  # correct a TSC read on CPU n by subtracting tsc_deltas[n]

GIP_FLAG_INVARIANT_TSC = 1  # constant rate, keeps ticking in deep C-states

GIP_DTYPE = np.dtype(
    [
        ("magic", "<u4"),
        ("version", "<u4"),
        ("transaction_id", "<i8"),
        ("mode", "<u4"),
        ("flags", "<u4"),
        ("cpu_count", "<u4"),  # CPUs the page describes (tsc_deltas entries)
        ("reference_cpu", "<u4"),  # the CPU the deltas are measured against
        ("tsc_khz", "<i8"),  # the frequency conversions use: KVM's when known
        ("tsc_khz_measured", "<i8"),
        ("tsc_khz_kvm", "<i8"),  # 0: not known
        ("update_interval_ns", "<i8"),  # how stale the anchor may get before a refresh
        ("update_count", "<i8"),
        ("anchor_tsc", "<i8"),
        ("anchor_ns", "<i8"),  # CLOCK_MONOTONIC_RAW at anchor_tsc
        ("tsc_deltas", "<i8", (GIP_MAX_CPUS,)),
        ("cpu_measured", "u1", (GIP_MAX_CPUS,)),
    ],
    align=True,
)
assert GIP_DTYPE.itemsize <= PAGE_SIZE

# Below this a measured delta is indistinguishable from the measurement's own error.
_SYNC_TOLERANCE_NS = 1_000
_SAMPLE_TRIES = 16


class TscSource(Protocol):
    """Reads the time-stamp counter."""

    def read(self) -> int:
        """The TSC of whichever CPU runs the caller."""

    def read_with_cpu(self) -> tuple[int, int]:
        """``(tsc, cpu)`` read atomically (``rdtscp``)."""


class TrampolineTsc:
    """``rdtsc``/``rdtscp`` through the trampoline (``hvt_sys_rdtsc``, ``hvt_sys_rdtscp``)."""

    def __init__(self):
        from hvjit import _trampoline

        self._ffi = _trampoline.ffi
        self._lib = _trampoline.lib
        self.read = self._lib.hvt_sys_rdtsc

    def read_with_cpu(self) -> tuple[int, int]:
        aux = self._ffi.new("uint32_t *")
        tsc = self._lib.hvt_sys_rdtscp(aux)
        return tsc, aux[0] & 0xFFF  # Linux keeps the CPU number in TSC_AUX[11:0]


class SimulatedTsc:
    """A TSC made from CLOCK_MONOTONIC_RAW: ``ns * ticks_per_ns + cpu_offsets[cpu]``.

    For tests and simulations: the frequency and per-CPU offsets are known exactly. The CPU
    is the one the calling thread is pinned to (the reference CPU's timeline when unpinned).
    """

    def __init__(self, ticks_per_ns: int = 3, cpu_offsets: dict[int, int] | None = None):
        self.ticks_per_ns = ticks_per_ns
        self.cpu_offsets = dict(cpu_offsets or {})

    def read(self) -> int:
        return self.read_with_cpu()[0]

    def read_with_cpu(self) -> tuple[int, int]:
        allowed = os.sched_getaffinity(0)
        cpu = next(iter(allowed)) if len(allowed) == 1 else min(allowed)
        tsc = _monotonic_raw_ns() * self.ticks_per_ns + self.cpu_offsets.get(cpu, 0)
        return tsc, cpu


def _monotonic_raw_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)


def _ticks_to_ns(ticks: int, tsc_khz: int) -> int:
    # Same arithmetic as hvjit.kernels.gipclock.ticks_to_ns (floored), in Python ints.
    return ticks * 1_000_000 // tsc_khz


def _invariant_tsc() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"constant_tsc", "nonstop_tsc"} <= flags
    except OSError:
        pass
    return False


def sample_tsc_and_clock(read_tsc: Callable[[], int]) -> tuple[int, int, int]:
    """``(tsc, ns, uncertainty_ns)``: a TSC read and the CLOCK_MONOTONIC_RAW time it happened.

    The read is bracketed by two clock reads; of several tries the tightest bracket wins and
    its midpoint is the time, uncertain by half its width.
    """
    best = None
    for _ in range(_SAMPLE_TRIES):
        before = _monotonic_raw_ns()
        tsc = read_tsc()
        after = _monotonic_raw_ns()
        if best is None or after - before < best[0]:
            best = (after - before, tsc, (before + after) // 2)
    assert best is not None  # the loop above ran at least once
    width, tsc, ns = best
    return tsc, ns, (width + 1) // 2


class _ClockParameters(NamedTuple):
    """What Python's nanotime() needs, replaced whole on every publish (zero if unmeasured)."""

    mode: int
    tsc_khz: int
    anchor_tsc: int
    anchor_ns: int
    update_interval_ns: int
    tsc_deltas: tuple[int, ...]


class Gip:
    """Measures TSC time and publishes it in ``GIP_DTYPE`` pages (see the module docstring).

    ``tsc_source`` defaults to the trampoline's ``rdtsc``; ``kvm_tsc_khz`` (an int or a
    callable returning one, 0/None for unknown) overrides the measured frequency, which is
    still measured and published. ``calibration_ns`` is how long the frequency measurement
    waits. The constructor measures once (:meth:`update`).
    """

    def __init__(
        self,
        *,
        tsc_source: TscSource | None = None,
        kvm_tsc_khz: int | Callable[[], int | None] | None = None,
        calibration_ns: int = 20_000_000,
        update_interval_ns: int = 1_000_000_000,
        measure_cpu_deltas: bool = True,
    ):
        if calibration_ns <= 0 or update_interval_ns <= 0:
            raise ValueError("calibration_ns and update_interval_ns must be positive")
        self._tsc = tsc_source if tsc_source is not None else TrampolineTsc()
        self._kvm_tsc_khz = kvm_tsc_khz
        self._calibration_ns = calibration_ns
        self._update_interval_ns = update_interval_ns
        self._measure_cpu_deltas = measure_cpu_deltas
        self._flags = GIP_FLAG_INVARIANT_TSC if _invariant_tsc() else 0
        # Serialises writers; readers never take it.
        self._lock = threading.Lock()
        self._master = np.zeros(1, GIP_DTYPE)
        self._mappings: list[GipMapping] = []
        # (tsc, ns) of the last full update: refresh() refines the frequency against it.
        self._baseline = (0, 0)
        self.update()

    # -- reading -----------------------------------------------------------------------------

    @property
    def record(self) -> np.ndarray:
        """A read-only view of the process's master page (shape ``(1,)``)."""
        view = self._master.view()
        view.flags.writeable = False
        return view

    def snapshot(self) -> np.void:
        """A consistent copy of the record (retries while an update is being written)."""
        return read_consistent(self._master)

    @property
    def tsc_khz(self) -> int:
        return int(self.snapshot()["tsc_khz"])

    @property
    def mode(self) -> int:
        return int(self.snapshot()["mode"])

    def tsc_delta(self, cpu: int) -> int:
        """TSC of ``cpu`` minus the reference CPU's TSC; 0 if not measured."""
        record = self.snapshot()
        if not 0 <= cpu < GIP_MAX_CPUS or not record["cpu_measured"][cpu]:
            return 0
        return int(record["tsc_deltas"][cpu])

    def nanotime(self) -> int:
        """Now, in ns on CLOCK_MONOTONIC_RAW's timeline, from the TSC.

        Re-anchors first (:meth:`refresh`) when the anchor is older than the update interval.
        """
        clock = self._clock  # one attribute load: a consistent set without the seqlock
        if clock.mode == GIP_MODE_ASYNC_TSC:
            tsc, cpu = self._tsc.read_with_cpu()
            if 0 <= cpu < GIP_MAX_CPUS:
                tsc -= clock.tsc_deltas[cpu]
        else:
            tsc = self._tsc.read()
        elapsed_ns = _ticks_to_ns(tsc - clock.anchor_tsc, clock.tsc_khz)
        if elapsed_ns > clock.update_interval_ns:
            self.refresh()
        return clock.anchor_ns + elapsed_ns

    # -- measuring ---------------------------------------------------------------------------

    def _kvm_khz(self) -> int:
        source = self._kvm_tsc_khz
        khz = source() if callable(source) else source
        return int(khz) if khz else 0

    def _measure_khz(self) -> int:
        tsc0, ns0, _ = sample_tsc_and_clock(self._tsc.read)
        time.sleep(self._calibration_ns / 1e9)
        tsc1, ns1, _ = sample_tsc_and_clock(self._tsc.read)
        return (tsc1 - tsc0) * 1_000_000 // (ns1 - ns0)

    def _measure_cpu_offsets(self, tsc_khz: int) -> tuple[dict[int, int], int]:
        """``{cpu: tsc - ns*khz}`` for each CPU we may run on, and the worst uncertainty (ns).

        Pins the calling thread to each CPU in turn and restores its affinity afterwards.
        """
        original = os.sched_getaffinity(0)
        offsets: dict[int, int] = {}
        worst_uncertainty = 0
        try:
            for cpu in sorted(c for c in original if c < GIP_MAX_CPUS):
                try:
                    os.sched_setaffinity(0, {cpu})
                except OSError:  # went offline meanwhile
                    continue
                tsc, ns, uncertainty = sample_tsc_and_clock(self._tsc.read)
                offsets[cpu] = tsc - ns * tsc_khz // 1_000_000
                worst_uncertainty = max(worst_uncertainty, uncertainty)
        finally:
            os.sched_setaffinity(0, original)
        return offsets, worst_uncertainty

    def update(self) -> None:
        """Re-measure everything (frequency, per-CPU deltas, anchor) and publish it."""
        measured_khz = self._measure_khz()
        kvm_khz = self._kvm_khz()
        tsc_khz = kvm_khz or measured_khz
        if tsc_khz <= 0:
            raise HvjitError(f"TSC frequency measured as {tsc_khz} kHz: the TSC is not usable")
        deltas = np.zeros(GIP_MAX_CPUS, np.int64)
        measured = np.zeros(GIP_MAX_CPUS, np.uint8)
        reference_cpu = 0
        mode = GIP_MODE_SYNC_TSC
        if self._measure_cpu_deltas:
            offsets, uncertainty_ns = self._measure_cpu_offsets(tsc_khz)
            if offsets:
                reference_cpu = min(offsets)
                for cpu, offset in offsets.items():
                    deltas[cpu] = offset - offsets[reference_cpu]
                    measured[cpu] = 1
                tolerance = max(_SYNC_TOLERANCE_NS, 2 * uncertainty_ns) * tsc_khz // 1_000_000
                if np.abs(deltas).max() > tolerance:
                    mode = GIP_MODE_ASYNC_TSC
        # Pin the anchor to the reference CPU so that deltas apply to it.
        anchor_tsc, anchor_ns = self._sample_on(reference_cpu)
        self._baseline = (anchor_tsc, anchor_ns)
        cpu_count = int(measured.nonzero()[0].max()) + 1 if measured.any() else 0
        self._publish(
            magic=GIP_MAGIC,
            version=GIP_VERSION,
            mode=mode,
            flags=self._flags,
            cpu_count=cpu_count,
            reference_cpu=reference_cpu,
            tsc_khz=tsc_khz,
            tsc_khz_measured=measured_khz,
            tsc_khz_kvm=kvm_khz,
            update_interval_ns=self._update_interval_ns,
            anchor_tsc=anchor_tsc,
            anchor_ns=anchor_ns,
            tsc_deltas=deltas,
            cpu_measured=measured,
        )

    def _sample_on(self, cpu: int) -> tuple[int, int]:
        original = os.sched_getaffinity(0)
        pinned = cpu in original and self._measure_cpu_deltas
        try:
            if pinned:
                os.sched_setaffinity(0, {cpu})
            tsc, ns, _ = sample_tsc_and_clock(self._tsc.read)
        finally:
            if pinned:
                os.sched_setaffinity(0, original)
        return tsc, ns

    def refresh(self) -> None:
        """Take a new anchor; without KVM's frequency, refine it over the long baseline."""
        record = self.snapshot()
        tsc, ns = self._sample_on(int(record["reference_cpu"]))
        fields = {"anchor_tsc": tsc, "anchor_ns": ns}
        base_tsc, base_ns = self._baseline
        if not record["tsc_khz_kvm"] and ns - base_ns >= 10 * self._calibration_ns:
            fields["tsc_khz"] = (tsc - base_tsc) * 1_000_000 // (ns - base_ns)
        self._publish(**fields)

    # -- publishing --------------------------------------------------------------------------

    def _publish(self, **fields) -> None:
        """Write ``fields`` to the master and every mapped page under the seqlock protocol."""
        with self._lock:
            pages = [self._master] + [mapping.page for mapping in self._mappings]
            for page in pages:
                page["transaction_id"][0] += 1  # odd: readers retry
            try:
                for page in pages:
                    for name, value in fields.items():
                        page[name][0] = value
                    page["update_count"][0] += 1
            finally:
                for page in pages:
                    page["transaction_id"][0] += 1
            master = self._master[0]
            self._clock = _ClockParameters(
                mode=int(master["mode"]),
                tsc_khz=int(master["tsc_khz"]),
                anchor_tsc=int(master["anchor_tsc"]),
                anchor_ns=int(master["anchor_ns"]),
                update_interval_ns=int(master["update_interval_ns"]),
                tsc_deltas=tuple((master["tsc_deltas"] * master["cpu_measured"]).tolist()),
            )

    # -- mappings ----------------------------------------------------------------------------

    @property
    def mapping_count(self) -> int:
        """How many pages (session mappings) are live."""
        return len(self._mappings)

    def map(self) -> GipMapping:
        """A new page holding the current record, kept current by every update."""
        mapping = GipMapping(self)
        with self._lock:
            mapping.page[0] = self._master[0]
            self._mappings.append(mapping)
        return mapping

    def unmap(self, mapping: GipMapping) -> None:
        """Stop updating ``mapping``'s page and zero it. Idempotent."""
        with self._lock:
            if mapping in self._mappings:
                self._mappings.remove(mapping)
        mapping.invalidate()


class GipMapping:
    """One read-only page of GIP data: ``view`` for readers, ``page`` for the writer."""

    def __init__(self, gip: Gip):
        self.gip = gip
        fd = os.memfd_create("hvjit-gip", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, PAGE_SIZE)
            self._writable = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            readonly = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.page: Any = np.frombuffer(self._writable, GIP_DTYPE, count=1)  # None once unmapped
        # The view keeps the read-only mapping alive for as long as anyone holds it.
        self.view = np.frombuffer(readonly, GIP_DTYPE, count=1)

    def invalidate(self) -> None:
        """Zero the page (magic first, so readers stop trusting it) and drop the writer side."""
        if self.page is None:
            return
        self.page["magic"][0] = 0
        self.page[0] = np.zeros((), GIP_DTYPE)
        self.page = None  # releases the buffer export so the mapping can close
        self._writable.close()


def read_consistent(page: np.ndarray) -> np.void:
    """A copy of ``page[0]`` taken between two equal, even ``transaction_id`` reads."""
    while True:
        sequence = int(page["transaction_id"][0])
        if sequence & 1:
            time.sleep(0)
            continue
        record = page[0].copy()
        if int(page["transaction_id"][0]) == sequence:
            return record


# -- the process-wide GIP and its session mappings ---------------------------------------------

_process_gip: Gip | None = None
_process_gip_lock = threading.Lock()


def _kvm_tsc_khz() -> int | None:
    """KVM's TSC frequency for guests, where /dev/kvm is usable (else the GIP measures)."""
    try:
        from hvjit.system import Kvm

        return Kvm.instance().tsc_khz
    except Exception:  # noqa: BLE001 - no KVM here: measuring is the fallback
        return None


def process_gip(*, kvm_tsc_khz: int | Callable[[], int | None] | None = None) -> Gip:
    """The process-wide GIP, measured on first use.

    ``kvm_tsc_khz`` (when given) becomes its frequency source; if the GIP already exists it
    is re-measured with it.
    """
    global _process_gip
    with _process_gip_lock:
        if _process_gip is None:
            try:
                _process_gip = Gip(kvm_tsc_khz=kvm_tsc_khz if kvm_tsc_khz is not None else _kvm_tsc_khz)
            except (ImportError, AttributeError) as exc:
                raise HvjitError(f"the GIP needs the trampoline's hvt_sys_rdtsc: {exc}") from exc
            return _process_gip
        gip = _process_gip
    if kvm_tsc_khz is not None and gip._kvm_tsc_khz is None:
        gip._kvm_tsc_khz = kvm_tsc_khz
        gip.update()
    return gip


def set_process_gip(gip: Gip | None) -> Gip | None:
    """Replace the process-wide GIP (e.g. one with another TSC source); returns the old one.

    Sessions already mapped keep their page from the old GIP until they unmap.
    """
    global _process_gip
    with _process_gip_lock:
        old, _process_gip = _process_gip, gip
    return old


def map_into_session(session: Session) -> np.ndarray:
    """Implementation of :meth:`Session.map_gip`."""
    state = session._state
    with state.lock:
        state.check_open()
        if state.gip_handle:
            return state.gip_view
        gip = process_gip()
        mapping = gip.map()

        def unmap() -> None:
            state.gip_handle = 0
            state.gip_view = None
            gip.unmap(mapping)

        try:
            state.gip_handle = state.table.insert(mapping, HandleKind.GIP, unmap)
        except BaseException:
            gip.unmap(mapping)
            raise
        state.gip_view = mapping.view
        return mapping.view


def unmap_from_session(session: Session) -> None:
    """Implementation of :meth:`Session.unmap_gip`."""
    state = session._state
    with state.lock:
        state.check_open()
        if not state.gip_handle:
            raise InvalidHandleError(f"session {state.serial} has not mapped the GIP")
        handle = state.gip_handle
    state.table.free(handle, HandleKind.GIP)
