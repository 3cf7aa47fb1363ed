"""The MSR filter hvjit builds, read back the way KVM reads it (kvm_msr_allowed)."""

import numpy as np
import pytest

from hvjit.errors import MsrTrapError
from hvjit.msr_filter import FILTER_READ, FILTER_WRITE, MAX_RANGE_MSRS, MsrTraps, build_filter


def allowed(filt, bitmaps, index, op):
    """KVM's rule: the first range whose flags include the operation and that covers the MSR
    decides by its bit; an MSR no range covers is allowed (default allow)."""
    by_address = {b.ctypes.data: b for b in bitmaps}
    for r in filt[0]["ranges"]:
        if not int(r["flags"]) & op:
            continue
        base, n = int(r["base"]), int(r["nmsrs"])
        if base <= index < base + n:
            bits = np.unpackbits(by_address[int(r["bitmap"])], bitorder="little")
            return bool(bits[index - base])
    return True


def check(traps, probes):
    filt, bitmaps = build_filter(traps)
    for index in probes:
        assert allowed(filt, bitmaps, index, FILTER_READ) == (index not in traps.reads), hex(index)
        assert allowed(filt, bitmaps, index, FILTER_WRITE) == (index not in traps.writes), hex(index)
    return filt


def test_exactly_the_trapped_msrs_are_denied():
    trapped = {0x10, 0x174, 0x277, 0xC0000080, 0xC0000081, 0x4B564D00}
    probes = set(range(0, 0x300)) | {0xC000007F, 0xC0000080, 0xC0000081, 0xC0000082, 0x4B564D00, 0x4B564D01}
    filt = check(MsrTraps(set(trapped), set(trapped)), probes)
    flags = [int(r["flags"]) for r in filt[0]["ranges"] if r["flags"]]
    assert flags == [FILTER_READ | FILTER_WRITE] * 3  # 0x10..0x277, 0xc000008x, 0x4b564d00


def test_reads_and_writes_are_trapped_separately():
    check(MsrTraps({0x174, 0x175}, {0x175, 0x176}), range(0x170, 0x180))


def test_msrs_further_apart_than_a_bitmap_get_their_own_ranges():
    filt = check(MsrTraps({0, MAX_RANGE_MSRS}, {0, MAX_RANGE_MSRS}), [0, 1, MAX_RANGE_MSRS - 1, MAX_RANGE_MSRS])
    assert sum(1 for r in filt[0]["ranges"] if r["flags"]) == 2


def test_too_many_ranges_is_a_typed_error():
    spread = {i * MAX_RANGE_MSRS for i in range(17)}
    with pytest.raises(MsrTrapError, match="17 filter ranges"):
        build_filter(MsrTraps(spread, spread))


def test_no_traps_is_an_allow_everything_filter():
    filt, _ = build_filter(MsrTraps())
    assert not filt[0]["ranges"]["flags"].any() and filt[0]["flags"] == 0
