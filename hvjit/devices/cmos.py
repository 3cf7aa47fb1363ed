"""CMOS RAM and the MC146818 real-time clock at ports 0x70 (index) / 0x71 (data).

The 128 bytes of CMOS RAM live in the device's buffer row; the clock registers are computed
inside the Numba handler at every read: the time is ``base_ns + elapsed host TSC`` (the base
wall-clock time and TSC are taken at attach; the TSC is read with ``hvjit._jit.rdtsc``
inside the handler), so Python never needs to refresh anything while the guest runs. A guest
that writes the time registers moves the clock: the difference is kept as an offset.

- index port 0x70: bit 7 is the NMI-disable bit (remembered, masked off the index), reads 0xff;
- 0x00/0x02/0x04/0x06/0x07/0x08/0x09/0x32: seconds, minutes, hours, weekday (1 = Sunday),
  day, month, year, century; BCD unless REG_B.DM (bit 2), 24-hour unless REG_B.24H (bit 1) is
  cleared (then hours 1-12 with bit 7 = PM). The time is UTC, as PC VMMs give Linux guests;
- REG_A (0x0a): UIP (bit 7) reads 1 during the last 244 us of each second, as on hardware
  (guests that synchronise on its falling edge terminate); the rest is stored;
- REG_B (0x0b) defaults to 0x02 (24 hours, BCD); REG_C reads 0 (no interrupt sources);
  REG_D reads 0x80 (valid RAM and time);
- memory size registers from the VM's RAM (QEMU's layout): 0x15/0x16 base memory KiB,
  0x17/0x18 and 0x30/0x31 KiB above 1 MiB (max 65535), 0x34/0x35 64 KiB units above 16 MiB
  below 4 GiB, 0x5b-0x5d 64 KiB units above 4 GiB, 0x5f CPU count - 1; 0x2e/0x2f checksum.
"""

from __future__ import annotations

import time

import numpy as np

from .._jit import kernel, rdtsc
from . import kinds
from .bus import PortDevice
from .pm_timer import host_tsc_hz, tsc_to_ticks

DEFAULT_PORT = 0x70
PORT_COUNT = 2
CMOS_SIZE = 128

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_DM = 0x04  # binary, not BCD
REG_B_24H = 0x02
REG_D_VRT = 0x80
HOUR_PM = 0x80
UIP_NS = 244_000

NS = 1_000_000_000

# State words (0 is kinds.STATE_EXIT_CODE).
S_INDEX = 1
S_NMI_DISABLED = 2
S_BASE_NS = 3  # Unix time (ns) when the TSC read S_TSC_BASE
S_TSC_BASE = 4
S_TSC_HZ = 5
S_OFFSET_S = 6  # seconds the guest moved the clock by


@kernel
def civil_from_days(days):
    """(year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian)."""
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y = yoe + era * 400
    if m <= 2:
        y += 1
    return y, m, d


@kernel
def days_from_civil(y, m, d):
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


@kernel
def now_ns(state):
    """The guest's wall-clock time (Unix ns), before the guest's own offset."""
    return state[S_BASE_NS] + tsc_to_ticks(rdtsc() - state[S_TSC_BASE], state[S_TSC_HZ], np.int64(NS))


@kernel
def _to_bcd(v):
    return ((v // 10) << 4) | (v % 10)


@kernel
def _from_bcd(v):
    return ((v >> 4) & 0xF) * 10 + (v & 0xF)


@kernel
def _time_field(secs, index):
    """The binary value of a clock register at Unix time ``secs`` (hours 0-23)."""
    days = secs // 86400
    sod = secs - days * 86400
    if index == REG_SECONDS:
        return sod % 60
    if index == REG_MINUTES:
        return (sod // 60) % 60
    if index == REG_HOURS:
        return sod // 3600
    if index == REG_WEEKDAY:
        return (days + 4) % 7 + 1  # 1970-01-01 was a Thursday; Sunday is 1
    y, m, d = civil_from_days(days)
    if index == REG_DAY:
        return d
    if index == REG_MONTH:
        return m
    if index == REG_YEAR:
        return y % 100
    return (y // 100) % 100  # REG_CENTURY


@kernel
def _is_clock_register(index):
    return (index == REG_SECONDS or index == REG_MINUTES or index == REG_HOURS
            or index == REG_WEEKDAY or index == REG_DAY or index == REG_MONTH
            or index == REG_YEAR or index == REG_CENTURY)


@kernel
def _read_register(state, buf, index):
    if index < 0 or index >= CMOS_SIZE:
        return np.int64(0xFF)
    if _is_clock_register(index):
        secs = now_ns(state) // NS + state[S_OFFSET_S]
        v = _time_field(secs, index)
        reg_b = np.int64(buf[REG_B])
        pm = np.int64(0)
        if index == REG_HOURS and not (reg_b & REG_B_24H):
            if v >= 12:
                pm = np.int64(HOUR_PM)
            v = v % 12
            if v == 0:
                v = 12
        if not (reg_b & REG_B_DM):
            v = _to_bcd(v)
        return v | pm
    if index == REG_A:
        v = np.int64(buf[REG_A]) & 0x7F
        if now_ns(state) % NS >= NS - UIP_NS:
            v |= REG_A_UIP
        return v
    if index == REG_C:
        return np.int64(0)
    if index == REG_D:
        return np.int64(REG_D_VRT)
    return np.int64(buf[index])


@kernel
def _write_register(state, buf, index, value):
    if index < 0 or index >= CMOS_SIZE:
        return
    if index == REG_C or index == REG_D:
        return  # read-only
    if index == REG_A:
        buf[REG_A] = value & 0x7F  # UIP is read-only
        return
    if not _is_clock_register(index):
        buf[index] = value
        return
    if index == REG_WEEKDAY:
        return  # derived from the date
    reg_b = np.int64(buf[REG_B])
    pm = False
    if index == REG_HOURS and not (reg_b & REG_B_24H):
        pm = (value & HOUR_PM) != 0
        value &= 0x7F
    v = value if reg_b & REG_B_DM else _from_bcd(value)
    if index == REG_HOURS and not (reg_b & REG_B_24H):
        v = v % 12 + (12 if pm else 0)
    cur = now_ns(state) // NS + state[S_OFFSET_S]
    days = cur // 86400
    sod = cur - days * 86400
    hh = sod // 3600
    mm = (sod // 60) % 60
    ss = sod % 60
    y, m, d = civil_from_days(days)
    if index == REG_SECONDS:
        ss = min(v, 59)
    elif index == REG_MINUTES:
        mm = min(v, 59)
    elif index == REG_HOURS:
        hh = min(v, 23)
    elif index == REG_DAY:
        d = max(1, min(v, 31))
    elif index == REG_MONTH:
        m = max(1, min(v, 12))
    elif index == REG_YEAR:
        y = (y // 100) * 100 + min(v, 99)
    else:  # REG_CENTURY
        y = min(v, 99) * 100 + y % 100
    new = days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60 + ss
    state[S_OFFSET_S] += new - cur


@kernel
def cmos_io(state, buf, offset, size, is_write, value):
    """An access at ``offset`` from 0x70; each byte lane is one port. Returns (value, action)."""
    result = np.int64(0)
    for i in range(size):
        off = offset + i
        byte = (value >> (8 * i)) & 0xFF
        if off == 0:
            if is_write:
                state[S_INDEX] = byte & 0x7F
                state[S_NMI_DISABLED] = byte >> 7
            else:
                result |= np.int64(0xFF) << (8 * i)
        elif off == 1:
            index = state[S_INDEX] & 0x7F
            if is_write:
                _write_register(state, buf, index, byte)
            else:
                result |= _read_register(state, buf, index) << (8 * i)
        elif not is_write:
            result |= np.int64(0xFF) << (8 * i)
    return result, kinds.ACT_CONTINUE


def memory_registers(below_4g: int, above_4g: int = 0, cpus: int = 1) -> dict[int, int]:
    """The CMOS memory-size bytes for a PC with that much RAM (QEMU's and SeaBIOS's layout)."""
    regs = {}
    base_kib = min(640, below_4g // 1024)
    ext_kib = min(max(below_4g // 1024 - 1024, 0), 0xFFFF)
    over_16m = min(max(below_4g - (16 << 20), 0) // 65536, 0xFFFF)
    over_4g = min(above_4g // 65536, 0xFFFFFF)
    for lo, v in ((0x15, base_kib), (0x17, ext_kib), (0x30, ext_kib), (0x34, over_16m)):
        regs[lo], regs[lo + 1] = v & 0xFF, v >> 8
    regs[0x5B], regs[0x5C], regs[0x5D] = over_4g & 0xFF, (over_4g >> 8) & 0xFF, over_4g >> 16
    regs[0x5F] = max(cpus - 1, 0) & 0xFF
    return regs


def ram_split(memory) -> tuple[int, int]:
    """(bytes of RAM below 4 GiB, bytes above) of a GuestMemory."""
    below = above = 0
    for seg in memory.segments:
        if seg.readonly:
            continue  # ROM is not RAM
        start, end = seg.gpa, seg.gpa + seg.size
        below += max(0, min(end, 1 << 32) - start)
        above += max(0, end - max(start, 1 << 32))
    return below, above


class Cmos(PortDevice):
    """CMOS RAM + RTC at 0x70/0x71.

    ``ram_below_4g``/``ram_above_4g``: RAM sizes for the memory registers; by default taken
    from the ``memory`` given to :meth:`attach` (0 without one). ``cpus`` fills 0x5f.
    ``tsc_khz``: host TSC frequency (default: the process GIP's). ``time_ns``: the Unix time
    the clock starts at (default: now).
    """

    port_io = cmos_io
    port_count = PORT_COUNT

    def __init__(self, *, ram_below_4g: int | None = None, ram_above_4g: int | None = None,
                 cpus: int = 1, tsc_khz: int | None = None, time_ns: int | None = None,
                 port: int = DEFAULT_PORT, name: str = "cmos"):
        super().__init__(port, name)
        self.ram_below_4g = ram_below_4g
        self.ram_above_4g = ram_above_4g
        self.cpus = cpus
        self.tsc_khz = tsc_khz
        self.time_ns = time_ns

    def attach(self, bus, memory=None) -> None:
        below, above = ram_split(memory) if memory is not None else (0, 0)
        if self.ram_below_4g is not None:
            below = self.ram_below_4g
        if self.ram_above_4g is not None:
            above = self.ram_above_4g
        tsc_hz = self.tsc_khz * 1000 if self.tsc_khz else host_tsc_hz()
        super().attach(bus, memory)
        buf = bus.buffer(self.slot)
        buf[:CMOS_SIZE] = 0
        buf[REG_A] = REG_A_DEFAULT
        buf[REG_B] = REG_B_24H
        buf[0x14] = 0x02  # equipment byte: math coprocessor present
        for reg, v in memory_registers(below, above, self.cpus).items():
            buf[reg] = v
        checksum = int(buf[0x10:0x2E].sum()) & 0xFFFF
        buf[0x2E], buf[0x2F] = checksum >> 8, checksum & 0xFF
        state = bus.state(self.slot)
        state[S_TSC_HZ] = tsc_hz
        state[S_TSC_BASE] = rdtsc()
        state[S_BASE_NS] = self.time_ns if self.time_ns is not None else time.time_ns()
        state[S_OFFSET_S] = 0

    def buffer_changes(self, saved: np.ndarray) -> list[tuple[int, int]]:
        return [(0, CMOS_SIZE)]  # the guest writes CMOS RAM only

    def read(self, index: int) -> int:
        """A register as the guest reads it (for tests and monitors)."""
        return int(_read_register(self.bus.state(self.slot), self.bus.buffer(self.slot), np.int64(index)))
