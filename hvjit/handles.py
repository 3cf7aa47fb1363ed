"""Per-session handle tables, after VirtualBox SUPDrv's ``RTHandleTable``.

A handle is an ``int`` that names one object in one table. It packs three fields::

    bit 62 .. 36   table magic  (27 bits, distinct for every table made in this process)
    bit 35 .. 20   generation   (16 bits, bumped each time the slot is freed)
    bit 19 ..  0   slot         (20 bits, slot 0 is never used, so handle 0 is nil)

The magic refuses handles of another table (another session) even when slot and generation
match; the generation refuses a stale handle whose slot was freed and reused; the kind given to
every lookup refuses a handle to the wrong sort of object. Handles fit a signed 64-bit
integer, so they can be passed to C or Numba unchanged.

Freed slots are reused first-in first-out, so a slot comes back with the same generation only
after it has been freed 65,536 times.
"""

from __future__ import annotations

import collections
import enum
import itertools
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from hvjit.errors import InvalidHandleError, ObjectDestroyedError


class HandleKind(str, enum.Enum):
    """Kinds of handle the library registers; equal to their string values."""

    VM = "vm"
    VCPU = "vcpu"
    MEMORY = "memory"
    DEVICE = "device"
    FACTORY = "factory"
    OBJECT_USAGE = "object-usage"
    GIP = "gip"


NIL_HANDLE = 0
SLOT_BITS = 20
GENERATION_BITS = 16
MAGIC_BITS = 27
MAX_SLOTS = (1 << SLOT_BITS) - 1
DEFAULT_MAX_HANDLES = 65536

_SLOT_MASK = (1 << SLOT_BITS) - 1
_GENERATION_MASK = (1 << GENERATION_BITS) - 1
_MAGIC_MASK = (1 << MAGIC_BITS) - 1
_GENERATION_SHIFT = SLOT_BITS
_MAGIC_SHIFT = SLOT_BITS + GENERATION_BITS

# Magics walk a random permutation of all 2**27 values (an odd step is coprime with 2**27),
# so no two tables of one process share a magic until 2**27 tables have been made, and a
# table's magic still cannot be predicted from outside the process.
_MAGIC_START = secrets.randbits(MAGIC_BITS)
_MAGIC_STEP = secrets.randbits(MAGIC_BITS) | 1
_table_serials = itertools.count()


def _next_magic() -> int:
    return (_MAGIC_START + next(_table_serials) * _MAGIC_STEP) & _MAGIC_MASK


Destructor = Callable[[], Any]


@dataclass
class _Entry:
    obj: Any
    kind: Hashable
    destructor: Destructor | None
    refs: int
    sequence: int  # creation order, for reverse-order teardown


class HandleTable:
    """A thread-safe table of ``handle -> (object, kind)`` with reference counts.

    ``insert`` gives an entry one reference; ``retain``/``release`` add and drop references;
    when the last one goes the slot is freed and the entry's destructor runs (once, outside
    the table's lock, after the handle has become invalid). Every refused call raises
    :class:`InvalidHandleError` and changes nothing.
    """

    def __init__(self, max_handles: int = DEFAULT_MAX_HANDLES):
        if not 1 <= max_handles <= MAX_SLOTS:
            raise ValueError(f"max_handles must be in 1..{MAX_SLOTS}, not {max_handles}")
        self.max_handles = max_handles
        self._magic = _next_magic()
        self._lock = threading.Lock()
        # Index 0 is the nil slot and stays empty.
        self._entries: list[_Entry | None] = [None]
        self._generations: list[int] = [0]
        self._free_slots: collections.deque[int] = collections.deque()
        self._sequence = itertools.count()
        self._count = 0
        self._closed = False

    # -- handle encoding -------------------------------------------------------------------

    def _encode(self, slot: int) -> int:
        generation = self._generations[slot]
        return (self._magic << _MAGIC_SHIFT) | (generation << _GENERATION_SHIFT) | slot

    def _resolve(self, handle: object, kind: Hashable | None) -> tuple[int, _Entry]:
        """The slot and entry ``handle`` names; the caller holds the lock."""
        if type(handle) is not int:  # bool is an int subclass, but never a handle
            raise InvalidHandleError(f"a handle is an int, not {type(handle).__name__}")
        if handle == NIL_HANDLE:
            raise InvalidHandleError("nil handle")
        if handle < 0 or (handle >> _MAGIC_SHIFT) != self._magic:
            raise InvalidHandleError(f"handle {handle:#x} does not belong to this table")
        slot = handle & _SLOT_MASK
        if not 0 < slot < len(self._entries):
            raise InvalidHandleError(f"handle {handle:#x}: no such slot")
        entry = self._entries[slot]
        generation = (handle >> _GENERATION_SHIFT) & _GENERATION_MASK
        if entry is None or generation != self._generations[slot]:
            raise InvalidHandleError(f"handle {handle:#x} is stale (its object was freed)")
        if kind is not None and entry.kind != kind:
            raise InvalidHandleError(
                f"handle {handle:#x} names a {entry.kind!r}, not a {kind!r}"
            )
        return slot, entry

    # -- public API ------------------------------------------------------------------------

    def insert(self, obj: Any, kind: Hashable, destructor: Destructor | None = None) -> int:
        """Add ``obj`` under ``kind`` with one reference and return its new handle.

        ``destructor`` (no arguments) runs when the entry is freed. Raises
        :class:`InvalidHandleError` when the table is full and
        :class:`ObjectDestroyedError` once the table is closed.
        """
        if kind is None:
            raise ValueError("a handle needs a kind")
        if destructor is not None and not callable(destructor):
            raise TypeError("destructor must be callable")
        with self._lock:
            if self._closed:
                raise ObjectDestroyedError("handle table is closed")
            if self._free_slots:
                slot = self._free_slots.popleft()
            elif len(self._entries) <= self.max_handles:
                slot = len(self._entries)
                self._entries.append(None)
                self._generations.append(0)
            else:
                raise InvalidHandleError(f"handle table full ({self.max_handles} handles)")
            self._entries[slot] = _Entry(obj, kind, destructor, 1, next(self._sequence))
            self._count += 1
            return self._encode(slot)

    def lookup(self, handle: int, kind: Hashable) -> Any:
        """The object ``handle`` names, which must be of ``kind``."""
        with self._lock:
            return self._resolve(handle, kind)[1].obj

    def set_object(
        self, handle: int, kind: Hashable, obj: Any, destructor: Destructor | None = None
    ) -> None:
        """Fill a handle reserved by ``insert(None, kind)`` with its object and destructor."""
        if destructor is not None and not callable(destructor):
            raise TypeError("destructor must be callable")
        with self._lock:
            entry = self._resolve(handle, kind)[1]
            entry.obj = obj
            entry.destructor = destructor

    def kind_of(self, handle: int) -> Hashable:
        """The kind ``handle`` was registered under."""
        with self._lock:
            return self._resolve(handle, None)[1].kind

    def retain(self, handle: int, kind: Hashable | None = None) -> int:
        """Add a reference to the entry; returns the new reference count."""
        with self._lock:
            entry = self._resolve(handle, kind)[1]
            entry.refs += 1
            return entry.refs

    def release(self, handle: int, kind: Hashable | None = None) -> int:
        """Drop a reference; at zero free the handle and run its destructor.

        Returns the remaining reference count (0 when the entry was freed).
        """
        with self._lock:
            slot, entry = self._resolve(handle, kind)
            entry.refs -= 1
            if entry.refs:
                return entry.refs
            self._free_slot(slot)
        if entry.destructor is not None:
            entry.destructor()
        return 0

    def free(self, handle: int, kind: Hashable | None = None) -> Any:
        """Free the handle whatever its reference count; runs the destructor, returns the object."""
        with self._lock:
            slot, entry = self._resolve(handle, kind)
            self._free_slot(slot)
        if entry.destructor is not None:
            entry.destructor()
        return entry.obj

    def _free_slot(self, slot: int) -> None:
        self._entries[slot] = None
        self._generations[slot] = (self._generations[slot] + 1) & _GENERATION_MASK
        self._free_slots.append(slot)
        self._count -= 1

    def close(self) -> None:
        """Free every handle, running destructors in reverse creation order. Idempotent.

        Every destructor runs even if an earlier one raises; the first exception is then
        re-raised (with a note counting the others).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            entries = [e for e in self._entries if e is not None]
            self._entries = [None]
            self._generations = [0]
            self._free_slots.clear()
            self._count = 0
        entries.sort(key=lambda e: e.sequence, reverse=True)
        errors = []
        for entry in entries:
            if entry.destructor is None:
                continue
            try:
                entry.destructor()
            except Exception as exc:  # keep tearing down; report afterwards
                errors.append(exc)
        if errors:
            first = errors[0]
            if len(errors) > 1:
                first.add_note(f"{len(errors) - 1} more destructor(s) failed during close")
            raise first

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return self._count

    def items(self, kind: Hashable | None = None) -> list[tuple[int, Any]]:
        """A snapshot of ``(handle, object)`` pairs (of ``kind`` if given), in creation order."""
        with self._lock:
            live = [
                (entry.sequence, self._encode(slot), entry.obj)
                for slot, entry in enumerate(self._entries)
                if entry is not None and (kind is None or entry.kind == kind)
            ]
        live.sort(key=lambda item: item[0])
        return [(handle, obj) for _, handle, obj in live]

    def handles(self, kind: Hashable | None = None) -> list[int]:
        """Live handles (of ``kind`` if given), in creation order."""
        return [handle for handle, _ in self.items(kind)]

    def reference_count(self, handle: int, kind: Hashable | None = None) -> int:
        """The entry's current reference count."""
        with self._lock:
            return self._resolve(handle, kind)[1].refs
