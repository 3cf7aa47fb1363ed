"""Host-side page-table builders for tests, benchmarks and hand-made guests.

- ``PageTableBuilder``: maps chosen pages in any paging mode, allocating tables from an area
  of guest memory; intermediate entries are permissive (P, R/W, U/S) so the leaf's flags
  decide, and ``entry_gpa`` lets a caller tweak any level afterwards.
- ``random_page_tables``: a random *graph* of tables (every entry points at a random table
  or page), so any address walks through random entries with random flags: the raw material
  for randomized comparisons and for throughput benchmarks.
"""

from __future__ import annotations

import numpy as np

from hvjit.kernels.pagewalk import PagingMode

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_XD = 1 << 63

_LEVELS = {PagingMode.BITS32: 2, PagingMode.PAE: 3, PagingMode.LEVEL4: 4, PagingMode.LEVEL5: 5}


def _entry_bytes(mode: PagingMode) -> int:
    return 4 if mode == PagingMode.BITS32 else 8


def _index(mode: PagingMode, gla: int, level: int) -> int:
    if mode == PagingMode.BITS32:
        return (gla >> (12 + 10 * (level - 1))) & 0x3FF
    if mode == PagingMode.PAE and level == 3:
        return (gla >> 30) & 3
    return (gla >> (12 + 9 * (level - 1))) & 0x1FF


class PageTableBuilder:
    """Builds page tables for ``mode`` in ``mem`` (guest-physical ``mem_base_gpa`` onward).

    Tables are taken one 4 KiB page at a time from ``table_area_gpa`` upward (zeroed first).
    ``cr3`` is the value to load (the PAE PDPT sits at the start of its own page).
    """

    def __init__(self, mem: np.ndarray, mode: PagingMode, *, table_area_gpa: int,
                 mem_base_gpa: int = 0):
        if mode == PagingMode.FLAT:
            raise ValueError("FLAT mode has no page tables")
        self.mem = mem
        self.mode = PagingMode(mode)
        self.mem_base_gpa = mem_base_gpa
        self._next_table = table_area_gpa
        self.cr3 = self._new_table()

    def _new_table(self) -> int:
        gpa = self._next_table
        offset = gpa - self.mem_base_gpa
        if gpa % 4096 or offset < 0 or offset + 4096 > self.mem.size:
            raise ValueError(f"no room for a page table at {gpa:#x}")
        self.mem[offset:offset + 4096] = 0
        self._next_table += 4096
        return gpa

    def read_entry(self, gpa: int) -> int:
        offset = gpa - self.mem_base_gpa
        return int.from_bytes(self.mem[offset:offset + _entry_bytes(self.mode)].tobytes(), "little")

    def write_entry(self, gpa: int, value: int) -> None:
        size = _entry_bytes(self.mode)
        offset = gpa - self.mem_base_gpa
        self.mem[offset:offset + size] = np.frombuffer(value.to_bytes(size, "little"), np.uint8)

    def entry_gpa(self, gla: int, level: int) -> int:
        """Address of the entry used at ``level`` (1 = PTE) for ``gla``; the path must exist."""
        table = self.cr3 & ~0x1F if self.mode == PagingMode.PAE else self.cr3 & ~0xFFF
        for lvl in range(_LEVELS[self.mode], level - 1, -1):
            gpa = table + _index(self.mode, gla, lvl) * _entry_bytes(self.mode)
            if lvl == level:
                return gpa
            entry = self.read_entry(gpa)
            if not entry & PTE_P or (lvl != 3 or self.mode != PagingMode.PAE) and entry & PTE_PS:
                raise ValueError(f"no level-{level} entry for {gla:#x}")
            table = entry & 0x000F_FFFF_FFFF_F000
        raise AssertionError("unreachable")

    def map(self, gla: int, gpa: int, *, page_size: int = 4096, writable: bool = True,
            user: bool = True, no_execute: bool = False, extra_bits: int = 0) -> int:
        """Map one page; returns the leaf entry's address. ``extra_bits`` are or-ed into it."""
        leaf_level = {4096: 1, 2 << 20: 2, 4 << 20: 2, 1 << 30: 3}[page_size]
        if (page_size == 4 << 20) != (self.mode == PagingMode.BITS32 and leaf_level == 2):
            raise ValueError(f"page size {page_size:#x} not available in {self.mode.name}")
        if gla % page_size or gpa % page_size:
            raise ValueError("unaligned mapping")
        leaf = PTE_P | extra_bits
        leaf |= PTE_RW if writable else 0
        leaf |= PTE_US if user else 0
        leaf |= PTE_XD if no_execute else 0
        if leaf_level > 1:
            leaf |= PTE_PS
        if self.mode == PagingMode.BITS32 and leaf_level == 2:
            leaf |= (gpa & 0xFFC0_0000) | ((gpa >> 32) << 13)  # PSE-36 high bits
        else:
            leaf |= gpa
        table = self.cr3 & ~0x1F if self.mode == PagingMode.PAE else self.cr3
        for level in range(_LEVELS[self.mode], leaf_level, -1):
            entry_gpa = table + _index(self.mode, gla, level) * _entry_bytes(self.mode)
            entry = self.read_entry(entry_gpa)
            if not entry & PTE_P:
                pdpte = self.mode == PagingMode.PAE and level == 3
                entry = self._new_table() | (PTE_P if pdpte else PTE_P | PTE_RW | PTE_US)
                self.write_entry(entry_gpa, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        leaf_gpa = table + _index(self.mode, gla, leaf_level) * _entry_bytes(self.mode)
        self.write_entry(leaf_gpa, leaf)
        return leaf_gpa


def random_page_tables(rng: np.random.Generator, mode: PagingMode, *, tables: int = 64,
                       mem_base_gpa: int = 0, present: float = 0.9, large: float = 0.15,
                       writable: float = 0.8, user: float = 0.8, no_execute: float = 0.15,
                       reserved: float = 0.03, outside: float = 0.02, maxphyaddr: int = 52):
    """A random table graph in a fresh memory of ``tables`` pages: returns ``(mem, cr3)``.

    Each entry is present with probability ``present`` and points at a random table page,
    or (``outside``) at a page beyond the memory. Entries with PS set (``large``) point at a
    random 1 GiB- or 2 MiB-aligned frame below 2**maxphyaddr (4 MiB with PSE-36 bits in
    BITS32 mode) so they make valid large leaves where PS counts. ``reserved`` sets one
    random bit from 9..62 (9..31 in BITS32 mode) which may or may not be reserved where the
    entry is used; R/W, U/S, XD, A and D are random.
    """
    mode = PagingMode(mode)
    size = _entry_bytes(mode)
    count = tables * 4096 // size
    top = 32 if mode == PagingMode.BITS32 else maxphyaddr
    table_gpa = mem_base_gpa + rng.integers(0, tables, count, dtype=np.uint64) * np.uint64(4096)
    # Beyond the end of memory, below 4 GiB so 32-bit entries can hold it.
    end = mem_base_gpa + tables * 4096
    far = rng.integers(end >> 12, 1 << 20, count, dtype=np.uint64) << np.uint64(12)
    address = np.where(rng.random(count) < outside, far, table_gpa)
    is_large = rng.random(count) < large
    if mode == PagingMode.BITS32:
        frame_4m = rng.integers(0, 1 << 10, count, dtype=np.uint64) << np.uint64(22)
        pse36 = rng.integers(0, 1 << 8, count, dtype=np.uint64) << np.uint64(13)
        large_address = frame_4m | pse36
    else:
        align = np.where(rng.random(count) < 0.5, 30, 21).astype(np.uint64)
        frames = rng.integers(0, 1 << top, count, dtype=np.uint64)
        large_address = (frames >> align) << align
    address = np.where(is_large, large_address, address)

    def bits(probability: float, bit: int) -> np.ndarray:
        return np.where(rng.random(count) < probability, np.uint64(bit), np.uint64(0))

    entries = address | bits(present, PTE_P) | bits(writable, PTE_RW) | bits(user, PTE_US)
    entries |= bits(0.5, PTE_A) | bits(0.3, PTE_D) | bits(0.2, PTE_G)
    entries |= np.where(is_large, np.uint64(PTE_PS), np.uint64(0))
    if mode != PagingMode.BITS32:
        entries |= bits(no_execute, PTE_XD)
    high_bit = 31 if mode == PagingMode.BITS32 else 62
    stray = np.uint64(1) << rng.integers(9, high_bit + 1, count, dtype=np.uint64)
    entries |= np.where(rng.random(count) < reserved, stray, np.uint64(0))

    if mode == PagingMode.BITS32:
        mem = entries.astype(np.uint32).view(np.uint8)
    else:
        mem = entries.view(np.uint8)
    mem = np.ascontiguousarray(mem)
    root = mem_base_gpa + int(rng.integers(0, tables)) * 4096
    if mode != PagingMode.PAE:
        return mem, root | int(rng.integers(0, 4096))  # low CR3 bits (PCID, PWT, PCD) are noise
    # PAE: a PDPT anywhere 32-byte aligned; its PDPTEs get the reserved bits that PDPTEs have
    # (R/W, U/S, A, D, PS, G, XD) cleared, except with probability ``reserved``.
    cr3 = root + int(rng.integers(0, 128)) * 32
    pdpt = mem[cr3 - mem_base_gpa:cr3 - mem_base_gpa + 32].view(np.uint64)
    keep = rng.random(4) < reserved
    pdpt[~keep] &= np.uint64(~(0x1E6 | PTE_G | PTE_XD) & ((1 << 64) - 1))
    return mem, cr3
