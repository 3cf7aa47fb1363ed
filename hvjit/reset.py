"""Fast in-process reset: put a VM back into a snapshot's state, copying only what changed.

Memory: the pages KVM's dirty log (and hvjit's own writes) marked since the VM last equalled
a snapshot, plus the pages that differ between that snapshot and the target, known from the
tree of snapshots taken in this process (each holds the pages that may differ from its
parent). One C call copies them. Without such a link (another VM's snapshot, a file) every
page is copied once, and later resets are fast again.

vCPUs: the exit each vCPU stopped at is completed first (else KVM would finish it on top of
the restored registers); REGS, SREGS and events travel in kvm_run (KVM_CAP_SYNC_REGS, one
immediate-exit KVM_RUN); the XSAVE area is one ioctl. ``privileged=False`` skips what only
CPL0 code (or the host) changes — XCRs, MSRs, MP state, LAPIC, debug registers, PICs,
IOAPIC, PIT, kvmclock — for guests that ran at CPL3 only since the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import _trampoline as _t
from . import dirty, snapshot
from .memory import PAGE_SIZE
from .snapshot import Snapshot


@dataclass(frozen=True)
class ResetStats:
    pages: int  # pages copied back
    full: bool  # every page was copied (no known link to the target)
    completed_exits: int  # vCPUs whose pending exit had to be completed first


def take(vm) -> Snapshot:
    """``vm.snapshot()``: capture, and link the snapshot into this VM's tree."""
    snapshot.check_stopped(vm)
    tracker = dirty.tracker(vm)
    since = tracker.accumulate()
    parent = tracker.base
    snap = snapshot.capture(vm)
    if parent is not None:
        snap.parent, snap.delta = parent, since
    tracker.rebase(snap)
    return snap


def pages_between(base: Optional[Snapshot], target: Snapshot) -> Optional[dirty.Bitmaps]:
    """Pages that may differ between two snapshots of one tree (None: not in one tree)."""
    if base is None:
        return None
    up: dict[int, Optional[dirty.Bitmaps]] = {}  # id(ancestor of base) -> pages from base to it
    acc: Optional[dirty.Bitmaps] = None
    node: Optional[Snapshot] = base
    while node is not None:
        up[id(node)] = acc
        if node.delta is None:
            break
        acc = node.delta if acc is None else dirty.union(acc, node.delta)
        node = node.parent
    acc = None
    node = target
    while node is not None:
        if id(node) in up:
            parts = [p for p in (up[id(node)], acc) if p is not None]
            if not parts:
                return {}
            return parts[0] if len(parts) == 1 else dirty.union(parts[0], parts[1])
        if node.delta is None:
            break
        acc = node.delta if acc is None else dirty.union(acc, node.delta)
        node = node.parent
    return None


def reset_to(vm, snap: Snapshot, *, privileged: bool = True) -> ResetStats:
    snapshot.check_stopped(vm)
    snapshot.check_compatible(vm, snap)
    tracker = dirty.tracker(vm)
    since = tracker.accumulate()
    between = pages_between(tracker.base, snap)
    full = between is None
    segments = vm.memory.segments
    pages = dirty.full_bitmaps(segments) if between is None else (dirty.union(since, between) if between else since)
    copied = 0
    for k, seg in enumerate(segments):
        src = snap.dense(k)
        copied += _t.check(_t.lib.hvt_mem_copy_pages(_t.ffi.cast("void *", seg.host_address), _t.ptr(src),
                                                     _t.ptr(pages[k], "uint64_t *"), seg.size // PAGE_SIZE,
                                                     PAGE_SIZE), "hvt_mem_copy_pages")
    completed = 0
    for v in vm.vcpus:
        completed += snapshot.complete_pending(v)
        synced = snapshot.sync_registers(v, snap)
        snapshot.apply_vcpu(v, snap, cpuid=False, registers=not synced, privileged=privileged)
    if privileged:
        snapshot.apply_vm(vm, snap)
        snapshot.apply_clock(vm, snap)
    snapshot.reset_devices(vm, snap)
    console = snap.console
    if len(vm._console) != len(console) or vm._console != console:
        vm._console[:] = console
    tracker.rebase(snap)
    return ResetStats(copied, full, completed)
