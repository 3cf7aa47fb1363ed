"""What a fast reset costs (``vm.reset_to``), next to one vCPU ioctl measured in the same run.

A CPL3 guest writes one byte to each of ``n`` pages and powers off; between runs the VM is
reset to the snapshot taken before the writes. Reported per dirty-page count: microseconds
per reset, with all state and with ``privileged=False`` (a CPL3-only guest), each as a ratio
to one KVM_GET_REGS; and where the time of one reset goes, step by step.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .. import _trampoline as _t
from .. import dirty, entry, reset, snapshot
from ..abi import KVM_REGS_DTYPE
from ..asm import assemble
from ..memory import PAGE_SIZE

CODE_GPA = 0x1000
BUFFER_GPA = 0x100000
MEMORY = 4 << 20
MAX_PAGES = 512

WRITER = """
.code64
    mov ${buffer}, %rdi
    mov ${pages}, %ecx
1:  incb (%rdi)
    add $4096, %rdi
    dec %ecx
    jnz 1b
    xor %eax, %eax
    outl %eax, $0xf4
"""


def ioctl_us(vcpu, rounds: int = 2000) -> float:
    """One KVM_GET_REGS from Python (cffi), median of batches, in microseconds."""
    regs = np.zeros(1, KVM_REGS_DTYPE)
    ptr, fd, fn = _t.ptr(regs), vcpu.fd, _t.lib.hvt_vcpu_get_regs
    batches = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(rounds // 5):
            fn(fd, ptr)
        batches.append((time.perf_counter_ns() - t0) / (rounds // 5) / 1000)
    return statistics.median(batches)


def _writer_vm(session, pages: int, name: str):
    if not 1 <= pages <= MAX_PAGES:
        raise ValueError(f"pages must be 1..{MAX_PAGES}")
    vm = session.create_vm(name, memory=MEMORY)
    vm.memory.write(CODE_GPA, assemble(WRITER.format(buffer=BUFFER_GPA, pages=pages), CODE_GPA))
    entry.setup_long_mode(vm.vcpu(0), CODE_GPA, cpl=3)
    vm.vcpu(0).warm_up()
    return vm


def _run_once(vm) -> None:
    result = vm.run(timeout=10)
    if result.reason != "poweroff":
        raise RuntimeError(f"benchmark guest stopped with {result}")


def reset_us(vm, snap, *, privileged: bool, rounds: int) -> tuple[float, int]:
    """Median microseconds of ``vm.reset_to(snap)`` after each guest run; and pages copied."""
    times, copied = [], 0
    for _ in range(rounds):
        _run_once(vm)
        t0 = time.perf_counter_ns()
        stats = vm.reset_to(snap, privileged=privileged)
        times.append((time.perf_counter_ns() - t0) / 1000)
        copied = stats.pages
    return statistics.median(times), copied


def breakdown_us(vm, snap, rounds: int) -> dict[str, float]:
    """The steps of one full reset, timed one by one (medians, microseconds)."""
    vcpu = vm.vcpu(0)
    steps: dict[str, list[float]] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter_ns()
        out = fn(*args, **kwargs)
        steps.setdefault(name, []).append((time.perf_counter_ns() - t0) / 1000)
        return out

    tracker = dirty.tracker(vm)
    for _ in range(rounds):
        _run_once(vm)
        since = timed("dirty log (KVM_GET_DIRTY_LOG)", tracker.accumulate)
        seg = vm.memory.segments[0]
        src = snap.dense(0)
        timed("page copies (one C call)", _t.lib.hvt_mem_copy_pages, _t.ffi.cast("void *", seg.host_address),
              _t.ptr(src), _t.ptr(since[0], "uint64_t *"), seg.size // PAGE_SIZE, PAGE_SIZE)
        timed("complete the pending exit (KVM_RUN)", snapshot.complete_pending, vcpu)
        timed("regs+sregs+events via kvm_run (KVM_RUN)", snapshot.sync_registers, vcpu, snap)
        timed("XSAVE (KVM_SET_XSAVE)", vcpu.set_xsave, snap.vcpu_array(0, "xsave"))
        timed("XCRs, MSRs, MP state, DRs (privileged)", snapshot.apply_vcpu, vcpu, snap, cpuid=False,
              registers=False, privileged=True)
        timed("kvmclock (KVM_SET_CLOCK, privileged)", snapshot.apply_clock, vm, snap)
        timed("device rows", snapshot.reset_devices, vm, snap)
        tracker.rebase(snap)
    return {k: round(statistics.median(v), 1) for k, v in steps.items()}


def measure(session, page_counts=(1, 50, 500), rounds: int = 60) -> dict:
    """Reset cost per dirty-page count, as microseconds and as multiples of one vCPU ioctl."""
    out: dict = {"rows": []}
    for n in page_counts:
        vm = _writer_vm(session, n, f"reset-bench-{n}")
        try:
            snap = reset.take(vm)
            _run_once(vm)
            vm.reset_to(snap)  # the first reset after the snapshot sets the dirty log going
            get_regs = ioctl_us(vm.vcpu(0))
            full, copied = reset_us(vm, snap, privileged=True, rounds=rounds)
            user, _ = reset_us(vm, snap, privileged=False, rounds=rounds)
            row = {"dirty_pages": n, "pages_copied": copied, "reset_us": round(full, 1),
                   "reset_user_us": round(user, 1), "get_regs_us": round(get_regs, 2),
                   "reset_over_ioctl": round(full / get_regs, 2),
                   "reset_user_over_ioctl": round(user / get_regs, 2)}
            if n == 50:
                row["breakdown_us"] = breakdown_us(vm, snap, rounds)
                out["breakdown_pages"] = n
            out["rows"].append(row)
        finally:
            vm.destroy()
    return out
