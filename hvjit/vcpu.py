"""A virtual CPU: its registers by name, its entry state, and its run loop.

Registers follow bhyve's vmm API: ``get_register``/``set_register`` by name for every general
register, control register, EFER and RFLAGS (segments by selector), and ``get_desc``/
``set_desc`` for segment descriptors in bhyve's base/limit/access form. ``run`` enters the
Numba run loop and returns a :class:`~hvjit.exits.VmExit` for anything the loop and the
Python handlers did not handle themselves.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import numpy as np

from . import _trampoline as _t
from . import cpuid, exit_handlers, run_loop, tsc, vcpu_debug, vcpu_events, watchdog
from .abi import (
    GPR_NAMES,
    KVM_CPUID_ENTRY2_DTYPE,
    KVM_FPU_DTYPE,
    KVM_MAX_XCRS,
    KVM_MSR_ENTRY_DTYPE,
    KVM_REGS_DTYPE,
    KVM_RUN_DTYPE,
    KVM_RUN_SIZE,
    KVM_SREGS_DTYPE,
    KVM_VCPU_EVENTS_DTYPE,
    KVM_XCRS_DTYPE,
    KVM_XSAVE_SIZE,
    SEGMENT_NAMES,
    VM_EXIT_DTYPE,
    Cap,
    SuspendHow,
    VmExitCode,
)
from .errors import HvjitError, KvmError, ObjectDestroyedError, RegisterError
from .exits import VmExit
from .kvm_stats import KvmStats
from .vcpu_lifecycle import Request, RunControl, VcpuBusyError, VcpuState, authorize, ensure_kick_signal

Vm = Any  # hvjit.vm.Vm: not imported, the VM imports this module

CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
DTABLE_NAMES = ("gdtr", "idtr")
DEBUG_NAMES = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
REGISTER_NAMES = GPR_NAMES + CONTROL_NAMES + SEGMENT_NAMES + DEBUG_NAMES
# KVM refuses KVM_GET/SET_MSRS with more entries than this (E2BIG).
MSRS_PER_IOCTL = 255
KVM_DIRTY_REGS_OFFSET = KVM_RUN_DTYPE.fields["kvm_dirty_regs"][1]  # type: ignore[index]
# Exits the loop handles per call before checking in with Python (watchdog, stop requests).
EXIT_BUDGET = 1 << 20
# How long destroy waits for a run to stop before leaving the release to that run.
DESTROY_WAIT = 5.0
PAUSE_WAIT = 5.0

@dataclass(frozen=True)
class SegmentDescriptor:
    """bhyve's ``struct seg_desc``: base, limit and VMX-style access rights.

    access = type | S<<4 | DPL<<5 | P<<7 | AVL<<12 | L<<13 | D/B<<14 | G<<15 | unusable<<16
    """

    base: int
    limit: int
    access: int

    @property
    def dpl(self) -> int:
        return (self.access >> 5) & 3

    @property
    def unusable(self) -> bool:
        return bool(self.access & (1 << 16))


def _access_of(seg) -> int:
    return (int(seg["type"]) | int(seg["s"]) << 4 | int(seg["dpl"]) << 5 | int(seg["present"]) << 7
            | int(seg["avl"]) << 12 | int(seg["l"]) << 13 | int(seg["db"]) << 14
            | int(seg["g"]) << 15 | int(seg["unusable"]) << 16)


def _set_access(seg, access: int) -> None:
    seg["type"] = access & 0xF
    seg["s"] = (access >> 4) & 1
    seg["dpl"] = (access >> 5) & 3
    seg["present"] = (access >> 7) & 1
    seg["avl"] = (access >> 12) & 1
    seg["l"] = (access >> 13) & 1
    seg["db"] = (access >> 14) & 1
    seg["g"] = (access >> 15) & 1
    seg["unusable"] = (access >> 16) & 1


class _Watchdog:
    """Kicks the vCPU out of KVM_RUN after `timeout` seconds (immediate exit + signal)."""

    def __init__(self, vcpu: "Vcpu", timeout: Optional[float]):
        self.fired = False
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._token = None
        if timeout is not None:
            self._token = watchdog.arm(timeout, lambda: self._fire(vcpu))

    def _fire(self, vcpu: "Vcpu") -> None:
        self.fired = True
        with vcpu._control.lock:  # kicks only a run that is still registered
            vcpu._control.kick_locked()

    def expired(self) -> bool:
        return self.fired or (self.deadline is not None and time.monotonic() >= self.deadline)

    def cancel(self) -> None:
        if self._token is not None:
            watchdog.cancel(self._token)


class _Ticker:
    """Brings a running vCPU back to Python every ``period`` seconds for its tick hooks
    (sampling, finishing long string instructions): a kick, as the watchdog's."""

    def __init__(self, vcpu: "Vcpu", period: float):
        self._vcpu, self._period = vcpu, period
        self._lock = threading.Lock()
        self._token: Optional[int] = watchdog.arm(period, self._fire)

    def _fire(self) -> None:
        vcpu = self._vcpu
        with self._lock:
            if self._token is None:
                return
            self._token = watchdog.arm(self._period, self._fire)
        vcpu._tick_due = True
        with vcpu._control.lock:
            vcpu._control.kick_locked()

    def cancel(self) -> None:
        with self._lock:
            if self._token is not None:
                watchdog.cancel(self._token)
                self._token = None


class Vcpu:
    """One vCPU of a :class:`~hvjit.vm.Vm`; created only by its VM."""

    def __init__(self, vm: "Vm", index: int):
        self.vm = vm
        self.index = index
        run_out = _t.ffi.new("struct kvm_run **")
        fd = vm._kvm_call(_t.lib.hvt_vcpu_create(vm.fd, index, vm.kvm.vcpu_mmap_size, run_out),
                          "KVM_CREATE_VCPU", f"vcpu {index}")
        self.fd = fd
        self._run_ptr = run_out[0]
        self._mmap_size = vm.kvm.vcpu_mmap_size
        self._page: Any = np.frombuffer(_t.ffi.buffer(self._run_ptr, self._mmap_size), np.uint8)
        self._run: Any = self._page[:KVM_RUN_SIZE].view(KVM_RUN_DTYPE)
        self._exit = np.zeros(1, VM_EXIT_DTYPE)
        self.counters = np.zeros(run_loop.N_COUNTERS + run_loop.N_REASONS, np.int64)
        self._trace = vm.trace.attach(self)  # this vCPU's exit ring (empty: tracing off)
        self._native: Any = None  # the generated run-loop module (see warm_up)
        self._control = RunControl(lambda: self._run_ptr)
        self._released = False
        # This vCPU's dirty ring, and the VM's DirtyRings that mapped it (None: no rings).
        self._rings = vm._rings
        try:
            self._ring = None if self._rings is None else self._rings.map(self)
        except HvjitError:
            self._page = self._run = None
            _t.lib.hvt_vcpu_destroy(self.fd, self._run_ptr, self._mmap_size)
            raise
        # kvm_run's kvm_dirty_regs: registers a reset left there for the next KVM_RUN (_deferred)
        self._dirty_regs = _t.ffi.cast("uint64_t *", _t.ffi.cast("char *", self._run_ptr) + KVM_DIRTY_REGS_OFFSET)
        self._debug = vcpu_debug.DebugState()
        self.emulation_counts: dict[str, int] = {}
        # The guest's CPUID feature names as KVM holds them, for deciding which instructions
        # fault (hvjit.emulation.faults); None until read after the last KVM_SET_CPUID2.
        self.fault_features: Optional[frozenset] = None
        self.destroyed = False
        self.handle = 0  # the session's handle for it
        # Called with the vCPU every tick_period seconds of a run (on the vCPU's thread,
        # between two KVM_RUNs); no ticks while the list is empty.
        self.tick_hooks: list[Callable[["Vcpu"], None]] = []
        self.tick_period = 0.02
        self._tick_due = False
        self._kvm_stats: Optional[KvmStats] = None  # opened on first use
        # Without KVM_SET_CPUID2 a guest sees almost no features (long mode included).
        self.set_cpuid(vm.kvm.vcpu_cpuid(index))

    # ---- lifetime ------------------------------------------------------------------------

    def _check(self) -> None:
        if self.destroyed:
            raise ObjectDestroyedError(f"vcpu {self.index} of VM {self.vm.name!r} was destroyed")

    def _check_access(self, what: str = "vCPU state") -> None:
        """Before a state ioctl: alive, allowed for the acting session, and not running in
        another thread (it would block)."""
        self._check()
        authorize(self.vm, what)
        self._control.check_state_access()
        if self._deferred:
            self._flush_deferred()

    @property
    def _deferred(self) -> bool:
        """A reset left registers in kvm_run for the next KVM_RUN (hvjit.reset); KVM clears
        each bit of kvm_dirty_regs as it applies that part."""
        return not self._released and self._dirty_regs[0] != 0

    def _flush_deferred(self) -> None:
        """A reset left the registers in kvm_run for the next KVM_RUN: apply them now, before
        an ioctl reads or overwrites them."""
        self._call(_t.lib.hvt_vcpu_flush_sync(self.fd, self._run_ptr), "KVM_RUN(apply sync registers)")

    def _destroy(self, wait: float = DESTROY_WAIT) -> bool:
        """Stop any run, then close the fd and unmap ``kvm_run``: at once (True) or, when a
        run cannot be stopped within ``wait`` seconds or is the caller, as that run leaves."""
        if self.destroyed:
            return self._released
        self.destroyed = True
        self._control.request(Request.TEARDOWN)
        return self._control.release_when_idle(self._release, wait)

    def _release(self) -> None:
        if self._kvm_stats is not None:
            self._kvm_stats.close()
        # Drop every numpy view of the run page before unmapping it.
        self._page = self._run = None
        if self._ring is not None:
            self._rings.unmap(self, self._ring)  # out of the harvest's record first
            self._ring = None
        _t.lib.hvt_vcpu_destroy(self.fd, self._run_ptr, self._mmap_size)
        with self._control.lock:  # kicks read the pointer under this lock
            self._run_ptr = _t.ffi.NULL
        self._released = True
        self.vm._vcpu_released(self)

    def _call(self, rc: int, op: str) -> int:
        return _t.check(rc, op, f"vcpu {self.index} of VM {self.vm.name!r}")

    def kvm_stats(self) -> dict[str, int]:
        """KVM's own counters for this vCPU (``exits``, ``insn_emulation``, ...), {} where the
        host has no KVM_CAP_BINARY_STATS_FD."""
        stats = self._open_kvm_stats()
        return stats.read() if stats is not None else {}

    def kvm_stat(self, name: str) -> Optional[int]:
        """One of KVM's counters, None if the host does not keep it."""
        stats = self._open_kvm_stats()
        return stats.get(name) if stats is not None else None

    def _open_kvm_stats(self) -> Optional[KvmStats]:
        self._check()
        if self._kvm_stats is None and self.vm.kvm.has(Cap.BINARY_STATS_FD):
            self._kvm_stats = KvmStats(self.fd)
        return self._kvm_stats

    # ---- whole register files ------------------------------------------------------------

    def _get_record(self, dtype, fn, op: str):
        self._check_access()
        record = np.zeros(1, dtype)
        self._call(fn(self.fd, _t.ptr(record)), op)
        return record[0]

    def _set_record(self, value, dtype, fn, op: str) -> None:
        self._check_access()
        record = np.array([value], dtype)
        self._call(fn(self.fd, _t.ptr(record)), op)

    def get_regs(self) -> np.ndarray:
        """The general registers (a KVM_REGS_DTYPE record; a copy)."""
        return self._get_record(KVM_REGS_DTYPE, _t.lib.hvt_vcpu_get_regs, "KVM_GET_REGS")

    def set_regs(self, regs) -> None:
        self._set_record(regs, KVM_REGS_DTYPE, _t.lib.hvt_vcpu_set_regs, "KVM_SET_REGS")

    def get_sregs(self) -> np.ndarray:
        """Segments, descriptor tables, control registers, EFER (a KVM_SREGS_DTYPE record)."""
        return self._get_record(KVM_SREGS_DTYPE, _t.lib.hvt_vcpu_get_sregs, "KVM_GET_SREGS")

    def set_sregs(self, sregs) -> None:
        self._set_record(sregs, KVM_SREGS_DTYPE, _t.lib.hvt_vcpu_set_sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> np.ndarray:
        """x87 and SSE state (a KVM_FPU_DTYPE record)."""
        return self._get_record(KVM_FPU_DTYPE, _t.lib.hvt_vcpu_get_fpu, "KVM_GET_FPU")

    def set_fpu(self, fpu) -> None:
        self._set_record(fpu, KVM_FPU_DTYPE, _t.lib.hvt_vcpu_set_fpu, "KVM_SET_FPU")

    def get_events(self) -> np.ndarray:
        """Pending/injected exceptions, interrupts, NMI, SMI (a KVM_VCPU_EVENTS_DTYPE record)."""
        return self._get_record(KVM_VCPU_EVENTS_DTYPE, _t.lib.hvt_vcpu_get_events, "KVM_GET_VCPU_EVENTS")

    def set_events(self, events) -> None:
        self._set_record(events, KVM_VCPU_EVENTS_DTYPE, _t.lib.hvt_vcpu_set_events, "KVM_SET_VCPU_EVENTS")

    def get_xsave(self) -> np.ndarray:
        """The XSAVE area (x87, SSE, AVX, ... in the standard format) as bytes (a copy)."""
        self._check_access()
        size = max(KVM_XSAVE_SIZE, self.vm.xsave_size)
        area = np.zeros(size, np.uint8)
        self._call(_t.lib.hvt_vcpu_get_xsave(self.fd, _t.ptr(area), size), "KVM_GET_XSAVE")
        return area

    def set_xsave(self, area) -> None:
        self._check_access()
        size = max(KVM_XSAVE_SIZE, self.vm.xsave_size)
        buf = np.zeros(size, np.uint8)
        data = np.frombuffer(bytes(area), np.uint8) if not isinstance(area, np.ndarray) else area
        buf[: min(size, data.size)] = data[:size]
        self._call(_t.lib.hvt_vcpu_set_xsave(self.fd, _t.ptr(buf)), "KVM_SET_XSAVE")

    def get_xcrs(self) -> dict[int, int]:
        """Extended control registers (XCR0, ...) by index."""
        self._check_access()
        xcrs = np.zeros(1, KVM_XCRS_DTYPE)
        self._call(_t.lib.hvt_vcpu_get_xcrs(self.fd, _t.ptr(xcrs)), "KVM_GET_XCRS")
        n = min(int(xcrs[0]["nr_xcrs"]), KVM_MAX_XCRS)
        return {int(x["xcr"]): int(x["value"]) for x in xcrs[0]["xcrs"][:n]}

    def set_xcrs(self, values: dict[int, int]) -> None:
        self._check_access()
        if len(values) > KVM_MAX_XCRS:
            raise RegisterError(f"at most {KVM_MAX_XCRS} XCRs")
        xcrs = np.zeros(1, KVM_XCRS_DTYPE)
        xcrs[0]["nr_xcrs"] = len(values)
        for i, (index, value) in enumerate(values.items()):
            xcrs[0]["xcrs"][i]["xcr"] = index
            xcrs[0]["xcrs"][i]["value"] = value
        self._call(_t.lib.hvt_vcpu_set_xcrs(self.fd, _t.ptr(xcrs)), "KVM_SET_XCRS")

    # ---- registers by name (bhyve's vm_get_register / vm_set_register) -------------------

    def get_register(self, name: str) -> int:
        name = self._register_name(name)
        if name in GPR_NAMES:
            return int(self.get_regs()[name])
        if name in DEBUG_NAMES:
            return vcpu_debug.get_debugregs(self)[name]
        sregs = self.get_sregs()
        if name in CONTROL_NAMES:
            return int(sregs[name])
        return int(sregs[name]["selector"])

    def set_register(self, name: str, value: int) -> None:
        self.set_registers(**{name: value})

    def get_registers(self, *names: str) -> dict[str, int]:
        """Several registers with at most two ioctls; all of them when no names are given."""
        names = tuple(self._register_name(n) for n in names) or REGISTER_NAMES
        out = {}
        if any(n in GPR_NAMES for n in names):
            regs = self.get_regs()
            out.update({n: int(regs[n]) for n in names if n in GPR_NAMES})
        if any(n in DEBUG_NAMES for n in names):
            out.update(vcpu_debug.get_debugregs(self))
        if any(n not in GPR_NAMES and n not in DEBUG_NAMES for n in names):
            sregs = self.get_sregs()
            for n in names:
                if n in CONTROL_NAMES:
                    out[n] = int(sregs[n])
                elif n in SEGMENT_NAMES:
                    out[n] = int(sregs[n]["selector"])
        return {n: out[n] for n in names}

    def set_registers(self, **values: int) -> None:
        """Set registers by name; general and special registers each in one ioctl.

        Setting a segment register by name sets its selector only, as bhyve does; use
        :meth:`set_desc` for the hidden part.
        """
        values = {self._register_name(n): v for n, v in values.items()}
        for n, v in values.items():
            if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 1 << 64:
                raise RegisterError(f"register {n}: {v!r} is not a 64-bit unsigned integer")
        gprs = {n: v for n, v in values.items() if n in GPR_NAMES}
        debug = {n: v for n, v in values.items() if n in DEBUG_NAMES}
        special = {n: v for n, v in values.items() if n not in GPR_NAMES and n not in DEBUG_NAMES}
        if debug:
            vcpu_debug.set_debugregs(self, **debug)
        if gprs:
            regs = self.get_regs()
            for n, v in gprs.items():
                regs[n] = v
            self.set_regs(regs)
        if special:
            sregs = self.get_sregs()
            for n, v in special.items():
                if n in CONTROL_NAMES:
                    sregs[n] = v
                else:
                    if v > 0xFFFF:
                        raise RegisterError(f"segment selector {n}: {v:#x} does not fit 16 bits")
                    sregs[n]["selector"] = v
            self.set_sregs(sregs)

    @staticmethod
    def _register_name(name: str) -> str:
        key = name.lower() if isinstance(name, str) else name
        if key not in REGISTER_NAMES:
            raise RegisterError(f"unknown register {name!r}; known: {', '.join(REGISTER_NAMES)}")
        return key

    def get_desc(self, name: str) -> SegmentDescriptor:
        """A segment's (or gdtr/idtr's) hidden part: base, limit, access."""
        key = name.lower() if isinstance(name, str) else name
        sregs = self.get_sregs()
        if key in DTABLE_NAMES:
            t = sregs[key[:3]]
            return SegmentDescriptor(int(t["base"]), int(t["limit"]), 0)
        if key not in SEGMENT_NAMES:
            raise RegisterError(f"unknown segment {name!r}; known: {', '.join(SEGMENT_NAMES + DTABLE_NAMES)}")
        seg = sregs[key]
        return SegmentDescriptor(int(seg["base"]), int(seg["limit"]), _access_of(seg))

    def set_desc(self, name: str, base: int, limit: int, access: int = 0,
                 selector: Optional[int] = None) -> None:
        key = name.lower() if isinstance(name, str) else name
        sregs = self.get_sregs()
        if key in DTABLE_NAMES:
            t = sregs[key[:3]]
            if limit > 0xFFFF:
                raise RegisterError(f"{name} limit {limit:#x} does not fit 16 bits")
            t["base"], t["limit"] = base, limit
        elif key in SEGMENT_NAMES:
            seg = sregs[key]
            seg["base"], seg["limit"] = base, limit
            _set_access(seg, access)
            if selector is not None:
                seg["selector"] = selector
        else:
            raise RegisterError(f"unknown segment {name!r}; known: {', '.join(SEGMENT_NAMES + DTABLE_NAMES)}")
        self.set_sregs(sregs)

    # ---- MSRs and CPUID ------------------------------------------------------------------

    def get_msrs(self, indices) -> dict[int, Optional[int]]:
        """Read MSRs through KVM; an MSR KVM refuses maps to None."""
        self._check_access()
        indices = [int(i) for i in indices]
        out: dict[int, Optional[int]] = {}
        pos = 0
        while pos < len(indices):
            entries = np.zeros(min(len(indices) - pos, MSRS_PER_IOCTL), KVM_MSR_ENTRY_DTYPE)
            entries["index"] = indices[pos:pos + len(entries)]
            n = self._call(_t.lib.hvt_vcpu_get_msrs(self.fd, _t.ptr(entries), len(entries)), "KVM_GET_MSRS")
            for e in entries[:n]:
                out[int(e["index"])] = int(e["data"])
            if n < len(entries):  # KVM stops at the first MSR it refuses
                out[indices[pos + n]] = None
                n += 1
            pos += n
        return out

    def get_msr(self, index: int) -> int:
        value = self.get_msrs([index])[index]
        if value is None:
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {index:#x} is not readable through KVM")
        return value

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs through KVM; returns how many KVM accepted (it stops at the first refusal)."""
        self._check_access()
        items = list(values.items())
        done = 0
        for start in range(0, len(items), MSRS_PER_IOCTL):
            chunk = items[start:start + MSRS_PER_IOCTL]
            entries = np.zeros(len(chunk), KVM_MSR_ENTRY_DTYPE)
            entries["index"] = [int(i) for i, _ in chunk]
            entries["data"] = [int(v) & (1 << 64) - 1 for _, v in chunk]
            n = self._call(_t.lib.hvt_vcpu_set_msrs(self.fd, _t.ptr(entries), len(entries)), "KVM_SET_MSRS")
            done += n
            if n < len(entries):
                break
        return done

    def set_msr(self, index: int, value: int) -> None:
        if self.set_msrs({index: value}) != 1:
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {index:#x} refused value {value:#x}")

    def set_cpuid(self, entries: np.ndarray) -> None:
        self._check_access()
        entries = np.ascontiguousarray(entries, KVM_CPUID_ENTRY2_DTYPE)
        self._call(_t.lib.hvt_vcpu_set_cpuid(self.fd, _t.ptr(entries), len(entries)), "KVM_SET_CPUID2")
        self.fault_features = None  # read again (from KVM's table) at the next emulation decision

    def tsc_khz(self) -> int:
        self._check_access()
        return self._call(_t.lib.hvt_vcpu_get_tsc_khz(self.fd), "KVM_GET_TSC_KHZ")

    # ---- running -------------------------------------------------------------------------

    @property
    def state(self) -> VcpuState:
        """stopped (no run active), running, or paused."""
        return self._control.state()

    def stop(self) -> bool:
        """Make the current run (in another thread) return a BOGUS exit as soon as possible;
        False when no run is active (a later run is not affected)."""
        self._check()
        authorize(self.vm, "stop")
        return self._control.request(Request.STOP)

    kick = stop  # bhyve's word for it

    def pause(self, timeout: float = PAUSE_WAIT) -> None:
        """Park the vCPU (bhyve's suspend_cpu): a run stops entering the guest until
        :meth:`resume`; a run started while paused waits. Returns once a running vCPU has
        parked (VcpuBusyError if it does not within ``timeout``: a Python handler that
        does not return)."""
        self._check()
        authorize(self.vm, "pause")
        self._control.request(Request.PAUSE)
        if not self._control.wait_parked_or_idle(timeout):
            raise VcpuBusyError(f"vcpu {self.index} did not pause within {timeout} s")

    def resume(self) -> None:
        """Let a paused vCPU run again."""
        self._check()
        authorize(self.vm, "resume")
        self._control.resume()

    def run(self, *, timeout: Optional[float] = None, resume_hlt: bool = False,
            _group_stop: Optional[threading.Event] = None) -> VmExit:
        """Run until an exit that no native device and no Python handler handles.

        ``timeout`` (seconds) arms a watchdog that kicks a runaway guest out: the run then
        returns a TIMEOUT exit (time spent paused counts). ``resume_hlt`` counts HLT exits
        and resumes instead of returning them (a guest with no interrupt source would
        otherwise halt for good). A :meth:`stop` from another thread returns a BOGUS exit;
        ``vm.suspend(how)`` a SUSPENDED one.
        """
        self._check()
        self.vm._check()
        authorize(self.vm, "run")
        ensure_kick_signal()
        control = self._control
        control.enter()  # before the compile: a stop during it ends this run too
        try:
            self.warm_up()  # JIT time is not guest time: before the watchdog starts
            watchdog = _Watchdog(self, timeout)
            ticker = _Ticker(self, self.tick_period) if self.tick_hooks else None
            try:
                return self._run_until_exit(watchdog, resume_hlt, _group_stop)
            except ObjectDestroyedError:
                # Destroyed from another thread while this run was in Python (a tick hook, a
                # Python exit handler): a stop, as it is when the run is inside KVM_RUN.
                if self.destroyed or self.vm.destroyed:
                    return VmExit(exitcode=VmExitCode.BOGUS, rip=0, kvm_reason=-1)
                raise
            finally:
                watchdog.cancel()
                if ticker is not None:
                    ticker.cancel()
        finally:
            control.leave()

    def _run_until_exit(self, watchdog: "_Watchdog", resume_hlt: bool,
                        group_stop: Optional[threading.Event]) -> VmExit:
        resume_hlt = resume_hlt or not self._debug.halt_exit
        flags = run_loop.FLAG_RESUME_HLT if resume_hlt else 0
        control, bus, vm = self._control, self.vm.bus, self.vm
        while True:
            if self._debug.stopped_at is not None:  # also after a code hook resumed at a breakpoint
                stepped = self._step_over_breakpoint(watchdog, group_stop)
                if stepped is not None:
                    return stepped
            if self._debug.dirty:
                vcpu_debug.apply(self)
            # Clear, then read the requests: a kick after this line makes KVM_RUN return at once.
            self._run[0]["immediate_exit"] = 0
            request = control.pending(vm._request())
            if group_stop is not None and group_stop.is_set():
                request = max(request, Request.STOP)
            if request in (Request.STOP, Request.TEARDOWN):
                return self._synthetic_exit(VmExitCode.BOGUS)
            if request == Request.SUSPEND:
                return replace(self._synthetic_exit(VmExitCode.SUSPENDED),
                               how=control.suspend_how or vm._suspend_how or SuspendHow.NONE)
            if request == Request.PAUSE:
                control.park(lambda: control.pause_requested or vm._paused, watchdog.deadline)
                if watchdog.expired():
                    return self._synthetic_exit(VmExitCode.TIMEOUT)
                continue
            status = self._loop(bus, EXIT_BUDGET, flags)
            vm._drain_devices()
            if status == run_loop.LOOP_EXIT:
                result = self._trace.handled_in_python(exit_handlers.handle, self, self._exit[0])
                if result is not None:
                    return result
            elif status == run_loop.LOOP_ERRNO:
                err = int(self.counters[run_loop.C_ERRNO])
                # EINTR: kicked (watchdog, stop, pause) or a stray signal. EAGAIN: an AP that
                # was waiting for INIT/SIPI changed state; KVM wants KVM_RUN again.
                if err not in (errno.EINTR, errno.EAGAIN):
                    self._call(-err, "KVM_RUN")
                if err == errno.EINTR and self._tick_due:  # no exit is half done here
                    self._tick_due = False
                    for hook in self.tick_hooks:
                        hook(self)
            if watchdog.expired():
                return self._synthetic_exit(VmExitCode.TIMEOUT)

    def warm_up(self) -> float:
        """Compile (or load from the cache) the run loop now; returns the seconds it took."""
        self._check()
        t0 = time.perf_counter()
        self._native = run_loop.compiled()  # the loop for every native device class known now
        if not self._native.run_loop.signatures:
            self._loop(self.vm.bus, 0, 0)  # a zero budget returns before entering the guest
        return time.perf_counter() - t0

    def _loop(self, bus, budget: int, flags: int) -> int:
        return self._native.run_loop(
            self.fd, self.vm.fd if self.vm.irqchip else -1, self._run, self._page, bus.port_map, bus.mmio_table(), bus.dev_kind,
            bus.dev_base, bus.dev_state, bus.dev_buf, self.counters, self._exit, budget, flags,
            self._trace.ring, self._trace.state,
        )

    def _synthetic_exit(self, code: VmExitCode) -> VmExit:
        rip = int(self.get_regs()["rip"]) if not self.destroyed else 0
        return VmExit(exitcode=code, rip=rip, kvm_reason=-1)

    # ---- debugging (bhyve's capabilities, stepping, breakpoints) -------------------------

    def get_capability(self, cap) -> bool:
        """HALT_EXIT, MTRAP_EXIT, BPT_EXIT or PAUSE_EXIT (:class:`~hvjit.vcpu_debug.Capability`)."""
        self._check()
        return vcpu_debug.get_capability(self, cap)

    def set_capability(self, cap, on: bool) -> None:
        """Turn a capability on or off; UnsupportedError (naming the host's flavour) where the
        host cannot provide it. Takes effect at the vCPU's next entry into the guest."""
        self._check_access("set_capability")
        vcpu_debug.set_capability(self, cap, on)

    def step(self, n: int = 1, *, timeout: Optional[float] = 10.0) -> VmExit:
        """Execute ``n`` instructions, one KVM entry each; returns the last MTRAP exit (rip:
        the next instruction), or the first other exit that ended the stepping early."""
        self._check_access()
        if n < 1:
            raise ValueError(f"step count must be at least 1, not {n}")
        state = self._debug
        before = state.single_step
        vcpu_debug.set_capability(self, vcpu_debug.Capability.MTRAP_EXIT, True)
        try:
            for _ in range(n):
                ex = self.run(timeout=timeout)
                if ex.exitcode != VmExitCode.MTRAP:
                    break
            return ex  # n >= 1: the loop ran
        finally:
            state.single_step = before
            state.dirty = True

    def _step_over_breakpoint(self, watchdog: "_Watchdog", group_stop) -> Optional[VmExit]:
        """Continuing from a breakpoint: run its instruction with the int3 taken out, then
        put it back. None when that went as planned and the run should go on."""
        state, gla = self._debug, self._debug.stopped_at
        state.stopped_at = None
        bp = self.vm.breakpoints.get(gla)
        if bp is None or int(self.get_regs()["rip"]) != gla:
            return None  # moved on (or removed) meanwhile
        stepping = state.single_step
        self.vm.memory.unpatch(bp.gpa)
        state.single_step, state.dirty = True, True
        try:
            result = self._run_until_exit(watchdog, False, group_stop)
        finally:
            if gla in self.vm.breakpoints:
                self.vm.memory.patch(bp.gpa, vcpu_debug.INT3)
            state.single_step, state.dirty = stepping, True
        if result.exitcode == VmExitCode.MTRAP and not stepping:
            return None  # over it: go on as asked
        return result  # the user was stepping, or another exit came first

    def add_breakpoint(self, where):
        """A software breakpoint at a guest-linear address or an ELF symbol (translated through
        this vCPU's paging); every vCPU of the VM stops there with a BPT exit."""
        self._check_access()
        return vcpu_debug.add_breakpoint(self, where)

    def remove_breakpoint(self, where) -> None:
        self._check_access()
        vcpu_debug.remove_breakpoint(self, where)

    def add_hw_breakpoint(self, where) -> int:
        """A hardware breakpoint in a debug register (slot 0-3); see ``vcpu_debug.host_support``."""
        self._check_access()
        return vcpu_debug.add_hw(self, where, "x")

    def add_watchpoint(self, where, length: int = 1, kind: str = "w") -> int:
        """A hardware watchpoint ("w" writes, "rw" reads and writes); a hit is a DB exit."""
        self._check_access()
        return vcpu_debug.add_hw(self, where, kind, length)

    def remove_hw(self, slot: int) -> None:
        self._check_access()
        vcpu_debug.remove_hw(self, slot)

    # ---- guest-virtual memory (bhyve's copy-in/copy-out) -----------------------------------

    def read_virtual(self, gla: int, length: int, *, raw: bool = False) -> bytes:
        """Bytes at a guest-linear address through the current paging (GuestFault with the
        #PF error code where a page is not mapped). ``raw``: as the CPU sees them (with
        software breakpoints)."""
        self._check_access()
        from .emulation import guest  # the decoder and page walker load on first use

        return guest.read_virtual(self, gla, length, raw=raw)

    def write_virtual(self, gla: int, data: bytes) -> None:
        """Write through the current paging; nothing is written if any page would fault."""
        self._check_access()
        from .emulation import guest  # the decoder and page walker load on first use

        guest.write_virtual(self, gla, data)

    # ---- looking at the guest ------------------------------------------------------------

    def disassemble(self, rip: Optional[int] = None, count: int = 1) -> list:
        """``count`` instructions from ``rip`` (default: the current one), fetched through
        the guest's page tables: a list of (address, bytes, Intel-syntax text)."""
        self._check()
        from .emulation import guest  # the decoder and page walker load on first use

        return guest.disassemble(self, rip, count)

    def translate(self, gla: int, access: str = "r"):
        """Walk this vCPU's page tables for ``gla`` (``access``: "r", "w" or "x")."""
        self._check()
        from .emulation import guest  # the decoder and page walker load on first use

        return guest.translate(self, gla, access)

    # ---- statistics ----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        c = self.counters
        d = {
            "exits": int(c[run_loop.C_EXITS]),
            "native": int(c[run_loop.C_NATIVE]),
            "escalated": int(c[run_loop.C_ESCALATED]),
            "pio": int(c[run_loop.C_PIO]),
            "pio_string": int(c[run_loop.C_PIO_STRING]),
            "mmio": int(c[run_loop.C_MMIO]),
            "hlt": int(c[run_loop.C_HLT]),
            "eintr": int(c[run_loop.C_EINTR]),
        }
        from .abi import KvmExit

        for reason in KvmExit:
            n = int(c[run_loop.REASON_BASE + reason]) if reason < run_loop.N_REASONS else 0
            if n:
                d[f"kvm_{reason.name.lower()}"] = n
        for kind, n in self.emulation_counts.items():
            d[f"emulated_{kind}"] = n
        return d

    # ---- events, CPUID by name, TSC (hvjit.vcpu_events, hvjit.cpuid, hvjit.tsc) ---------------

    def inject_exception(self, vector: int, error_code: Optional[int] = None, cr2: Optional[int] = None):
        """Deliver exception ``vector`` at the next entry (32-255: as a software interrupt);
        ``cr2`` for a #PF. Combines with an event in flight as x86 does (#DF, triple fault):
        returns what will be delivered. See :mod:`hvjit.vcpu_events`."""
        return vcpu_events.inject_exception(self, vector, error_code, cr2)

    def inject_nmi(self) -> None:
        """Queue an NMI (KVM_NMI)."""
        vcpu_events.inject_nmi(self)

    def inject_extint(self, vector: int):
        """An external interrupt (KVM_INTERRUPT); only for a VM without an in-kernel irqchip."""
        return vcpu_events.inject_extint(self, vector)

    def get_intinfo(self) -> vcpu_events.IntInfo:
        """The exception, interrupt and NMI being delivered or pending."""
        return vcpu_events.get_intinfo(self)

    def set_intinfo(self, info: vcpu_events.IntInfo) -> None:
        vcpu_events.set_intinfo(self, info)

    def get_cpuid(self) -> np.ndarray:
        """The CPUID table KVM answers this vCPU's intercepted ``cpuid`` from (KVM_GET_CPUID2)."""
        return cpuid.get_cpuid(self)

    def cpuid_features(self) -> set[str]:
        """The named feature bits (:data:`hvjit.cpuid.FEATURES`) set in :meth:`get_cpuid`."""
        return cpuid.features(self.get_cpuid())

    def set_cpuid_features(self, **flags: bool) -> None:
        """Set (True) or clear (False) feature bits by name, e.g. ``avx=False, movbe=True``."""
        cpuid.set_features(self, **flags)

    def set_tsc_khz(self, khz: int) -> None:
        tsc.set_khz(self, khz)

    def get_tsc_offset(self) -> int:
        return tsc.get_offset(self)

    def set_tsc_offset(self, offset: int) -> None:
        """Guest TSC = host TSC + ``offset``; UnsupportedError where KVM does not apply it."""
        tsc.set_offset(self, offset)

    def __repr__(self) -> str:
        state = "destroyed" if self.destroyed else f"fd={self.fd}"
        return f"<Vcpu {self.index} of {self.vm.name!r} {state}>"
