"""ACPI fixed hardware: the PM1a event/control blocks and the PM timer (q35/ICH9 layout).

Ports (from ``base``, 0x600 by default, as QEMU's q35 and SeaBIOS place ICH9's PMBASE):

- ``base+0`` PM1a_STS (16 bits, write 1 to clear), ``base+2`` PM1a_EN (16 bits);
- ``base+4`` PM1a_CNT (16 bits): SCI_EN (bit 0) always reads 1 (there is no SMI_CMD port, so
  the OS finds ACPI already enabled); a write with SLP_EN (bit 13) ends the run
  SUSPENDED/POWEROFF (exit code 0) whatever SLP_TYP is: the DSDT of
  :mod:`hvjit.firmware.acpi` declares only ``\\_S5`` (SLP_TYP 0);
- ``base+8`` PM_TMR: a 24-bit counter at 3.579545 MHz (FADT flag TMR_VAL_EXT clear).

The timer is derived from the host TSC inside the Numba handler (``rdtsc`` of
:mod:`hvjit._jit`): ``ticks = (tsc - tsc_base) * 3579545 / tsc_hz``, never going backwards.
The TSC frequency comes from the constructor (the VM passes KVM's figure) or, by default, a
short measurement (:func:`host_tsc_hz`). Python touches nothing while the guest runs.
"""

from __future__ import annotations

import time

import numpy as np

from .._jit import kernel, rdtsc
from . import kinds
from .bus import PortDevice

DEFAULT_BASE = 0x600
PORT_COUNT = 12
PM1_EVT_OFFSET = 0  # PM1a_EVT_BLK: status (2 bytes) + enable (2 bytes)
PM1_CNT_OFFSET = 4  # PM1a_CNT_BLK: 2 bytes
PM_TMR_OFFSET = 8  # PM_TMR_BLK: 4 bytes
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR_LEN = 4

PM_TIMER_HZ = 3579545
PM_TIMER_MASK = 0xFFFFFF

SCI_EN = 0x0001
SLP_TYP_SHIFT = 10
SLP_EN = 0x2000
PM1_CNT_WRITABLE = 0x1C06  # BM_RLD, GBL_RLS, SLP_TYP; SLP_EN is write-only, SCI_EN fixed
PM1_EN_WRITABLE = 0x0521  # TMR_EN, GBL_EN, PWRBTN_EN, RTC_EN

# State words (0 is kinds.STATE_EXIT_CODE).
S_TSC_HZ = 1
S_TSC_BASE = 2  # TSC value at which the counter read 0
S_PM1_STS = 3
S_PM1_EN = 4
S_PM1_CNT = 5
S_LAST_TICKS = 6  # the largest (unwrapped) tick count handed out: the timer never goes back
S_SLEEP_TYPE = 7  # SLP_TYP of the last SLP_EN write, for the curious


@kernel
def tsc_to_ticks(delta, tsc_hz, rate):
    """``delta * rate / tsc_hz`` without overflowing 64 bits (delta >= 0)."""
    if tsc_hz <= 0 or delta <= 0:
        return np.int64(0)
    q = delta // tsc_hz
    r = delta - q * tsc_hz
    return q * rate + (r * rate) // tsc_hz


@kernel
def pm_ticks(state):
    """The unwrapped PM-timer tick count now (monotonic)."""
    ticks = tsc_to_ticks(rdtsc() - state[S_TSC_BASE], state[S_TSC_HZ], np.int64(PM_TIMER_HZ))
    ticks = max(ticks, state[S_LAST_TICKS])
    state[S_LAST_TICKS] = ticks
    return ticks


@kernel
def pm_timer_io(state, offset, size, is_write, value):
    """An access of ``size`` bytes at ``offset`` from PM_BASE. Returns (value read, action)."""
    act = kinds.ACT_CONTINUE
    if is_write:
        cnt_written = False
        for i in range(size):
            off = offset + i
            byte = (value >> (8 * i)) & 0xFF
            if off == 0 or off == 1:  # PM1_STS: write 1 to clear
                state[S_PM1_STS] &= ~(byte << (8 * off))
            elif off == 2 or off == 3:
                sh = 8 * (off - 2)
                en = (state[S_PM1_EN] & ~(np.int64(0xFF) << sh)) | (byte << sh)
                state[S_PM1_EN] = en & PM1_EN_WRITABLE
            elif off == 4 or off == 5:
                sh = 8 * (off - 4)
                state[S_PM1_CNT] = (state[S_PM1_CNT] & ~(np.int64(0xFF) << sh)) | (byte << sh)
                cnt_written = True
        if cnt_written:
            cnt = state[S_PM1_CNT]
            if cnt & SLP_EN:
                state[S_SLEEP_TYPE] = (cnt >> SLP_TYP_SHIFT) & 7
                state[kinds.STATE_EXIT_CODE] = 0
                act = kinds.ACT_POWEROFF
            state[S_PM1_CNT] = cnt & PM1_CNT_WRITABLE
        return np.int64(0), act
    timer = np.int64(-1)
    if offset + size > PM_TMR_OFFSET and offset < PM_TMR_OFFSET + PM_TMR_LEN:
        timer = pm_ticks(state) & PM_TIMER_MASK
    result = np.int64(0)
    for i in range(size):
        off = offset + i
        byte = np.int64(0xFF)
        if off == 0 or off == 1:
            byte = (state[S_PM1_STS] >> (8 * off)) & 0xFF
        elif off == 2 or off == 3:
            byte = (state[S_PM1_EN] >> (8 * (off - 2))) & 0xFF
        elif off == 4 or off == 5:
            byte = ((state[S_PM1_CNT] | SCI_EN) >> (8 * (off - 4))) & 0xFF
        elif off == 6 or off == 7:
            byte = np.int64(0)
        elif PM_TMR_OFFSET <= off < PM_TMR_OFFSET + PM_TMR_LEN:
            byte = (timer >> (8 * (off - PM_TMR_OFFSET))) & 0xFF
        result |= byte << (8 * i)
    return result, act


_tsc_hz_cache = 0


def host_tsc_hz() -> int:
    """The host TSC frequency in Hz, measured once against the monotonic clock (~50 ms)."""
    global _tsc_hz_cache
    if not _tsc_hz_cache:
        t0, c0 = _bracketed_tsc()
        time.sleep(0.05)
        t1, c1 = _bracketed_tsc()
        # Rounded to kHz, as KVM reports it.
        _tsc_hz_cache = round((c1 - c0) * 1e6 / (t1 - t0)) * 1000
    return _tsc_hz_cache


def _bracketed_tsc() -> tuple[int, int]:
    """(ns, tsc) read together: of a few tries, the one least disturbed by preemption."""
    best = None
    for _ in range(8):
        before = time.perf_counter_ns()
        tsc = rdtsc()
        after = time.perf_counter_ns()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2, tsc)
    assert best is not None
    return best[1], best[2]


class PmTimer(PortDevice):
    """ACPI PM1a event/control blocks and the PM timer at ``base`` (0x600: PM_TMR at 0x608).

    ``tsc_khz``: the host TSC frequency; by default the process GIP's. Keep ``base`` equal to
    the ``pm_base`` given to :func:`hvjit.firmware.acpi.write_acpi_tables`.
    """

    port_io = pm_timer_io
    port_count = PORT_COUNT

    def __init__(self, base: int = DEFAULT_BASE, *, tsc_khz: int | None = None, name: str = "acpi-pm"):
        if not 0 < base <= 0x10000 - PORT_COUNT:
            raise ValueError(f"PM base {base:#x} leaves no room for {PORT_COUNT} ports")
        if tsc_khz is not None and tsc_khz <= 0:
            raise ValueError(f"tsc_khz must be positive, got {tsc_khz}")
        super().__init__(base, name)
        self.base = base
        self.tsc_khz = tsc_khz

    @property
    def timer_port(self) -> int:
        return self.base + PM_TMR_OFFSET

    def attach(self, bus, memory=None) -> None:
        tsc_hz = self.tsc_khz * 1000 if self.tsc_khz else host_tsc_hz()
        super().attach(bus, memory)
        state = bus.state(self.slot)
        state[S_TSC_HZ] = tsc_hz
        state[S_TSC_BASE] = rdtsc()

    def read_timer(self) -> int:
        """The 24-bit counter as the guest would read it now."""
        return int(pm_timer_io(self.bus.state(self.slot), PM_TMR_OFFSET, 4, False, 0)[0])
