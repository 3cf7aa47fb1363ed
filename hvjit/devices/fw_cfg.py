"""QEMU's fw_cfg, legacy port interface: selector 0x510 (16-bit write), data 0x511 (byte reads).

Items are built in Python at configuration time and laid out in the device's buffer row
(64 KiB); the directory of items sits in the state words, one word an item:
``key | offset << 16 | length << 33``. The Numba handler only looks up the selected item and
hands out its bytes; a read past an item's end (or of an unknown key) returns 0 and never
reads outside the item.

Keys: 0x0000 signature "QEMU", 0x0001 ID (1: traditional interface, no DMA), 0x0002 UUID
(zeros), 0x0003 RAM size (u64 LE), 0x0005 NB_CPUS (u16), 0x000f MAX_CPUS (u16),
0x0014/0x0015 CMDLINE_SIZE/DATA (when a command line is set, NUL-terminated like QEMU's),
0x0019 FILE_DIR (u32 BE count, then {u32 size BE, u16 select BE, u16 reserved, char name[56]})
and the files from 0x0020 up, in the order added. Writes to the data port are ignored.
A wide read of the data port returns consecutive bytes in memory order.
"""

from __future__ import annotations

import struct

import numpy as np

from .._jit import kernel
from ..errors import HvjitError
from . import kinds
from .bus import PortDevice

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
PORT_COUNT = 2

KEY_SIGNATURE = 0x0000
KEY_ID = 0x0001
KEY_UUID = 0x0002
KEY_RAM_SIZE = 0x0003
KEY_NB_CPUS = 0x0005
KEY_MAX_CPUS = 0x000F
KEY_CMDLINE_SIZE = 0x0014
KEY_CMDLINE_DATA = 0x0015
KEY_FILE_DIR = 0x0019
KEY_FILE_FIRST = 0x0020
FILE_NAME_SIZE = 56
FILE_ENTRY_SIZE = 64
CMDLINE_FILE = "opt/org.hvjit/cmdline"

# State words (0 is kinds.STATE_EXIT_CODE).
S_SELECTOR = 1
S_POSITION = 2  # read offset within the selected item
S_ITEM_START = 3  # the selected item's bytes in the buffer (length 0: no such item)
S_ITEM_LENGTH = 4
S_N_ITEMS = 5
S_DIR = 8  # words 8..60: the item directory (the words after it wire IRQs)
MAX_ITEMS = kinds.STATE_IRQ_REPORTED - S_DIR
ENTRY_KEY_MASK = 0xFFFF
ENTRY_OFFSET_SHIFT = 16
ENTRY_LENGTH_SHIFT = 33
ENTRY_FIELD_MASK = (1 << 17) - 1


class FwCfgError(HvjitError, ValueError):
    """fw_cfg content that does not fit the device (too big, too many items, bad name)."""


@kernel
def _select(state, buf, key):
    state[S_SELECTOR] = key
    state[S_POSITION] = 0
    state[S_ITEM_START] = 0
    state[S_ITEM_LENGTH] = 0
    n = state[S_N_ITEMS]
    if n < 0 or n > MAX_ITEMS:
        return
    for i in range(n):
        e = state[S_DIR + i]
        if (e & ENTRY_KEY_MASK) == key:
            start = (e >> ENTRY_OFFSET_SHIFT) & ENTRY_FIELD_MASK
            length = (e >> ENTRY_LENGTH_SHIFT) & ENTRY_FIELD_MASK
            if start + length <= buf.size:  # the directory is ours, but be safe
                state[S_ITEM_START] = start
                state[S_ITEM_LENGTH] = length
            return


@kernel
def _next_byte(state, buf):
    pos = state[S_POSITION]
    length = state[S_ITEM_LENGTH]
    if pos < 0 or pos >= length:
        return np.int64(0)
    at = state[S_ITEM_START] + pos
    if at < 0 or at >= buf.size:
        return np.int64(0)
    state[S_POSITION] = pos + 1
    return np.int64(buf[at])


@kernel
def fw_cfg_io(state, buf, offset, size, is_write, value):
    """An access at ``offset`` from 0x510 (0: selector, 1: data). Returns (value, action)."""
    if offset == 0:
        if is_write:
            _select(state, buf, value & 0xFFFF)
            return np.int64(0), kinds.ACT_CONTINUE
        return np.int64(0), kinds.ACT_CONTINUE
    if offset == 1 and not is_write:
        v = np.int64(0)
        for i in range(size):
            v |= _next_byte(state, buf) << (8 * i)
        return v, kinds.ACT_CONTINUE
    return np.int64(0), kinds.ACT_CONTINUE


class FwCfg(PortDevice):
    """fw_cfg content and device. ``ram_size`` (bytes): by default the size of the memory given
    to :meth:`attach`. ``max_cpus`` defaults to ``cpus``.
    """

    port_io = fw_cfg_io
    port_count = PORT_COUNT

    def __init__(self, cpus: int = 1, ram_size: int | None = None, *, max_cpus: int | None = None,
                 name: str = "fw_cfg"):
        if not 1 <= cpus <= 0xFFFF:
            raise FwCfgError(f"cpus must be 1..65535, got {cpus}")
        if max_cpus is not None and not cpus <= max_cpus <= 0xFFFF:
            raise FwCfgError(f"max_cpus must be {cpus}..65535, got {max_cpus}")
        super().__init__(SELECTOR_PORT, name)
        self.cpus = cpus
        self.max_cpus = max_cpus if max_cpus is not None else cpus
        self.ram_size = ram_size
        self.files: dict[str, bytes] = {}
        self.cmdline: bytes | None = None
        self._memory_size = 0
        self.state_version = 0  # counts changes of snapshot_state() (see PortDevice)

    # ---- content -------------------------------------------------------------------------

    def add_file(self, name: str, data: bytes) -> int:
        """Add (or replace) a named file; returns its selector key."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_SIZE or b"\0" in raw:
            raise FwCfgError(f"fw_cfg file name {name!r} must be 1..{FILE_NAME_SIZE - 1} bytes, no NUL")
        old = self.files.get(name)
        self.files[name] = bytes(data)
        try:
            self._check()
        except FwCfgError:
            if old is None:
                del self.files[name]
            else:
                self.files[name] = old
            raise
        self._sync()
        return self.file_key(name)

    def set_cmdline(self, cmdline: str) -> None:
        """The kernel command line: file ``opt/org.hvjit/cmdline`` and keys 0x14/0x15."""
        old, self.cmdline = self.cmdline, cmdline.encode() + b"\0"
        try:
            self.add_file(CMDLINE_FILE, self.cmdline)
        except FwCfgError:
            self.cmdline = old
            raise

    def file_key(self, name: str) -> int:
        return KEY_FILE_FIRST + list(self.files).index(name)

    def items(self, ram_size: int = 0) -> dict[int, bytes]:
        """Every item by key, as the guest will read them."""
        ram = self.ram_size if self.ram_size is not None else ram_size
        items = {
            KEY_SIGNATURE: b"QEMU",
            KEY_ID: struct.pack("<I", 1),
            KEY_UUID: bytes(16),
            KEY_RAM_SIZE: struct.pack("<Q", ram),
            KEY_NB_CPUS: struct.pack("<H", self.cpus),
            KEY_MAX_CPUS: struct.pack("<H", self.max_cpus),
        }
        if self.cmdline is not None:
            items[KEY_CMDLINE_SIZE] = struct.pack("<I", len(self.cmdline))
            items[KEY_CMDLINE_DATA] = self.cmdline
        directory = bytearray(struct.pack(">I", len(self.files)))
        for i, (name, data) in enumerate(self.files.items()):
            directory += struct.pack(">IHH", len(data), KEY_FILE_FIRST + i, 0)
            directory += name.encode().ljust(FILE_NAME_SIZE, b"\0")
        items[KEY_FILE_DIR] = bytes(directory)
        for i, data in enumerate(self.files.values()):
            items[KEY_FILE_FIRST + i] = data
        return items

    def _check(self) -> None:
        items = self.items()
        total = sum(len(v) for v in items.values())
        if len(items) > MAX_ITEMS:
            raise FwCfgError(f"fw_cfg holds at most {MAX_ITEMS} items ({len(items)} asked)")
        if total > kinds.BUFFER_BYTES:
            raise FwCfgError(f"fw_cfg content is {total} bytes; the device buffer holds "
                             f"{kinds.BUFFER_BYTES}")

    # ---- snapshots -----------------------------------------------------------------------

    def snapshot_state(self) -> dict:
        return {"files": {k: v.decode("latin-1") for k, v in self.files.items()},
                "cmdline": None if self.cmdline is None else self.cmdline.decode("latin-1"),
                "memory_size": self._memory_size}

    def restore_state(self, state: dict) -> None:
        # The buffer and state rows already hold the laid-out items: no _sync here.
        self.files = {str(k): str(v).encode("latin-1") for k, v in state["files"].items()}
        cmdline = state["cmdline"]
        self.cmdline = None if cmdline is None else str(cmdline).encode("latin-1")
        self._memory_size = int(state["memory_size"])
        self.state_version += 1

    def buffer_changes(self, saved: np.ndarray) -> list[tuple[int, int]]:
        return []  # the guest only reads the items; Python rewrites them (see snapshot_state)

    # ---- device --------------------------------------------------------------------------

    def attach(self, bus, memory=None) -> None:
        self._check()
        self._memory_size = 0
        if memory is not None:
            self._memory_size = sum(s.size for s in memory.segments if not s.readonly)
        super().attach(bus, memory)
        self._sync()

    def _sync(self) -> None:
        """Lay the items out in the buffer row and the directory in the state words."""
        self.state_version += 1  # every change of the content comes here
        if self.bus is None:
            return
        state = self.bus.state(self.slot)
        buf = self.bus.buffer(self.slot)
        items = self.items(self._memory_size)
        state[S_N_ITEMS] = 0  # a guest selecting now finds nothing rather than a half-built item
        offset = 0
        for i, (key, data) in enumerate(items.items()):
            buf[offset: offset + len(data)] = np.frombuffer(data, np.uint8)
            state[S_DIR + i] = key | (offset << ENTRY_OFFSET_SHIFT) | (len(data) << ENTRY_LENGTH_SHIFT)
            offset += len(data)
        state[S_N_ITEMS] = len(items)
        _select(state, buf, np.int64(state[S_SELECTOR]))
