"""PCI configuration mechanism #1 (ports 0xcf8-0xcff) with an i440FX host bridge at 00:00.0.

- 0xcf8 (dword): CONFIG_ADDRESS: enable (bit 31), bus (23:16), device (15:11), function
  (10:8), register (7:2); reads back what was written (reserved bits 30:24 and 1:0 as 0);
- 0xcfc-0xcff: CONFIG_DATA, byte/word/dword at the offset: register ``(addr & 0xfc) + (port -
  0xcfc)``; an access that would cross the dword reads all ones and writes nothing;
- 0xcf9 (byte): PIIX's reset control register: a write with bit 2 (RST_CPU) set resets the
  machine (``ACT_RESET``: Linux's ``reboot=pci`` and the FADT's RESET_REG use it);
- other byte/word accesses to 0xcf8-0xcfb read all ones and are dropped.

The host bridge's 256-byte configuration space lives in the buffer row (bytes 0-255) with a
write mask (bytes 256-511): vendor 8086 device 1237, class 060000, header type 0, no BARs;
command, cache line, latency timer and the chipset registers 0x40-0xff are writable (stored,
not acted upon), everything else is read-only. Every other bus/device/function reads
0xffffffff ("no device"), as does CONFIG_DATA while the enable bit is clear.
"""

from __future__ import annotations

import numpy as np

from .._jit import kernel
from . import kinds
from .bus import PortDevice

ADDRESS_PORT = 0xCF8
RESET_CONTROL_PORT = 0xCF9
DATA_PORT = 0xCFC
PORT_COUNT = 8
CONFIG_SIZE = 256
WMASK_AT = CONFIG_SIZE

ADDRESS_ENABLE = 0x80000000
ADDRESS_MASK = 0x80FFFFFC
RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04

HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x1237  # 82441FX PMC (i440FX)
HOST_BRIDGE_CLASS = 0x060000

# State words (0 is kinds.STATE_EXIT_CODE).
S_ADDRESS = 1
S_RCR = 2
S_RESETS = 3


@kernel
def _config_read(state, buf, reg, size):
    addr = state[S_ADDRESS]
    ones = (np.int64(1) << (8 * size)) - 1
    if not (addr & ADDRESS_ENABLE):
        return ones
    if (addr & 0x00FFFF00) != 0:  # only bus 0, device 0, function 0 exists
        return ones
    if reg < 0 or reg + size > CONFIG_SIZE:
        return ones
    v = np.int64(0)
    for i in range(size):
        v |= np.int64(buf[reg + i]) << (8 * i)
    return v


@kernel
def _config_write(state, buf, reg, size, value):
    addr = state[S_ADDRESS]
    if not (addr & ADDRESS_ENABLE) or (addr & 0x00FFFF00) != 0:
        return
    if reg < 0 or reg + size > CONFIG_SIZE:
        return
    for i in range(size):
        mask = np.int64(buf[WMASK_AT + reg + i])
        byte = (value >> (8 * i)) & 0xFF
        buf[reg + i] = (np.int64(buf[reg + i]) & ~mask) | (byte & mask)


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
            _config_write(state, buf, reg, size, value)
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


class PciHost(PortDevice):
    """CONFIG_ADDRESS/CONFIG_DATA at 0xcf8/0xcfc (+ reset control 0xcf9), one host bridge."""

    port_io = pci_io
    port_count = PORT_COUNT

    def __init__(self, name: str = "pci-host"):
        super().__init__(ADDRESS_PORT, name)

    def attach(self, bus, memory=None) -> None:
        super().attach(bus, memory)
        cfg, wmask = host_bridge_config()
        buf = bus.buffer(self.slot)
        buf[:CONFIG_SIZE] = np.frombuffer(cfg, np.uint8)
        buf[WMASK_AT: WMASK_AT + CONFIG_SIZE] = np.frombuffer(wmask, np.uint8)

    def buffer_changes(self, saved: np.ndarray) -> list[tuple[int, int]]:
        return [(0, CONFIG_SIZE)]  # configuration space; the write mask after it never changes

    @property
    def config(self) -> bytes:
        """The host bridge's configuration space as it is now."""
        return self.bus.buffer(self.slot)[:CONFIG_SIZE].tobytes()
