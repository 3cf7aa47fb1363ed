"""What a fast reset costs (``vm.reset_to``), next to one vCPU ioctl measured in the same run.

A CPL3 guest writes one byte to each of ``n`` pages and powers off; between runs the VM is
reset to the snapshot taken before the writes. Reported per dirty-page count: microseconds
per reset, with all state and with ``privileged=False`` (a CPL3-only guest), each as a ratio
to one KVM_GET_REGS, both back to back (warm) and as the first call after a guest run (cold,
where the reset itself runs); the guest run between two resets (``vm.run``: a reset that merely moved
work into the next run would show there); where the time of one reset goes, step by step;
and what the steps no reset can skip cost on this host.
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
from ..system import Kvm

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


IOCTL_BATCH = 10  # KVM_GET_REGS calls timed after each reset


def _get_regs_batch(vcpu, calls: int = IOCTL_BATCH) -> float:
    """Microseconds of one KVM_GET_REGS from Python (cffi), averaged over ``calls``."""
    regs = np.zeros(1, KVM_REGS_DTYPE)
    ptr, fd, fn = _t.ptr(regs), vcpu.fd, _t.lib.hvt_vcpu_get_regs
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn(fd, ptr)
    return (time.perf_counter_ns() - t0) / calls / 1000


def ioctl_us(vcpu, rounds: int = 2000) -> float:
    """One KVM_GET_REGS from Python (cffi), median of batches, in microseconds."""
    return statistics.median(_get_regs_batch(vcpu, rounds // 5) for _ in range(5))


def _writer_vm(session, pages: int, name: str, dirty_ring=None):
    if not 1 <= pages <= MAX_PAGES:
        raise ValueError(f"pages must be 1..{MAX_PAGES}")
    vm = session.create_vm(name, memory=MEMORY, dirty_ring=dirty_ring)
    vm.memory.write(CODE_GPA, assemble(WRITER.format(buffer=BUFFER_GPA, pages=pages), CODE_GPA))
    entry.setup_long_mode(vm.vcpu(0), CODE_GPA, cpl=3)
    vm.vcpu(0).warm_up()
    return vm


def _run_once(vm) -> None:
    result = vm.run(timeout=10)
    if result.reason != "poweroff":
        raise RuntimeError(f"benchmark guest stopped with {result}")


def reset_rounds(vm, snap, rounds: int) -> dict:
    """Resets after guest runs, full and CPL3-only in turn, each followed by a batch of
    KVM_GET_REGS (back to back: warm) and by another guest run and one KVM_GET_REGS right
    after it (cold, as the reset was): on a shared host the ratio of neighbours is steadier
    than either time."""
    vcpu = vm.vcpu(0)
    out: dict = {True: ([], [], []), False: ([], [], [])}
    runs: list[float] = []
    copied = 0
    for _ in range(rounds):
        for privileged in (True, False):
            t0 = time.perf_counter_ns()
            _run_once(vm)
            runs.append((time.perf_counter_ns() - t0) / 1000)
            t0 = time.perf_counter_ns()
            stats = vm.reset_to(snap, privileged=privileged)
            us = (time.perf_counter_ns() - t0) / 1000
            out[privileged][0].append(us)
            out[privileged][1].append(_get_regs_batch(vcpu))
            _run_once(vm)
            # One KVM_GET_REGS as the first call after a guest run, where a reset is made:
            # caches and TLBs hold the guest's work then, not hvjit's.
            out[privileged][2].append(_get_regs_batch(vcpu, 1))
            vm.reset_to(snap, privileged=privileged)
            copied = stats.pages
    full, user = out[True], out[False]
    return {"pages_copied": copied, "run_us": statistics.median(runs),
            "reset_us": statistics.median(full[0]), "reset_user_us": statistics.median(user[0]),
            "get_regs_us": statistics.median(full[1] + user[1]),
            "get_regs_cold_us": statistics.median(full[2] + user[2]),
            "reset_over_ioctl": statistics.median(t / g for t, g, _ in zip(*full)),
            "reset_user_over_ioctl": statistics.median(t / g for t, g, _ in zip(*user)),
            "reset_over_cold_ioctl": statistics.median(t / c for t, _, c in zip(*full)),
            "reset_user_over_cold_ioctl": statistics.median(t / c for t, _, c in zip(*user))}


def breakdown_us(vm, snap, rounds: int) -> dict[str, float]:
    """The steps of one CPL3-only reset, timed one by one (medians, microseconds), beside the
    whole resets; the rest of the CPL3-only one is Python's bookkeeping."""
    steps: dict[str, list[float]] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter_ns()
        out = fn(*args, **kwargs)
        steps.setdefault(name, []).append((time.perf_counter_ns() - t0) / 1000)
        return out

    vm.reset_to(snap)
    plan = next(iter(snap._reset_plan.values()))
    seg, part = plan.slots[0], plan.user.records[0]
    ptr = _t.ffi.cast
    lib = _t.lib
    tracker = dirty.tracker(vm)
    rings = _t.ffi.NULL if vm._rings is None else vm._rings.ptr
    pages_step = ("dirty log + page copies (hvt_mem_reset_pages)" if vm._rings is None else
                  "dirty ring harvest + page copies (hvt_mem_reset_pages)")

    def reset_pages():
        if rings:
            lib.hvt_dirty_rings_harvest(rings)
        return lib.hvt_mem_reset_pages(vm.fd, int(seg["slot"]), ptr("void *", int(seg["dst"])),
                                       ptr("void *", int(seg["src"])), ptr("uint64_t *", int(seg["bitmap"])),
                                       ptr("uint64_t *", int(seg["logged"])), _t.ffi.NULL, _t.ffi.NULL,
                                       int(seg["npages"]), PAGE_SIZE)

    for _ in range(rounds):
        _run_once(vm)
        timed("device fields and rows (reset_devices)", snapshot.reset_devices, vm, snap, since_snapshot=True)
        timed(pages_step, reset_pages)
        done = timed("finish exit, registers, XSAVE (hvt_vcpu_reset)", lib.hvt_vcpu_reset, int(part["fd"]),
                     ptr("struct kvm_run *", int(part["run"])), ptr("struct kvm_regs *", int(part["regs"])),
                     ptr("struct kvm_sregs *", int(part["sregs"])),
                     ptr("struct kvm_vcpu_events *", int(part["events"])), ptr("void *", int(part["xsave"])),
                     int(part["flags"]))
        steps.setdefault("  % of them with REGS left for the next KVM_RUN", []).append(
            100.0 * bool(done & reset.DID_DEFER_REGS))
        steps.setdefault("  % of them with no completing KVM_RUN (OUT settled)", []).append(
            100.0 * bool(done & reset.DID_SKIP))
        tracker.rebase(snap)
        _run_once(vm)
        timed("whole CPL3-only reset (vm.reset_to)", vm.reset_to, snap, privileged=False)
        _run_once(vm)
        timed("whole reset, with CPL0 state (XCRs, MSRs, MP state, DRs, kvmclock)", vm.reset_to, snap)
    return {k: round(statistics.median(v), 1) for k, v in steps.items()}


def floor_us(vm, rounds: int) -> dict[str, float]:
    """What the unavoidable steps cost on this host, each timed beside KVM_GET_REGS."""
    vcpu = vm.vcpu(0)
    fd, run = vcpu.fd, vcpu._run[0]
    lib = _t.lib
    regs = np.zeros(1, KVM_REGS_DTYPE)
    lib.hvt_vcpu_get_regs(fd, _t.ptr(regs))
    xsave = np.zeros(max(4096, vm.xsave_size), np.uint8)
    lib.hvt_vcpu_get_xsave(fd, _t.ptr(xsave), len(xsave))
    seg = vm.memory.segments[0]
    bitmap = np.zeros(dirty.bitmap_words(seg.size), np.uint64)
    pregs, pxsave, pbitmap = _t.ptr(regs), _t.ptr(xsave), _t.ptr(bitmap, "uint64_t *")

    def immediate_run():
        run["immediate_exit"] = 1
        lib.hvt_vcpu_run(fd)
        run["immediate_exit"] = 0

    ops = {"KVM_GET_REGS": lambda: lib.hvt_vcpu_get_regs(fd, pregs),
           "KVM_SET_REGS": lambda: lib.hvt_vcpu_set_regs(fd, pregs),
           "KVM_SET_XSAVE": lambda: lib.hvt_vcpu_set_xsave(fd, pxsave),
           "KVM_RUN (immediate exit)": immediate_run}
    if vm._rings is None:
        ops["KVM_GET_DIRTY_LOG (VM ioctl, nothing dirty)"] = lambda: lib.hvt_vm_get_dirty_log(vm.fd, seg.slot, pbitmap)
    else:
        ops["dirty ring harvest (nothing new; no system call)"] = lambda: lib.hvt_dirty_rings_harvest(vm._rings.ptr)
    ops["cffi call (hvt_sys_nop)"] = lib.hvt_sys_nop
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(rounds):
        for name, fn in ops.items():
            t0 = time.perf_counter_ns()
            for _ in range(IOCTL_BATCH):
                fn()
            times[name].append((time.perf_counter_ns() - t0) / IOCTL_BATCH / 1000)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def measure(session, page_counts=(1, 50, 500), rounds: int = 60) -> dict:
    """Reset cost per dirty-page count, as microseconds and as multiples of one vCPU ioctl,
    with the VM's default tracking (the dirty ring where the host has one); with 50 pages
    also with KVM's dirty bitmap on such a host, for the comparison."""
    out: dict = {"rows": []}
    runs = [(n, None) for n in page_counts]
    if 50 in page_counts and dirty.ring_capability(Kvm.instance())[0]:
        runs.append((50, 0))
    for n, ring in runs:
        vm = _writer_vm(session, n, f"reset-bench-{n}" + ("" if ring is None else "-bitmap"), dirty_ring=ring)
        try:
            snap = reset.take(vm)
            _run_once(vm)
            vm.reset_to(snap)  # the first reset after the snapshot sets the dirty log going
            m = reset_rounds(vm, snap, rounds)
            row = {"dirty_pages": n, "tracking": "bitmap" if vm._rings is None else "ring",
                   "pages_copied": m["pages_copied"], "reset_us": round(m["reset_us"], 1),
                   "reset_user_us": round(m["reset_user_us"], 1), "get_regs_us": round(m["get_regs_us"], 2),
                   "get_regs_cold_us": round(m["get_regs_cold_us"], 2), "guest_run_us": round(m["run_us"], 1),
                   **{k: round(m[k], 2) for k in ("reset_over_ioctl", "reset_user_over_ioctl",
                                                  "reset_over_cold_ioctl", "reset_user_over_cold_ioctl")}}
            if n == 50 and ring is None:
                row["breakdown_us"] = breakdown_us(vm, snap, rounds)
                row["floor_us"] = floor_us(vm, rounds)
                out["breakdown_pages"] = n
            out["rows"].append(row)
        finally:
            vm.destroy()
    return out
