"""Exit tracing: every exit of every vCPU in a ring buffer, readable while the guest runs.

``vm.trace.enable()`` gives each vCPU a ring of :data:`~hvjit.kernels.tracering.TRACE_DTYPE`
records; the Numba run loop writes one per exit it handles itself, and one per exit it hands
to Python, whose handler time (and, for reads, the value read) is added when the Python
handler returns. ``vm.trace.records()`` unrolls the rings (oldest first, all vCPUs merged by
time) and fills in nanoseconds on the GIP's clock; ``save`` writes ``.npy`` (or Parquet where
pyarrow is installed), ``clear`` starts over.

The exit's ``rip`` comes from ``KVM_CAP_SYNC_REGS``: with ``kvm_run.kvm_valid_regs`` set, KVM
copies the registers into ``kvm_run`` at every exit, so the loop reads rip without the
``KVM_GET_REGS`` ioctl (about as expensive as an exit). Where a host lacks the capability,
records have ``rip_valid == 0``. Which instruction rip names depends on the host: after a port
access KVM on VMX/SVM reports the ``in``/``out`` itself, a PVM host the next instruction.

Tracing off is a zero-length ring: the loop tests its length once per call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import _jit
from .abi import KVM_SYNC_X86_REGS, Cap, KvmExit, VmExitCode
from .errors import HvjitError
from .kernels import tracering
from .kernels.gipclock import gip_nanotime
from .kernels.tracering import TRACE_DTYPE
from .vcpu_debug import symbolize

Vm = Any  # hvjit.vm.Vm: not imported, the VM imports this module

DEFAULT_SIZE = 1 << 16  # records per vCPU (72 bytes each: 4.5 MiB)
ARROW_SUFFIXES = (".parquet", ".arrow", ".feather")
META_SUFFIX = ".meta.json"  # beside a .npy trace: clock and symbols
TRACE_FIELDS: tuple[str, ...] = TRACE_DTYPE.names or ()


class TraceError(HvjitError):
    """A trace that cannot be enabled, saved or loaded as asked."""


class VcpuTrace:
    """One vCPU's ring and its state array (head, vCPU index, flags); the run loop writes them."""

    def __init__(self, index: int):
        self.index = index
        self.ring = tracering.empty_ring()
        self.state = tracering.new_state(index)
        self.since = 0  # records before this number were cleared (only readers look at it)

    def unroll(self) -> tuple[np.ndarray, int]:
        return tracering.unroll(self.ring, self.state, self.since)

    @property
    def written(self) -> int:
        return int(self.state[tracering.T_HEAD]) - self.since

    @property
    def enabled(self) -> bool:
        return self.ring.size > 0

    def handled_in_python(self, handler: Callable, vcpu, rec):
        """Run the Python handler for the exit the loop just returned; complete its record."""
        if not self.ring.size:
            return handler(vcpu, rec)
        head = int(self.state[tracering.T_HEAD])
        at = (head - 1) % self.ring.size
        tsc = int(self.ring[at]["tsc"])
        try:
            return handler(vcpu, rec)
        finally:
            now = int(_jit.rdtsc())
            e = self.ring[at]
            # A nested run (stepping over a breakpoint) may have wrapped the ring over it.
            if head > 0 and int(e["tsc"]) == tsc and not e["native"]:
                e["handler_tsc"] = now - tsc
                if not e["is_write"]:
                    e["data"] = _value_read(vcpu, e)


def _value_read(vcpu, e) -> int:
    """What a Python handler answered a port or MMIO read with (from kvm_run)."""
    r, page = vcpu._run[0], vcpu._page
    size = int(e["size"])
    if int(e["kvm_reason"]) == KvmExit.IO:
        at = int(r["io_data_offset"])
        if 1 <= size <= 8 and 0 <= at and at + size <= page.size:
            return int.from_bytes(page[at:at + size].tobytes(), "little")
    elif int(e["kvm_reason"]) == KvmExit.MMIO and 1 <= size <= 8:
        return int.from_bytes(r["mmio_data"][:size].tobytes(), "little")
    elif int(e["kvm_reason"]) == KvmExit.X86_RDMSR:
        return int(r["msr_data"])
    return 0


class Trace:
    """``vm.trace``: per-vCPU exit rings. Off until :meth:`enable`."""

    def __init__(self, vm: Vm):
        self._vm = vm
        self._vcpus: dict[int, VcpuTrace] = {}
        self._size = 0
        self._rip = False

    # ---- switching --------------------------------------------------------------------------

    def attach(self, vcpu) -> VcpuTrace:
        """The ring a vCPU writes to (a vCPU recreated by reinit keeps its predecessor's)."""
        t = self._vcpus.get(vcpu.index)
        if t is None:
            t = self._vcpus[vcpu.index] = VcpuTrace(vcpu.index)
            self._arm(t)
        self._sync_regs(vcpu)
        return t

    def enable(self, size: int = DEFAULT_SIZE, *, rip: bool = True) -> None:
        """Record every exit, ``size`` records per vCPU (the oldest are overwritten).

        ``rip`` asks KVM to sync the registers into kvm_run at each exit (where the host has
        KVM_CAP_SYNC_REGS). Takes effect when a vCPU next enters the run loop: enable before
        running (a running vCPU picks it up after its next exit handled in Python).
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise TraceError(f"trace size must be a positive number of records, not {size!r}")
        self._size = size
        self._rip = bool(rip) and self._vm.kvm.has(Cap.SYNC_REGS)
        self._rearm()

    def disable(self) -> None:
        """Stop recording (the records so far are dropped: save them first)."""
        self._size = 0
        self._rip = False
        self._rearm()

    def _rearm(self) -> None:
        for v in self._vm.vcpus:
            self._vcpus.setdefault(v.index, VcpuTrace(v.index))
        for t in self._vcpus.values():
            self._arm(t)
        for v in self._vm.vcpus:
            self._sync_regs(v)

    def _arm(self, t: VcpuTrace) -> None:
        t.since = 0
        t.state = tracering.new_state(t.index, tracering.TRACE_RIP if self._rip else 0)
        if self._size:
            ring = np.zeros(self._size, TRACE_DTYPE)
            ring.fill(0)  # touch every page now, not as page faults between the guest's exits
            t.ring = ring
        else:
            t.ring = tracering.empty_ring()

    def _sync_regs(self, vcpu) -> None:
        """KVM copies the registers into kvm_run at every exit while kvm_valid_regs says so."""
        run = getattr(vcpu, "_run", None)
        if run is not None:
            run[0]["kvm_valid_regs"] = KVM_SYNC_X86_REGS if self._rip else 0

    @property
    def enabled(self) -> bool:
        return self._size > 0

    @property
    def size(self) -> int:
        """Records per vCPU ring (0: off)."""
        return self._size

    def clear(self) -> None:
        """Forget every record so far (also while vCPUs run)."""
        for t in self._vcpus.values():
            # Readers skip what came before; the writer's head is left alone (no race with it).
            t.since = int(t.state[tracering.T_HEAD])

    # ---- reading ----------------------------------------------------------------------------

    @property
    def written(self) -> int:
        """Exits recorded since enable/clear, over all vCPUs (including overwritten ones)."""
        return sum(t.written for t in self._vcpus.values())

    def records(self, vcpu: Optional[int] = None) -> np.ndarray:
        """The records still in the rings, oldest first (all vCPUs merged by TSC), with ``ns``
        and ``handler_ns`` on the GIP's clock. Safe while vCPUs run."""
        parts = []
        for index, t in sorted(self._vcpus.items()):
            if vcpu is None or vcpu == index:
                parts.append(t.unroll()[0])
        out = np.concatenate(parts) if parts else tracering.empty_ring()
        if len(parts) > 1:
            out = out[np.argsort(out["tsc"], kind="stable")]
        self._fill_ns(out)
        return out

    def dropped(self) -> int:
        """Records overwritten (or being overwritten) before they could be read."""
        return sum(t.unroll()[1] for t in self._vcpus.values())

    def _clock(self) -> tuple[Optional[np.ndarray], int]:
        """(GIP view or None, TSC kHz) for turning TSC values into nanoseconds."""
        session = self._vm.session
        gip = None
        if session is not None and hasattr(session, "map_gip"):
            try:
                gip = session.map_gip()
            except HvjitError:
                gip = None
        khz = int(gip[0]["tsc_khz"]) if gip is not None and gip.size else 0
        if khz <= 0:
            khz = int(self._vm.kvm.tsc_khz or 0)
        return gip, khz

    def _fill_ns(self, out: np.ndarray) -> None:
        if not out.size:
            return
        gip, khz = self._clock()
        known = out["handler_tsc"] >= 0
        out["handler_ns"] = -1
        if khz > 0:
            out["handler_ns"][known] = ticks_to_ns(out["handler_tsc"][known], khz)
        out["ns"] = -1
        base_tsc = int(out["tsc"].min())
        base_ns = int(gip_nanotime(gip, base_tsc)) if gip is not None else -1
        if base_ns >= 0 and khz > 0:
            out["ns"] = base_ns + ticks_to_ns(out["tsc"] - base_tsc, khz)

    def meta(self, records: Optional[np.ndarray] = None) -> dict:
        """What a saved trace needs beside its records: the clock and the guest's symbols."""
        _, khz = self._clock()
        records = self.records() if records is None else records
        symbols = {}
        if self._vm.symbols is not None:
            for rip in np.unique(records["rip"][records["rip_valid"] != 0]):
                name = symbolize(self._vm, int(rip))
                if name and not name.startswith("0x"):  # the ELF table's "no symbol here"
                    symbols[str(int(rip))] = name
        return {"format": "hvjit-trace-1", "vm": self._vm.name, "tsc_khz": khz,
                "rip": self._rip, "dropped": self.dropped(), "symbols": symbols}

    def save(self, path) -> Path:
        """Write the records: Parquet/Arrow for a ``.parquet``/``.arrow``/``.feather`` path
        (needs pyarrow), else ``.npy`` (with a ``.meta.json`` beside it)."""
        records = self.records()
        return save(path, records, self.meta(records))

    def __len__(self) -> int:
        """Records the rings hold now."""
        return sum(min(t.written, t.ring.size) for t in self._vcpus.values())

    def __repr__(self) -> str:
        state = f"{self._size} records/vCPU" if self._size else "off"
        return f"<Trace of {self._vm.name!r}: {state}, {self.written} written>"


def ticks_to_ns(ticks, khz: int):
    """TSC ticks to ns without overflowing int64 (numpy arrays or ints)."""
    whole = ticks // khz
    return whole * 1_000_000 + ((ticks - whole * khz) * 1_000_000) // khz


# ---- files ------------------------------------------------------------------------------------

def _arrow():
    try:
        import pyarrow
        import pyarrow.feather  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise TraceError("Parquet/Arrow traces need pyarrow (pip install pyarrow); "
                         "or save as .npy") from None
    return pyarrow


def save(path, records: np.ndarray, meta: dict) -> Path:
    """Write trace records and their meta (see :meth:`Trace.save`); returns the path written."""
    path = Path(path)
    if path.suffix in ARROW_SUFFIXES:
        pa = _arrow()
        table = pa.table({name: records[name] for name in TRACE_FIELDS})
        table = table.replace_schema_metadata({b"hvjit": json.dumps(meta).encode()})
        if path.suffix == ".parquet":
            pa.parquet.write_table(table, path)
        else:
            pa.feather.write_feather(table, path)
        return path
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    np.save(path, records, allow_pickle=False)
    Path(str(path) + META_SUFFIX).write_text(json.dumps(meta, indent=1))
    return path


def load(path) -> tuple[np.ndarray, dict]:
    """(records, meta) of a trace written by :func:`save` (meta is {} when it has none)."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"no trace at {path}")
    if path.suffix in ARROW_SUFFIXES:
        pa = _arrow()
        table = pa.parquet.read_table(path) if path.suffix == ".parquet" else pa.feather.read_table(path)
        records = np.zeros(table.num_rows, TRACE_DTYPE)
        for name in TRACE_FIELDS:
            if name not in table.column_names:
                raise TraceError(f"{path}: column {name!r} is missing: not an hvjit trace")
            records[name] = table.column(name).to_numpy()
        raw = (table.schema.metadata or {}).get(b"hvjit")
        return records, json.loads(raw) if raw else {}
    try:
        records = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TraceError(f"{path}: not a .npy trace: {e}") from None
    if records.dtype != TRACE_DTYPE:
        raise TraceError(f"{path}: records are {records.dtype}, not an hvjit trace")
    meta_path = Path(str(path) + META_SUFFIX)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return records, meta


def exit_name(code: int) -> str:
    try:
        return VmExitCode(int(code)).name
    except ValueError:
        return str(int(code))
