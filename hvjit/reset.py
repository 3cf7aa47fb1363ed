"""Fast in-process reset: put a VM back into a snapshot's state, copying only what changed.

Memory: the pages KVM's dirty ring or dirty log (and hvjit's own writes) marked since the
VM last equalled a snapshot, plus the pages that differ between that snapshot and the
target, known from the tree of snapshots taken in this process (each holds the pages that
may differ from its parent). Without such a link (another VM's snapshot, a file) every page
is copied once, and later resets are fast again.

vCPUs: the exit each vCPU stopped at is completed first (else KVM would finish it on top of
the restored registers) by an immediate-exit KVM_RUN that also reports the SREGS and events
in kvm_run (KVM_CAP_SYNC_REGS). Where they equal the snapshot's, the REGS are left in
kvm_run for the next KVM_RUN (``Vcpu._deferred``: hvjit's register accessors apply them
first); else REGS, SREGS and events go in through one more immediate KVM_RUN. The XSAVE
area is one ioctl: no cheaper way tells whether the guest touched it. ``privileged=False``
skips what only CPL0 code (or the host) changes — XCRs, MSRs, MP state, LAPIC, debug
registers, PICs, IOAPIC, PIT, kvmclock — for guests that ran at CPL3 only since the snapshot.

All of it is one C call, ``hvt_vm_reset`` (docs/architecture.md lists its steps), on records
made once per snapshot and VM (``_Plan``), the device state rows the guest or the host
touched included; Python puts back the devices' Python-side fields, the buffer bytes of the
devices whose handlers write their buffer (:mod:`hvjit.snapshot`'s ``reset_fields``,
``reset_buffers``) and the console. Without an in-kernel irqchip the MP state is not set:
KVM then has no other state than RUNNABLE.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _trampoline as _t
from . import dirty, snapshot, vcpu_events
from .abi import (
    HVT_RESET_SLOT_DTYPE,
    HVT_RESET_TALLY_DTYPE,
    HVT_RESET_VCPU_DTYPE,
    HVT_RESET_VMSTATE_DTYPE,
    KVM_EXIT_IO_OUT,
    KVM_SYNC_X86_REGS,
    KVM_XSAVE_SIZE,
    Cap,
    KvmExit,
)
from .errors import HvjitError, SnapshotError
from .memory import PAGE_SIZE
from .snapshot import Snapshot


class ResetStats(NamedTuple):  # a NamedTuple: built in a fraction of a frozen dataclass's time
    pages: int  # pages copied back
    full: bool  # every page was copied (no known link to the target)
    completed_exits: int  # vCPUs whose pending exit had to be completed first
    sregs_restored: int = 0  # vCPUs whose SREGS or events differed (set through a 2nd KVM_RUN)
    # vCPUs stopped at an OUT this host had finished (out_exit_settled): no completing
    # KVM_RUN, all their registers wait in kvm_run for the next one (CPL3-only resets)
    settled_exits: int = 0


# ResetStats(...) without the Python-level __new__ NamedTuple adds (what that __new__ calls).
_new_tuple = tuple.__new__


def take(vm) -> Snapshot:
    """``vm.snapshot()``: capture, and link the snapshot into this VM's tree (under the VM's
    state lock, as a reset: the rings it harvests are unmapped by a destroy)."""
    with vm._state_lock:
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


# hvt_vm_reset's steps and record flags (trampoline/include/hvt.h).
DID_COMPLETE, DID_DEFER_REGS, DID_SYNC, DID_XSAVE, DID_PRIVILEGED, MSRS_SHORT, DID_SKIP = 1, 2, 4, 8, 32, 64, 128
LEFT_ROWS, LEFT_MSRS = 1, 2  # hvt_reset_tally.left
OUT_SETTLED = 1
KVM_MP_STATE_RUNNABLE = 0
MAX_PLANS = 8  # plans kept per snapshot (one per VM it was reset into)


PROBE_PORTS = (0x10, 0x11, 0x12)
PROBE_CODE = bytes([0xE6, PROBE_PORTS[0], 0xE6, PROBE_PORTS[1], 0xE6, PROBE_PORTS[2]])  # out %al, $port (x3)
PROBE_GPA = 0x1000


def out_exit_settled(vm) -> bool:
    """Whether this host's KVM finishes an OUT before it reports the exit, so that nothing
    left pending rewrites registers set after it (then a CPL3-only reset needs no completing
    KVM_RUN). Found once per host by a probe guest at CPL3: after its first OUT exit, RIP is
    set back to that OUT, then to the third, through kvm_run; the host settles OUTs if both
    run as set. PVM (KVM's instruction emulator) does; VMX and SVM finish an OUT on the next
    KVM_RUN by skipping the instruction at the exit's RIP, which the first step shows."""
    return host_settles_out_exits(vm.kvm, type(vm))


def host_settles_out_exits(kvm, vm_class) -> bool:
    """:func:`out_exit_settled` for a host (``hvjit.system.Kvm``), its probe VM made with
    ``vm_class`` (``hvjit.vm.Vm``, which imports this module)."""
    known = kvm.behaviour.get("out_exit_settled")
    if known is not None:
        return known
    settled = False
    if Cap.SYNC_REGS.name in kvm.capabilities:
        from .entry import setup_long_mode  # the probe alone needs guest mode set-up

        try:
            probe = vm_class(None, "hvjit-out-probe", memory=1 << 20, devices=False, kvm=kvm,
                             syscall_fixup=False, accelerate_strings=False)
        except HvjitError:
            probe = None  # no VM for the probe: resets keep the completing KVM_RUN
        if probe is not None:
            try:
                probe.memory.write(PROBE_GPA, PROBE_CODE)
                vcpu = probe.vcpu(0)
                setup_long_mode(vcpu, PROBE_GPA, cpl=3)
                settled = _probe_out_exits(vcpu)
            except HvjitError:
                settled = False
            finally:
                probe.destroy()
    kvm.behaviour["out_exit_settled"] = settled
    return settled


def _probe_out_exits(vcpu) -> bool:
    run = vcpu._run[0]

    def run_to(rip: Optional[int]) -> int:
        if rip is not None:
            run["sync_regs"]["rip"] = rip
            run["kvm_dirty_regs"] = KVM_SYNC_X86_REGS
        rc = _t.lib.hvt_vcpu_run(vcpu.fd)
        run["kvm_dirty_regs"] = 0
        if rc < 0 or int(run["exit_reason"]) != KvmExit.IO or int(run["io_direction"]) != KVM_EXIT_IO_OUT:
            return -1
        return int(run["io_port"])

    run["kvm_valid_regs"] = KVM_SYNC_X86_REGS
    try:
        first = run_to(None)
        return (first == PROBE_PORTS[0] and run_to(PROBE_GPA) == PROBE_PORTS[0]
                and run_to(PROBE_GPA + 4) == PROBE_PORTS[2])
    finally:
        run["kvm_valid_regs"] = 0


def _address(cdata) -> int:
    return int(_t.ffi.cast("uintptr_t", cdata))


class _Records:
    """hvt_vm_reset's vCPU records for one kind of reset (CPL3-only or privileged)."""

    def __init__(self, records: np.ndarray):
        self.records = records
        self.ptr = _t.ptr(records, "struct hvt_reset_vcpu *")
        base = _t.ffi.cast("char *", _t.ffi.from_buffer(records))
        fields = HVT_RESET_VCPU_DTYPE.fields
        assert fields is not None
        at = fields["done"][1]
        # int32_t * to each record's `done`: read back without numpy.
        self.done = [_t.ffi.cast("int32_t *", base + i * HVT_RESET_VCPU_DTYPE.itemsize + at)
                     for i in range(len(records))]


@dataclass
class _Plan:
    """What one VM's resets to one snapshot need: hvt_vm_reset's records, every pointer in
    them made once, and the arrays they point into."""
    slots: np.ndarray  # HVT_RESET_SLOT_DTYPE, one per memory segment
    slots_ptr: Any
    user: _Records  # one per vCPU (none without KVM_CAP_SYNC_REGS)
    privileged: _Records  # the same, with the CPL0 state
    vmstate_ptr: Any  # struct hvt_reset_vmstate *: PICs, IOAPIC, PIT, kvmclock
    bitmaps: list  # uint64_t * to each slot record's bitmap (what the reset copied)
    devices: snapshot.DevicePlan
    xsave: bool  # the C call sets the XSAVE areas
    full: list[np.ndarray]  # all-pages bitmaps, for a target outside this VM's tree
    keep: list  # what the records point into
    rings_ptr: Any  # struct hvt_dirty_rings * of the VM (NULL: it reads KVM's dirty bitmap)
    tally_ptr: Any  # struct hvt_reset_tally *, hvt_vm_reset's
    tally: Any  # int32_t * to the same: completed, synced, settled, left
    tracker: Any = None  # the DirtyTracker whose segments' host_dirty the records point into
    extra: bool = False  # some record points at an `extra` bitmap


def _plan_key(vm) -> tuple:
    # The VM's id (the plan holds its vCPUs, and so the VM: no id is reused while it lives)
    # and generation (bumped by every change of its memory, devices, vCPUs or KVM VM).
    return (id(vm), vm.generation)


def _make_plan(vm, snap: Snapshot) -> _Plan:
    snapshot.check_compatible(vm, snap)
    keep: list = [vm.memory.segments, list(vm.devices), list(vm.vcpus)]  # what the plan was made for

    def address(array: Optional[np.ndarray]) -> int:
        if array is None:
            return 0
        array = np.ascontiguousarray(array)
        keep.append(array)
        return _address(_t.ptr(array))

    segments = vm.memory.segments
    slots = np.zeros(len(segments), HVT_RESET_SLOT_DTYPE)
    for k, seg in enumerate(segments):
        row = slots[k]
        # No KVM log to read: the guest cannot write read-only memory, and a VM with dirty
        # rings has them harvested into the tracker's `logged` (the record's `logged`).
        row["slot"] = -1 if seg.readonly or vm._rings is not None else seg.slot
        row["npages"] = seg.size // PAGE_SIZE
        row["dst"] = seg.host_address
        row["src"] = address(snap.dense(k))
        row["bitmap"] = address(np.zeros(dirty.bitmap_words(seg.size), np.uint64))
    sync = Cap.SYNC_REGS.name in vm.kvm.capabilities
    user = np.zeros(len(vm.vcpus) if sync else 0, HVT_RESET_VCPU_DTYPE)
    user["flags"] = OUT_SETTLED if sync and out_exit_settled(vm) else 0
    xsave_size = max(KVM_XSAVE_SIZE, vm.xsave_size)
    has_xsave = sync
    for i, v in enumerate(vm.vcpus[: len(user)]):
        row = user[i]
        row["fd"], row["run"] = v.fd, _address(v._run_ptr)
        row["regs"] = address(snap.arrays[f"vcpu{v.index}.regs"][:1])
        row["sregs"] = address(snap.arrays[f"vcpu{v.index}.sregs"][:1])
        events = snap.vcpu_array(v.index, "events")
        if events is not None:
            vcpu_events.enable_flags(v, int(events["flags"][0]))  # as the snapshot's VM had them
            row["events"] = address(events[:1])
        area = snap.vcpu_array(v.index, "xsave")
        if area is None:
            has_xsave = False  # the legacy FPU image goes through apply_vcpu
            continue
        xsave = np.zeros(xsave_size, np.uint8)  # KVM_SET_XSAVE reads the size KVM_CAP_XSAVE2 gives
        xsave[: min(xsave_size, area.size)] = area[:xsave_size]
        row["xsave"] = address(xsave)
    privileged = user.copy()
    privileged["flags"] = 0  # the SREGS go in before the CPL0 state (hvt_vm_reset also checks)
    for i, v in enumerate(vm.vcpus[: len(user)]):
        row = privileged[i]
        msrs = snap._writable.get(f"vcpu{v.index}.msrs", snap.arrays[f"vcpu{v.index}.msrs"])
        row["msrs"], row["nmsrs"] = address(msrs), len(msrs)
        for name in ("xcrs", "lapic", "debugregs"):
            row[name] = address(snap.vcpu_array(v.index, name))
        mp_state = snap.vcpu_array(v.index, "mp_state")
        # Without an in-kernel LAPIC KVM has (and takes) no MP state but RUNNABLE: nothing to set.
        if vm.irqchip or mp_state is None or int(mp_state["mp_state"][0]) != KVM_MP_STATE_RUNNABLE:
            row["mp_state"] = address(mp_state)
    vmstate = np.zeros(1, HVT_RESET_VMSTATE_DTYPE)
    chips = snap.arrays.get("vm.irqchip")
    vmstate["irqchip"], vmstate["nirqchip"] = address(chips), 0 if chips is None else len(chips)
    vmstate["pit2"] = address(snap.arrays.get("vm.pit2"))
    vmstate["clock"] = address(snapshot.clock_to_set(snap.arrays["vm.clock"]))
    keep.append(vmstate)
    tally = np.zeros(1, HVT_RESET_TALLY_DTYPE)
    keep.append(tally)
    return _Plan(slots=slots, slots_ptr=_t.ptr(slots, "struct hvt_reset_slot *"), user=_Records(user),
                 privileged=_Records(privileged), vmstate_ptr=_t.ptr(vmstate, "struct hvt_reset_vmstate *"),
                 bitmaps=[_t.ffi.cast("uint64_t *", int(a)) for a in slots["bitmap"]],
                 devices=snapshot.device_plan(vm, snap), xsave=has_xsave,
                 full=list(dirty.full_bitmaps(segments).values()), keep=keep,
                 rings_ptr=_t.ffi.NULL if vm._rings is None else vm._rings.ptr,
                 tally_ptr=_t.ptr(tally, "struct hvt_reset_tally *"), tally=_t.ffi.cast("int32_t *", _t.ptr(tally)))


class _Ready:
    """What a VM's last reset found, kept so that the next reset to the same snapshot goes
    straight to the C call while none of it changed (one for each kind of reset: a CPL3-only
    one and one with the CPL0 state). A reset runs right after the guest, with cold caches:
    there every look-up of the general path costs ~0.5-1 us, and they added up to a third
    of a 50-page reset."""

    __slots__ = ("snap", "generation", "tracker", "plan", "records", "call", "args", "touched", "devices_version",
                 "controls", "bus", "console", "tally", "bitmaps")

    def __init__(self, vm, snap: Snapshot, privileged: bool, plan: _Plan, records: _Records):
        self.snap, self.plan, self.records = snap, plan, records
        self.generation = vm.generation  # memory, devices, vCPUs and KVM VM as they are now
        self.tracker = vm._dirty
        devices = plan.devices
        self.touched = devices.touched  # uint64_t *: the device rows the host handed out
        self.call = _t.lib.hvt_vm_reset
        self.args = (vm.fd, plan.slots_ptr, len(vm.memory.segments), records.ptr, len(records.done),
                     plan.vmstate_ptr if privileged else _t.ffi.NULL, devices.record_ptr, plan.rings_ptr,
                     plan.tally_ptr)
        # The devices' Python-side fields equal the snapshot's while no state_version moves.
        self.devices_version = vm.bus.state_version
        self.controls = [(v, v._control) for v in vm.vcpus]
        self.bus, self.console, self.tally, self.bitmaps = vm.bus, snap.console, plan.tally, plan.bitmaps

    @staticmethod
    def possible(plan: _Plan, records: _Records) -> bool:
        """Whether a reset like the one just made (and complete) can take the short way next
        time: the C call does all of it, and every device with Python-side fields counts its
        changes (state_version), so one bus-wide count tells whether they moved."""
        return (bool(records.done) and plan.xsave and not plan.extra
                and all(seen is not None for seen in plan.devices.seen))


def reset_to(vm, snap: Snapshot, *, privileged: bool = True) -> ResetStats:
    """``vm.reset_to(snap)``: put the VM back into ``snap``'s state in place, copying only the
    pages that may differ. ``privileged=False`` leaves out what only CPL0 code changes (the
    guest ran at CPL3 alone since ``snap``). The VM must be stopped or paused."""
    # Under the VM's state lock: a destroy or reinit in another thread waits for the C call,
    # which writes through raw pointers into kvm_run pages and the rings; a reset after it
    # finds the VM destroyed.
    with vm._state_lock:
        if vm.destroyed:
            vm._check()  # raises
        ready = vm._reset_ready[privileged]
        if ready is None or ready.snap is not snap or ready.generation != vm.generation:
            return _reset_planned(vm, snap, privileged)
        tracker = ready.tracker
        if vm._dirty is not tracker or tracker.base is not snap or not tracker.since_empty:
            return _reset_planned(vm, snap, privileged)
        bus = ready.bus
        if bus.state_version != ready.devices_version:
            return _reset_planned(vm, snap, privileged)
        for vcpu, control in ready.controls:  # snapshot.check_stopped's test
            if vcpu.destroyed or control.thread is not None and not control.parked:
                snapshot.check_stopped(vm)  # raises the error, the state read under the lock
        if vm._console != ready.console:
            vm._console[:] = ready.console
        ready.touched[0] = bus.buffer_touched
        rc = ready.call(*ready.args)
        tally = ready.tally
        if rc < 0 or tally[3]:  # an error, or device rows or MSRs left to Python
            return _after_call(vm, snap, ready.plan, ready.records, rc, 0, False, privileged, ready)
        bus.buffer_touched = 0  # tracker.rebase(snap): its base and `since` are as they were
        tracker.resets_left -= 1  # tracker.after_reset, its test inline
        if tracker.resets_left <= 0 or rc > tracker.clear_above:
            tracker.clear_due(rc, ready.bitmaps)
        return _new_tuple(ResetStats, (rc, False, tally[0], tally[1], tally[2]))


def _reset_planned(vm, snap: Snapshot, privileged: bool) -> ResetStats:
    """The general way: find (or make) the plan, point it at every page that may differ and
    put back the devices' Python-side fields, then the C call."""
    vm._reset_ready[privileged] = None
    snapshot.check_stopped(vm)
    segments = vm.memory.segments
    key = _plan_key(vm)
    plan = snap._reset_plan.get(key)
    if plan is None:
        if len(snap._reset_plan) >= MAX_PLANS:
            snap._reset_plan.clear()
        plan = snap._reset_plan[key] = _make_plan(vm, snap)
    tracker = dirty.tracker(vm)
    at_snap = tracker.base is snap
    full, extras = False, ()  # `extras`: kept alive across the call
    if plan.tracker is not tracker or not at_snap or plan.extra or not tracker.since_empty:
        vm._reset_ready = [None, None]  # the other kind's short way shares the slot records
        full, extras = _extra_pages(vm, snap, plan, tracker, segments, at_snap)
    bus, devices = vm.bus, plan.devices
    if not devices.valid(bus):
        vm._reset_ready = [None, None]  # ... and the device plan
        devices = plan.devices = snapshot.device_plan(vm, snap)
    rewritten = snapshot.reset_fields(devices, bus, snap) if devices.python else 0
    devices.touched[0] = bus.buffer_touched if at_snap else snapshot.ALL_ROWS
    console = snap.console
    if len(vm._console) != len(console) or vm._console != console:
        vm._console[:] = console
    records = plan.privileged if privileged else plan.user
    nvcpus = len(records.done)
    if not nvcpus:  # no KVM_CAP_SYNC_REGS: one ioctl per register set
        for v in vm.vcpus:
            snapshot.complete_pending(v)
    rc = _t.lib.hvt_vm_reset(vm.fd, plan.slots_ptr, len(segments), records.ptr, nvcpus,
                             plan.vmstate_ptr if privileged and nvcpus else _t.ffi.NULL, devices.record_ptr,
                             plan.rings_ptr, plan.tally_ptr)
    return _after_call(vm, snap, plan, records, rc, rewritten, full, privileged, None)


def _after_call(vm, snap: Snapshot, plan: _Plan, records: _Records, rc: int, rewritten: int, full: bool,
                privileged: bool, ready: Optional[_Ready]) -> ResetStats:
    """After hvt_vm_reset: the device buffers it left, its errors, the rest of the vCPU state
    where it left that, the dirty tracker. ``ready``, or a new one where the reset allows it,
    becomes the VM's short way to its next reset."""
    devices = plan.devices
    changed = devices.changed[0] & devices.buffer_slots  # rows the C call left: buffers first
    if changed:
        snapshot.reset_buffers(devices, changed, rewritten)
    if rc < 0:
        vm._reset_ready[privileged] = None
        _raise_reset_error(vm, records, rc)
    tally = plan.tally
    short = tally[3] & LEFT_MSRS
    if short or not records.done or not plan.xsave:
        ready = None
        _slow_rest(vm, snap, plan, privileged, [p[0] for p in records.done])
    tracker = vm._dirty
    tracker.rebase(snap)
    tracker.after_reset(rc, plan.bitmaps)
    if ready is None and not short and _Ready.possible(plan, records):
        ready = _Ready(vm, snap, privileged, plan, records)
    vm._reset_ready[privileged] = ready
    return ResetStats(rc, full, tally[0], tally[1], tally[2])


def _extra_pages(vm, snap: Snapshot, plan: _Plan, tracker, segments, at_snap: bool) -> tuple[bool, tuple]:
    """Point the slot records at what KVM's log does not show: the pages hvjit wrote (each
    segment's host_dirty, new with each tracker), what an earlier look folded into `since`,
    the way through the snapshot tree; every page without a link. Returns whether every page
    goes back, and the bitmaps the records point at."""
    if plan.tracker is not tracker:
        plan.tracker = tracker
        for k, seg in enumerate(segments):
            plan.slots[k]["host_dirty"] = 0 if seg.host_dirty is None else _address(_t.ptr(seg.host_dirty))
            logged = tracker.logged.get(k)
            plan.slots[k]["logged"] = 0 if logged is None else _address(_t.ptr(logged))
    between = {} if at_snap else pages_between(tracker.base, snap)
    full = between is None
    extras = []
    since = None if tracker.since_empty else tracker.since
    for k in range(len(segments)):
        parts = [plan.full[k]] if full else [b[k] for b in (since, between or None) if b is not None]
        extra = parts[0] if len(parts) == 1 else (parts[0] | parts[1] if parts else None)
        if extra is not None:
            extras.append(extra)
        plan.slots[k]["extra"] = 0 if extra is None else _address(_t.ptr(extra))
    plan.extra = bool(extras)
    return full, tuple(extras)


def _slow_rest(vm, snap: Snapshot, plan: _Plan, privileged: bool, done: list[int]) -> None:
    """What the C call left: everything but memory without KVM_CAP_SYNC_REGS; the legacy FPU
    image; the vCPU state after an MSR KVM refused (then the plan leaves it out)."""
    nvcpus = len(done)
    for v in vm.vcpus:
        short = bool(nvcpus and done[v.index] & MSRS_SHORT)
        if nvcpus and not short and plan.xsave:
            continue
        snapshot.apply_vcpu(v, snap, cpuid=False, registers=not nvcpus, privileged=privileged and (short or not nvcpus),
                            fpu=not plan.xsave)
        writable = snap._writable.get(f"vcpu{v.index}.msrs")
        if short and writable is not None:  # _set_msrs kept the MSRs KVM takes: point the record at them
            msrs = np.ascontiguousarray(writable)
            plan.keep.append(msrs)
            plan.privileged.records[v.index]["msrs"] = _address(_t.ptr(msrs))
            plan.privileged.records[v.index]["nmsrs"] = len(msrs)
    if privileged and not nvcpus:
        snapshot.apply_vm(vm, snap)
    if privileged:
        snapshot.apply_clock(vm, snap)  # last, after any MSR set here


def _raise_reset_error(vm, records: _Records, rc: int):
    for v, done in zip(vm.vcpus, records.done):
        if done[0] == -errno.EBUSY:
            raise SnapshotError(f"vcpu {v.index} stopped inside a repeated I/O instruction; "
                                "run on to the next exit before taking or restoring state")
        if done[0] < 0:
            v._call(int(done[0]), "fast reset (KVM_RUN, KVM_SET_REGS, KVM_SET_XSAVE, CPL0 state)")
    vm._kvm_call(rc, "fast reset (KVM_GET_DIRTY_LOG, page copies, irqchip, kvmclock)")
