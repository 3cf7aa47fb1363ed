"""A VM's complete state as one object: what a snapshot holds, how it is read and applied.

The inventory (docs/snapshot-format.md lists it): per vCPU the general, segment and control
registers, the XSAVE area (or the legacy FPU image), XCRs, every MSR KVM lists, debug
registers, pending events, MP state, the LAPIC and the CPUID table; per VM the in-kernel
PICs and IOAPIC, the PIT, kvmclock, each native device's state and buffer rows plus its
Python-side fields, the console so far, the memory layout and the non-zero pages.

State is only read or written while no vCPU thread is inside KVM_RUN (``vm.run`` returned, or
the VM is paused). Before reading a vCPU, an I/O exit the vCPU stopped at is completed with
an immediate-exit KVM_RUN: KVM finishes the instruction only on the next KVM_RUN, so a
snapshot taken without it would replay the access.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import _trampoline as _t
from . import dirty, snapshot_file, syscall_entry, vcpu_events
from .abi import (
    HVT_RESET_ROWS_DTYPE,
    KVM_CLOCK_DATA_DTYPE,
    KVM_CPUID_ENTRY2_DTYPE,
    KVM_DEBUGREGS_DTYPE,
    KVM_FPU_DTYPE,
    KVM_IRQCHIP_DTYPE,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_LAPIC_STATE_DTYPE,
    KVM_MP_STATE_DTYPE,
    KVM_MSR_ENTRY_DTYPE,
    KVM_PIT_STATE2_DTYPE,
    KVM_REGS_DTYPE,
    KVM_SREGS_DTYPE,
    KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS,
    KVM_VCPU_EVENTS_DTYPE,
    KVM_XCRS_DTYPE,
    Cap,
    KvmExit,
)
from .devices import kinds
from .devices.bus import PortDevice, handlers_take_buffer
from .errors import HvjitError, SnapshotError
from .memory import PAGE_SIZE, allocate_segment
from .snapshot_file import FORMAT, VERSION

MAX_CPUID_ENTRIES = 256
KVM_CLOCK_REALTIME = 4  # KVM_SET_CLOCK would add the wall time since the snapshot: not wanted

IRQCHIPS = (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)

_SYNC_ALL = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


@dataclass(eq=False)
class Snapshot:
    """One VM state. ``manifest`` is the JSON header, ``arrays`` the named numpy arrays (the
    file's members); ``parent``/``delta`` link snapshots taken in this process into a tree:
    ``delta`` holds the pages that may differ from ``parent`` (see :mod:`hvjit.reset`)."""

    manifest: dict
    arrays: dict[str, np.ndarray]
    parent: Optional["Snapshot"] = None
    delta: Optional[dirty.Bitmaps] = None
    _dense: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _writable: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # MSRs worth setting
    _device_plan: dict[tuple, Any] = field(default_factory=dict, repr=False)  # per device set, for resets
    _compatible: set = field(default_factory=set, repr=False)  # layouts check_compatible passed
    _console: Optional[bytes] = field(default=None, repr=False)
    _reset_plan: dict[tuple, Any] = field(default_factory=dict, repr=False)  # per VM, for resets (reset.py)

    @property
    def vcpus(self) -> int:
        return int(self.manifest["vm"]["vcpus"])

    @property
    def console(self) -> bytes:
        if self._console is None:
            self._console = self.arrays["vm.console"].tobytes()
        return self._console

    def vcpu_array(self, index: int, name: str) -> Optional[np.ndarray]:
        return self.arrays.get(f"vcpu{index}.{name}")

    def save(self, path) -> None:
        """Write the snapshot file (docs/snapshot-format.md)."""
        snapshot_file.save(self.manifest, self.arrays, path)

    @classmethod
    def load(cls, path) -> "Snapshot":
        """Read and check a snapshot file; :class:`SnapshotError` if it is not a sound one."""
        return cls(*snapshot_file.load(path))

    def dense(self, k: int) -> np.ndarray:
        """Segment ``k``'s contents as one array (built on first use, for resets)."""
        if k not in self._dense:
            size = int(self.manifest["memory"][k]["size"])
            _, out = allocate_segment(size)  # huge pages, as guest memory: fewer TLB misses in resets
            pages = self.arrays[f"mem{k}.pages"]
            out.reshape(-1, PAGE_SIZE)[pages] = self.arrays[f"mem{k}.data"]
            self._dense[k] = out
        return self._dense[k]

    def differences(self, other: "Snapshot") -> list[str]:
        """Names of the arrays (and manifest parts) that differ from ``other``'s."""
        out = [k for k in ("vm", "memory", "devices") if self.manifest[k] != other.manifest[k]]
        names = sorted(set(self.arrays) | set(other.arrays))
        for name in names:
            a, b = self.arrays.get(name), other.arrays.get(name)
            if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                out.append(name)
        return out


# ---- stopping and pending I/O ---------------------------------------------------------------

def check_stopped(vm) -> None:
    """No vCPU thread may be inside KVM_RUN while state is read or written."""
    vm._check()
    for v in vm.vcpus:
        v._check()
        # A run parked by pause() waits outside KVM_RUN: its state may be read and written.
        control = v._control
        with control.lock:
            busy = control.thread is not None and not control.parked
        if busy:
            raise HvjitError(f"VM {vm.name!r} is running: stop it (vm.run returned) or pause it first")


def complete_pending(vcpu) -> bool:
    """Let KVM finish the instruction of the exit the vCPU stopped at, without running on.

    A KVM_RUN with ``immediate_exit`` completes a pending port or MMIO access (and advances
    RIP past it) and returns EINTR. Returns whether that was needed.
    """
    if vcpu._deferred:
        vcpu._flush_deferred()
    if not _t.lib.hvt_vcpu_exit_pending(vcpu._run_ptr):
        return False
    _immediate_run(vcpu, "KVM_RUN(complete pending exit)")
    vcpu._run[0]["exit_reason"] = KvmExit.INTR  # so the next look knows nothing is pending
    return True


def _immediate_run(vcpu, op: str) -> None:
    run = vcpu._run[0]
    run["immediate_exit"] = 1
    try:
        rc = _t.lib.hvt_vcpu_run(vcpu.fd)
    finally:
        run["immediate_exit"] = 0
    if rc == 0:
        # KVM went on to a new exit (a string instruction's next access): not a stop point.
        raise SnapshotError(f"vcpu {vcpu.index} stopped inside a repeated I/O instruction; "
                            "run on to the next exit before taking or restoring state")
    if rc not in (-errno.EINTR, -errno.EAGAIN):
        vcpu._call(rc, op)


# ---- reading state ---------------------------------------------------------------------------

def _record(vcpu_or_vm, dtype, fn, op: str, count: int = 1, prefill=None) -> np.ndarray:
    arr = np.zeros(count, dtype)
    if prefill is not None:
        prefill(arr)
    fd = vcpu_or_vm.fd
    call = vcpu_or_vm._call if hasattr(vcpu_or_vm, "_call") else vcpu_or_vm._kvm_call
    for i in range(count):
        call(fn(fd, _t.ptr(arr[i:i + 1])), op)
    return arr


def _cpuid(vcpu) -> np.ndarray:
    entries = np.zeros(MAX_CPUID_ENTRIES, KVM_CPUID_ENTRY2_DTYPE)
    n = vcpu._call(_t.lib.hvt_vcpu_get_cpuid(vcpu.fd, _t.ptr(entries), len(entries)), "KVM_GET_CPUID2")
    return entries[:n].copy()


def _msrs(vcpu, indices: list[int]) -> np.ndarray:
    values = vcpu.get_msrs(indices)
    readable = [(i, v) for i, v in values.items() if v is not None]
    out = np.zeros(len(readable), KVM_MSR_ENTRY_DTYPE)
    out["index"] = [i for i, _ in readable]
    out["data"] = [v for _, v in readable]
    return out


def _read_vcpu(vcpu, msr_indices: list[int], irqchip: bool) -> dict[str, np.ndarray]:
    kvm = vcpu.vm.kvm
    lib = _t.lib
    out = {
        "regs": _record(vcpu, KVM_REGS_DTYPE, lib.hvt_vcpu_get_regs, "KVM_GET_REGS"),
        "sregs": _record(vcpu, KVM_SREGS_DTYPE, lib.hvt_vcpu_get_sregs, "KVM_GET_SREGS"),
        "msrs": _msrs(vcpu, msr_indices),
        "mp_state": _record(vcpu, KVM_MP_STATE_DTYPE, lib.hvt_vcpu_get_mp_state, "KVM_GET_MP_STATE"),
        "cpuid": _cpuid(vcpu),
    }
    if kvm.has(Cap.XSAVE):
        out["xsave"] = vcpu.get_xsave()
    else:
        out["fpu"] = _record(vcpu, KVM_FPU_DTYPE, lib.hvt_vcpu_get_fpu, "KVM_GET_FPU")
    if kvm.has(Cap.XCRS):
        out["xcrs"] = _record(vcpu, KVM_XCRS_DTYPE, lib.hvt_vcpu_get_xcrs, "KVM_GET_XCRS")
    if kvm.has(Cap.DEBUGREGS):
        out["debugregs"] = _record(vcpu, KVM_DEBUGREGS_DTYPE, lib.hvt_vcpu_get_debugregs, "KVM_GET_DEBUGREGS")
    if kvm.has(Cap.VCPU_EVENTS):
        out["events"] = _record(vcpu, KVM_VCPU_EVENTS_DTYPE, lib.hvt_vcpu_get_events, "KVM_GET_VCPU_EVENTS")
    if irqchip:
        out["lapic"] = _record(vcpu, KVM_LAPIC_STATE_DTYPE, lib.hvt_vcpu_get_lapic, "KVM_GET_LAPIC")
    return out


def _read_vm(vm) -> dict[str, np.ndarray]:
    lib = _t.lib
    out = {"clock": _record(vm, KVM_CLOCK_DATA_DTYPE, lib.hvt_vm_get_clock, "KVM_GET_CLOCK"),
           "console": np.frombuffer(vm.console, np.uint8).copy()}
    if vm.irqchip:
        def chips(arr):
            arr["chip_id"] = IRQCHIPS
        out["irqchip"] = _record(vm, KVM_IRQCHIP_DTYPE, lib.hvt_vm_get_irqchip, "KVM_GET_IRQCHIP", 3, chips)
        if vm.kvm.has(Cap.PIT2):
            out["pit2"] = _record(vm, KVM_PIT_STATE2_DTYPE, lib.hvt_vm_get_pit2, "KVM_GET_PIT2")
    return out


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_native(device) -> bool:
    return bool(getattr(device, "slot", 0)) and (getattr(type(device), "port_io", None) is not None
                                                 or getattr(type(device), "mmio_io", None) is not None)


def _device_entries(vm) -> tuple[list[dict], dict[str, np.ndarray]]:
    specs = getattr(vm, "device_specs", [])
    if len(specs) != len(vm.devices):
        raise SnapshotError(f"VM {vm.name!r}: devices were attached outside Vm.add_device")
    entries, arrays = [], {}
    for j, (device, (factory, config)) in enumerate(zip(vm.devices, specs)):
        state = device.snapshot_state() if hasattr(device, "snapshot_state") else {}
        entry = {"factory": factory, "config": config, "class": _class_name(device),
                 "name": getattr(device, "name", ""), "native": _is_native(device), "state": state}
        try:
            json.dumps(entry)
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"device {entry['name']!r}: its configuration or state cannot be saved: {e}") from None
        entries.append(entry)
        if entry["native"]:
            arrays[f"dev{j}.state"] = vm.bus.dev_state[device.slot].copy()
            arrays[f"dev{j}.buf"] = vm.bus.dev_buf[device.slot].copy()
    return entries, arrays


def _memory(vm) -> tuple[list[dict], dict[str, np.ndarray]]:
    layout, arrays = [], {}
    for k, seg in enumerate(vm.memory.segments):
        layout.append({"gpa": seg.gpa, "size": seg.size, "readonly": seg.readonly, "name": seg.name})
        pages = seg.array.reshape(-1, PAGE_SIZE)
        used = np.flatnonzero(pages.any(axis=1)).astype("<u4")  # zero pages are left out
        arrays[f"mem{k}.pages"] = used
        arrays[f"mem{k}.data"] = pages[used]
    return layout, arrays


def capture(vm) -> Snapshot:
    """Read the whole state of a stopped VM (pending exits are completed first)."""
    check_stopped(vm)
    for v in vm.vcpus:
        complete_pending(v)
    msr_indices = vm.kvm.msr_index_list()
    devices, arrays = _device_entries(vm)
    layout, mem_arrays = _memory(vm)
    arrays.update(mem_arrays)
    for name, arr in _read_vm(vm).items():
        arrays[f"vm.{name}"] = arr
    for v in vm.vcpus:
        for name, arr in _read_vcpu(v, msr_indices, vm.irqchip).items():
            arrays[f"vcpu{v.index}.{name}"] = arr
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "vm": {"name": vm.name, "vcpus": len(vm.vcpus), "irqchip": bool(vm.irqchip),
               "default_devices": bool(getattr(vm, "default_devices", True)),
               # the reasons a user enabled; an MSR filter's (bit 2) comes back with the filter
               "msr_exits": int(vm._msr_exits) & 3,
               "unassigned_ports": str(getattr(vm, "unassigned_ports", "exit")),
               "syscall_fixup": getattr(vm, "syscall_stats", None) is not None},
        "memory": layout,
        "devices": devices,
    }
    return Snapshot(manifest, arrays)


# ---- writing state ---------------------------------------------------------------------------

def _set(vcpu_or_vm, fn, arr: np.ndarray, op: str) -> None:
    call = vcpu_or_vm._call if hasattr(vcpu_or_vm, "_call") else vcpu_or_vm._kvm_call
    for i in range(len(arr)):
        call(fn(vcpu_or_vm.fd, _t.ptr(np.ascontiguousarray(arr[i:i + 1]))), op)


def _set_msrs(vcpu, snap: "Snapshot") -> None:
    """Every saved MSR. KVM refuses some writes of the very value it reports (an async-PF
    MSR without an in-kernel LAPIC): those are skipped when the vCPU already holds the saved
    value, and left out of later resets to the same snapshot."""
    key = f"vcpu{vcpu.index}.msrs"
    entries = snap._writable.get(key)
    if entries is None:
        entries = snap.arrays[key]
    pos, skipped = 0, []
    while pos < len(entries):
        chunk = np.ascontiguousarray(entries[pos:])
        n = vcpu._call(_t.lib.hvt_vcpu_set_msrs(vcpu.fd, _t.ptr(chunk), len(chunk)), "KVM_SET_MSRS")
        if n < len(chunk):
            index, wanted = int(chunk[n]["index"]), int(chunk[n]["data"])
            if vcpu.get_msrs([index])[index] != wanted:
                raise SnapshotError(f"vcpu {vcpu.index}: KVM refused MSR {index:#x} = {wanted:#x}")
            skipped.append(pos + n)
            n += 1
        pos += n
    if skipped:
        snap._writable[key] = np.delete(entries, skipped)


def clock_to_set(clock: np.ndarray) -> np.ndarray:
    """A saved kvmclock as KVM_SET_CLOCK should take it: without KVM_CLOCK_REALTIME."""
    clock = clock.copy()
    clock["flags"] &= ~np.uint32(KVM_CLOCK_REALTIME)
    return clock


def _set_clock(vm, clock: np.ndarray) -> None:
    _set(vm, _t.lib.hvt_vm_set_clock, clock_to_set(clock), "KVM_SET_CLOCK")


def apply_vm(vm, snap: Snapshot) -> None:
    """The in-kernel PICs, IOAPIC and PIT (kvmclock is set last, by apply_clock)."""
    a = snap.arrays
    if "vm.irqchip" in a:
        _set(vm, _t.lib.hvt_vm_set_irqchip, a["vm.irqchip"], "KVM_SET_IRQCHIP")
    if "vm.pit2" in a:
        _set(vm, _t.lib.hvt_vm_set_pit2, a["vm.pit2"], "KVM_SET_PIT2")


def apply_clock(vm, snap: Snapshot) -> None:
    _set_clock(vm, snap.arrays["vm.clock"])


def apply_vcpu(vcpu, snap: Snapshot, *, cpuid: bool = True, registers: bool = True,
               privileged: bool = True, fpu: bool = True) -> None:
    """One vCPU's state, in the order KVM needs (CPUID before MSRs, SREGS before the LAPIC).

    ``registers``: also REGS, SREGS and events (a reset may pass them through kvm_run).
    ``privileged``: also what only CPL0 code changes (XCRs, MSRs, MP state, LAPIC, DRs).
    ``fpu``: also the XSAVE area (or legacy FPU image).
    """
    lib = _t.lib
    if vcpu._deferred:  # registers a reset left for the next KVM_RUN go first
        vcpu._flush_deferred()

    def get(name):
        return snap.vcpu_array(vcpu.index, name)

    if cpuid:
        vcpu.set_cpuid(get("cpuid"))
    if registers:
        _set(vcpu, lib.hvt_vcpu_set_regs, get("regs"), "KVM_SET_REGS")
    if not fpu:
        pass
    elif get("xsave") is not None:
        vcpu.set_xsave(get("xsave"))
    elif get("fpu") is not None:
        _set(vcpu, lib.hvt_vcpu_set_fpu, get("fpu"), "KVM_SET_FPU")
    if privileged and get("xcrs") is not None:
        _set(vcpu, lib.hvt_vcpu_set_xcrs, get("xcrs"), "KVM_SET_XCRS")
    if registers:
        _set(vcpu, lib.hvt_vcpu_set_sregs, get("sregs"), "KVM_SET_SREGS")
    if privileged:
        _set_msrs(vcpu, snap)
        _set(vcpu, lib.hvt_vcpu_set_mp_state, get("mp_state"), "KVM_SET_MP_STATE")
        if get("lapic") is not None:
            _set(vcpu, lib.hvt_vcpu_set_lapic, get("lapic"), "KVM_SET_LAPIC")
    if registers and get("events") is not None:
        vcpu_events.enable_flags(vcpu, int(get("events")["flags"][0]))  # as the source VM had them
        _set(vcpu, lib.hvt_vcpu_set_events, get("events"), "KVM_SET_VCPU_EVENTS")
    if privileged and get("debugregs") is not None:
        _set(vcpu, lib.hvt_vcpu_set_debugregs, get("debugregs"), "KVM_SET_DEBUGREGS")


def sync_registers(vcpu, snap: Snapshot) -> bool:
    """REGS, SREGS and events through kvm_run (KVM_CAP_SYNC_REGS): one immediate-exit
    KVM_RUN instead of three ioctls. False where the host lacks the capability."""
    if not vcpu.vm.kvm.has(Cap.SYNC_REGS):
        return False
    run = vcpu._run[0]
    run["sync_regs"] = snap.arrays[f"vcpu{vcpu.index}.regs"][0]
    run["sync_sregs"] = snap.arrays[f"vcpu{vcpu.index}.sregs"][0]
    dirty_bits = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS
    events = snap.vcpu_array(vcpu.index, "events")
    if events is not None:
        vcpu_events.enable_flags(vcpu, int(events["flags"][0]))
        run["sync_events"] = events[0]
        dirty_bits |= KVM_SYNC_X86_EVENTS
    run["kvm_dirty_regs"] = dirty_bits
    try:
        _immediate_run(vcpu, "KVM_RUN(sync registers)")
    finally:
        run["kvm_dirty_regs"] = 0
    run["exit_reason"] = KvmExit.INTR
    return True


def apply_devices(vm, snap: Snapshot) -> None:
    """Device rows and Python-side fields, whole."""
    for j, (device, entry) in enumerate(zip(vm.devices, snap.manifest["devices"])):
        if hasattr(device, "restore_state"):
            device.restore_state(entry["state"])
        if entry["native"]:
            vm.bus.dev_state[device.slot] = snap.arrays[f"dev{j}.state"]
            vm.bus.dev_buf[device.slot] = snap.arrays[f"dev{j}.buf"]


def _has_python_state(device) -> bool:
    own = getattr(type(device), "snapshot_state", None)
    return own is not None and own is not PortDevice.snapshot_state


def _buffer_may_change(device: Any) -> bool:
    cls: Any = type(device)
    return handlers_take_buffer(cls) or cls.buffer_changes is not PortDevice.buffer_changes


@dataclass
class DevicePlan:
    """What resets of one VM's devices to one snapshot need, with every pointer made once."""
    dev_buf: np.ndarray  # the bus arrays the pointers point into
    dev_state: np.ndarray
    slots: np.ndarray  # int64, the native devices' slots
    rows: np.ndarray  # their saved state rows, in that order
    buffers: list  # (slot, device, saved state row, live buffer, saved buffer, live row, saved row)
    python: list  # (device, manifest entry, j) of devices with Python-side fields
    record: np.ndarray  # HVT_RESET_ROWS_DTYPE: hvt_mem_reset_rows's (and hvt_vm_reset's) record
    record_ptr: Any
    touched: Any  # uint64_t * to the record's `touched`, `changed`
    changed: Any
    buffer_slots: int  # a bit a slot of `buffers`: the rows the C side leaves to Python
    # Per `python` device, its state_version when its fields last equalled the snapshot's
    # (None: not known).
    seen: list

    def valid(self, bus) -> bool:
        return self.dev_buf is bus.dev_buf and self.dev_state is bus.dev_state


def device_plan(vm, snap: Snapshot) -> DevicePlan:
    bus = vm.bus
    key = tuple(map(id, vm.devices))
    plan = snap._device_plan.get(key)
    if plan is not None and plan.valid(bus):
        return plan
    entries = snap.manifest["devices"]
    native = [(j, d) for j, (d, e) in enumerate(zip(vm.devices, entries)) if e["native"]]
    slots = np.array([d.slot for _, d in native], np.int64)
    rows = np.array([snap.arrays[f"dev{j}.state"] for j, _ in native], np.int64).reshape(len(slots), kinds.STATE_WORDS)
    index = {int(slot): i for i, slot in enumerate(slots)}

    def char_ptr(array):
        return _t.ffi.cast("char *", _t.ffi.from_buffer(array))

    # Bytes are copied with ffi.memmove: a numpy slice copy costs ~1 us each.
    buffers = [(d.slot, d, snap.arrays[f"dev{j}.state"], char_ptr(bus.dev_buf[d.slot]),
                char_ptr(snap.arrays[f"dev{j}.buf"]), char_ptr(bus.dev_state[d.slot]), char_ptr(rows[index[d.slot]]))
               for j, d in native if _buffer_may_change(d)]
    python = [(d, e, j) for j, (d, e) in enumerate(zip(vm.devices, entries)) if _has_python_state(d)]
    buffer_slots = sum(1 << b[0] for b in buffers)
    record = np.zeros(1, HVT_RESET_ROWS_DTYPE)
    record["live"] = int(_t.ffi.cast("uintptr_t", char_ptr(bus.dev_state)))
    record["saved"] = int(_t.ffi.cast("uintptr_t", char_ptr(rows)))
    record["slots"] = int(_t.ffi.cast("uintptr_t", _t.ffi.from_buffer(slots)))
    record["count"], record["row_bytes"], record["python"] = len(slots), kinds.STATE_WORDS * 8, buffer_slots
    base = _t.ffi.cast("char *", _t.ffi.from_buffer(record))
    fields = HVT_RESET_ROWS_DTYPE.fields
    assert fields is not None
    plan = snap._device_plan[key] = DevicePlan(
        bus.dev_buf, bus.dev_state, slots, rows, buffers, python, record,
        _t.ffi.cast("struct hvt_reset_rows *", base), _t.ffi.cast("uint64_t *", base + fields["touched"][1]),
        _t.ffi.cast("uint64_t *", base + fields["changed"][1]), buffer_slots, [None] * len(python))
    return plan


ALL_ROWS = (1 << 64) - 1  # `touched` that puts every row back


def reset_fields(plan: DevicePlan, bus, snap: Snapshot) -> int:
    """Python-side fields where they differ from the snapshot's (then the whole buffer:
    Python may have re-laid it out). Returns the slots whose buffer went back whole. A device
    whose ``state_version`` has not moved since its fields last equalled them is skipped."""
    rewritten = 0
    seen = plan.seen
    for i, (device, entry, j) in enumerate(plan.python):
        version = device.state_version
        if version is not None and version == seen[i]:
            continue
        if device.snapshot_state() != entry["state"]:
            device.restore_state(entry["state"])
            if entry["native"]:
                bus.dev_buf[device.slot] = snap.arrays[f"dev{j}.buf"]
                rewritten |= 1 << device.slot
        seen[i] = device.state_version
    return rewritten


def reset_buffers(plan: DevicePlan, changed: int, rewritten: int) -> None:
    """For the ``changed`` slots the C side left (``buffer_slots``): the buffer bytes each
    device says its handlers can have written, then the state row (``buffer_changes``
    compares with the live row)."""
    memmove, size, row_bytes = _t.ffi.memmove, kinds.BUFFER_BYTES, kinds.STATE_WORDS * 8
    for slot, device, saved_state, live, saved, live_row, saved_row in plan.buffers:
        if not changed >> slot & 1:
            continue
        if not rewritten >> slot & 1:
            for start, end in device.buffer_changes(saved_state):
                start, end = max(0, start), min(end, size)  # the device's word; the row's bounds
                if end > start:
                    memmove(live + start, saved + start, end - start)
        memmove(live_row, saved_row, row_bytes)


def reset_devices(vm, snap: Snapshot, *, since_snapshot: bool = False, plan: Optional[DevicePlan] = None) -> None:
    """What a reset needs of :func:`apply_devices`: :func:`reset_fields`, the state rows
    (``hvt_mem_reset_rows``) and :func:`reset_buffers`.

    ``since_snapshot``: the devices equalled ``snap``'s when it was taken or last reset to;
    then only the devices whose state row differs (every guest access counts in it,
    ``STATE_ACCESSES``) or whose buffer Python was handed since are put back. ``plan``: the
    :func:`device_plan` a caller kept. (``Vm.reset_to`` does the rows inside its C call.)"""
    bus = vm.bus
    if plan is None or not plan.valid(bus):
        plan = device_plan(vm, snap)
    rewritten = reset_fields(plan, bus, snap)
    plan.touched[0] = bus.buffer_touched if since_snapshot else ALL_ROWS
    changed = _t.lib.hvt_mem_reset_rows(plan.record_ptr) & plan.buffer_slots
    if changed:
        reset_buffers(plan, changed, rewritten)


def apply_memory(vm, snap: Snapshot) -> None:
    for k, seg in enumerate(vm.memory.segments):
        pages = seg.array.reshape(-1, PAGE_SIZE)
        pages[:] = 0
        pages[snap.arrays[f"mem{k}.pages"]] = snap.arrays[f"mem{k}.data"]


def check_compatible(vm, snap: Snapshot) -> None:
    """The VM has the snapshot's memory layout, vCPUs, irqchip and devices."""
    key = (vm.fd, tuple(id(s) for s in vm.memory.segments), tuple(id(d) for d in vm.devices), len(vm.vcpus))
    if key in snap._compatible:
        return
    m = snap.manifest
    layout = [(s.gpa, s.size, s.readonly) for s in vm.memory.segments]
    want = [(e["gpa"], e["size"], e["readonly"]) for e in m["memory"]]
    problems = []
    if layout != want:
        problems.append(f"memory {layout} is not the snapshot's {want}")
    if len(vm.vcpus) != m["vm"]["vcpus"]:
        problems.append(f"{len(vm.vcpus)} vCPUs, the snapshot has {m['vm']['vcpus']}")
    if bool(vm.irqchip) != m["vm"]["irqchip"]:
        problems.append("the in-kernel irqchip differs")
    have = [(_class_name(d), getattr(d, "name", "")) for d in vm.devices]
    if have != [(e["class"], e["name"]) for e in m["devices"]]:
        problems.append("the devices differ")
    if problems:
        raise SnapshotError(f"VM {vm.name!r} does not match the snapshot: " + "; ".join(problems))
    snap._compatible.add(key)


# ---- a new VM from a snapshot ----------------------------------------------------------------

def restore(vm_class, session, source, name: Optional[str] = None):
    """A new VM in ``session`` holding ``source``'s state (a Snapshot or a file path).

    Anything wrong (a corrupt file, a state KVM refuses) raises :class:`SnapshotError`, and
    the half-built VM is destroyed first.
    """
    snap = source if isinstance(source, Snapshot) else Snapshot.load(source)
    m = snap.manifest
    name = name or m["vm"]["name"]
    kwargs: dict[str, Any] = dict(memory=[], vcpus=m["vm"]["vcpus"], irqchip=m["vm"]["irqchip"],
                                  devices=m["vm"]["default_devices"])
    if m["vm"].get("syscall_fixup"):
        kwargs["syscall_fixup"] = True
    vm = session.create_vm(name, **kwargs) if session is not None else vm_class(None, name, **kwargs)
    try:
        _build(vm, snap)
        apply_memory(vm, snap)
        apply_vm(vm, snap)
        for v in vm.vcpus:
            apply_vcpu(v, snap)
        apply_devices(vm, snap)
        apply_clock(vm, snap)
        vm._console[:] = snap.console
        vm.unassigned_ports = m["vm"].get("unassigned_ports", "exit")
        if vm.syscall_stats is not None:  # LSTAR came back by KVM_SET_MSRS: no trapped write
            for v in vm.vcpus:
                if v.get_msr(syscall_entry.MSR_LSTAR):
                    syscall_entry.arm(v)
        dirty.tracker(vm).rebase(snap)
    except BaseException as e:
        vm.destroy()
        if isinstance(e, SnapshotError) or not isinstance(e, Exception):
            raise
        raise SnapshotError(f"cannot restore VM {name!r}: {e}") from e
    return vm


def _build(vm, snap: Snapshot) -> None:
    """Memory segments and devices as the snapshot's VM had them."""
    m = snap.manifest
    for entry in m["memory"]:
        vm.add_memory(int(entry["gpa"]), int(entry["size"]), readonly=bool(entry["readonly"]), name=str(entry["name"]))
    specs = [(e["factory"], e["config"]) for e in m["devices"]]
    have = list(getattr(vm, "device_specs", []))
    if have != specs[: len(have)]:
        raise SnapshotError("the snapshot's VM did not start with this VM's default devices")
    for factory, config in specs[len(have):]:
        vm.add_device(factory, **config)
    if m["vm"]["msr_exits"]:
        reasons = int(m["vm"]["msr_exits"])
        vm.enable_msr_exits(unknown=bool(reasons & 2), invalid=bool(reasons & 1))
    check_compatible(vm, snap)
