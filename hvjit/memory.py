"""Guest memory: segments of host memory mapped into guest-physical space.

Kept apart from the VM's memory-map management (after rust-vmm's vm-memory): a
``GuestMemory`` only reads and writes by guest-physical address, with range checks, through
numpy views of each segment. Unmapped guest-physical ranges are MMIO.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .errors import GuestMemoryError, MemoryMapError, ObjectDestroyedError

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20


@dataclass(eq=False)
class MemorySegment:
    """One contiguous run of guest-physical memory backed by anonymous host memory."""

    gpa: int
    size: int
    slot: int
    readonly: bool
    name: str
    host_address: int
    array: np.ndarray  # uint8 view of the whole segment
    handle: int = 0  # the session's handle for it
    # Pages the host wrote (or handed out a writable view of) since dirty tracking last
    # looked: KVM's dirty log sees only the guest's writes. None while nobody tracks.
    host_dirty: Optional[np.ndarray] = None

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


class GuestMemory:
    """The guest-physical address space of one VM, as seen from the host."""

    def __init__(self):
        # gpa -> (the guest's byte, the byte the CPU sees): software breakpoints.
        self.patches: dict[int, tuple[int, int]] = {}
        self._segments: list[MemorySegment] = []
        self.version = 0  # counts layout changes: what a cached view of the layout checks
        self._closed = False
        self._window = None  # (segments, mem, segs) of the last host_window()

    # ---- layout ----------------------------------------------------------------------------

    @property
    def segments(self) -> tuple[MemorySegment, ...]:
        return tuple(self._segments)

    @property
    def size(self) -> int:
        """Bytes of guest RAM (all segments)."""
        return sum(s.size for s in self._segments)

    def check_new_segment(self, gpa: int, size: int) -> None:
        check_segment(gpa, size, self._segments)

    def _add(self, segment: MemorySegment) -> None:
        self._segments.append(segment)
        self._segments.sort(key=lambda s: s.gpa)
        self.version += 1

    def _remove(self, segment: MemorySegment) -> None:
        self._segments.remove(segment)
        self.version += 1

    def _close(self) -> None:
        self._closed = True
        self._segments.clear()
        self.version += 1
        self._window = None

    # ---- access ----------------------------------------------------------------------------

    def find(self, gpa: int, length: int = 1) -> MemorySegment:
        """The segment holding ``[gpa, gpa+length)`` whole, or ``GuestMemoryError``."""
        if self._closed:
            raise ObjectDestroyedError("guest memory of a destroyed VM")
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest-physical range {gpa:#x}+{length:#x}")
        for s in self._segments:
            if s.contains(gpa, max(length, 1)):
                return s
        raise GuestMemoryError(
            f"guest-physical range {gpa:#x}-{gpa + length:#x} is not inside guest memory "
            f"({', '.join(f'{s.gpa:#x}-{s.end:#x}' for s in self._segments) or 'none'})"
        )

    def is_mapped(self, gpa: int, length: int = 1) -> bool:
        return any(s.contains(gpa, max(length, 1)) for s in self._segments)

    def view(self, gpa: int, length: int) -> np.ndarray:
        """A writable uint8 numpy view of guest memory (no copy)."""
        return self._view(gpa, length, written=True)

    def _view(self, gpa: int, length: int, written: bool) -> np.ndarray:
        s = self.find(gpa, length)
        off = gpa - s.gpa
        if written and s.host_dirty is not None and length > 0:
            s.host_dirty[off // PAGE_SIZE : (off + length - 1) // PAGE_SIZE + 1] = True
        return s.array[off : off + length]

    def read_raw(self, gpa: int, length: int) -> bytes:
        """A copy of guest memory as the CPU sees it (software breakpoints included)."""
        return self._view(gpa, length, written=False).tobytes()

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of guest memory, as the guest wrote it (software breakpoints hidden)."""
        data = self._view(gpa, length, written=False).tobytes()
        if self.patches:
            data = self._unpatch(gpa, data)
        return data

    def write(self, gpa: int, data) -> None:
        buf = np.frombuffer(bytes(data) if not isinstance(data, (bytes, bytearray)) else data, np.uint8)
        view = self.view(gpa, len(buf))
        view[:] = buf
        for at in self._patched_in(gpa, len(buf)):  # keep the breakpoint, remember the new byte
            self.patches[at] = (int(buf[at - gpa]), self.patches[at][1])
            view[at - gpa] = self.patches[at][1]

    def _patched_in(self, gpa: int, length: int) -> list[int]:
        return [at for at in self.patches if gpa <= at < gpa + length]

    def _unpatch(self, gpa: int, data: bytes) -> bytes:
        out = bytearray(data)
        for at in self._patched_in(gpa, len(data)):
            out[at - gpa] = self.patches[at][0]
        return bytes(out)

    def patch(self, gpa: int, byte: int) -> None:
        """Put ``byte`` at ``gpa`` for the CPU while reads through this object keep seeing
        the original (software breakpoints)."""
        view = self.view(gpa, 1)
        original = self.patches[gpa][0] if gpa in self.patches else int(view[0])
        self.patches[gpa] = (original, byte)
        view[0] = byte

    def unpatch(self, gpa: int) -> None:
        if gpa in self.patches:
            original, _ = self.patches.pop(gpa)
            self.view(gpa, 1)[0] = original

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        self.view(gpa, length)[:] = value

    def _scalar(self, gpa: int, dtype, written: bool = True) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        return self._view(gpa, size, written).view(dtype)

    def read_u8(self, gpa: int) -> int:
        return int(self._scalar(gpa, "<u1", False)[0])

    def read_u16(self, gpa: int) -> int:
        return int(self._scalar(gpa, "<u2", False)[0])

    def read_u32(self, gpa: int) -> int:
        return int(self._scalar(gpa, "<u4", False)[0])

    def read_u64(self, gpa: int) -> int:
        return int(self._scalar(gpa, "<u8", False)[0])

    def write_u8(self, gpa: int, value: int) -> None:
        self._scalar(gpa, "<u1")[0] = value

    def write_u16(self, gpa: int, value: int) -> None:
        self._scalar(gpa, "<u2")[0] = value

    def write_u32(self, gpa: int, value: int) -> None:
        self._scalar(gpa, "<u4")[0] = value

    def write_u64(self, gpa: int, value: int) -> None:
        self._scalar(gpa, "<u8")[0] = value

    def host_window(self) -> tuple[np.ndarray, np.ndarray]:
        """All guest RAM for the page-walk kernels: ``(mem, segs)``, a uint8 array over the
        host memory of every segment and the segment table (uint64 rows: guest-physical start,
        size, offset in ``mem``), so page tables in any segment can be walked.

        With several segments ``mem`` spans the host address range from the lowest segment to
        the end of the highest, gaps included (memory that is not guest RAM, maybe unmapped):
        only offsets the table gives may be touched, which the kernels check. The array keeps
        the segments' memory alive.
        """
        if self._closed:
            raise ObjectDestroyedError("guest memory of a destroyed VM")
        segments = tuple(self._segments)
        cached = self._window
        if cached is not None and cached[0] == segments:
            return cached[1], cached[2]
        if not segments:
            mem, segs = np.zeros(0, np.uint8), np.zeros((0, 3), np.uint64)
        elif len(segments) == 1:
            mem = segments[0].array
            segs = np.array([[segments[0].gpa, segments[0].size, 0]], np.uint64)
        else:
            low = min(s.array.ctypes.data for s in segments)
            high = max(s.array.ctypes.data + s.size for s in segments)
            span: Any = (ctypes.c_uint8 * (high - low)).from_address(low)
            span.segments = tuple(s.array for s in segments)  # keeps the mappings alive
            mem = np.frombuffer(span, np.uint8)
            segs = np.array([[s.gpa, s.size, s.array.ctypes.data - low] for s in segments], np.uint64)
        self._window = (segments, mem, segs)
        return mem, segs

    def flat(self) -> tuple[np.ndarray, int]:
        """The lowest segment as (uint8 array, base gpa): what the page-walk kernels take."""
        s = self.find(self._segments[0].gpa) if self._segments else self.find(0)
        return s.array, s.gpa


def check_segment(gpa: int, size: int, existing) -> None:
    """Refuse a misaligned, out-of-range or overlapping segment."""
    if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
        raise MemoryMapError(
            f"memory segment at {gpa:#x} of {size:#x} bytes: gpa and size must be positive "
            f"multiples of the {PAGE_SIZE:#x}-byte page"
        )
    if gpa < 0 or gpa + size > 1 << 52:
        raise MemoryMapError(f"memory segment at {gpa:#x}+{size:#x} is outside 52-bit physical space")
    for s in existing:
        if gpa < s.end and s.gpa < gpa + size:
            raise MemoryMapError(
                f"memory segment {gpa:#x}-{gpa + size:#x} overlaps {s.name!r} ({s.gpa:#x}-{s.end:#x})"
            )


def validate_layout(layout) -> None:
    """Check a whole list of (gpa, size) before any of it is created."""
    placed: list[MemorySegment] = []
    for gpa, size in layout:
        check_segment(gpa, size, placed)
        placed.append(MemorySegment(gpa, size, -1, False, f"mem@{gpa:#x}", 0, np.empty(0, np.uint8)))


def allocate_segment(size: int) -> tuple[int, np.ndarray]:
    """Anonymous zeroed host memory for a segment: (host address, uint8 view).

    The memory is a Python ``mmap`` owned by the numpy view: it is unmapped when the last view
    goes, so a view a user kept after the VM was destroyed stays valid instead of dangling.
    """
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError) as e:
        raise MemoryMapError(f"cannot allocate {size:#x} bytes of guest memory: {e}") from None
    if size >= HUGE_PAGE_SIZE and hasattr(mmap, "MADV_HUGEPAGE"):
        # Transparent huge pages (where the host's policy is "madvise"): far fewer faults as
        # the guest touches its RAM, and shorter walks for KVM. The kernel aligns large
        # anonymous mappings to 2 MiB by itself.
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    array = np.frombuffer(mm, dtype=np.uint8)
    return array.ctypes.data, array
