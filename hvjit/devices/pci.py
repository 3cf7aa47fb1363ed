"""PCI configuration mechanism #1 (ports 0xcf8-0xcff): an i440FX host bridge at 00:00.0 and
the configuration spaces of the PCI devices on bus 0.

- 0xcf8 (dword): CONFIG_ADDRESS: enable (bit 31), bus (23:16), device (15:11), function
  (10:8), register (7:2); reads back what was written (reserved bits 30:24 and 1:0 as 0);
- 0xcfc-0xcff: CONFIG_DATA, byte/word/dword at the offset: register ``(addr & 0xfc) + (port -
  0xcfc)``; an access that would cross the dword reads all ones and writes nothing;
- 0xcf9 (byte): PIIX's reset control register: a write with bit 2 (RST_CPU) set resets the
  machine (``ACT_RESET``: Linux's ``reboot=pci`` and the FADT's RESET_REG use it);
- other byte/word accesses to 0xcf8-0xcfb read all ones and are dropped.

Bus 0 has 32 device numbers, function 0 each. Device ``d``'s 256-byte configuration space
lives in the buffer row at ``d * FUNCTION_STRIDE`` with its write mask right after it; a
write changes only the bits its mask allows, which is also what gives a BAR its sizing
behaviour (all ones written, the size mask read back). A device number nobody uses is all
ones with an empty mask, so it reads 0xffffffff ("no device"), as does every other bus and
function, and CONFIG_DATA while the enable bit is clear.

The host bridge (00:00.0): vendor 8086 device 1237, class 060000, header type 0, no BARs;
command, cache line, latency timer and the chipset registers 0x40-0xff are writable (stored,
not acted upon). Other devices are :class:`PciDevice` subclasses (``pci_testdev.py``).

A guest write to another device's command register or BARs is stored natively and then
handed to Python (``ACT_DRAIN``): :meth:`PciHost.sync` moves the device's port and MMIO
claims on the bus to where its BARs now point (or drops them where decoding is off).
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from .._jit import kernel
from ..errors import HvjitError
from . import kinds
from .bus import PortDevice

ADDRESS_PORT = 0xCF8
RESET_CONTROL_PORT = 0xCF9
DATA_PORT = 0xCFC
PORT_COUNT = 8
CONFIG_SIZE = 256
WMASK_AT = CONFIG_SIZE  # a function's write mask follows its configuration space
FUNCTION_STRIDE = 2 * CONFIG_SIZE
DEVICES = 32  # device numbers on bus 0 (function 0 of each)
FIRST_FREE_DEVICE = 2  # 00:01.0 is the PIIX's place on QEMU's i440FX: devices go from 00:02.0

ADDRESS_ENABLE = 0x80000000
ADDRESS_MASK = 0x80FFFFFC
ADDRESS_BUS_FUNCTION = 0x00FF0700
RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04

HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x1237  # 82441FX PMC (i440FX)
HOST_BRIDGE_CLASS = 0x060000

# Configuration-space registers.
REG_COMMAND = 0x04
REG_BAR0 = 0x10
BAR_COUNT = 6
REG_ROM = 0x30
COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
BAR_IO = 0x1  # bit 0 of an I/O BAR
IO_LIMIT = 0x10000

# Where firmware would put BARs: the PCI hole below 4 GiB and I/O from 0xc000 (SeaBIOS's
# choices); the guest may move them.
MEM_WINDOW = (0xC0000000, 0xFEC00000)
IO_WINDOW = (0xC000, 0x10000)

# State words (0 is kinds.STATE_EXIT_CODE).
S_ADDRESS = 1
S_RCR = 2
S_RESETS = 3
S_REMAP = 4  # bit d: device d's command register or BARs were written since the last sync


class PciError(HvjitError):
    """A PCI device cannot be placed (no host bridge, device number taken or invalid)."""


@kernel
def _function_base(addr):
    """Buffer offset of the addressed function's configuration space, -1 for nobody."""
    if not (addr & ADDRESS_ENABLE) or (addr & ADDRESS_BUS_FUNCTION) != 0:
        return np.int64(-1)
    return ((addr >> 11) & (DEVICES - 1)) * FUNCTION_STRIDE


@kernel
def _config_read(state, buf, reg, size):
    ones = (np.int64(1) << (8 * size)) - 1
    base = _function_base(state[S_ADDRESS])
    if base < 0 or reg < 0 or reg + size > CONFIG_SIZE or base + FUNCTION_STRIDE > buf.size:
        return ones
    v = np.int64(0)
    for i in range(size):
        v |= np.int64(buf[base + reg + i]) << (8 * i)
    return v


@kernel
def _touches_mapping(reg, size):
    """Whether registers [reg, reg + size) include the command register, a BAR or the ROM BAR."""
    end = reg + size
    return ((reg < REG_COMMAND + 2 and end > REG_COMMAND)
            or (reg < REG_BAR0 + 4 * BAR_COUNT and end > REG_BAR0)
            or (reg < REG_ROM + 4 and end > REG_ROM))


@kernel
def _config_write(state, buf, reg, size, value):
    """Store a write through the write mask; True when Python must remap the device's BARs."""
    addr = state[S_ADDRESS]
    base = _function_base(addr)
    if base < 0 or reg < 0 or reg + size > CONFIG_SIZE or base + FUNCTION_STRIDE > buf.size:
        return False
    for i in range(size):
        mask = np.int64(buf[base + WMASK_AT + reg + i])
        byte = (value >> (8 * i)) & 0xFF
        buf[base + reg + i] = (np.int64(buf[base + reg + i]) & ~mask) | (byte & mask)
    device = (addr >> 11) & (DEVICES - 1)
    present = buf[base] != 0xFF or buf[base + 1] != 0xFF  # vendor 0xffff: nobody
    if device != 0 and present and _touches_mapping(reg, size):
        state[S_REMAP] |= np.int64(1) << device
        return True
    return False


@kernel
def pci_io(state, buf, offset, size, is_write, value):
    """An access at ``offset`` from 0xcf8. Returns (value read, action)."""
    ones = (np.int64(1) << (8 * size)) - 1
    if 4 <= offset < 8:
        lane = offset - 4
        if lane + size > 4:
            return (np.int64(0) if is_write else ones), kinds.ACT_CONTINUE
        reg = (state[S_ADDRESS] & 0xFC) + lane
        if is_write:
            if _config_write(state, buf, reg, size, value):
                return np.int64(0), kinds.ACT_DRAIN  # Python moves the BARs (PciHost.sync)
            return np.int64(0), kinds.ACT_CONTINUE
        return _config_read(state, buf, reg, size), kinds.ACT_CONTINUE
    if offset == 0 and size == 4:
        if is_write:
            state[S_ADDRESS] = value & ADDRESS_MASK
            return np.int64(0), kinds.ACT_CONTINUE
        return state[S_ADDRESS], kinds.ACT_CONTINUE
    if offset == 1 and size == 1:
        if is_write:
            state[S_RCR] = value & RCR_SYS_RST
            if value & RCR_RST_CPU:
                state[S_RESETS] += 1
                return np.int64(0), kinds.ACT_RESET
            return np.int64(0), kinds.ACT_CONTINUE
        return state[S_RCR], kinds.ACT_CONTINUE
    return (np.int64(0) if is_write else ones), kinds.ACT_CONTINUE


def host_bridge_config() -> tuple[bytes, bytes]:
    """(configuration space, write mask) of the i440FX host bridge, 256 bytes each."""
    cfg = bytearray(CONFIG_SIZE)
    wmask = bytearray(CONFIG_SIZE)
    cfg[0x00:0x02] = HOST_BRIDGE_VENDOR.to_bytes(2, "little")
    cfg[0x02:0x04] = HOST_BRIDGE_DEVICE.to_bytes(2, "little")
    cfg[0x04:0x06] = (0x0006).to_bytes(2, "little")  # PCICMD reset value: memory, master
    cfg[0x06:0x08] = (0x0280).to_bytes(2, "little")  # PCISTS: fast back-to-back, DEVSEL medium
    cfg[0x08] = 0x02  # revision
    cfg[0x09:0x0C] = HOST_BRIDGE_CLASS.to_bytes(3, "little")  # prog-if, subclass, class
    cfg[0x0E] = 0x00  # header type 0, single function
    cfg[0x2C:0x2E] = (0x1AF4).to_bytes(2, "little")  # subsystem vendor (as QEMU)
    cfg[0x2E:0x30] = (0x1100).to_bytes(2, "little")
    wmask[0x04:0x06] = (0x0547).to_bytes(2, "little")  # IO, memory, master, PERR, SERR, INTx
    wmask[0x0C] = 0xFF  # cache line size
    wmask[0x0D] = 0xFF  # latency timer
    wmask[0x40:CONFIG_SIZE] = b"\xff" * (CONFIG_SIZE - 0x40)  # chipset registers (PAM, SMRAM...)
    return bytes(cfg), bytes(wmask)


def bar_address(raw: int, is_io: bool, size: int) -> Optional[int]:
    """Where a BAR register value places a BAR of ``size`` bytes, None where it decodes
    nothing (as QEMU judges it: zero, or not fitting below 4 GiB / 64 KiB, e.g. mid-sizing)."""
    address = raw & ~(size - 1) & (0xFFFFFFFC if is_io else 0xFFFFFFF0)
    limit = IO_LIMIT if is_io else 1 << 32
    if address == 0 or address + size >= limit:
        return None
    return address


class PciHost(PortDevice):
    """CONFIG_ADDRESS/CONFIG_DATA at 0xcf8/0xcfc (+ reset control 0xcf9): the host bridge and
    the configuration spaces of the :class:`PciDevice` s attached after it."""

    port_io = pci_io
    port_count = PORT_COUNT

    def __init__(self, name: str = "pci-host"):
        super().__init__(ADDRESS_PORT, name)
        self.functions: dict[int, "PciDevice"] = {}
        self._mapped: dict[tuple[int, int], Optional[int]] = {}  # (device, bar) -> address
        self.state_version = 0  # counts changes of _mapped and functions (see PortDevice)
        self._lock = threading.Lock()
        self.memory = None

    def attach(self, bus, memory=None) -> None:
        super().attach(bus, memory)
        buf = bus.buffer(self.slot)
        for device in range(DEVICES):  # nobody: all ones, nothing writable
            base = device * FUNCTION_STRIDE
            buf[base:base + CONFIG_SIZE] = 0xFF
            buf[base + WMASK_AT:base + FUNCTION_STRIDE] = 0
        self._store(0, *host_bridge_config())
        self.memory = memory

    def _store(self, device: int, cfg: bytes, wmask: bytes) -> None:
        base = device * FUNCTION_STRIDE
        buf = self.bus.buffer(self.slot)
        buf[base:base + CONFIG_SIZE] = np.frombuffer(cfg, np.uint8)
        buf[base + WMASK_AT:base + FUNCTION_STRIDE] = np.frombuffer(wmask, np.uint8)

    def config_space(self, device: int = 0) -> bytes:
        """Device ``device``'s configuration space as it is now."""
        base = device * FUNCTION_STRIDE
        return self.bus.buffer(self.slot)[base:base + CONFIG_SIZE].tobytes()

    def buffer_changes(self, saved: np.ndarray) -> list[tuple[int, int]]:
        # The configuration spaces in use; the write masks after them never change.
        return [(d * FUNCTION_STRIDE, d * FUNCTION_STRIDE + CONFIG_SIZE) for d in (0, *sorted(self.functions))]

    def snapshot_state(self) -> dict:
        """Where each device's BARs are mapped (the bus claims live outside the rows)."""
        return {"mapped": sorted([d, i, a] for (d, i), a in self._mapped.items() if d in self.functions)}

    def restore_state(self, state: dict) -> None:
        with self._lock:
            for device, index, address in state.get("mapped", []):
                function = self.functions.get(device)
                if function is not None and index < len(function.bars):
                    self._mapped[(device, index)] = function.map_bar(index, address)
            self.state_version += 1

    @property
    def config(self) -> bytes:
        """The host bridge's configuration space as it is now."""
        return self.config_space(0)

    def _read32(self, device: int, reg: int) -> int:
        return int.from_bytes(self.config_space(device)[reg:reg + 4], "little")

    def _write32(self, device: int, reg: int, value: int) -> None:
        at = device * FUNCTION_STRIDE + reg
        self.bus.buffer(self.slot)[at:at + 4] = np.frombuffer(value.to_bytes(4, "little"), np.uint8)

    # ---- devices ---------------------------------------------------------------------------

    def add_function(self, function: "PciDevice", device: Optional[int] = None) -> int:
        """Put ``function`` at 00:``device``.0 (the first free number from 2 when None),
        assign its BARs as firmware would and map them; returns the device number."""
        with self._lock:
            if device is None:
                device = next((d for d in range(FIRST_FREE_DEVICE, DEVICES) if d not in self.functions), None)
                if device is None:
                    raise PciError(f"no free PCI device number on bus 0 (max {DEVICES})")
            if not 1 <= device < DEVICES or device in self.functions:
                raise PciError(f"PCI device number {device} is invalid or taken")
            self.functions[device] = function
            self.state_version += 1  # snapshot_state() names only present functions
            self._store(device, *function.config())
            self._assign_bars(device, function)
        self.sync(force=True)
        return device

    def remove_function(self, device: int) -> None:
        with self._lock:
            function = self.functions.pop(device, None)
            if function is None:
                return
            for index in range(len(function.bars)):
                self._mapped.pop((device, index), None)
            self.state_version += 1
            if self.bus is not None and self.slot in self.bus.slots:  # not torn down already
                self._store(device, b"\xff" * CONFIG_SIZE, bytes(CONFIG_SIZE))
                function.unmap_bars()

    def _assign_bars(self, device: int, function: "PciDevice") -> None:
        """Firmware's job, done here as bhyve does: each BAR at the next aligned free address
        of its window, and decoding on. A BAR that does not fit stays 0 (unassigned)."""
        command = 0
        for index, (is_io, size) in enumerate(function.bars):
            low, high = IO_WINDOW if is_io else MEM_WINDOW
            address = self._free_address(low, high, size, is_io)
            if address is None:
                continue
            reg = REG_BAR0 + 4 * index
            self._write32(device, reg, address | (self._read32(device, reg) & (size - 1)))
            command |= COMMAND_IO if is_io else COMMAND_MEMORY
        reg = REG_COMMAND
        self._write32(device, reg, self._read32(device, reg) | command)

    def _free_address(self, low: int, high: int, size: int, is_io: bool) -> Optional[int]:
        bus, memory = self.bus, self.memory
        address = (low + size - 1) & ~(size - 1)
        while address + size <= high:
            if is_io:
                busy = bool(bus.port_map[address:address + size].any())
            else:
                busy = any(address < end and start < address + size for start, end, _ in bus.mmio_table())
                busy = busy or (memory is not None and any(
                    address < s.end and s.gpa < address + size for s in memory.segments))
            if not busy:
                return address
            address += size
        return None

    def sync(self, force: bool = False) -> None:
        """Move BAR claims to where the configuration spaces say (the run loop's drain hook:
        a guest wrote a command register or a BAR)."""
        if self.bus is None or self.slot not in self.bus.slots:  # detached or torn down
            return
        state = self.bus.state(self.slot)
        if not force and state[S_REMAP] == 0:
            return
        with self._lock:
            # Clear before reading: a write landing after this sets the bit again.
            state[S_REMAP] = 0
            for device, function in self.functions.items():
                command = self._read32(device, REG_COMMAND)
                for index, (is_io, size) in enumerate(function.bars):
                    enabled = command & (COMMAND_IO if is_io else COMMAND_MEMORY)
                    raw = self._read32(device, REG_BAR0 + 4 * index)
                    address = bar_address(raw, is_io, size) if enabled else None
                    key = (device, index)
                    if key not in self._mapped or self._mapped[key] != address:
                        self._mapped[key] = function.map_bar(index, address)
                        self.state_version += 1


class PciDevice(PortDevice):
    """A PCI device on bus 0 of the VM's :class:`PciHost`: a configuration space and up to
    one I/O and one memory BAR, handled natively by the subclass's ``port_io`` (offset from
    the I/O BAR) and ``mmio_io`` (offset from the memory BAR).

    Subclasses set ``vendor_id``, ``device_id``, ``class_code`` (the 16-bit class/subclass
    word at register 0x0a, as QEMU's ``class_id``), ``revision`` and ``bars``:
    ``((is_io, size), ...)`` in BAR order, sizes powers of two.
    """

    vendor_id = 0xFFFF
    device_id = 0xFFFF
    class_code = 0
    revision = 0
    bars: tuple[tuple[bool, int], ...] = ()

    def __init__(self, name: str, device: Optional[int] = None):
        super().__init__(0, name)
        self.pci_device = device
        self.host: Optional[PciHost] = None
        self.bar_addresses: dict[int, Optional[int]] = {}
        self._memory = None

    def _claim(self, bus, memory) -> None:
        # Nothing at attach time: the BARs claim ports and MMIO once they are placed.
        self._memory = memory

    def attach(self, bus, memory=None) -> None:
        host = next((s.owner for s in bus.slots.values() if isinstance(s.owner, PciHost)), None)
        if host is None:
            raise PciError(f"{self.name}: the bus has no PCI host bridge (add 'pci-host' first)")
        super().attach(bus, memory)
        self.host = host
        try:
            self.pci_device = host.add_function(self, self.pci_device)
        except Exception:
            super().detach(bus)
            raise

    def detach(self, bus) -> None:
        if self.host is not None and self.pci_device is not None:
            self.host.remove_function(self.pci_device)
            self.host = None
        super().detach(bus)

    def config(self) -> tuple[bytes, bytes]:
        """(configuration space, write mask) at reset, BARs unassigned."""
        cfg = bytearray(CONFIG_SIZE)
        wmask = bytearray(CONFIG_SIZE)
        cfg[0x00:0x02] = self.vendor_id.to_bytes(2, "little")
        cfg[0x02:0x04] = self.device_id.to_bytes(2, "little")
        cfg[0x08] = self.revision
        cfg[0x0A:0x0C] = self.class_code.to_bytes(2, "little")
        cfg[0x2C:0x2E] = (0x1AF4).to_bytes(2, "little")  # subsystem ids, as QEMU gives them
        cfg[0x2E:0x30] = (0x1100).to_bytes(2, "little")
        wmask[0x04:0x06] = (0x0547).to_bytes(2, "little")
        wmask[0x0C] = wmask[0x0D] = wmask[0x3C] = 0xFF  # cache line, latency, interrupt line
        ios = [b for b in self.bars if b[0]]
        if len(self.bars) > BAR_COUNT or len(ios) > 1 or len(self.bars) - len(ios) > 1:
            raise PciError(f"{type(self).__name__}: at most one I/O and one memory BAR")
        for index, (is_io, size) in enumerate(self.bars):
            if size < (4 if is_io else 16) or size & (size - 1):
                raise PciError(f"{type(self).__name__}: BAR {index} size {size:#x} is not a power of two")
            reg = REG_BAR0 + 4 * index
            cfg[reg:reg + 4] = (BAR_IO if is_io else 0).to_bytes(4, "little")
            wmask[reg:reg + 4] = (~(size - 1) & 0xFFFFFFFF).to_bytes(4, "little")
        return bytes(cfg), bytes(wmask)

    def map_bar(self, index: int, address: Optional[int]) -> Optional[int]:
        """Claim BAR ``index`` at ``address`` on the bus (None: decode nothing). Returns where
        it is mapped: None too when the range collides with RAM or another device (there
        the guest's access finds what was there before, as with QEMU's lower-priority BAR)."""
        is_io, size = self.bars[index]
        bus = self.bus
        if is_io:
            bus.release_ports(self.slot)
        else:
            bus.release_mmio(self.slot)
        mapped = None
        if address is not None:
            try:
                if is_io:
                    bus.claim_ports(self.slot, address, size)
                    bus.dev_base[self.slot] = address
                else:
                    bus.claim_mmio(self.slot, address, size, self._memory)
                mapped = address
            except HvjitError:  # BusConflictError, or MemoryMapError over RAM
                mapped = None
        self.bar_addresses[index] = mapped
        return mapped

    def unmap_bars(self) -> None:
        if self.bus is not None:
            self.bus.release_ports(self.slot)
            self.bus.release_mmio(self.slot)
        self.bar_addresses.clear()
