"""The PC platform devices' handlers, driven directly (no KVM): i8042, CMOS/RTC, fw_cfg, PCI
host bridge, ACPI PM timer; and their arms in the run loop's switch."""

import calendar
import datetime
import struct
import time

import numpy as np
import pytest

from hvjit import run_loop
from hvjit.devices import cmos as c
from hvjit.devices import fw_cfg as f
from hvjit.devices import i8042 as k
from hvjit.devices import kinds
from hvjit.devices import pci as p
from hvjit.devices import pm_timer as pm
from hvjit.devices.bus import IoBus

dispatch = run_loop.compiled()  # the generated loop, with the native device switch

CONT, RESET, POWEROFF = kinds.ACT_CONTINUE, kinds.ACT_RESET, kinds.ACT_POWEROFF


@pytest.fixture
def bus():
    return IoBus()


def attached(bus, dev, memory=None):
    dev.attach(bus, memory)
    return bus.state(dev.slot), bus.buffer(dev.slot)


# ---- i8042 ----------------------------------------------------------------------------------

def test_i8042_status_self_test_and_command_byte(bus):
    state, _ = attached(bus, k.I8042())
    io = k.i8042_io
    st = io(state, k.OFF_STATUS, 1, False, 0)[0]
    assert not st & k.STAT_OBF and st & k.STAT_SYS and not st & 0x02  # IBF never set
    assert io(state, k.OFF_STATUS, 1, True, 0xAA) == (0, CONT)
    assert io(state, k.OFF_STATUS, 1, False, 0)[0] & k.STAT_OBF
    assert io(state, k.OFF_DATA, 1, False, 0)[0] == 0x55
    assert not io(state, k.OFF_STATUS, 1, False, 0)[0] & k.STAT_OBF
    io(state, k.OFF_STATUS, 1, True, 0x20)
    assert io(state, k.OFF_DATA, 1, False, 0)[0] == k.CMDBYTE_DEFAULT
    io(state, k.OFF_STATUS, 1, True, 0x60)
    io(state, k.OFF_DATA, 1, True, 0x61)
    io(state, k.OFF_STATUS, 1, True, 0xAD)  # disable keyboard: bit 4 of the command byte
    io(state, k.OFF_STATUS, 1, True, 0x20)
    assert io(state, k.OFF_DATA, 1, False, 0)[0] == 0x71
    assert not io(state, k.OFF_STATUS, 1, False, 0)[0] & k.STAT_SYS  # SYS follows the byte
    io(state, k.OFF_STATUS, 1, True, 0xAE)
    io(state, k.OFF_STATUS, 1, True, 0x20)
    assert io(state, k.OFF_DATA, 1, False, 0)[0] == 0x61


def test_i8042_keyboard_commands_and_bounded_queue(bus):
    state, _ = attached(bus, k.I8042())
    io = k.i8042_io
    io(state, k.OFF_DATA, 1, True, 0xF2)  # identify
    assert [io(state, k.OFF_DATA, 1, False, 0)[0] for _ in range(3)] == [0xFA, 0xAB, 0x83]
    assert io(state, k.OFF_DATA, 1, False, 0)[0] == 0x83  # empty: the last byte again
    for _ in range(100):  # more responses than the queue holds: dropped, never overflows
        io(state, k.OFF_DATA, 1, True, 0xFF)
    assert state[k.S_Q_HEAD] - state[k.S_Q_TAIL] == k.QUEUE_SIZE
    assert all(state[k.S_QUEUE + k.QUEUE_SIZE: kinds.STATE_IRQ_REPORTED] == 0)


@pytest.mark.parametrize("cmd", [0xFE, 0xF0, 0xFC])
def test_i8042_pulse_reset(bus, cmd):
    dev = k.I8042()
    state, _ = attached(bus, dev)
    assert k.i8042_io(state, k.OFF_STATUS, 1, True, cmd) == (0, RESET)
    assert dev.resets == 1
    assert k.i8042_io(state, k.OFF_STATUS, 1, True, 0xFF)[1] == CONT  # no line pulsed
    # Output port write with the reset line low.
    k.i8042_io(state, k.OFF_STATUS, 1, True, 0xD1)
    assert k.i8042_io(state, k.OFF_DATA, 1, True, 0xFE)[1] == RESET


def test_port_b_refresh_bit_toggles(bus):
    state, _ = attached(bus, k.I8042())
    k.i8042_io(state, k.OFF_PORT_B, 1, True, 0xFF)
    reads = [k.i8042_io(state, k.OFF_PORT_B, 1, False, 0)[0] for _ in range(4)]
    assert [r & 0x10 for r in reads] == [0x10, 0, 0x10, 0]
    assert all(r & 0x0F == 0x0F for r in reads)
    assert bus.port_map[0x61] == bus.port_map[0x60] == bus.port_map[0x64] != 0
    assert bus.port_map[0x62] == 0


# ---- CMOS / RTC -----------------------------------------------------------------------------

def _bcd(v):
    return (v >> 4) * 10 + (v & 0xF)


def cmos_read(state, buf, index):
    c.cmos_io(state, buf, 0, 1, True, index)
    return c.cmos_io(state, buf, 1, 1, False, 0)[0]


def test_cmos_time_is_the_hosts_in_bcd(bus):
    state, buf = attached(bus, c.Cmos(ram_below_4g=2 << 20))
    cmos_read(state, buf, 0)  # compiled before the clock matters
    before = time.time()
    fields = [cmos_read(state, buf, r) for r in (0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00, 0x06)]
    after = time.time()
    cen, yy, mon, day, hh, mm, ss, wday = map(_bcd, fields)
    guest = calendar.timegm((cen * 100 + yy, mon, day, hh, mm, ss, 0, 0, 0))
    assert before - 2 < guest < after + 2  # UTC, to the second
    host = time.gmtime(before)
    assert wday == (host.tm_wday + 1) % 7 + 1  # 1 = Sunday
    assert cmos_read(state, buf, c.REG_B) == c.REG_B_24H
    assert cmos_read(state, buf, c.REG_D) == 0x80
    assert cmos_read(state, buf, c.REG_C) == 0


def test_cmos_binary_and_12_hour_modes_and_guest_set_time(bus):
    t0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC, a Tuesday
    state, buf = attached(bus, c.Cmos(time_ns=t0 * 10**9, tsc_khz=10**9))
    assert [cmos_read(state, buf, r) for r in (0x09, 0x08, 0x07, 0x04, 0x02, 0x06)] == \
        [0x23, 0x11, 0x14, 0x22, 0x13, 0x03]
    c.cmos_io(state, buf, 0, 1, True, c.REG_B)
    c.cmos_io(state, buf, 1, 1, True, c.REG_B_DM)  # binary, 12-hour
    assert cmos_read(state, buf, 0x04) == 0x80 | 10  # 10 PM
    assert cmos_read(state, buf, 0x09) == 23
    # The guest sets the year to 2030 (binary): the clock moves, the rest stays.
    c.cmos_io(state, buf, 0, 1, True, 0x09)
    c.cmos_io(state, buf, 1, 1, True, 30)
    assert cmos_read(state, buf, 0x09) == 30 and cmos_read(state, buf, 0x08) == 11
    assert cmos_read(state, buf, 0x07) == 14
    moved = datetime.datetime(2030, 11, 14) - datetime.datetime(2023, 11, 14)
    assert abs(state[c.S_OFFSET_S] - moved.total_seconds()) < 5
    c.cmos_io(state, buf, 0, 1, True, c.REG_B)
    c.cmos_io(state, buf, 1, 1, True, c.REG_B_24H)
    assert cmos_read(state, buf, 0x09) == 0x30


def test_calendar_helpers_match_python():
    for days in (-1, 0, 59, 10957, 11016, 20000, 47482, 100000):
        d = datetime.date(1970, 1, 1) + datetime.timedelta(days=days)
        assert c.civil_from_days(days) == (d.year, d.month, d.day)
        assert c.days_from_civil(d.year, d.month, d.day) == days


@pytest.mark.parametrize("below,above,expect", [
    (2 << 20, 0, {0x15: 0x80, 0x16: 0x02, 0x17: 0x00, 0x18: 0x04, 0x34: 0, 0x35: 0}),
    (32 << 20, 0, {0x17: 0x00, 0x18: 0x7C, 0x30: 0x00, 0x31: 0x7C, 0x34: 0x00, 0x35: 0x01}),
    (3 << 30, 1 << 30, {0x17: 0xFF, 0x18: 0xFF, 0x34: 0x00, 0x35: 0xBF,
                        0x5B: 0x00, 0x5C: 0x40, 0x5D: 0x00}),
    (512 << 10, 0, {0x15: 0x00, 0x16: 0x02, 0x17: 0, 0x18: 0}),
])
def test_cmos_memory_size_registers(bus, below, above, expect):
    state, buf = attached(bus, c.Cmos(ram_below_4g=below, ram_above_4g=above, cpus=4))
    for reg, v in expect.items():
        assert cmos_read(state, buf, reg) == v, hex(reg)
    assert cmos_read(state, buf, 0x5F) == 3
    checksum = sum(buf[0x10:0x2E].astype(int)) & 0xFFFF
    assert (cmos_read(state, buf, 0x2E) << 8) | cmos_read(state, buf, 0x2F) == checksum


def test_cmos_ram_index_masks_nmi_bit_and_stays_in_range(bus):
    state, buf = attached(bus, c.Cmos(ram_below_4g=1 << 20))
    c.cmos_io(state, buf, 0, 1, True, 0x80 | 0x40)  # NMI disable + index 0x40
    assert state[c.S_INDEX] == 0x40 and state[c.S_NMI_DISABLED] == 1
    c.cmos_io(state, buf, 1, 1, True, 0x5A)
    assert cmos_read(state, buf, 0x40) == 0x5A
    c.cmos_io(state, buf, 0, 1, True, 0xFF)  # index 0x7f, not 0xff
    c.cmos_io(state, buf, 1, 1, True, 0x77)
    assert buf[0x7F] == 0x77 and buf[0xFF] == 0
    state[c.S_INDEX] = 0x1234  # even a corrupted index stays inside the 128 bytes
    assert c.cmos_io(state, buf, 1, 1, False, 0)[0] == buf[0x34]
    assert c.cmos_io(state, buf, 0, 1, False, 0)[0] == 0xFF
    # outw to 0x70: index from AL, data from AH.
    c.cmos_io(state, buf, 0, 2, True, 0x3341)
    assert buf[0x41] == 0x33
    cmos_read(state, buf, c.REG_C)
    c.cmos_io(state, buf, 0, 1, True, c.REG_D)
    c.cmos_io(state, buf, 1, 1, True, 0)  # read-only
    assert cmos_read(state, buf, c.REG_D) == 0x80


def test_cmos_uip_only_near_the_end_of_a_second(bus):
    state, buf = attached(bus, c.Cmos(tsc_khz=pm.host_tsc_hz() // 1000))
    seen = [cmos_read(state, buf, c.REG_A) & 0x80 for _ in range(20000)]
    assert seen.count(0x80) < len(seen) // 10
    assert cmos_read(state, buf, c.REG_A) & 0x7F == c.REG_A_DEFAULT


def test_cmos_from_guest_memory_layout(bus):
    class Seg:
        def __init__(self, gpa, size, readonly=False):
            self.gpa, self.size, self.readonly = gpa, size, readonly

    class Mem:
        segments = (Seg(0, 3 << 30), Seg(1 << 32, 2 << 30), Seg(0xFFFF0000, 0x10000, True))

    dev = c.Cmos()
    dev.attach(bus, Mem())
    assert c.ram_split(Mem()) == (3 << 30, 2 << 30)
    assert dev.read(0x5C) == 0x80  # 2 GiB / 64 KiB = 0x8000


# ---- fw_cfg ---------------------------------------------------------------------------------

def fw_read(state, buf, key, n):
    f.fw_cfg_io(state, buf, 0, 2, True, key)
    return bytes(int(f.fw_cfg_io(state, buf, 1, 1, False, 0)[0]) for _ in range(n))


def test_fw_cfg_signature_id_ram_and_cpus(bus):
    state, buf = attached(bus, f.FwCfg(cpus=3, ram_size=256 << 20))
    assert fw_read(state, buf, f.KEY_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", fw_read(state, buf, f.KEY_ID, 4))[0] == 1
    assert struct.unpack("<Q", fw_read(state, buf, f.KEY_RAM_SIZE, 8))[0] == 256 << 20
    assert struct.unpack("<H", fw_read(state, buf, f.KEY_NB_CPUS, 2))[0] == 3
    assert struct.unpack("<H", fw_read(state, buf, f.KEY_MAX_CPUS, 2))[0] == 3
    # kvm-unit-tests' way: outw selector, inb the bytes little-endian; and a wide read.
    f.fw_cfg_io(state, buf, 0, 2, True, f.KEY_SIGNATURE)
    assert f.fw_cfg_io(state, buf, 1, 4, False, 0)[0] == int.from_bytes(b"QEMU", "little")


def test_fw_cfg_ram_size_from_memory(bus):
    class Seg:
        gpa, size, readonly = 0, 64 << 20, False

    class Mem:
        segments = (Seg(),)

    state, buf = attached(bus, f.FwCfg(cpus=1), Mem())
    assert struct.unpack("<Q", fw_read(state, buf, f.KEY_RAM_SIZE, 8))[0] == 64 << 20


def test_fw_cfg_reads_past_the_end_return_zero_and_bad_selectors(bus):
    state, buf = attached(bus, f.FwCfg(cpus=1, ram_size=1 << 20))
    assert fw_read(state, buf, f.KEY_SIGNATURE, 10) == b"QEMU" + bytes(6)
    assert state[f.S_POSITION] == 4  # stopped at the end of the item
    assert fw_read(state, buf, 0x1234, 8) == bytes(8)
    assert fw_read(state, buf, 0xFFFF, 8) == bytes(8)
    assert fw_read(state, buf, 0x10000 | f.KEY_SIGNATURE, 4) == b"QEMU"  # 16-bit selector
    # A corrupted directory entry pointing past the buffer is refused, not read.
    state[f.S_DIR] = 0x4242 | (0x1FFFF << f.ENTRY_OFFSET_SHIFT) | (16 << f.ENTRY_LENGTH_SHIFT)
    assert fw_read(state, buf, 0x4242, 4) == bytes(4)
    state[f.S_N_ITEMS] = 10_000  # and a corrupted count is not walked
    assert fw_read(state, buf, f.KEY_SIGNATURE, 4) == bytes(4)
    # Writes to the data port are ignored.
    attached_dev = f.FwCfg(cpus=1, ram_size=1 << 20, name="fw2")
    bus2 = IoBus()
    s2, b2 = attached(bus2, attached_dev)
    f.fw_cfg_io(s2, b2, 0, 2, True, f.KEY_SIGNATURE)
    f.fw_cfg_io(s2, b2, 1, 1, True, 0x55)
    assert fw_read(s2, b2, f.KEY_SIGNATURE, 4) == b"QEMU"


def parse_file_dir(raw):
    (count,) = struct.unpack(">I", raw[:4])
    out = {}
    for i in range(count):
        size, select, _ = struct.unpack_from(">IHH", raw, 4 + 64 * i)
        name = raw[4 + 64 * i + 8: 4 + 64 * i + 64].rstrip(b"\0").decode()
        out[name] = (size, select)
    return out


def test_fw_cfg_files_and_cmdline(bus):
    dev = f.FwCfg(cpus=2, ram_size=16 << 20)
    dev.add_file("etc/first", b"one")  # before attach
    state, buf = attached(bus, dev)
    dev.add_file("etc/second", bytes(range(200)))  # after attach: the device is rebuilt
    dev.set_cmdline("console=ttyS0 quiet")
    (count,) = struct.unpack(">I", fw_read(state, buf, f.KEY_FILE_DIR, 4))
    assert count == 3
    files = parse_file_dir(fw_read(state, buf, f.KEY_FILE_DIR, 4 + 64 * count))
    assert files == {"etc/first": (3, 0x20), "etc/second": (200, 0x21),
                     f.CMDLINE_FILE: (20, 0x22)}
    assert fw_read(state, buf, 0x21, 200) == bytes(range(200))
    assert fw_read(state, buf, 0x22, 20) == b"console=ttyS0 quiet\0"
    assert struct.unpack("<I", fw_read(state, buf, f.KEY_CMDLINE_SIZE, 4))[0] == 20
    assert fw_read(state, buf, f.KEY_CMDLINE_DATA, 20) == b"console=ttyS0 quiet\0"
    dev.add_file("etc/first", b"uno!")  # replace: same key
    assert fw_read(state, buf, 0x20, 4) == b"uno!"


def test_fw_cfg_refuses_what_does_not_fit(bus):
    dev = f.FwCfg(cpus=1, ram_size=1 << 20)
    dev.attach(bus)
    with pytest.raises(f.FwCfgError, match="buffer"):
        dev.add_file("etc/big", bytes(kinds.BUFFER_BYTES))
    with pytest.raises(f.FwCfgError):
        dev.add_file("x" * 56, b"")
    with pytest.raises(f.FwCfgError, match="items"):
        for i in range(f.MAX_ITEMS):
            dev.add_file(f"f{i}", b"x")
    assert len(dev.files) == f.MAX_ITEMS - 7  # the fixed keys + FILE_DIR take the rest
    assert f.S_DIR + f.MAX_ITEMS <= kinds.STATE_IRQ_REPORTED  # the IRQ words stay the bus's
    assert bus.state(dev.slot)[kinds.STATE_IRQ_GSI] == -1
    with pytest.raises(f.FwCfgError):
        f.FwCfg(cpus=0)


# ---- PCI ------------------------------------------------------------------------------------

def cfg_addr(bus_, dev, fn, reg):
    return 0x80000000 | bus_ << 16 | dev << 11 | fn << 8 | reg


def pci_read(state, buf, addr, size=4, lane=0):
    p.pci_io(state, buf, 0, 4, True, addr)
    return p.pci_io(state, buf, 4 + lane, size, False, 0)[0]


def test_pci_host_bridge_ids_and_absent_devices(bus):
    state, buf = attached(bus, p.PciHost())
    assert pci_read(state, buf, cfg_addr(0, 0, 0, 0)) == 0x12378086
    assert pci_read(state, buf, cfg_addr(0, 0, 0, 8)) >> 8 == 0x060000
    assert pci_read(state, buf, cfg_addr(0, 0, 0, 0xC)) >> 16 & 0xFF == 0  # header type 0
    assert pci_read(state, buf, cfg_addr(0, 0, 0, 0x10)) == 0  # no BARs
    for b_, d, fn in ((0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 31, 7), (255, 0, 0)):
        assert pci_read(state, buf, cfg_addr(b_, d, fn, 0)) == 0xFFFFFFFF
    assert pci_read(state, buf, cfg_addr(0, 0, 0, 0) & 0x7FFFFFFF) == 0xFFFFFFFF  # disabled
    p.pci_io(state, buf, 0, 4, True, 0xFFFFFFFF)
    assert p.pci_io(state, buf, 0, 4, False, 0)[0] == 0x80FFFFFC


def test_pci_byte_and_word_access_and_read_only_fields(bus):
    dev = p.PciHost()
    state, buf = attached(bus, dev)
    a = cfg_addr(0, 0, 0, 0)
    assert pci_read(state, buf, a, 2, 0) == 0x8086
    assert pci_read(state, buf, a, 2, 2) == 0x1237
    assert pci_read(state, buf, a, 1, 1) == 0x80
    assert pci_read(state, buf, a, 1, 3) == 0x12
    assert pci_read(state, buf, a, 4, 2) == 0xFFFFFFFF  # crosses the dword
    assert pci_read(state, buf, a, 2, 3) == 0xFFFF
    # Writes to the ids are ignored, the command and latency timer stick.
    p.pci_io(state, buf, 4, 4, True, 0xDEADBEEF)
    assert pci_read(state, buf, a) == 0x12378086
    p.pci_io(state, buf, 0, 4, True, cfg_addr(0, 0, 0, 4))
    p.pci_io(state, buf, 4, 2, True, 0xFFFF)
    assert pci_read(state, buf, cfg_addr(0, 0, 0, 4), 2) == 0x0547
    p.pci_io(state, buf, 0, 4, True, cfg_addr(0, 0, 0, 0xC))
    p.pci_io(state, buf, 5, 1, True, 0x40)
    assert pci_read(state, buf, cfg_addr(0, 0, 0, 0xC), 1, 1) == 0x40
    p.pci_io(state, buf, 0, 4, True, cfg_addr(0, 0, 0, 0xFC))
    p.pci_io(state, buf, 7, 1, True, 0x99)  # last byte of the space
    assert buf[0xFF] == 0x99 and buf[0x100] == 0  # the write mask after it untouched
    assert dev.config[:4] == bytes.fromhex("86803712")


def test_pci_reset_control_register(bus):
    state, buf = attached(bus, p.PciHost())
    assert p.pci_io(state, buf, 1, 1, True, 0x02) == (0, CONT)
    assert p.pci_io(state, buf, 1, 1, False, 0)[0] == 0x02
    assert p.pci_io(state, buf, 1, 1, True, 0x06) == (0, RESET)
    assert p.pci_io(state, buf, 2, 1, False, 0)[0] == 0xFF


# ---- PM timer -------------------------------------------------------------------------------

def test_pm_timer_runs_at_3_58_mhz(bus):
    dev = pm.PmTimer()
    attached(bus, dev)
    dev.read_timer()  # compile first

    def sample():  # a timer read bracketed by the clock, so preemption shows as a wide bracket
        a = time.perf_counter()
        v = dev.read_timer()
        return (a + time.perf_counter()) / 2, v

    t0, v0 = sample()
    time.sleep(0.2)
    t1, v1 = sample()
    rate = ((v1 - v0) & pm.PM_TIMER_MASK) / (t1 - t0)
    assert rate == pytest.approx(pm.PM_TIMER_HZ, rel=0.03)


def test_pm_timer_wraps_at_24_bits(bus):
    dev = pm.PmTimer()
    state, _ = attached(bus, dev)
    hz = int(state[pm.S_TSC_HZ])
    dev.read_timer()  # compiled before the clock matters
    # Move the origin so that the counter is ~2 ms before its wrap.
    state[pm.S_TSC_BASE] = pm.rdtsc() - (pm.PM_TIMER_MASK - 7000) * hz // pm.PM_TIMER_HZ
    state[pm.S_LAST_TICKS] = 0
    before = dev.read_timer()
    time.sleep(0.01)
    after = dev.read_timer()
    assert before > pm.PM_TIMER_MASK - 8000 and after < before and after < 1_000_000
    assert pm.pm_timer_io(state, 8, 4, False, 0)[0] <= pm.PM_TIMER_MASK
    byte0 = pm.pm_timer_io(state, 8, 1, False, 0)[0]
    assert 0 <= byte0 <= 0xFF


def test_pm_timer_tick_arithmetic_does_not_overflow():
    assert pm.tsc_to_ticks(10**15, 2_500_000_000, pm.PM_TIMER_HZ) == 10**15 * pm.PM_TIMER_HZ // 2_500_000_000
    assert pm.tsc_to_ticks(-5, 10, 3) == 0 and pm.tsc_to_ticks(5, 0, 3) == 0


def test_pm1_control_sci_en_and_sleep(bus):
    state, _ = attached(bus, pm.PmTimer(tsc_khz=1_000_000))
    assert pm.pm_timer_io(state, 4, 2, False, 0)[0] & pm.SCI_EN
    pm.pm_timer_io(state, 2, 2, True, 0x0121)  # PM1_EN
    assert pm.pm_timer_io(state, 0, 4, False, 0)[0] == 0x0121 << 16
    assert pm.pm_timer_io(state, 4, 2, True, 5 << pm.SLP_TYP_SHIFT) == (0, CONT)  # no SLP_EN
    assert pm.pm_timer_io(state, 4, 2, True, pm.SLP_EN | (0 << pm.SLP_TYP_SHIFT)) == (0, POWEROFF)
    assert state[kinds.STATE_EXIT_CODE] == 0
    assert not pm.pm_timer_io(state, 4, 2, False, 0)[0] & pm.SLP_EN  # write-only
    assert pm.pm_timer_io(state, 5, 1, True, pm.SLP_EN >> 8)[1] == POWEROFF  # byte write


# ---- the run loop's switch ------------------------------------------------------------------

def test_dispatch_switch_reaches_every_pc_device(bus):
    devs = [k.I8042(), c.Cmos(ram_below_4g=1 << 20), f.FwCfg(cpus=2, ram_size=1 << 20),
            p.PciHost(), pm.PmTimer()]
    for d in devs:
        d.attach(bus)

    def pio(port, size, is_write, value=0):
        slot = bus.port_map[port]
        return dispatch._pio_device(bus.dev_kind[slot], bus.dev_state[slot], bus.dev_buf[slot],
                                    np.int64(port - bus.dev_base[slot]), np.int64(size),
                                    is_write, np.int64(value))

    assert pio(0x64, 1, True, 0xFE) == (0, RESET)
    pio(0x70, 1, True, 0x0D)
    assert pio(0x71, 1, False)[0] == 0x80
    pio(0x510, 2, True, f.KEY_NB_CPUS)
    assert pio(0x511, 1, False)[0] == 2
    pio(0xCF8, 4, True, 0x80000000)
    assert pio(0xCFC, 4, False)[0] == 0x12378086
    a = pio(0x608, 4, False)[0]
    assert 0 <= a <= pm.PM_TIMER_MASK
    assert pio(0x604, 2, True, pm.SLP_EN)[1] == POWEROFF


def test_devices_detach_and_free_their_ports(bus):
    devs = [k.I8042(), c.Cmos(tsc_khz=10**6), f.FwCfg(), p.PciHost(), pm.PmTimer(tsc_khz=10**6)]
    for d in devs:
        d.attach(bus)
    assert all(bus.port_map[port] for port in (0x60, 0x61, 0x64, 0x70, 0x71, 0x510, 0x511,
                                               0xCF8, 0xCFF, 0x600, 0x60B))
    with pytest.raises(Exception, match="overlap"):
        c.Cmos(tsc_khz=10**6).attach(bus)
    for d in devs:
        d.detach(bus)
    assert not bus.port_map.any() and not bus.slots
    k.I8042(port_b=False).attach(bus)
    assert bus.port_map[0x61] == 0
