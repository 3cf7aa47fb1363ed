"""PCI configuration spaces beyond the host bridge (enumeration, BAR sizing and moving) and
QEMU's pci-testdev protocol, driven through the handlers directly (no KVM)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvjit.devices import kinds
from hvjit.devices import pci as p
from hvjit.devices import pci_testdev as t
from hvjit.devices.bus import IoBus

CONT, DRAIN = kinds.ACT_CONTINUE, kinds.ACT_DRAIN


def cfg_addr(dev, reg, bus_=0, fn=0):
    return 0x80000000 | bus_ << 16 | dev << 11 | fn << 8 | reg


class Machine:
    """A bus with the host bridge and one pci-testdev, and config accessors as a guest has."""

    def __init__(self):
        self.bus = IoBus()
        self.host = p.PciHost()
        self.host.attach(self.bus)
        self.dev = t.PciTestDev()
        self.dev.attach(self.bus)
        self.state, self.buf = self.bus.state(self.host.slot), self.bus.buffer(self.host.slot)

    def read(self, dev, reg, size=4):
        p.pci_io(self.state, self.buf, 0, 4, True, cfg_addr(dev, reg & 0xFC))
        return p.pci_io(self.state, self.buf, 4 + (reg & 3), size, False, 0)[0]

    def write(self, dev, reg, value, size=4):
        p.pci_io(self.state, self.buf, 0, 4, True, cfg_addr(dev, reg & 0xFC))
        _, act = p.pci_io(self.state, self.buf, 4 + (reg & 3), size, True, value)
        if act == DRAIN:  # what the run loop does: back to Python, which syncs
            self.host.sync()
        return act

    def dev_io(self, offset, size, is_write, value=0):
        st, b = self.bus.state(self.dev.slot), self.bus.buffer(self.dev.slot)
        return t.pci_testdev_pio(st, b, offset, size, is_write, value)[0]

    def dev_mem(self, offset, size, is_write, value=0):
        st, b = self.bus.state(self.dev.slot), self.bus.buffer(self.dev.slot)
        data = np.frombuffer(value.to_bytes(8, "little"), np.uint8).copy()
        t.pci_testdev_mmio(st, b, offset, size, is_write, data)
        return int.from_bytes(data[:size].tobytes(), "little")


@pytest.fixture
def m():
    return Machine()


def enumerate_bus(m):
    """What a kernel's PCI scan finds: (device, vendor, device id) on bus 0."""
    return [(d, v & 0xFFFF, v >> 16) for d in range(32) if (v := m.read(d, 0)) != 0xFFFFFFFF]


def test_enumeration_finds_the_host_bridge_and_pci_testdev(m):
    assert enumerate_bus(m) == [(0, 0x8086, 0x1237), (2, 0x1B36, 0x0005)]
    assert m.dev.pci_device == 2
    assert m.read(2, 0x08) == 0x00FF0000  # revision 0, prog-if 0, class word 0x00ff (QEMU's)
    assert m.read(2, 0x0C) >> 16 & 0xFF == 0  # header type 0, single function
    assert m.read(2, 0x2C) == 0x11001AF4
    assert m.read(2, 0x3C) >> 8 & 0xFF == 0  # no interrupt pin
    for fn in range(1, 8):  # other functions and buses: nobody
        p.pci_io(m.state, m.buf, 0, 4, True, cfg_addr(2, 0, fn=fn))
        assert p.pci_io(m.state, m.buf, 4, 4, False, 0)[0] == 0xFFFFFFFF
    p.pci_io(m.state, m.buf, 0, 4, True, cfg_addr(2, 0, bus_=1))
    assert p.pci_io(m.state, m.buf, 4, 4, False, 0)[0] == 0xFFFFFFFF


def test_bars_are_assigned_and_decoded_as_firmware_leaves_them(m):
    mem, io = m.read(2, 0x10), m.read(2, 0x14)
    assert mem == p.MEM_WINDOW[0] and io == p.IO_WINDOW[0] | 1
    assert m.read(2, 0x04) & 3 == 3  # I/O and memory decoding on
    assert m.bus.port_map[0xC000] == m.dev.slot and m.bus.port_map[0xC0FF] == m.dev.slot
    assert m.bus.port_map[0xC100] == 0 and m.bus.dev_base[m.dev.slot] == 0xC000
    assert [tuple(r) for r in m.bus.mmio_table()] == [(mem, mem + t.MEM_SIZE, m.dev.slot)]
    assert m.dev.bar_addresses == {0: mem, 1: 0xC000}
    for reg in range(0x18, 0x28, 4):  # unused BARs: 0 and not writable
        m.write(2, reg, 0xFFFFFFFF)
        assert m.read(2, reg) == 0


def test_bar_sizing_reads_back_the_size_mask_and_moves_nothing_until_restored(m):
    m.write(2, 0x04, 0)  # decoding off first, as a kernel does
    assert m.bus.port_map[0xC000] == 0 and len(m.bus.mmio_table()) == 0
    assert m.write(2, 0x10, 0xFFFFFFFF) == DRAIN
    assert m.read(2, 0x10) == 0xFFFFF000  # 4 KiB, 32-bit, not prefetchable
    m.write(2, 0x14, 0xFFFFFFFF)
    assert m.read(2, 0x14) == 0xFFFFFF01  # 256 ports
    m.write(2, 0x04, 3)  # decoding on while a BAR holds all ones: it decodes nothing
    assert m.bus.port_map[0xFF00:].sum() == 0 and len(m.bus.mmio_table()) == 0
    m.write(2, 0x10, 0xD0000000)
    m.write(2, 0x14, 0xE000)
    assert m.read(2, 0x10) == 0xD0000000 and m.read(2, 0x14) == 0xE001
    assert m.bus.port_map[0xE000] == m.dev.slot and m.bus.port_map[0xE0FF] == m.dev.slot
    assert m.bus.port_map[0xC000] == 0 and m.bus.dev_base[m.dev.slot] == 0xE000
    assert [tuple(r) for r in m.bus.mmio_table()] == [(0xD0000000, 0xD0001000, m.dev.slot)]
    m.write(2, 0x04, 1, size=2)  # memory decoding off: only the I/O BAR stays
    assert len(m.bus.mmio_table()) == 0 and m.bus.port_map[0xE000] == m.dev.slot
    m.write(2, 0x10, 0x123, size=1)  # low bits of a BAR are read-only
    assert m.read(2, 0x10) == 0xD0000000


def test_writes_elsewhere_and_to_absent_devices_do_not_ask_for_python(m):
    assert m.write(2, 0x0C, 0x4010) == CONT  # cache line, latency timer: stored
    assert m.read(2, 0x0C) & 0xFFFF == 0x4010
    assert m.write(2, 0x00, 0) == CONT and m.read(2, 0) == 0x00051B36  # ids are read-only
    assert m.write(5, 0x10, 0xFFFFFFFF) == CONT and m.read(5, 0x10) == 0xFFFFFFFF
    assert m.write(0, 0x04, 0x0006) == CONT  # the host bridge has no BARs to move
    assert m.state[p.S_REMAP] == 0


def test_a_bar_over_ram_or_another_device_is_not_mapped():
    class Memory:
        segments = [type("S", (), {"gpa": 0, "end": 0xE0000000})()]

    bus = IoBus()
    p.PciHost().attach(bus, Memory())
    dev = t.PciTestDev()
    dev.attach(bus, Memory())
    assert dev.bar_addresses[0] == 0xE0000000  # firmware skipped the RAM below
    host = bus.slots[1].owner
    host._write32(2, 0x10, 0x1000)  # as a guest write would: over RAM
    bus.state(host.slot)[p.S_REMAP] = 1 << 2
    host.sync()
    assert dev.bar_addresses[0] is None and len(bus.mmio_table()) == 0


def test_device_numbers_and_errors():
    bus = IoBus()
    with pytest.raises(p.PciError, match="host bridge"):
        t.PciTestDev().attach(bus)
    assert not bus.slots
    p.PciHost().attach(bus)
    a, b = t.PciTestDev(), t.PciTestDev(name="second", device=7)
    a.attach(bus)
    b.attach(bus)
    assert (a.pci_device, b.pci_device) == (2, 7)
    assert b.bar_addresses[0] == p.MEM_WINDOW[0] + t.MEM_SIZE and b.bar_addresses[1] == 0xC100
    with pytest.raises(p.PciError, match="taken"):
        t.PciTestDev(name="third", device=7).attach(bus)
    b.detach(bus)
    host = bus.slots[1].owner
    assert host.config_space(7) == b"\xff" * 256
    assert bus.port_map[0xC100] == 0 and len(bus.mmio_table()) == 1


# ---- the pci-testdev protocol (kvm-unit-tests' lib/pci-testdev.c, step by step) ------------

def run_test(access, nr, writes=16):
    """pci_testdev_one: select, check the header, write `writes` times, return (ok, count)."""
    access(0, 1, True, nr)
    if access(12, 4, False) != 0:
        return False, None
    width = access(1, 1, False)
    if width not in (1, 2, 4):
        return False, None
    sig, off = access(8, 4, False), access(4, 4, False)
    for _ in range(writes):
        access(off, width, True, sig)
    count = access(12, 4, False)
    return count == writes, count


def name(access):
    out = bytearray()
    while (c := access(16 + len(out), 1, False)) != 0:
        out.append(c)
    return out.decode()


@pytest.mark.parametrize("kind", ["mem", "io"])
def test_pci_testdev_all_tests_pass_as_kvm_unit_tests_runs_them(m, kind):
    access = m.dev_mem if kind == "mem" else m.dev_io
    prefix = "mmio" if kind == "mem" else "portio"
    names = []
    for nr in range(4):
        ok, count = run_test(access, nr)
        if not ok:
            break
        names.append(name(access))
    assert names == [f"{prefix}-no-eventfd", f"{prefix}-wildcard-eventfd", f"{prefix}-datamatch-eventfd"]
    assert access(1, 1, False) == 0  # test 3 does not exist: nothing selected
    first = 0 if kind == "mem" else 3
    assert [m.dev.count(i) for i in range(first, first + 3)] == [16, 16, 16]


def test_pci_testdev_header_fields_and_matching(m):
    m.dev_io(0, 1, True, 2)  # portio-datamatch-eventfd (test 5)
    assert m.dev_io(0, 4, False) == 0x00000105  # test 5, width 1
    assert m.dev_io(4, 4, False) == 128 + 5
    assert m.dev_io(8, 4, False) == t.DATAMATCH
    m.dev_io(133, 1, True, 0x12)  # wrong data: not counted
    m.dev_io(134, 1, True, t.DATAMATCH)  # wrong offset: not counted
    m.dev_io(132, 2, True, t.DATAMATCH << 8)  # the high byte lands at 133: counted
    assert m.dev_io(12, 4, False) == 1
    m.dev_io(0, 1, True, 1)  # portio-wildcard: any byte counts, count restarts at 0
    assert m.dev_io(12, 4, False) == 0
    m.dev_io(132, 1, True, 0x77)
    assert m.dev_io(12, 4, False) == 1 and m.dev.count(5) == 1
    size = 16 + len("portio-wildcard-eventfd") + 1
    assert m.dev_io(size - 2, 1, False) == ord("d") and m.dev_io(size - 1, 1, False) == 0
    assert m.dev_mem(16, 4, False) == int.from_bytes(b"port", "little")  # one current test
    m.dev_mem(0, 4, True, 0x100)  # a dword write: byte 0 (0) selects mmio-no-eventfd
    assert name(m.dev_mem) == "mmio-no-eventfd"
    m.dev_mem(0, 1, True, 9)
    assert m.dev_mem(0, 8, False) == 0 and m.dev_io(16, 4, False) == 0


def test_pci_testdev_out_of_range_accesses_are_ignored(m):
    m.dev_io(0, 1, True, 0)
    for offset, size in ((-1, 1), (255, 2), (256, 1), (0, 8), (0, 0)):
        assert m.dev_io(offset, size, False) == 0
        m.dev_io(offset, size, True, 0xFF)
    for offset, size in ((-4, 4), (4093, 4), (4096, 1), (0, 9)):
        m.dev_mem(offset, size, True, 0xFF)
    assert m.dev_io(0, 1, False) == 3  # still test 3 (portio-no-eventfd), untouched


@pytest.mark.skipif(os.environ.get("NUMBA_BOUNDSCHECK") == "1", reason="already bounds-checked")
def test_with_numba_boundscheck(tmp_path):
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", HVJIT_CACHE_DIR=str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not boundscheck"],
        env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_bar_mappings_follow_a_snapshot_back(m):
    m.write(2, 0x10, 0xD0000000)
    saved = m.host.snapshot_state()
    assert [2, 0, 0xD0000000] in saved["mapped"] and [2, 1, 0xC000] in saved["mapped"]
    m.write(2, 0x10, 0xE0000000)  # moved after the snapshot
    assert [tuple(r) for r in m.bus.mmio_table()] == [(0xE0000000, 0xE0001000, m.dev.slot)]
    m.host.restore_state(saved)  # (the bus restores the configuration spaces themselves)
    assert [tuple(r) for r in m.bus.mmio_table()] == [(0xD0000000, 0xD0001000, m.dev.slot)]
    assert m.dev.bar_addresses[0] == 0xD0000000
    assert m.host.buffer_changes(m.state) == [(0, 256), (2 * p.FUNCTION_STRIDE, 2 * p.FUNCTION_STRIDE + 256)]
    assert m.dev.buffer_changes(m.state) == [(0, t.SIZES_AT)]
