"""Running a whole VM: one thread per vCPU until the VM stops (``Vm.run``).

Each vCPU thread enters the Numba run loop (which releases the GIL), so vCPUs truly run in
parallel. The first vCPU to return an exit decides the outcome; the others are kicked out
of KVM_RUN and stop too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from . import helper_threads
from .abi import SuspendHow, VmExitCode
from .errors import ObjectDestroyedError
from .exits import VmExit

JOIN_SLICE = 0.05  # seconds the caller waits for a vCPU thread between looks at its signals


@dataclass(frozen=True)
class RunResult:
    """How a VM run ended: the deciding exit, which vCPU saw it, and what each vCPU did."""

    exit: VmExit
    vcpu: int
    elapsed: float
    console: bytes
    vcpu_stats: list = field(default_factory=list)

    @property
    def reason(self) -> str:
        """'poweroff', 'reset', 'halt', 'triplefault', 'timeout', or the exit code's name."""
        if self.exit.exitcode == VmExitCode.SUSPENDED:
            return self.exit.how.name.lower()
        return self.exit.exitcode.name.lower().replace("_", "-")

    # The deciding exit's fields, so `vm.run().code` reads naturally.
    @property
    def exitcode(self) -> VmExitCode:
        return self.exit.exitcode

    @property
    def how(self) -> SuspendHow:
        return self.exit.how

    @property
    def code(self) -> int:
        return self.exit.code

    @property
    def rip(self) -> int:
        return self.exit.rip

    def __getattr__(self, name):
        # Exit-specific fields (port, gpa, data, report, ...) of the deciding exit.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.exit, name)

    def to_dict(self) -> dict:
        return {"reason": self.reason, "vcpu": self.vcpu, "elapsed_s": round(self.elapsed, 6),
                "exit": self.exit.to_dict(), "vcpus": self.vcpu_stats,
                "console": self.console.decode("latin-1")}

    def __str__(self) -> str:
        return f"{self.reason} (vcpu {self.vcpu}, {self.elapsed:.3f} s): {self.exit}"


def run_vm(vm, *, timeout: Optional[float], resume_hlt: bool) -> RunResult:
    """Run every vCPU, one thread each (the caller's thread for a single vCPU).

    The first exit a vCPU returns decides; the others are stopped through a shared event
    (which also covers a vCPU whose thread has not entered its run yet). A KeyboardInterrupt
    (Ctrl-C) or any other exception in the caller stops every vCPU and waits for all of them
    before it propagates: no run outlives this call.
    """
    t0 = time.perf_counter()
    vcpus = vm.vcpus
    if len(vcpus) == 1:
        ex = vcpus[0].run(timeout=timeout, resume_hlt=resume_hlt)
        return _result(vm, ex, 0, t0)

    group_stop = threading.Event()
    decided: list[tuple[int, VmExit]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def stop_all() -> None:
        group_stop.set()  # before the requests: a run that registers later still sees it
        for v in vcpus:
            try:
                v.stop()
            except ObjectDestroyedError:  # destroyed from another thread: its run stops anyway
                pass

    def worker(v, finished: threading.Event) -> None:
        try:
            run_one(v)
        finally:
            finished.set()

    def run_one(v) -> None:
        try:
            try:
                ex = v.run(timeout=timeout, resume_hlt=resume_hlt, _group_stop=group_stop)
            except ObjectDestroyedError:
                if not (v.destroyed or vm.destroyed):
                    raise
                # Destroyed from another thread before this thread's run began: a stop, as
                # for the vCPUs whose runs it ended.
                ex = VmExit(exitcode=VmExitCode.BOGUS, rip=0, kvm_reason=-1)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            with lock:
                errors.append(e)
            stop_all()
            return
        with lock:
            # A BOGUS exit after the group was stopped is the echo of that stop, not a decision.
            first = not decided and not (ex.exitcode == VmExitCode.BOGUS and group_stop.is_set())
            if first:
                decided.append((v.index, ex))
        if first:
            stop_all()

    # Ctrl-C must reach the caller's thread (which then stops everyone), not a vCPU thread
    # where it would only interrupt one KVM_RUN: helper_threads block it. The caller waits on
    # each thread's own event, not Thread.join: a KeyboardInterrupt in a join may leave the
    # Thread marked stopped while it still runs (CPython 3.11's _wait_for_tstate_lock).
    finished = [threading.Event() for _ in vcpus]
    threads = [threading.Thread(target=worker, args=(v, done), name=f"{vm.name}-vcpu{v.index}", daemon=True)
               for v, done in zip(vcpus, finished)]
    started = 0
    try:
        for t in threads:
            helper_threads.start_quiet(t)
            started += 1
        for done in finished:
            # In slices: a SIGINT another thread of the process took (one the caller started)
            # raises KeyboardInterrupt here only when this thread runs Python code again.
            while not done.wait(JOIN_SLICE):
                pass
    except BaseException:
        stop_all()
        for i, (t, done) in enumerate(zip(threads, finished)):
            if i < started or t.ident is not None:  # (a start the interrupt cut short may have run)
                done.wait()
        raise
    if errors and not decided:
        raise errors[0]
    index, ex = decided[0] if decided else (0, vcpus[0]._synthetic_exit(VmExitCode.BOGUS))
    return _result(vm, ex, index, t0)


def _result(vm, ex: VmExit, index: int, t0: float) -> RunResult:
    return RunResult(exit=ex, vcpu=index, elapsed=time.perf_counter() - t0, console=vm.console,
                     vcpu_stats=[v.stats() for v in vm.vcpus])
