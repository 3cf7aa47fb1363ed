"""Which guest pages changed: KVM's dirty log for the guest's writes, plus hvjit's own.

A :class:`DirtyTracker` turns on ``KVM_MEM_LOG_DIRTY_PAGES`` for every memory slot of a VM
and, on :meth:`~DirtyTracker.collect`, reads (and so clears) KVM's bitmap of each slot with
``KVM_GET_DIRTY_LOG``. KVM logs only writes by the guest: writes through ``vm.memory``
(loaders, emulation, a fuzzer placing its input) are flagged per page by
:class:`~hvjit.memory.GuestMemory` in each segment's ``host_dirty`` and folded in here.

Where the host offers ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` it is enabled: reading the log
then neither clears it nor write-protects the pages again, so a page the guest keeps
writing costs no write fault each run (measured on the PVM host: a 50-page guest run took
~160 us instead of ~320 us) and the log reads as "written since the last clear", a superset
of "since the last read" that every user here accepts. :meth:`DirtyTracker.after_reset`
clears it, right after a reset (when the memory equals the base snapshot), every
``CLEAR_EVERY`` resets or once the pages copied grew well past what one run writes.

Bitmaps are KVM's layout: uint64 words, bit ``i % 64`` of word ``i // 64`` is page ``i`` of
the segment. They are keyed by the segment's position in guest-physical order (not by KVM
slot number), so snapshots of VMs with the same layout can be compared.
"""

from __future__ import annotations

import numpy as np

from . import _trampoline as _t
from .abi import Cap
from .errors import HvjitError
from .memory import PAGE_SIZE, MemorySegment

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1  # not INITIALLY_SET: enabling still protects every page
CLEAR_EVERY = 64  # resets between two clears of a manually protected log
CLEAR_GROWTH = 64  # pages copied beyond the first reset's count that make a clear worth it

Bitmaps = dict[int, np.ndarray]  # segment index (guest-physical order) -> bitmap


def bitmap_words(size: int) -> int:
    return (size // PAGE_SIZE + 63) // 64


def empty_bitmaps(segments) -> Bitmaps:
    return {k: np.zeros(bitmap_words(s.size), np.uint64) for k, s in enumerate(segments)}


def full_bitmaps(segments) -> Bitmaps:
    out = {}
    for k, s in enumerate(segments):
        out[k] = pack(np.ones(s.size // PAGE_SIZE, bool))
    return out


def pack(pages: np.ndarray) -> np.ndarray:
    """A bool per page -> a KVM-layout bitmap."""
    words = (len(pages) + 63) // 64
    padded = np.zeros(words * 64, bool)
    padded[: len(pages)] = pages
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


def unpack(bitmap: np.ndarray, npages: int) -> np.ndarray:
    return np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages].astype(bool)


def union(a: Bitmaps, b: Bitmaps) -> Bitmaps:
    return {k: a[k] | b[k] for k in a}


def count(bitmaps: Bitmaps) -> int:
    return sum(int(np.unpackbits(b.view(np.uint8)).sum()) for b in bitmaps.values())


class DirtyTracker:
    """Dirty-page tracking of one VM's memory slots, as laid out when it was enabled."""

    def __init__(self, vm):
        self.vm = vm
        self.vm_fd = -1
        self.layout = -1  # vm.memory.version when tracking began
        # The snapshot whose memory the VM's memory equalled when `since` was last cleared.
        self.base = None
        self.since: Bitmaps = {}
        self.since_empty = True  # nothing folded into `since` since the last rebase
        self.manual = False  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled: the log reads cumulative
        self._resets = 0  # resets since the last clear
        self._baseline = -1  # pages the first reset after the last clear copied

    @property
    def valid(self) -> bool:
        """Still tracking the VM's memory as it is (a reinit or a new segment ends that)."""
        return self.vm_fd == self.vm.fd >= 0 and self.layout == self.vm.memory.version

    def enable(self) -> None:
        """Log the guest's writes to every slot from now on (and forget any base)."""
        vm = self.vm
        if vm.kvm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            # Before the slots log: enabling the log then write-protects every page once.
            self.manual = _t.lib.hvt_vm_enable_cap(vm.fd, Cap.MANUAL_DIRTY_LOG_PROTECT2,
                                                   KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, 0) == 0
        for seg in vm.memory.segments:
            flags = KVM_MEM_READONLY if seg.readonly else KVM_MEM_LOG_DIRTY_PAGES
            vm._kvm_call(_t.lib.hvt_vm_set_user_memory(vm.fd, seg.slot, flags, seg.gpa, seg.size,
                                                       _t.ffi.cast("void *", seg.host_address)),
                         "KVM_SET_USER_MEMORY_REGION(log dirty pages)", seg.name)
            seg.host_dirty = np.zeros(seg.size // PAGE_SIZE, bool)
        self.vm_fd = vm.fd
        self.layout = vm.memory.version
        self.base = None
        self.since = empty_bitmaps(vm.memory.segments)
        self.since_empty = True

    def collect(self) -> Bitmaps:
        """Pages written since the last collect (KVM's log is cleared by reading it), or, with
        manual protection, since the last clear."""
        if not self.valid:
            raise HvjitError(f"dirty tracking of VM {self.vm.name!r} is stale (memory was remapped)")
        out = {}
        for k, seg in enumerate(self.vm.memory.segments):
            bitmap = np.zeros(bitmap_words(seg.size), np.uint64)
            if not seg.readonly:
                self.vm._kvm_call(_t.lib.hvt_vm_get_dirty_log(self.vm.fd, seg.slot, _t.ptr(bitmap)),
                                  "KVM_GET_DIRTY_LOG", seg.name)
            out[k] = bitmap | self._host_written(seg)
        return out

    @staticmethod
    def _host_written(seg: MemorySegment) -> np.ndarray:
        written = DirtyTracker.host_written(seg)
        return np.zeros(bitmap_words(seg.size), np.uint64) if written is None else written

    @staticmethod
    def host_written(seg: MemorySegment):
        """The pages hvjit wrote into ``seg`` since the last look (a bitmap), or None."""
        flags = seg.host_dirty
        if flags is None or not flags.any():
            return None
        bitmap = pack(flags)
        flags[:] = False
        return bitmap

    def accumulate(self) -> Bitmaps:
        """Fold what changed since the last look into ``since``; returns ``since``."""
        fresh = self.collect()
        self.since = union(self.since, fresh) if self.since else fresh
        self.since_empty = False
        return self.since

    def after_reset(self, copied: int, bitmaps) -> None:
        """A reset just made the memory equal the base snapshot, copying ``copied`` pages;
        ``bitmaps`` (per segment, a pointer) hold at least the pages KVM logged. With manual
        protection, clear the log when that is due (see the module docstring)."""
        if not self.manual:
            return
        self._resets += 1
        if self._baseline < 0:
            self._baseline = copied
        if self._resets < CLEAR_EVERY and copied <= self._baseline + CLEAR_GROWTH:
            return
        for seg, bitmap in zip(self.vm.memory.segments, bitmaps):
            if not seg.readonly:
                self.vm._kvm_call(_t.lib.hvt_vm_clear_dirty_log(self.vm.fd, seg.slot, 0, seg.size // PAGE_SIZE, bitmap),
                                  "KVM_CLEAR_DIRTY_LOG", seg.name)
        self._resets, self._baseline = 0, -1

    def rebase(self, snapshot) -> None:
        """The VM's memory (and its device rows) now equal ``snapshot``'s."""
        self.base = snapshot
        self.vm.bus.buffer_touched = 0
        if not self.since_empty:
            self.since = empty_bitmaps(self.vm.memory.segments)
            self.since_empty = True


def tracker(vm) -> DirtyTracker:
    """The VM's tracker; a new one (tracking from now on) if there was none or its VM's
    memory was remapped since."""
    t = getattr(vm, "_dirty", None)
    if t is not None and t.valid:
        return t
    t = DirtyTracker(vm)
    t.enable()
    vm._dirty = t
    return t
