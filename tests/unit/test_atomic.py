"""Compare-and-swap on guest RAM (the write-back of emulated locked instructions), no KVM."""

import threading

import pytest

from hvjit import _trampoline as _t
from hvjit.emulation.atomic import cas_block, compare_and_swap, exchange_if_equal
from hvjit.memory import GuestMemory, MemorySegment, allocate_segment


@pytest.fixture
def memory():
    mem = GuestMemory()
    for gpa, size in ((0, 0x10000), (0x100000, 0x1000)):
        host, array = allocate_segment(size)
        mem._add(MemorySegment(gpa, size, 0, False, f"m{gpa:#x}", host, array))
    return mem


@pytest.mark.parametrize(("gpa", "size", "block"), [
    (0x10, 1, (0x10, 1)), (0x11, 2, (0x10, 4)), (0x12, 2, (0x12, 2)), (0x13, 4, (0x10, 8)),
    (0x18, 8, (0x18, 8)), (0x14, 8, (0x10, 16)), (0x1C, 8, None), (0x20, 16, (0x20, 16)), (0x1F, 2, None),
    (0x28, 16, None), (0x2F, 1, (0x2F, 1)),
])
def test_the_smallest_aligned_block(gpa, size, block):
    assert cas_block(gpa, size) == block


def test_swap_only_when_unchanged(memory):
    memory.write(0x100, bytes(range(16)))
    assert compare_and_swap(memory, 0x103, b"\x03\x04\x05", b"abc") is True
    assert memory.read(0x100, 16) == bytes(range(3)) + b"abc" + bytes(range(6, 16))  # neighbours kept
    assert compare_and_swap(memory, 0x103, b"\x03\x04\x05", b"xyz") is False
    assert memory.read(0x103, 3) == b"abc"
    assert compare_and_swap(memory, 0x100, memory.read(0x100, 16), b"Q" * 16) is True  # cmpxchg16b
    assert memory.read(0x100, 16) == b"Q" * 16
    assert compare_and_swap(memory, 0x100000, b"\0" * 8, b"high seg") is True
    assert memory.read(0x100000, 8) == b"high seg"


def test_what_cannot_be_swapped_is_left_alone(memory):
    memory.write(0x200, bytes(32))
    assert compare_and_swap(memory, 0x20E, b"\0" * 4, b"spli") is None  # crosses 16 bytes
    assert compare_and_swap(memory, 0x20000, b"\0" * 4, b"mmio") is None  # not RAM
    memory.patch(0x208, 0xCC)  # a software breakpoint
    assert compare_and_swap(memory, 0x208, b"\0" * 8, b"patched!") is None
    assert memory.read(0x200, 32) == bytes(32)
    with pytest.raises(ValueError):
        compare_and_swap(memory, 0x200, b"\0", b"\0\0")


def test_cmpxchg8b_and_16b_as_one_host_instruction(memory):
    memory.write(0x400, bytes(range(32)))
    found = exchange_if_equal(memory, 0x400, bytes(range(16)), b"N" * 16)  # equal: stored
    assert found == bytes(range(16)) and memory.read(0x400, 16) == b"N" * 16
    found = exchange_if_equal(memory, 0x410, b"\0" * 8, b"M" * 8)  # not equal: what was there
    assert found == bytes(range(16, 24)) and memory.read(0x410, 8) == bytes(range(16, 24))
    assert exchange_if_equal(memory, 0x408, memory.read(0x408, 8), b"E" * 8) == b"N" * 8
    assert memory.read(0x400, 16) == b"N" * 8 + b"E" * 8
    # Where the host's instruction cannot do it, nothing is done (the caller's general path runs)
    assert exchange_if_equal(memory, 0x418, bytes(16), bytes(16)) is None  # 16 bytes not 16-aligned
    assert exchange_if_equal(memory, 0x404, bytes(8), bytes(8)) is None  # not 8-aligned
    assert exchange_if_equal(memory, 0x20000, bytes(8), bytes(8)) is None  # not RAM
    memory.patch(0x41C, 0xCC)
    assert exchange_if_equal(memory, 0x418, memory.read(0x418, 8), bytes(8)) is None  # a breakpoint's byte
    assert exchange_if_equal(memory, 0x400, bytes(4), bytes(4)) is None  # only 8 and 16


def test_the_c_helper_checks_size_and_alignment(memory):
    view = memory.view(0x300, 32)
    old, new = _t.ffi.new("uint8_t[16]"), _t.ffi.new("uint8_t[16]")
    address = view.ctypes.data
    for size, at in ((3, 0), (32, 0), (0, 0), (8, 4), (16, 8)):
        assert _t.lib.hvt_mem_cas(_t.ffi.cast("void *", address + at), size, old, new) < 0
    new[0:8] = b"12345678"
    old[0:8] = b"x" * 8
    assert _t.lib.hvt_mem_cas(_t.ffi.cast("void *", address), 8, old, new) == 0
    assert bytes(old[0:8]) == bytes(8)  # the value found
    assert _t.lib.hvt_mem_cas(_t.ffi.cast("void *", address), 8, old, new) == 1
    assert view[:8].tobytes() == b"12345678"


def test_concurrent_increments_are_not_lost(memory):
    """Threads incrementing one 16-byte word with read / compare-and-swap loops (the GIL
    is released inside the C call): every increment lands."""
    rounds, threads = 4000, 4
    memory.write(0x400, bytes(16))

    def worker():
        done = 0
        while done < rounds:
            old = memory.read(0x400, 16)
            low, high = int.from_bytes(old[:8], "little"), int.from_bytes(old[8:], "little")
            new = (low + 1).to_bytes(8, "little") + (high + 2).to_bytes(8, "little")
            if compare_and_swap(memory, 0x400, old, new):
                done += 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    data = memory.read(0x400, 16)
    assert int.from_bytes(data[:8], "little") == rounds * threads
    assert int.from_bytes(data[8:], "little") == 2 * rounds * threads
