"""The exit-cost benchmark: one guest, three exit loops, in the same process and run.

The same tiny guest does N exits of one kind (port IO, MMIO or HLT) and then writes the
debug-exit port. Each round runs it under

* the trampoline's C reference loop (``hvt_loop_reference``: what a hand-written VMM costs),
* hvjit's Numba run loop (``Vcpu.run``: native device dispatch), and
* a Python loop calling ``KVM_RUN`` through cffi and handling every exit in Python,

alternating the three so drift on the host hits all alike. Reported: ns per exit (median of
the rounds) and each loop's ratio to the C loop. ``hvjit bench exits --json`` prints this.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from .. import _trampoline as _t
from .. import entry
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


def measure(session, kind: str, exits: int = 20000, rounds: int = 5) -> dict:
    """ns/exit for the three loops on one exit kind, alternating rounds; medians and ratios."""
    bench = ExitBench(session, kind)
    try:
        loops: dict[str, Callable[[int], float]] = {
            "c": bench.run_c, "numba": bench.run_numba, "python": bench.run_python,
        }
        for run in loops.values():  # warm-up: JIT, page faults, caches
            run(min(exits, 1000))
        samples: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(rounds):
            for name, run in loops.items():
                samples[name].append(run(exits))
    finally:
        bench.close()
    c = statistics.median(samples["c"])
    numba = statistics.median(samples["numba"])
    python = statistics.median(samples["python"])
    return {
        "c_ns": round(c, 1), "numba_ns": round(numba, 1), "python_ns": round(python, 1),
        "numba_over_c": round(numba / c, 4), "python_over_c": round(python / c, 4),
        "samples": rounds, "exits_per_sample": exits,
        "all_ns": {k: [round(x, 1) for x in v] for k, v in samples.items()},
    }


def host_info(kvm: Kvm) -> dict:

    return {"flavour": kvm.flavour, "cpu": cpu_model(), "cpu_vendor": cpu_vendor(),
            "tsc_khz": probe_tsc_khz(kvm), "api_version": kvm.api_version}


def run_all(session, exits: int = 20000, rounds: int = 5, kinds=("pio", "mmio", "hlt")) -> dict:
    """The schema ``hvjit bench exits --json`` prints (stable: harnesses rely on it)."""
    kvm = Kvm.instance()
    return {"host": host_info(kvm), "exits": {k: measure(session, k, exits, rounds) for k in kinds}}
