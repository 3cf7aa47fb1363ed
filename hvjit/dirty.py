"""Which guest pages changed: KVM's dirty ring or dirty log for the guest's writes, plus hvjit's own.

A :class:`DirtyTracker` turns on ``KVM_MEM_LOG_DIRTY_PAGES`` for every memory slot of a VM.
KVM then reports the guest's writes one of two ways:

- **The dirty ring** (``KVM_CAP_DIRTY_LOG_RING``, used where the host offers it unless the
  VM was made with ``dirty_ring=0``): each vCPU has a ring of written frames, mapped into
  this process, which :class:`DirtyRings` reads without a system call. A frame enters the
  ring on the first write after its page was write-protected and the page then stays
  writable, so a page the guest keeps writing costs one fault, not one a run. The harvest
  goes into ``logged``, a bitmap per segment of the pages written since the last clear;
  ``KVM_RESET_DIRTY_RINGS`` protects them again at the clear. A full ring stops the vCPU
  (``KVM_EXIT_DIRTY_RING_FULL``): :meth:`DirtyRings.drain` harvests and resets, and the run
  goes on. The ring has to be enabled before the VM's first vCPU (:func:`enable_ring`).
- **The dirty bitmap**, read with ``KVM_GET_DIRTY_LOG``. Where the host offers
  ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` it is enabled: reading the log then neither clears
  it nor write-protects the pages again (measured on the PVM host: a 50-page guest run took
  ~160 us instead of ~320 us), and the log reads as "written since the last clear".

Both read as "written since the last clear", a superset of "since the last read" that every
user here accepts (``cumulative``). :meth:`DirtyTracker.after_reset` clears, right after a
reset (when the memory equals the base snapshot), every ``CLEAR_EVERY`` resets or once the
pages copied grew well past what one run writes.

KVM logs only writes by the guest: writes through ``vm.memory`` (loaders, emulation, a
fuzzer placing its input) are flagged per page by :class:`~hvjit.memory.GuestMemory` in
each segment's ``host_dirty`` and folded in here.

Bitmaps are KVM's layout: uint64 words, bit ``i % 64`` of word ``i // 64`` is page ``i`` of
the segment. They are keyed by the segment's position in guest-physical order (not by KVM
slot number), so snapshots of VMs with the same layout can be compared.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Optional

import numpy as np

from . import _trampoline as _t
from .abi import HVT_DIRTY_RINGS_DTYPE, KVM_DIRTY_GFN_DTYPE, Cap
from .errors import HvjitError, UnsupportedError
from .memory import PAGE_SIZE, MemorySegment

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_MEM_READONLY = 2
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1  # not INITIALLY_SET: enabling still protects every page
CLEAR_EVERY = 64  # resets between two clears of a manually protected log
CLEAR_GROWTH = 64  # pages copied beyond the first reset's count that make a clear worth it
NEVER = sys.maxsize

Bitmaps = dict[int, np.ndarray]  # segment index (guest-physical order) -> bitmap

# Entries of each vCPU's dirty ring unless the VM asks otherwise: 64 KiB a vCPU, 16 MiB of
# distinct pages between two resets of the rings (a full ring costs one exit to Python).
DEFAULT_RING_ENTRIES = 4096


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


def ring_capability(kvm) -> tuple[int, int]:
    """(the capability to enable, its largest ring in bytes) of this host's dirty ring;
    (0, 0) without one. ``DIRTY_LOG_RING`` first: x86's memory order is what the acquire and
    release of ``..._ACQ_REL`` ask for anyway."""
    for cap in (Cap.DIRTY_LOG_RING, Cap.DIRTY_LOG_RING_ACQ_REL):
        largest = kvm.check_extension(cap)
        if largest > 0:
            return int(cap), largest
    return 0, 0


def host_tracking(kvm) -> dict:
    """What ``hvjit info`` says of this host's ways to track the guest's writes."""
    return {"ring_entries": ring_entries(kvm, None), "ring_max_entries": ring_capability(kvm)[1] // KVM_DIRTY_GFN_DTYPE.itemsize,
            "manual_protect": bool(kvm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)}


def ring_entries(kvm, asked: Optional[int]) -> int:
    """The entries of each vCPU's dirty ring for a VM that asked ``asked`` (``Vm(dirty_ring=)``):
    None picks ``DEFAULT_RING_ENTRIES`` where the host offers rings (else 0), 0 means none.
    Checked before anything of the VM is made."""
    if asked == 0:
        return 0
    cap, largest = ring_capability(kvm)
    if not cap:
        if asked is None:
            return 0
        raise UnsupportedError("a dirty ring (this host's KVM lacks KVM_CAP_DIRTY_LOG_RING)", kvm.flavour)
    item = KVM_DIRTY_GFN_DTYPE.itemsize
    entries = min(DEFAULT_RING_ENTRIES, largest // item) if asked is None else asked
    if not isinstance(entries, int) or entries < 1 or entries & (entries - 1) or not PAGE_SIZE <= entries * item <= largest:
        raise ValueError(f"dirty_ring={entries!r}: a power of two from {PAGE_SIZE // item} "
                         f"to {largest // item} entries on this host")
    return entries


def enable_ring(vm, entries: int, asked: bool) -> int:
    """Give a new VM (no vCPU yet, as KVM asks) dirty rings of ``entries`` each (from
    :func:`ring_entries`). Returns the entries, or 0 when KVM refused a ring the VM did not
    ask for (it keeps the bitmap then); a refused ring it asked for is a KvmError."""
    if not entries:
        return 0
    cap, _ = ring_capability(vm.kvm)
    rc = _t.lib.hvt_vm_enable_cap(vm.fd, cap, entries * KVM_DIRTY_GFN_DTYPE.itemsize, 0)
    if rc < 0:
        if asked:
            vm._kvm_call(rc, "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)", f"{entries} entries")
        return 0
    return entries


def _address(array: np.ndarray) -> int:
    return int(_t.ffi.cast("uintptr_t", _t.ptr(array)))


class DirtyRings:
    """A VM's dirty rings, one per vCPU, and where their harvest goes (``hvt_dirty_rings``).

    The fetch index of each ring lives here, for the KVM VM's life: a ring is read on from
    where the last harvest stopped, whichever tracker asked. A vCPU's ring leaves the record
    (under the lock a harvest holds) before it is unmapped."""

    def __init__(self, entries: int, nvcpus: int):
        self.entries = entries
        self.bytes = entries * KVM_DIRTY_GFN_DTYPE.itemsize
        self.lock = threading.Lock()  # a full ring is harvested on its vCPU's thread
        self.full_exits = 0  # KVM_EXIT_DIRTY_RING_FULL exits drained
        self._rings = np.zeros(nvcpus, np.uint64)  # addresses (0: none)
        self._fetch = np.zeros(nvcpus, np.uint32)
        self._bitmaps = np.zeros(0, np.uint64)
        self._npages = np.zeros(0, np.uint64)
        self._targets: list = []  # the bitmaps _bitmaps points into
        self.record = np.zeros(1, HVT_DIRTY_RINGS_DTYPE)
        self.record["rings"], self.record["fetch"] = _address(self._rings), _address(self._fetch)
        self.record["count"], self.record["entries"] = nvcpus, entries
        self.ptr = _t.ptr(self.record, "struct hvt_dirty_rings *")

    def map(self, vcpu) -> Any:
        """Map ``vcpu``'s ring; returns its pointer (for :meth:`unmap`)."""
        out = _t.ffi.new("struct kvm_dirty_gfn **")
        vcpu._call(_t.lib.hvt_dirty_ring_map(vcpu.fd, self.bytes, out), "mmap(dirty ring)")
        with self.lock:
            self._rings[vcpu.index] = int(_t.ffi.cast("uintptr_t", out[0]))
        return out[0]

    def unmap(self, vcpu, ring) -> None:
        with self.lock:
            self._rings[vcpu.index] = 0
        _t.lib.hvt_dirty_ring_unmap(ring, self.bytes)

    def attach(self, segments, bitmaps: Bitmaps) -> None:
        """Harvest into ``bitmaps`` (per segment) from now on; other slots' pages are dropped."""
        with self.lock:
            top = max((seg.slot for seg in segments), default=-1) + 1
            self._bitmaps = np.zeros(top, np.uint64)
            self._npages = np.zeros(top, np.uint64)
            for k, seg in enumerate(segments):
                if not seg.readonly:
                    self._bitmaps[seg.slot] = _address(bitmaps[k])
                    self._npages[seg.slot] = seg.size // PAGE_SIZE
            self._targets = list(bitmaps.values())
            self.record["bitmaps"], self.record["npages"] = _address(self._bitmaps), _address(self._npages)
            self.record["nslots"] = top

    def drain(self, vm) -> None:
        """A vCPU stopped with its ring full (KVM_EXIT_DIRTY_RING_FULL): read every ring and
        let KVM reuse the entries. The pages stay in the attached bitmaps; those the guest
        writes again go into the rings again."""
        self.harvest()
        vm._kvm_call(_t.lib.hvt_vm_reset_dirty_rings(vm.fd), "KVM_RESET_DIRTY_RINGS")
        self.full_exits += 1

    @property
    def stray_entries(self) -> int:
        """Entries read for no tracked page (a slot deleted or not tracked since)."""
        return int(self.record["stray"][0])

    def harvest(self) -> int:
        """Read every ring into the attached bitmaps; returns the entries read."""
        with self.lock:
            n = _t.lib.hvt_dirty_rings_harvest(self.ptr)
        if n < 0:  # only a malformed record gets here
            raise HvjitError(f"dirty ring harvest: {os.strerror(-n)}")
        return int(n)


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
        # What collect shows runs from the last clear, not from the last collect (manual
        # protection or rings): after_reset clears now and then.
        self.cumulative = False
        # The VM's dirty rings (None: KVM's bitmap is read) and, per segment, the pages they
        # showed written since the last clear.
        self.rings: Optional[DirtyRings] = vm._rings
        self.logged: Bitmaps = {}
        # When after_reset clears a cumulative log: in this many resets, or after a reset
        # that copied more pages than this (-1: the next reset sets it). Never otherwise.
        self.resets_left = self.clear_above = NEVER

    @property
    def valid(self) -> bool:
        """Still tracking the VM's memory as it is (a reinit or a new segment ends that)."""
        return self.vm_fd == self.vm.fd >= 0 and self.layout == self.vm.memory.version

    def enable(self) -> None:
        """Log the guest's writes to every slot from now on (and forget any base)."""
        vm = self.vm
        if self.rings is None and vm.kvm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            # Before the slots log: enabling the log then write-protects every page once.
            self.manual = _t.lib.hvt_vm_enable_cap(vm.fd, Cap.MANUAL_DIRTY_LOG_PROTECT2,
                                                   KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, 0) == 0
        for seg in vm.memory.segments:
            flags = KVM_MEM_READONLY if seg.readonly else KVM_MEM_LOG_DIRTY_PAGES
            vm._kvm_call(_t.lib.hvt_vm_set_user_memory(vm.fd, seg.slot, flags, seg.gpa, seg.size,
                                                       _t.ffi.cast("void *", seg.host_address)),
                         "KVM_SET_USER_MEMORY_REGION(log dirty pages)", seg.name)
            seg.host_dirty = np.zeros(seg.size // PAGE_SIZE, bool)
        self.cumulative = self.manual or self.rings is not None
        if self.cumulative:
            self.resets_left, self.clear_above = CLEAR_EVERY, -1
        if self.rings is not None:
            self.logged = empty_bitmaps(vm.memory.segments)
            self.rings.attach(vm.memory.segments, self.logged)
            # What an earlier tracker left (a superset does no harm), and its pages protected
            # again: one it had read stays writable, and a write to it would not show.
            self.rings.harvest()
            vm._kvm_call(_t.lib.hvt_vm_reset_dirty_rings(vm.fd), "KVM_RESET_DIRTY_RINGS")
        self.vm_fd = vm.fd
        self.layout = vm.memory.version
        self.base = None
        self.since = empty_bitmaps(vm.memory.segments)
        self.since_empty = True

    def collect(self) -> Bitmaps:
        """Pages written since the last collect (KVM's log is cleared by reading it), or, with
        dirty rings or manual protection, since the last clear."""
        if not self.valid:
            raise HvjitError(f"dirty tracking of VM {self.vm.name!r} is stale (memory was remapped)")
        if self.rings is not None:
            self.rings.harvest()
            return {k: self.logged[k] | self._host_written(seg) for k, seg in enumerate(self.vm.memory.segments)}
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
        protection or dirty rings, clear the log when that is due (see the module docstring).
        hvjit.reset's short way makes this same test inline."""
        self.resets_left -= 1
        if self.resets_left <= 0 or copied > self.clear_above:
            self.clear_due(copied, bitmaps)

    def clear_due(self, copied: int, bitmaps) -> None:
        """:meth:`after_reset`'s test passed: the first reset since the last clear sets the
        growth bound (what one run writes); else clear the log now."""
        if self.clear_above < 0 and self.resets_left > 0:
            self.clear_above = copied + CLEAR_GROWTH
            return
        self.resets_left, self.clear_above = CLEAR_EVERY, -1
        if self.rings is not None:
            self.clear_rings()
            return
        for seg, bitmap in zip(self.vm.memory.segments, bitmaps):
            if not seg.readonly:
                self.vm._kvm_call(_t.lib.hvt_vm_clear_dirty_log(self.vm.fd, seg.slot, 0, seg.size // PAGE_SIZE, bitmap),
                                  "KVM_CLEAR_DIRTY_LOG", seg.name)

    def clear_rings(self) -> None:
        """Forget the pages the rings showed (the memory equals the base now) and protect
        them again, so that the next write to each shows."""
        assert self.rings is not None
        # The bitmaps first: a page harvested after KVM protected it again but before they
        # were cleared would be forgotten while it stays writable.
        with self.rings.lock:
            for bitmap in self.logged.values():
                bitmap[:] = 0
            self.vm._kvm_call(_t.lib.hvt_vm_reset_dirty_rings(self.vm.fd), "KVM_RESET_DIRTY_RINGS")

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
