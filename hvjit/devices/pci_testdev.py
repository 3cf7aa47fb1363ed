"""QEMU's ``pci-testdev`` (PCI 1b36:0005), as kvm-unit-tests drive it.

BAR0 is 4 KiB of memory, BAR1 256 I/O ports; both answer the same way, one byte at a time
(QEMU's regions are 1 byte wide: a wider access is that many byte accesses, low byte
first). Six tests, three per BAR type, each with a header the guest reads while it is the
current one::

    0  test    write: a test number n selects test (BAR type * 3 + n) and zeroes its count;
               n >= 3 selects none
    1  width   1 (bytes per write the test expects)
    4  offset  (le32) where to write: 2048 + i in the memory BAR, 128 + i in the I/O BAR
    8  data    the byte to write: 0xfa ("datamatch"), 0xce where any byte counts
   12  count   (le32) matching writes at ``offset`` since the test was selected
   16  name    "mmio-no-eventfd", "mmio-wildcard-eventfd", "mmio-datamatch-eventfd",
               "portio-..." (NUL-terminated)

With no test selected, or past the header (the last byte included, as in QEMU), reads give
0. QEMU hands the eventfd tests' writes to KVM ioeventfds (the count stays 0, which the
tests accept); here every write is counted, which they accept too.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .._jit import kernel
from . import kinds
from .pci import PciDevice

VENDOR_REDHAT = 0x1B36
DEVICE_TEST = 0x0005
CLASS_OTHERS = 0x00FF  # QEMU's class_id: register 0x0a = 0xff, 0x0b = 0x00
MEM_SIZE = 4096  # IOTEST_MEMSIZE * 2
IO_SIZE = 256  # IOTEST_IOSIZE * 2
TEST_OFFSET = (2048, 128)  # per BAR type (memory, I/O): the first test's write offset

TYPES = ("mmio", "portio")
KINDS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
TESTS_PER_TYPE = len(KINDS)
N_TESTS = len(TYPES) * TESTS_PER_TYPE
WILDCARD = 1  # the kind whose writes count whatever their data
DATAMATCH = 0xFA
NOMATCH = 0xCE

# Header layout.
HDR_TEST = 0
HDR_WIDTH = 1
HDR_OFFSET = 4
HDR_DATA = 8
HDR_COUNT = 12
HDR_NAME = 16
HDR_STRIDE = 64  # each test's header in the buffer row
SIZES_AT = N_TESTS * HDR_STRIDE  # one byte per test: its header's size (kept over a reset)

TYPE_MEMORY = 0
TYPE_IO = 1

# State words (0 is kinds.STATE_EXIT_CODE).
S_CURRENT = 1  # the current test + 1, 0 for none (a zeroed state is "none")


@kernel
def _load32(buf, at):
    return (np.int64(buf[at]) | (np.int64(buf[at + 1]) << 8) | (np.int64(buf[at + 2]) << 16)
            | (np.int64(buf[at + 3]) << 24))


@kernel
def _store32(buf, at, value):
    for i in range(4):
        buf[at + i] = (value >> (8 * i)) & 0xFF


@kernel
def _current(state):
    t = state[S_CURRENT] - 1
    return t if 0 <= t < N_TESTS else np.int64(-1)


@kernel
def _write_byte(state, buf, bar_type, offset, value):
    if offset == HDR_TEST:
        state[S_CURRENT] = 0
        if value >= TESTS_PER_TYPE:
            return
        t = bar_type * TESTS_PER_TYPE + value
        _store32(buf, t * HDR_STRIDE + HDR_COUNT, 0)
        state[S_CURRENT] = t + 1
        return
    t = _current(state)
    if t < 0:
        return
    base = t * HDR_STRIDE
    if offset != _load32(buf, base + HDR_OFFSET):
        return
    if t % TESTS_PER_TYPE != WILDCARD and value != buf[base + HDR_DATA]:
        return
    _store32(buf, base + HDR_COUNT, (_load32(buf, base + HDR_COUNT) + 1) & 0xFFFFFFFF)


@kernel
def _read_byte(state, buf, offset):
    t = _current(state)
    if t < 0 or offset < 0 or offset + 1 >= np.int64(buf[SIZES_AT + t]):
        return np.int64(0)
    return np.int64(buf[t * HDR_STRIDE + offset])


@kernel
def _access(state, buf, bar_type, offset, size, is_write, value):
    """One access as QEMU's byte-wide region sees it: ``size`` byte accesses."""
    out = np.int64(0)
    for i in range(size):
        if is_write:
            _write_byte(state, buf, bar_type, offset + i, (value >> (8 * i)) & 0xFF)
        else:
            out |= _read_byte(state, buf, offset + i) << (8 * i)
    return out


@kernel
def pci_testdev_pio(state, buf, offset, size, is_write, value):
    """The I/O BAR: ``offset`` from its base."""
    if offset < 0 or size < 1 or size > 4 or offset + size > IO_SIZE:
        return np.int64(0), kinds.ACT_CONTINUE  # outside the BAR: nothing there
    return _access(state, buf, TYPE_IO, offset, size, is_write, value), kinds.ACT_CONTINUE


@kernel
def pci_testdev_mmio(state, buf, offset, size, is_write, data):
    """The memory BAR: ``data`` is kvm_run's 8-byte MMIO buffer."""
    if offset < 0 or size < 1 or size > 8 or offset + size > MEM_SIZE or data.size < size:
        return kinds.ACT_CONTINUE
    value = np.int64(0)
    if is_write:
        for i in range(size):
            value |= np.int64(data[i]) << (8 * i)
    value = _access(state, buf, TYPE_MEMORY, offset, size, is_write, value)
    if not is_write:
        for i in range(size):
            data[i] = (value >> (8 * i)) & 0xFF
    return kinds.ACT_CONTINUE


def headers() -> list[bytes]:
    """The six tests' headers (count 0), in test order."""
    out = []
    for t in range(N_TESTS):
        bar_type, kind = divmod(t, TESTS_PER_TYPE)
        name = f"{TYPES[bar_type]}-{KINDS[kind]}".encode() + b"\0"
        hdr = bytearray(HDR_NAME) + name
        hdr[HDR_TEST] = t
        hdr[HDR_WIDTH] = 1
        hdr[HDR_OFFSET:HDR_OFFSET + 4] = (TEST_OFFSET[bar_type] + t).to_bytes(4, "little")
        hdr[HDR_DATA] = NOMATCH if kind == WILDCARD else DATAMATCH
        out.append(bytes(hdr))
    return out


class PciTestDev(PciDevice):
    """pci-testdev on the VM's PCI bus: memory BAR0, I/O BAR1, handled natively."""

    port_io = pci_testdev_pio
    mmio_io = pci_testdev_mmio
    vendor_id = VENDOR_REDHAT
    device_id = DEVICE_TEST
    class_code = CLASS_OTHERS
    bars = ((False, MEM_SIZE), (True, IO_SIZE))

    def __init__(self, name: str = "pci-testdev", device: Optional[int] = None):
        super().__init__(name, device)

    def attach(self, bus, memory=None) -> None:
        super().attach(bus, memory)
        buf = bus.buffer(self.slot)
        for t, hdr in enumerate(headers()):
            assert len(hdr) <= HDR_STRIDE
            buf[t * HDR_STRIDE:t * HDR_STRIDE + len(hdr)] = np.frombuffer(hdr, np.uint8)
            buf[SIZES_AT + t] = len(hdr)

    def buffer_changes(self, saved: np.ndarray) -> list[tuple[int, int]]:
        return [(0, SIZES_AT)]  # the headers (their counts); the sizes after them never change

    def count(self, test: int) -> int:
        """Test ``test``'s count (0-5: memory tests then I/O tests)."""
        at = test * HDR_STRIDE + HDR_COUNT
        return int.from_bytes(self.bus.buffer(self.slot)[at:at + 4].tobytes(), "little")
