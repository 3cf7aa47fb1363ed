"""The VM's IO bus: which device answers each port and MMIO range (kvmtool's one registry).

The tables are numpy arrays the run loop reads directly: a 64 Ki-entry port → slot map, a
short list of MMIO ranges, and per-slot kind, base, state and buffer rows. Native devices are
handled inside the Numba loop; a Python handler occupies a slot of kind PYTHON, and its exits
come back to Python (the slow path).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import HvjitError, MemoryMapError
from . import kinds

MAX_MMIO_RANGES = 64

# A Python port handler: (port, size, is_write, value) -> value read (ignored for writes).
PortHandler = Callable[[int, int, bool, int], Optional[int]]
# A Python MMIO handler: (gpa, size, is_write, value) -> value read (ignored for writes).
MmioHandler = Callable[[int, int, bool, int], Optional[int]]


class BusConflictError(HvjitError, ValueError):
    """A port or MMIO range is already claimed by another device."""


@dataclass
class Slot:
    index: int
    kind: int
    name: str
    owner: object  # the device object (or the Python handler)


class IoBus:
    def __init__(self):
        self.port_map = np.zeros(1 << 16, np.int16)
        self.mmio = np.zeros((MAX_MMIO_RANGES, 3), np.int64)  # start, end (exclusive), slot
        self.n_mmio = 0
        self.dev_kind = np.zeros(kinds.MAX_DEVICES, np.int32)
        self.dev_base = np.zeros(kinds.MAX_DEVICES, np.int64)
        self.dev_state = np.zeros((kinds.MAX_DEVICES, kinds.STATE_WORDS), np.int64)
        self.dev_buf = np.zeros((kinds.MAX_DEVICES, kinds.BUFFER_BYTES), np.uint8)
        # Buffer rows handed to Python since the last snapshot or reset, a bit a slot: Python
        # may have written them (the guest's writes show in the state row's STATE_ACCESSES).
        self.buffer_touched = 0
        # Counts every change of an attached device's state_version: one look tells a reset
        # whether any device's Python-side fields may have moved (hvjit.reset).
        self.state_version = 0
        self.slots: dict[int, Slot] = {}
        self._port_handlers: dict[int, tuple[int, PortHandler]] = {}  # port -> (slot, handler)
        self._mmio_handlers: list[tuple[int, int, int, MmioHandler]] = []  # start, end, slot, h

    # ---- slots ---------------------------------------------------------------------------

    def add_slot(self, kind: int, name: str, owner, base: int = 0) -> int:
        for i in range(1, kinds.MAX_DEVICES):  # slot 0 means "nobody"
            if i not in self.slots:
                self.slots[i] = Slot(i, kind, name, owner)
                self.dev_kind[i] = kind
                self.dev_base[i] = base
                self.dev_state[i] = 0
                self.dev_state[i, kinds.STATE_IRQ_GSI] = -1
                return i
        raise BusConflictError(f"no free device slot for {name!r} (max {kinds.MAX_DEVICES - 1})")

    def remove_slot(self, slot: int) -> None:
        if slot not in self.slots:
            return
        self.release_ports(slot)
        self.release_mmio(slot)
        self.dev_kind[slot] = kinds.NONE
        self.slots.pop(slot, None)
        self._port_handlers = {p: e for p, e in self._port_handlers.items() if e[0] != slot}
        self._mmio_handlers = [e for e in self._mmio_handlers if e[2] != slot]

    def release(self) -> None:
        """Free the tables (the VM is gone); the bus is empty afterwards."""
        self.port_map = np.zeros(0, np.int16)
        self.mmio = np.zeros((0, 3), np.int64)
        self.n_mmio = 0
        self.dev_kind = np.zeros(0, np.int32)
        self.dev_base = np.zeros(0, np.int64)
        self.dev_state = np.zeros((0, kinds.STATE_WORDS), np.int64)
        self.dev_buf = np.zeros((0, kinds.BUFFER_BYTES), np.uint8)
        self.buffer_touched = 0
        self.slots.clear()
        self._port_handlers.clear()
        self._mmio_handlers.clear()

    def state(self, slot: int) -> np.ndarray:
        return self.dev_state[slot]

    def buffer(self, slot: int) -> np.ndarray:
        self.buffer_touched |= 1 << slot
        return self.dev_buf[slot]

    # ---- ports and ranges ----------------------------------------------------------------

    def claim_ports(self, slot: int, first: int, count: int) -> None:
        if not (0 <= first and count > 0 and first + count <= 1 << 16):
            raise BusConflictError(f"ports {first:#x}+{count} are outside 0..0xffff")
        taken = self.port_map[first : first + count]
        if taken.any():
            other = self.slots[int(taken[taken != 0][0])].name
            raise BusConflictError(f"ports {first:#x}-{first + count - 1:#x} overlap device {other!r}")
        taken[:] = slot

    def claim_mmio(self, slot: int, gpa: int, size: int, memory=None) -> None:
        if size <= 0 or gpa < 0:
            raise MemoryMapError(f"invalid MMIO range {gpa:#x}+{size:#x}")
        if memory is not None and any(
            gpa < s.end and s.gpa < gpa + size for s in memory.segments
        ):
            raise MemoryMapError(f"MMIO range {gpa:#x}+{size:#x} overlaps guest RAM")
        for start, end, other in self.mmio[: self.n_mmio]:
            if gpa < end and start < gpa + size:
                raise BusConflictError(
                    f"MMIO range {gpa:#x}+{size:#x} overlaps device {self.slots[int(other)].name!r}"
                )
        if self.n_mmio == MAX_MMIO_RANGES:
            raise BusConflictError(f"too many MMIO ranges (max {MAX_MMIO_RANGES})")
        self.mmio[self.n_mmio] = (gpa, gpa + size, slot)
        self.n_mmio += 1

    def release_ports(self, slot: int) -> None:
        """Give up every port ``slot`` claimed (a PCI I/O BAR moving or turned off)."""
        self.port_map[self.port_map == slot] = 0

    def release_mmio(self, slot: int) -> None:
        """Give up every MMIO range ``slot`` claimed."""
        rows = self.mmio[: self.n_mmio]
        keep = rows[rows[:, 2] != slot].copy()
        if len(keep) == self.n_mmio:
            return
        self.mmio[: len(keep)] = keep
        self.mmio[len(keep):] = 0
        self.n_mmio = len(keep)

    def mmio_table(self) -> np.ndarray:
        return self.mmio[: self.n_mmio]

    # ---- Python handlers (slow path) -----------------------------------------------------

    def add_port_handler(self, first: int, count: int, handler: PortHandler, name: str = "") -> int:
        slot = self.add_slot(kinds.PYTHON, name or getattr(handler, "__name__", "python"), handler)
        try:
            self.claim_ports(slot, first, count)
        except Exception:
            self.remove_slot(slot)
            raise
        for p in range(first, first + count):
            self._port_handlers[p] = (slot, handler)
        return slot

    def add_mmio_handler(self, gpa: int, size: int, handler: MmioHandler, name: str = "",
                         memory=None) -> int:
        slot = self.add_slot(kinds.PYTHON, name or getattr(handler, "__name__", "python"), handler)
        try:
            self.claim_mmio(slot, gpa, size, memory)
        except Exception:
            self.remove_slot(slot)
            raise
        self._mmio_handlers.append((gpa, gpa + size, slot, handler))
        return slot

    def port_handler(self, port: int) -> Optional[PortHandler]:
        entry = self._port_handlers.get(port)
        return entry[1] if entry else None

    def mmio_handler(self, gpa: int, size: int) -> Optional[MmioHandler]:
        for start, end, _, h in self._mmio_handlers:
            if start <= gpa and gpa + size <= end:
                return h
        return None


@functools.cache
def handlers_take_buffer(cls) -> bool:
    """Whether a native class's handlers are given the buffer row (and so may write it)."""
    handlers = [h for h in (cls.port_io, cls.mmio_io) if h is not None]
    return any("buf" in inspect.signature(getattr(h, "py_func", h)).parameters for h in handlers)


class PortDevice:
    """A native device that claims ``port_count`` ports from ``port`` on one bus slot.

    A subclass names its Numba handlers; the run loop calls them with the arguments their
    parameter names ask for:

    - ``port_io``: from ``state, buf, offset, size, is_write, value``, returns
      ``(value read, action)`` (an ``ACT_*`` of :mod:`hvjit.devices.kinds`);
    - ``mmio_io``: from ``state, buf, offset, size, is_write, data`` (``data`` is the 8-byte
      ``kvm_run`` MMIO buffer, filled on reads), returns an action.

    ``offset`` is counted from ``port`` (or from the start of a claimed MMIO range).
    """

    port_io = None
    mmio_io = None
    port_count = 1

    def __init__(self, port: int, name: str):
        self.port = port
        self.name = name
        self.slot = 0
        self.bus: Optional[IoBus] = None

    def attach(self, bus: IoBus, memory=None) -> None:
        self.slot = bus.add_slot(kinds.native_kind(type(self)), self.name, self, base=self.port)
        try:
            self._claim(bus, memory)
        except Exception:
            bus.remove_slot(self.slot)
            raise
        self.bus = bus

    def _claim(self, bus: IoBus, memory) -> None:
        bus.claim_ports(self.slot, self.port, self.port_count)

    # ---- snapshots (hvjit.snapshot) -------------------------------------------------------
    # The state and buffer rows are saved by the bus; a device adds only its Python-side
    # fields, and says which part of its buffer its handler can change while the guest runs.

    # A device with Python-side state may count its changes here (bump it wherever
    # snapshot_state() may change, restore_state included): a reset then compares
    # snapshot_state() only when the count moved. None: compare every time.
    _state_version: Optional[int] = None

    @property
    def state_version(self) -> Optional[int]:
        return self._state_version

    @state_version.setter
    def state_version(self, value: Optional[int]) -> None:
        self._state_version = value
        bus = getattr(self, "bus", None)  # set by attach; a device may count before it
        if bus is not None:
            bus.state_version += 1

    def snapshot_state(self) -> dict:
        """Python-side fields that change after attach, as JSON-able values."""
        return {}

    def restore_state(self, state: dict) -> None:
        """Take back what :meth:`snapshot_state` returned (the rows are restored by the bus)."""

    def buffer_changes(self, saved: np.ndarray) -> list[tuple[int, int]]:
        """Byte ranges of the buffer row the handlers may have written since the state row
        was ``saved``: what a reset must copy back. Every byte unless the device knows better;
        none when no handler takes the buffer."""
        return [(0, kinds.BUFFER_BYTES)] if handlers_take_buffer(type(self)) else []

    def detach(self, bus: IoBus) -> None:
        if self.slot:
            bus.remove_slot(self.slot)
            self.slot = 0
            self.bus = None
