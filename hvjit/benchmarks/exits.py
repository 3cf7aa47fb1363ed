"""The exit-cost benchmark: one guest, three exit loops, in the same process and run.

The same tiny guest does N exits of one kind (port IO, MMIO or HLT) and then writes the
debug-exit port. Each round runs it under

* the trampoline's C reference loop (``hvt_loop_reference``: what a hand-written VMM costs),
* hvjit's Numba run loop (``Vcpu.run``: native device dispatch), and
* a Python loop calling ``KVM_RUN`` through cffi and handling every exit in Python,

alternating the three so drift on the host hits all alike. Reported: ns per exit (median of
the rounds) and each loop's ratio to the C loop. ``hvjit bench exits --json`` prints this.

With ``trace=True`` (``--trace-overhead``) four more loops join the rotation, each the run-loop
kernel called directly (no ``Vcpu.run`` around it) so that only tracing differs:

* ``untraced``: a loop generated without the tracing code (the reference),
* ``trace_off``: hvjit's loop with tracing off (a zero-length ring),
* ``trace_on``: tracing every exit, rip through KVM_CAP_SYNC_REGS,
* ``trace_on_norip``: tracing every exit without rip (what syncing the registers costs).

``trace_record_ns`` is what writing one record costs, timed alone over many records: on a
shared host the loops' ratios carry a few percent of noise, this does not.
"""

from __future__ import annotations

import errno
import statistics
import time
from typing import Callable, Optional

import numpy as np

from .. import _trampoline as _t
from .. import entry, run_loop
from .. import trace as _trace
from ..abi import HVT_LOOP_STATS_DTYPE, KvmExit, VmExitCode
from ..asm import assemble
from ..devices.testdev import IOMEM_GPA
from ..system import Kvm, cpu_model, cpu_vendor, probe_tsc_khz

GUEST_GPA = 0x1000
STOP_PORT = 0xF4

# (exit kind) -> (instruction doing one exit, CPL). HLT needs CPL0 (it #GPs at CPL3).
_EXIT_INSNS = {
    "pio": ("outb %al, $0x80", 3),
    "mmio": (f"movb %al, ({IOMEM_GPA:#x})", 3),
    "hlt": ("hlt", 0),
}


def guest_source(kind: str) -> str:
    insn, _ = _EXIT_INSNS[kind]
    return f"""
.code64
    mov %rdi, %rcx          # the exit count comes in rdi
1:  {insn}
    dec %rcx
    jnz 1b
    mov $0, %eax
    outl %eax, ${STOP_PORT:#x}
2:  jmp 2b
"""


class ExitBench:
    """A VM with the benchmark guest for one exit kind, resettable between loops."""

    def __init__(self, session, kind: str):
        if kind not in _EXIT_INSNS:
            raise ValueError(f"exit kind {kind!r}: one of {', '.join(_EXIT_INSNS)}")
        self.kind = kind
        self.cpl = _EXIT_INSNS[kind][1]
        self.vm = session.create_vm(f"exitbench-{kind}", memory=2 << 20)
        self.vm.memory.write(GUEST_GPA, assemble(guest_source(kind), GUEST_GPA))
        self.vcpu = self.vm.vcpu(0)
        self._stats = np.zeros(1, HVT_LOOP_STATS_DTYPE)
        self.last_trace: np.ndarray = np.zeros(0, _trace.TRACE_DTYPE)  # of the last run traced with rip
        self.cpu_ns: dict[str, list[float]] = {}  # run_bare's CPU time per exit, by label

    def reset(self, exits: int) -> None:
        entry.setup_long_mode(self.vcpu, GUEST_GPA, cpl=self.cpl)
        self.vcpu.set_registers(rdi=exits)

    def run_c(self, exits: int) -> float:
        self.reset(exits)
        t0 = time.perf_counter_ns()
        rc = _t.lib.hvt_loop_reference(self.vcpu.fd, self.vcpu._run_ptr, exits + 1, STOP_PORT,
                                       _t.ptr(self._stats, "struct hvt_loop_stats *"))
        t1 = time.perf_counter_ns()
        _t.check(rc, "hvt_loop_reference")
        s = self._stats[0]
        done = int(s["pio"] + s["mmio"] + s["hlt"])
        if done != exits or int(s["last_port"]) != STOP_PORT:
            raise RuntimeError(f"C loop: {done} of {exits} exits, stopped on reason {int(s['last_reason'])}")
        return (t1 - t0) / exits

    def run_numba(self, exits: int) -> float:
        self.reset(exits)
        before = int(self.vcpu.counters[0])
        t0 = time.perf_counter_ns()
        ex = self.vcpu.run(resume_hlt=True)
        t1 = time.perf_counter_ns()
        done = int(self.vcpu.counters[0]) - before - 1
        if ex.exitcode != VmExitCode.SUSPENDED or done != exits:
            raise RuntimeError(f"Numba loop: {done} of {exits} exits, then {ex}")
        return (t1 - t0) / exits

    def run_bare(self, exits: int, module, trace_size: int = 0, rip: bool = True, label: str = "") -> float:
        """The run-loop kernel of ``module`` called directly, tracing into a ring of
        ``trace_size`` records (0: off). Also keeps the thread's CPU time per exit under
        ``label`` in ``cpu_ns``: unlike wall time it does not grow when other processes
        take the CPU, which on a shared host hides a few percent."""
        self.reset(exits)
        v, bus, tr = self.vcpu, self.vm.bus, self.vm.trace
        if trace_size:
            tr.enable(trace_size, rip=rip)
        try:
            before = int(v.counters[0])
            args = (v.fd, -1, v._run, v._page, bus.port_map, bus.mmio_table(), bus.dev_kind, bus.dev_base,
                    bus.dev_state, bus.dev_buf, v.counters, v._exit, 1 << 40, run_loop.FLAG_RESUME_HLT,
                    v._trace.ring, v._trace.state)
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            status = module.run_loop(*args)
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            if trace_size and rip:
                self.last_trace = tr.records()
        finally:
            if trace_size:
                tr.disable()
        done = int(v.counters[0]) - before - 1
        if status != run_loop.LOOP_EXIT or v._exit[0]["exitcode"] != VmExitCode.SUSPENDED or done != exits:
            raise RuntimeError(f"bare loop: {done} of {exits} exits, status {status}, exit {int(v._exit[0]['exitcode'])}")
        self.cpu_ns.setdefault(label, []).append((c1 - c0) / exits)
        return (t1 - t0) / exits

    def record_cost_ns(self, records: int = 200_000) -> float:
        """ns to write one trace record (the run loop's tracing work per exit, caches warm),
        on the kvm_run page of the bench's last exit."""
        v, tr = self.vcpu, self.vm.trace
        v.warm_up()
        tr.enable(_trace.DEFAULT_SIZE)
        try:
            v._native.trace_write_loop(v._trace.ring, v._trace.state, v._run, v._page, 1000)  # compile, warm
            t0 = time.perf_counter_ns()
            v._native.trace_write_loop(v._trace.ring, v._trace.state, v._run, v._page, records)
            t1 = time.perf_counter_ns()
        finally:
            tr.disable()
        return (t1 - t0) / records

    def trace_loops(self) -> dict[str, Callable[[int], float]]:
        """The tracing comparison's loops (see the module doc)."""
        v = self.vcpu
        v.warm_up()
        traced, untraced = v._native, run_loop.compiled(trace_support=False)
        size = _trace.DEFAULT_SIZE
        return {
            "untraced": lambda n: self.run_bare(n, untraced, label="untraced"),
            "trace_off": lambda n: self.run_bare(n, traced, label="trace_off"),
            "trace_on": lambda n: self.run_bare(n, traced, size, label="trace_on"),
            "trace_on_norip": lambda n: self.run_bare(n, traced, size, rip=False, label="trace_on_norip"),
        }

    def run_python(self, exits: int) -> float:
        """Every exit handled in Python: cffi KVM_RUN, read kvm_run, dispatch, resume."""
        self.reset(exits)
        lib, fd = _t.lib, self.vcpu.fd
        run = self.vcpu._run[0]
        page = self.vcpu._page
        handled = 0
        t0 = time.perf_counter_ns()
        while True:
            rc = lib.hvt_vcpu_run(fd)
            if rc < 0:
                if rc in (-errno.EINTR, -errno.EAGAIN):  # a stray signal (Ray's workers get some): enter again
                    continue
                _t.check(rc, "KVM_RUN")
            reason = int(run["exit_reason"])
            if reason == KvmExit.IO:
                if int(run["io_port"]) == STOP_PORT:
                    break
                if int(run["io_direction"]) == 0:
                    at = int(run["io_data_offset"])
                    page[at : at + int(run["io_size"])] = 0
            elif reason == KvmExit.MMIO:
                if not run["mmio_is_write"]:
                    run["mmio_data"][:] = 0
            elif reason != KvmExit.HLT:
                raise RuntimeError(f"Python loop: unexpected exit {reason}")
            handled += 1
        t1 = time.perf_counter_ns()
        if handled != exits:
            raise RuntimeError(f"Python loop: {handled} of {exits} exits")
        return (t1 - t0) / exits

    def close(self) -> None:
        self.vm.destroy()


def measure(session, kind: str, exits: int = 20000, rounds: int = 5, trace: bool = False,
            traces: Optional[dict] = None) -> dict:
    """ns/exit for the three loops (and the tracing loops) on one exit kind, alternating
    rounds; medians and ratios. ``traces``, when given, receives the last traced run's
    records under ``kind``."""
    bench = ExitBench(session, kind)
    try:
        loops: dict[str, Callable[[int], float]] = {
            "c": bench.run_c, "numba": bench.run_numba, "python": bench.run_python,
        }
        if trace:
            loops.update(bench.trace_loops())
        for run in loops.values():  # warm-up: JIT, page faults, caches
            run(min(exits, 1000))
        bench.cpu_ns.clear()
        samples: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(rounds):
            for name, run in loops.items():
                samples[name].append(run(exits))
        if traces is not None and trace:
            traces[kind] = bench.last_trace
        record_ns = bench.record_cost_ns() if trace else 0.0
    finally:
        bench.close()
    c = statistics.median(samples["c"])
    numba = statistics.median(samples["numba"])
    python = statistics.median(samples["python"])
    result = {
        "c_ns": round(c, 1), "numba_ns": round(numba, 1), "python_ns": round(python, 1),
        "numba_over_c": round(numba / c, 4), "python_over_c": round(python / c, 4),
        "samples": rounds, "exits_per_sample": exits,
    }
    if trace:
        # Wall time per exit (as above) and the vCPU thread's CPU time per exit (robust to
        # other load on the host), each against the loop compiled without tracing.
        untraced = statistics.median(samples["untraced"])
        untraced_cpu = statistics.median(bench.cpu_ns["untraced"])
        result["untraced_ns"] = round(untraced, 1)
        result["untraced_cpu_ns"] = round(untraced_cpu, 1)
        for name in ("trace_off", "trace_on", "trace_on_norip"):
            ns, cpu = statistics.median(samples[name]), statistics.median(bench.cpu_ns[name])
            result[f"{name}_ns"] = round(ns, 1)
            result[f"{name}_over_untraced"] = round(ns / untraced, 4)
            result[f"{name}_cpu_ns"] = round(cpu, 1)
            result[f"{name}_cpu_over_untraced"] = round(cpu / untraced_cpu, 4)
        result["trace_record_ns"] = round(record_ns, 1)
    result["all_ns"] = {k: [round(x, 1) for x in v] for k, v in samples.items()}
    if trace:
        result["all_cpu_ns"] = {k: [round(x, 1) for x in v] for k, v in bench.cpu_ns.items()}
    return result


def host_info(kvm: Kvm) -> dict:
    return {"flavour": kvm.flavour, "cpu": cpu_model(), "cpu_vendor": cpu_vendor(),
            "tsc_khz": probe_tsc_khz(kvm), "api_version": kvm.api_version}


DEFAULT_ROUNDS = 5


def run_all(session, exits: int = 20000, rounds: int = DEFAULT_ROUNDS, kinds=("pio", "mmio", "hlt"), trace: bool = False,
            traces: Optional[dict] = None) -> dict:
    """The schema ``hvjit bench exits --json`` prints (stable: harnesses rely on it; the
    tracing fields appear with ``trace``)."""
    kvm = Kvm.instance()
    return {"host": host_info(kvm),
            "exits": {k: measure(session, k, exits, rounds, trace, traces) for k in kinds}}
