"""The harness convention (docs/fuzzing.md): boot a guest to its ready point, snapshot it,
then run one input after another from that snapshot.

The guest reports to :data:`HARNESS_PORT` with ``outl %eax, %dx``: READY (1) once, with its
input buffer in rdi/rsi, an optional 8-bit coverage map in r8/r9 and an optional comparison
log in r10/r11; then DONE (2) after each input, or ABORT (3) for a bug it detected itself.
hvjit installs a crash-reporting IDT (:mod:`hvjit.fuzz.idt`) into a 64-bit guest that has
none, so CPU exceptions arrive as EXCEPTION (4 | vector << 8) with the faulting rip.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..abi import SuspendHow, VmExitCode
from ..errors import HvjitError
from . import idt
from .outcome import Outcome

HARNESS_PORT = 0x6F0
READY, DONE, ABORT, EXCEPTION = 1, 2, 3, 4

MAX_COVERAGE = 1 << 16  # bytes of coverage map hvjit reads (libFuzzer gets 8 features per byte)
MAX_CMPLOG = 4096  # comparison-log entries read per input
BOOT_TIMEOUT = 30.0
# AFL's hit-count buckets: 1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128-255 -> 0..7.
_BUCKET = np.array([0] + [0 if n == 1 else 1 if n == 2 else 2 if n == 3 else 3 if n < 8 else 4 if n < 16
                          else 5 if n < 32 else 6 if n < 128 else 7 for n in range(1, 256)], np.uint32)

class HarnessError(HvjitError):
    """The guest does not follow the harness convention (no READY, a bad buffer, ...)."""


@dataclass(frozen=True)
class Layout:
    """What the guest said at READY, as guest-physical ranges (checked to be contiguous RAM)."""

    input_gpa: int
    input_capacity: int  # bytes, including the 8-byte length in front of the data
    coverage_gpa: int = 0
    coverage_size: int = 0
    cmplog_gpa: int = 0
    cmplog_entries: int = 0
    privileged: bool = False  # the guest was at CPL0 when ready: resets restore MSRs etc. too
    crash_idt: bool = False  # hvjit installed its crash-reporting IDT

    @property
    def max_input(self) -> int:
        return self.input_capacity - 8

    @property
    def features(self) -> int:
        """Feature ids the coverage map can produce (8 hit-count buckets per byte)."""
        return self.coverage_size * 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(**d)


def _physical(vm, gva: int, size: int, what: str) -> int:
    """The gpa of a guest-virtual range that must map to contiguous RAM."""
    if size <= 0:
        raise HarnessError(f"{what}: size {size} at {gva:#x}")
    first = vm.translate(gva, access="w")
    if first.fault:
        raise HarnessError(f"{what} at {gva:#x} is not mapped writable ({first.status.name})")
    page = 0x1000
    for off in range(page - gva % page, size, page):
        t = vm.translate(gva + off, access="w")
        if t.fault or t.gpa != first.gpa + off:
            raise HarnessError(f"{what} {gva:#x}+{size:#x} is not contiguous in guest-physical memory")
    if not vm.memory.is_mapped(first.gpa, size):
        raise HarnessError(f"{what} {gva:#x}+{size:#x} is not in guest RAM")
    return int(first.gpa)


def layout_at_ready(vm) -> Layout:
    """Read the READY registers and check every range they name."""
    vcpu = vm.vcpu(0)
    r = vcpu.get_registers()
    cpl = int(vcpu.get_sregs()["cs"]["dpl"])
    cap = int(r["rsi"])
    if cap < 9:
        raise HarnessError(f"input capacity {cap} (rsi) leaves no room for data after the 8-byte length")
    cov_size, cmp_entries = int(r["r9"]), int(r["r11"])
    if cov_size > MAX_COVERAGE:
        raise HarnessError(f"coverage map of {cov_size} bytes (r9): at most {MAX_COVERAGE}")
    if cmp_entries > MAX_CMPLOG:
        raise HarnessError(f"comparison log of {cmp_entries} entries (r11): at most {MAX_CMPLOG}")
    return Layout(
        input_gpa=_physical(vm, int(r["rdi"]), cap, "input buffer (rdi)"),
        input_capacity=cap,
        coverage_gpa=_physical(vm, int(r["r8"]), cov_size, "coverage map (r8)") if cov_size else 0,
        coverage_size=cov_size,
        cmplog_gpa=_physical(vm, int(r["r10"]), 8 + 24 * cmp_entries, "comparison log (r10)") if cmp_entries else 0,
        cmplog_entries=cmp_entries,
        privileged=cpl == 0,
    )


def run_to_ready(vm, timeout: float = BOOT_TIMEOUT) -> Layout:
    """Run a freshly loaded guest to READY; install the crash IDT; return the layout."""
    result = vm.run(timeout=timeout)
    ex = result.exit
    if not (ex.exitcode == VmExitCode.INOUT and ex.port == HARNESS_PORT and not ex.is_in):
        raise HarnessError(f"the guest did not report READY (outl 1 to port {HARNESS_PORT:#x}): {result}")
    if ex.data & 0xFFFFFFFF != READY:
        raise HarnessError(f"the guest's first harness report was {ex.data & 0xFFFFFFFF}, not READY (1)")
    layout = layout_at_ready(vm)
    installed = idt.install(vm, HARNESS_PORT, EXCEPTION)
    if installed:
        layout = Layout(**{**layout.to_dict(), "crash_idt": True})
    return layout


class Target:
    """A VM at its ready point and the snapshot taken there: :meth:`execute` runs one input.

    Each execution resets the VM to the snapshot (only the pages that changed), writes the
    input, runs until the guest reports or stops, and classifies how it ended.
    """

    def __init__(self, vm, snap, layout: Layout, *, timeout: float = 0.5):
        self.vm = vm
        self.vcpu = vm.vcpu(0)
        self.snapshot = snap
        self.layout = layout
        self.timeout = timeout
        self._privileged_next = layout.privileged
        self._coverage = self._ram(layout.coverage_gpa, layout.coverage_size)
        log = self._ram(layout.cmplog_gpa, 8 + 24 * layout.cmplog_entries)
        self._cmplog = log.view("<u8") if log is not None else None

    def _ram(self, gpa: int, size: int) -> Optional[np.ndarray]:
        """A read-only window on guest RAM that stays valid across resets (no copy)."""
        if not size:
            return None
        seg = self.vm.memory.find(gpa, size)
        view = seg.array[gpa - seg.gpa : gpa - seg.gpa + size]
        view.flags.writeable = False
        return view

    @classmethod
    def at_ready(cls, vm, *, timeout: float = 0.5, boot_timeout: float = BOOT_TIMEOUT) -> "Target":
        """Run a loaded guest to READY and snapshot it there."""
        layout = run_to_ready(vm, boot_timeout)
        return cls(vm, vm.snapshot(), layout, timeout=timeout)

    def execute(self, data: bytes) -> Outcome:
        """Reset, write ``data`` (cut to the buffer's capacity), run, classify."""
        self.vm.reset_to(self.snapshot, privileged=self._privileged_next)
        data = bytes(data[: self.layout.max_input])
        self.vm.memory.write(self.layout.input_gpa, struct.pack("<Q", len(data)) + data)
        ex = self.vcpu.run(timeout=self.timeout)
        outcome = classify(self.vcpu, ex, self.layout)
        # A triple fault, emulation failure or timeout may leave what only a full reset restores.
        self._privileged_next = self.layout.privileged or outcome.kind not in ("ok", "abort", "exception")
        return outcome

    def features(self) -> np.ndarray:
        """The last execution's coverage as feature ids: byte index * 8 + hit-count bucket."""
        cov = self._coverage
        if cov is None:
            return np.zeros(0, np.uint32)
        hit = np.flatnonzero(cov).astype(np.uint32)
        return hit * 8 + _BUCKET[cov[hit]]

    def comparisons(self) -> np.ndarray:
        """The last execution's logged comparisons: rows of (size | site << 8, a, b), uint64."""
        log = self._cmplog
        if log is None:
            return np.zeros((0, 3), np.uint64)
        n = min(int(log[0]), self.layout.cmplog_entries)
        return log[1 : 1 + 3 * n].reshape(n, 3)


def classify(vcpu, ex, layout: Layout) -> Outcome:
    """How one execution ended (docs/fuzzing.md, "Crash kinds")."""
    code = ex.exitcode
    if code == VmExitCode.INOUT and ex.port == HARNESS_PORT and not ex.is_in:
        value = ex.data & 0xFFFFFFFF
        report = value & 0xFF
        if report == DONE:
            return Outcome("ok", ex.rip)
        if report == ABORT:
            return Outcome("abort", ex.rip, detail=f"the guest reported a bug (value {value:#x})")
        if report == EXCEPTION and layout.crash_idt:
            r = vcpu.get_registers()
            vector = (value >> 8) & 0xFF
            fault_rip, error = int(r["rsi"]), int(r["rdi"])
            detail = f"error code {error:#x}" if vector in idt.ERROR_CODE_VECTORS else ""
            if vector == idt.PF:
                detail += f", address {int(vcpu.get_sregs()['cr2']):#x}"
            return Outcome("exception", fault_rip, vector=vector, error_code=error, detail=detail)
        return Outcome("other", ex.rip, detail=f"unexpected harness report {value:#x}")
    if code == VmExitCode.SUSPENDED and ex.how == SuspendHow.POWEROFF:
        return Outcome("ok", ex.rip)  # the debug-exit port also means done
    if code == VmExitCode.SUSPENDED and ex.how == SuspendHow.TRIPLEFAULT:
        return Outcome("triplefault", ex.rip)
    if code == VmExitCode.TIMEOUT:
        return Outcome("timeout", ex.rip)
    if code == VmExitCode.EMULATION_FAILURE:
        return Outcome("emulation", ex.rip, detail=str(ex.report) if ex.report is not None else ex.describe())
    if code == VmExitCode.INST_EMUL:
        return Outcome("mmio", ex.rip, detail=f"access to unbacked guest-physical {ex.gpa:#x}")
    return Outcome("other", ex.rip, detail=str(ex))
