"""Locked read-modify-writes on guest RAM.

An instruction hvjit emulates reads guest memory, computes, and writes back; other vCPUs run
on the same memory meanwhile. For a locked instruction (a LOCK prefix, cmpxchg8b/16b) the
write-back is a compare-and-swap against the bytes the instruction read
(``hvt_mem_cas``: the CPU's own ``lock cmpxchg``/``cmpxchg16b``): when they changed in
between, the caller runs the instruction again on the new value, as the CPU's locked
operation would have seen it.

A CAS covers a naturally aligned block of 1 to 16 bytes: an operand inside one is swapped as
that block (its neighbours compared and kept). One that crosses a 16-byte boundary, or is not
RAM, or holds a software breakpoint, cannot be swapped: the caller writes it plainly, as
KVM's emulator does for a split locked access.

cmpxchg8b/16b need no such loop: their operation is a compare-and-swap, so
:func:`exchange_if_equal` runs it as the host's own instruction on aligned RAM. Under a vCPU
that keeps changing the word (a ``lock xadd`` loop run by KVM), a read-compute-swap could lose
the race a thousand times in a row; the host's instruction cannot.
"""

from __future__ import annotations

from typing import Optional

from .. import _trampoline as _t
from ..errors import GuestMemoryError, HvjitError

MAX_BLOCK = 16
NEIGHBOUR_RETRIES = 64  # bytes next to the operand, in the same block, changing under us


def cas_block(gpa: int, size: int) -> Optional[tuple[int, int]]:
    """(start, width) of the smallest naturally aligned block of at most 16 bytes holding
    ``[gpa, gpa + size)``, None if there is none."""
    width = 1
    while width < size or gpa // width != (gpa + size - 1) // width:
        width *= 2
        if width > MAX_BLOCK:
            return None
    return gpa - gpa % width, width


def _ram_block(memory, start: int, width: int):
    """The host address of guest RAM ``[start, start + width)`` for ``hvt_mem_cas``, or None
    when a CAS cannot be done there: not RAM (MMIO), split over segments, or a breakpoint's
    byte inside (the guest's value lives in the patch table)."""
    try:
        view = memory.view(start, width)
    except GuestMemoryError:
        return None
    if any(start <= at < start + width for at in memory.patches):
        return None
    return view


def _cas(view, width: int, old, new, start: int) -> int:
    rc = _t.lib.hvt_mem_cas(_t.ffi.cast("void *", view.ctypes.data), width, old, new)
    if rc < 0:
        raise HvjitError(f"hvt_mem_cas refused {width} bytes at guest-physical {start:#x}: {_t.errno_name(rc)}")
    return rc


def exchange_if_equal(memory, gpa: int, expected: bytes, desired: bytes) -> Optional[bytes]:
    """cmpxchg8b/16b's own operation at guest-physical ``gpa``, done by the host CPU's: store
    ``desired`` if the naturally aligned 8 or 16 bytes there equal ``expected``. Returns what
    they held at that instant (``expected`` when stored); None when not possible here (not
    RAM, a breakpoint's byte, not aligned), nothing done. No retry can be needed: unlike a
    read, a computation and a compare-and-swap, nothing can change in between."""
    size = len(expected)
    if size not in (8, 16) or len(desired) != size or gpa % size:
        return None
    view = _ram_block(memory, gpa, size)
    if view is None:
        return None
    seen = _t.ffi.new("uint8_t[16]")
    seen[0:size] = expected
    new = _t.ffi.new("uint8_t[16]")
    new[0:size] = desired
    _cas(view, size, seen, new, gpa)
    return bytes(_t.ffi.buffer(seen, size))


def compare_and_swap(memory, gpa: int, expected: bytes, desired: bytes) -> Optional[bool]:
    """Store ``desired`` at guest-physical ``gpa`` if the bytes there still equal
    ``expected``, atomically. True: stored; False: they had changed (nothing stored); None:
    not possible here (see the module doc), nothing done."""
    size = len(expected)
    if size != len(desired) or size == 0:
        raise ValueError("expected and desired must be the same, non-zero length")
    block = cas_block(gpa, size)
    if block is None:
        return None
    start, width = block
    view = _ram_block(memory, start, width)
    if view is None:
        return None
    at = gpa - start
    old = _t.ffi.new("uint8_t[16]")
    new = _t.ffi.new("uint8_t[16]")
    for _ in range(NEIGHBOUR_RETRIES):
        current = view.tobytes()
        if current[at:at + size] != expected:
            return False
        old[0:width] = current
        new[0:width] = current[:at] + desired + current[at + size:]
        if _cas(view, width, old, new, start) == 1:
            return True
    return False  # the block keeps changing: let the caller start the instruction over
