"""Guest page-walk kernels against a slow reference written from the SDM (Vol. 3, ch. 4).

The reference below shares no code with the kernels: it reads entries as Python ints, tests
reserved bits one bit at a time and states the access rules the way SDM 4.6 words them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvjit.benchmarks.pagetables import (
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    PageTableBuilder,
    random_page_tables,
)
from hvjit.errors import GuestMemoryError
from hvjit.kernels import pagewalk as pw
from hvjit.kernels.pagewalk import Access, PagingMode, WalkStatus

PG, WP = 1 << 31, 1 << 16
PSE, PAE, LA57, SMEP, SMAP = 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21
NXE, LMA, LME = 1 << 11, 1 << 10, 1 << 8
AC = 1 << 18
ERR_P, ERR_W, ERR_U, ERR_RSVD, ERR_ID = 1, 2, 4, 8, 16

# ---------------------------------------------------------------------------------------------
# The reference walker.


class _Outside(Exception):
    def __init__(self, address):
        self.address = address


def _bit(value, n):
    return (value >> n) & 1


def _any_bit(value, low, high):
    """Whether any of bits high..low (inclusive) is set."""
    return any(_bit(value, n) for n in range(low, high + 1))


def reference_walk(mem, gla, *, mode, cr3, cr0, cr4, efer, rflags, cpl, access,
                   implicit=False, set_ad=False, maxphyaddr=52, base=0):
    """Returns (status, gpa, error_code); applies A/D updates to ``mem`` on success."""

    def read(address, size):
        if address < base or address + size > base + len(mem):
            raise _Outside(address)
        return int.from_bytes(mem[address - base:address - base + size].tobytes(), "little")

    def write(address, size, value):
        mem[address - base:address - base + size] = np.frombuffer(
            value.to_bytes(size, "little"), np.uint8)

    if mode == PagingMode.FLAT:
        return WalkStatus.OK, gla, 0
    is_write = access == Access.WRITE
    is_fetch = access == Access.EXECUTE
    user_access = cpl == 3 and not implicit
    nxe = bool(efer & NXE)
    code = (ERR_W if is_write else 0) | (ERR_U if user_access else 0)
    # SDM 4.7: I/D is set for fetches if SMEP is on, or if PAE/4-level paging with NXE.
    if is_fetch and (cr4 & SMEP or (mode != PagingMode.BITS32 and nxe)):
        code |= ERR_ID

    if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
        width = 48 if mode == PagingMode.LEVEL4 else 57
        upper = gla >> (width - 1)
        if upper not in (0, (1 << (65 - width)) - 1):
            return WalkStatus.NONCANONICAL, 0, 0
    else:
        assert gla < 1 << 32

    m = maxphyaddr
    used = []  # (address, size) of every entry that takes part in the translation
    try:
        if mode == PagingMode.BITS32:
            pde_address = (cr3 & 0xFFFFF000) | ((gla >> 22) << 2)
            pde = read(pde_address, 4)
            if not pde & PTE_P:
                return WalkStatus.PAGE_FAULT, 0, code
            used.append((pde_address, 4))
            if cr4 & PSE and pde & PTE_PS:
                m32 = min(m, 40)
                if _any_bit(pde, m32 - 19, 21):
                    return WalkStatus.PAGE_FAULT, 0, code | ERR_P | ERR_RSVD
                high = (pde >> 13) & ((1 << (m32 - 32)) - 1)
                gpa = (high << 32) | (pde & 0xFFC00000) | (gla & 0x3FFFFF)
                chain = [pde]
            else:
                pte_address = (pde & 0xFFFFF000) | (((gla >> 12) & 0x3FF) << 2)
                pte = read(pte_address, 4)
                if not pte & PTE_P:
                    return WalkStatus.PAGE_FAULT, 0, code
                used.append((pte_address, 4))
                gpa = (pte & 0xFFFFF000) | (gla & 0xFFF)
                chain = [pde, pte]
            xd = False
        else:
            if mode == PagingMode.PAE:
                pdpte = read((cr3 & 0xFFFFFFE0) | (((gla >> 30) & 3) << 3), 8)
                if not pdpte & PTE_P:
                    return WalkStatus.PAGE_FAULT, 0, code
                if _any_bit(pdpte, 1, 2) or _any_bit(pdpte, 5, 8) or _any_bit(pdpte, m, 63):
                    return WalkStatus.BAD_PDPTE, 0, 0
                table = pdpte & ((1 << m) - 1) & ~0xFFF
                levels = [2, 1]
            else:
                table = cr3 & ((1 << m) - 1) & ~0xFFF
                levels = [5, 4, 3, 2, 1] if mode == PagingMode.LEVEL5 else [4, 3, 2, 1]
            chain = []
            for level in levels:
                address = table + (((gla >> (12 + 9 * (level - 1))) & 0x1FF) << 3)
                entry = read(address, 8)
                if not entry & PTE_P:
                    return WalkStatus.PAGE_FAULT, 0, code
                # Physical-address bits at and above MAXPHYADDR (bits 62:52 too under PAE).
                reserved = _any_bit(entry, m, 62 if mode == PagingMode.PAE else 51)
                reserved |= _bit(entry, 63) and not nxe
                page = bool(entry & PTE_PS) and level in (2, 3)
                reserved |= level >= 4 and _bit(entry, 7)
                reserved |= page and level == 3 and _any_bit(entry, 13, 29)
                reserved |= page and level == 2 and _any_bit(entry, 13, 20)
                if reserved:
                    return WalkStatus.PAGE_FAULT, 0, code | ERR_P | ERR_RSVD
                used.append((address, 8))
                chain.append(entry)
                frame = entry & ((1 << m) - 1) & ~0xFFF
                if page or level == 1:
                    size = 1 << (12 + 9 * (level - 1))
                    gpa = (frame & ~(size - 1)) | (gla & (size - 1))
                    break
                table = frame
            xd = nxe and any(_bit(e, 63) for e in chain)
    except _Outside as outside:
        return WalkStatus.BAD_GPA, outside.address, 0

    user_page = all(e & PTE_US for e in chain)
    writable = all(e & PTE_RW for e in chain)
    if user_access:
        allowed = user_page and (writable or not is_write) and not (is_fetch and xd)
    elif is_fetch:
        allowed = not (user_page and cr4 & SMEP) and not xd
    else:
        smap_open = not cr4 & SMAP or (rflags & AC and not implicit)
        if user_page and not smap_open:
            allowed = False
        else:
            allowed = writable or not is_write or not cr0 & WP
    if not allowed:
        return WalkStatus.PAGE_FAULT, 0, code | ERR_P

    if set_ad:
        for address, size in used:
            write(address, size, read(address, size) | PTE_A)
        if is_write:
            address, size = used[-1]
            write(address, size, read(address, size) | PTE_D)
    return WalkStatus.OK, gpa, 0


# ---------------------------------------------------------------------------------------------
# Randomized comparison.

_MODE_REGISTERS = {
    PagingMode.FLAT: (0, 0, 0),
    PagingMode.BITS32: (PG, 0, 0),
    PagingMode.PAE: (PG, PAE, 0),
    PagingMode.LEVEL4: (PG, PAE, LME | LMA),
    PagingMode.LEVEL5: (PG, PAE | LA57, LME | LMA),
}
_GLA_BITS = {PagingMode.FLAT: 32, PagingMode.BITS32: 32, PagingMode.PAE: 32,
             PagingMode.LEVEL4: 48, PagingMode.LEVEL5: 57}


def _random_case(rng, mode):
    base = int(rng.choice([0, 0, 0x100000, 0x7654000]))
    maxphyaddr = int(rng.choice([36, 39, 40, 46, 48, 52]))
    # Mostly lenient tables, so most walks reach a leaf and the access checks get exercised.
    lenient = rng.random() < 0.7
    mem, cr3 = random_page_tables(
        rng, PagingMode.BITS32 if mode == PagingMode.FLAT else mode,
        tables=int(rng.integers(2, 24)), mem_base_gpa=base,
        present=rng.uniform(0.9 if lenient else 0.6, 1.0),
        large=rng.uniform(0, 0.15 if lenient else 0.5),
        writable=rng.uniform(0.7 if lenient else 0.2, 1.0),
        user=rng.uniform(0.7 if lenient else 0.2, 1.0),
        no_execute=rng.uniform(0, 0.1 if lenient else 0.5),
        reserved=rng.uniform(0, 0.02 if lenient else 0.2), outside=rng.uniform(0, 0.05),
        maxphyaddr=maxphyaddr if lenient else int(rng.choice([36, 40, 46, 52])))
    cr0, cr4, efer = _MODE_REGISTERS[mode]
    cr0 |= WP if rng.random() < 0.5 else 0
    for bit in (PSE, SMEP, SMAP):
        cr4 |= bit if rng.random() < 0.5 else 0
    efer |= NXE if rng.random() < 0.6 else 0
    access = Access(int(rng.integers(0, 3)))
    registers = dict(
        cr3=cr3, cr0=cr0, cr4=cr4, efer=efer, rflags=AC if rng.random() < 0.5 else 0x2,
        cpl=int(rng.choice([0, 3, 3, 1])), mode=mode, set_ad=bool(rng.random() < 0.7),
        maxphyaddr=maxphyaddr, mem_base_gpa=base)
    implicit = access != Access.EXECUTE and rng.random() < 0.2
    glas = rng.integers(0, 1 << _GLA_BITS[mode], 120, dtype=np.uint64)
    if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5):
        # Sign-extend most to canonical form; leave some non-canonical.
        top = np.uint64(_GLA_BITS[mode] - 1)
        negative = (glas >> top) & np.uint64(1) == np.uint64(1)
        extended = glas | ~((np.uint64(1) << top) - np.uint64(1))
        glas = np.where(negative & (rng.random(glas.size) < 0.9), extended, glas)
    # Neighbours of earlier addresses: same tables, often the same page.
    repeat = rng.random(glas.size) < 0.3
    glas[1:][repeat[1:]] = glas[:-1][repeat[1:]] ^ rng.integers(0, 1 << 14, int(repeat[1:].sum()),
                                                                  dtype=np.uint64)
    return mem, glas, access, implicit, registers


def _reference_batch(mem, glas, access, implicit, registers):
    r = dict(registers)
    r["base"] = r.pop("mem_base_gpa")
    results = [reference_walk(mem, int(gla), access=access, implicit=implicit, **r)
               for gla in glas]
    statuses = np.array([int(s) for s, _, _ in results], np.int64)
    gpas = np.array([g for _, g, _ in results], np.uint64)
    codes = np.array([c for _, _, c in results], np.uint64)
    return gpas, statuses, codes


@pytest.mark.parametrize("mode", list(PagingMode))
def test_batch_matches_reference_on_random_tables(mode):
    rng = np.random.default_rng(1000 + int(mode))
    seen = np.zeros(len(WalkStatus), np.int64)
    codes_seen = set()
    for _ in range(60):
        mem, glas, access, implicit, registers = _random_case(rng, mode)
        kernel_mem, reference_mem = mem.copy(), mem.copy()
        gpas, statuses, codes = pw.translate_batch(
            kernel_mem, glas, access=access, implicit_supervisor=implicit, **registers)
        want_gpas, want_statuses, want_codes = _reference_batch(
            reference_mem, glas, access, implicit, registers)
        np.testing.assert_array_equal(statuses, want_statuses)
        np.testing.assert_array_equal(gpas, want_gpas)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(kernel_mem, reference_mem)  # A/D side effects
        seen += np.bincount(statuses, minlength=len(WalkStatus))
        codes_seen.update(codes[statuses == WalkStatus.PAGE_FAULT].tolist())
    # The cases reach every outcome the mode can produce, successes most of all.
    assert seen[WalkStatus.OK] > 0.15 * seen.sum()
    if mode != PagingMode.FLAT:
        assert seen[WalkStatus.PAGE_FAULT] > 0 and seen[WalkStatus.BAD_GPA] > 0
        # Not-present, protection, reserved-bit and fetch faults, user and supervisor.
        assert {0, ERR_P, ERR_P | ERR_RSVD, ERR_U, ERR_P | ERR_W | ERR_U, ERR_ID} <= codes_seen
    assert (seen[WalkStatus.NONCANONICAL] > 0) == (mode in (PagingMode.LEVEL4, PagingMode.LEVEL5))
    assert (seen[WalkStatus.BAD_PDPTE] > 0) == (mode == PagingMode.PAE)


@pytest.mark.parametrize("mode", [PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4,
                                  PagingMode.LEVEL5])
def test_random_tables_at_an_unaligned_base(mode):
    """The same memory one to seven bytes further into an array (an unaligned
    ``mem_base_gpa``: entries no longer fall on 8-byte array elements), or as an array whose
    data is not 8-aligned, gives the same answers and the same A/D side effects."""
    rng = np.random.default_rng(3000 + int(mode))
    done = 0
    while done < 12:
        mem, glas, access, implicit, registers = _random_case(rng, mode)
        if registers["mem_base_gpa"] == 0:
            continue
        done += 1
        shift = int(rng.integers(1, 8))
        shifted = np.zeros(mem.size + 8, np.uint8)
        shifted[shift:shift + mem.size] = mem
        holder = shifted.copy()  # the same memory, aligned base, unaligned array data
        unaligned_data = holder[shift:shift + mem.size]
        got = pw.translate_batch(unaligned_data, glas, access=access,
                                 implicit_supervisor=implicit, **registers)
        moved = dict(registers, mem_base_gpa=registers["mem_base_gpa"] - shift)
        want = pw.translate_batch(mem, glas, access=access, implicit_supervisor=implicit,
                                  **registers)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        got = pw.translate_batch(shifted, glas, access=access, implicit_supervisor=implicit,
                                 **moved)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(shifted[shift:shift + mem.size], mem)
        np.testing.assert_array_equal(unaligned_data, mem)


def test_single_translate_agrees_with_batch():
    rng = np.random.default_rng(7)
    for mode in (PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4, PagingMode.LEVEL5):
        mem, glas, access, implicit, registers = _random_case(rng, mode)
        registers["set_ad"] = False
        gpas, statuses, codes = pw.translate_batch(mem, glas, access=access,
                                                   implicit_supervisor=implicit, **registers)
        for gla, gpa, status, code in zip(glas[:40], gpas, statuses, codes):
            if status == WalkStatus.BAD_GPA:
                with pytest.raises(GuestMemoryError):
                    pw.translate(mem, int(gla), access=access, implicit_supervisor=implicit,
                                 **registers)
                continue
            t = pw.translate(mem, int(gla), access=access, implicit_supervisor=implicit,
                             **registers)
            assert (t.status, t.error_code) == (status, code)
            assert t.gpa == (int(gpa) if status == WalkStatus.OK else None)


# ---------------------------------------------------------------------------------------------
# Hand-written cases.


def _registers(mode, builder=None, **extra):
    cr0, cr4, efer = _MODE_REGISTERS[mode]
    registers = dict(cr3=builder.cr3 if builder else 0, cr0=cr0 | extra.pop("cr0", 0),
                     cr4=cr4 | extra.pop("cr4", 0), efer=efer | extra.pop("efer", 0))
    registers.update(extra)
    return registers


def _setup(mode, size=8 << 20, base=0):
    mem = np.zeros(size, np.uint8)
    builder = PageTableBuilder(mem, mode, table_area_gpa=base + 0x10000, mem_base_gpa=base)
    return mem, builder


@pytest.mark.parametrize(("cr0", "cr4", "efer", "mode"), [
    (0, 0, 0, PagingMode.FLAT),
    (0x11, PAE, LME, PagingMode.FLAT),
    (PG | 1, 0, 0, PagingMode.BITS32),
    (PG | 1, PSE, 0, PagingMode.BITS32),
    (PG | 1, PAE, 0, PagingMode.PAE),
    (PG | 1, PAE, LME, PagingMode.PAE),  # long mode enabled but not yet active
    (PG | 1, PAE, LME | LMA, PagingMode.LEVEL4),
    (PG | 1, PAE | LA57, LME | LMA, PagingMode.LEVEL5),
])
def test_paging_mode_from_registers(cr0, cr4, efer, mode):
    assert pw.paging_mode(cr0, cr4, efer) == mode


def test_flat_mode_is_identity():
    mem = np.zeros(4096, np.uint8)
    t = pw.translate(mem, 0xFEE00123, cr3=0, cr0=0x11, access=Access.WRITE, cpl=3)
    assert (t.status, t.gpa, t.fault) == (WalkStatus.OK, 0xFEE00123, False)


def test_bits32_small_and_4m_pages():
    mem, b = _setup(PagingMode.BITS32)
    b.map(0x00401000, 0x00123000, writable=False)
    b.map(0x80000000, 0x00400000, page_size=4 << 20)
    b.map(0xC0000000, 0x12_3440_0000, page_size=4 << 20)  # PSE-36: bits 39:32 in PDE 20:13
    regs = _registers(PagingMode.BITS32, b, cr4=PSE)
    assert pw.translate(mem, 0x00401ABC, **regs).gpa == 0x00123ABC
    big = pw.translate(mem, 0x80354321, **regs)
    assert (big.gpa, big.page_size, big.level) == (0x00754321, 4 << 20, 2)
    assert pw.translate(mem, 0xC0012345, **regs).gpa == 0x12_3441_2345
    # With MAXPHYADDR 36 the PDE's bits 21:17 are reserved (PSE-36 carries bits 35:32 only).
    t = pw.translate(mem, 0xC0012345, maxphyaddr=36, **regs)
    assert (t.status, t.error_code) == (WalkStatus.PAGE_FAULT, ERR_P | ERR_RSVD)
    # Bit 21 is reserved in a 4 MiB PDE; without CR4.PSE the PS bit means nothing.
    pde = b.entry_gpa(0x80000000, 2)
    b.write_entry(pde, b.read_entry(pde) | 1 << 21)
    t = pw.translate(mem, 0x80000000, access=Access.WRITE, cpl=3, **regs)
    assert t.error_code == ERR_P | ERR_RSVD | ERR_W | ERR_U
    no_pse = dict(regs, cr4=0)
    assert pw.translate(mem, 0x00401ABC, **no_pse).gpa == 0x00123ABC
    t = pw.translate(mem, 0x80000000, **no_pse)  # the PDE points at an empty "page table"
    assert (t.status, t.level, t.error_code) == (WalkStatus.PAGE_FAULT, 1, 0)
    # User write to a read-only page; supervisor write passes only with CR0.WP clear.
    assert pw.translate(mem, 0x00401000, access=Access.WRITE, cpl=3, **regs).error_code == 7
    assert not pw.translate(mem, 0x00401000, access=Access.WRITE, **regs).fault
    assert pw.translate(mem, 0x00401000, access=Access.WRITE, **dict(regs, cr0=PG | WP)).error_code == 3
    # Not present: P=0. No NX in 32-bit paging: I/D only with SMEP.
    assert pw.translate(mem, 0x00402000, access=Access.EXECUTE, cpl=3, efer=NXE, **{
        k: v for k, v in regs.items() if k != "efer"}).error_code == ERR_U
    t = pw.translate(mem, 0x00402000, access=Access.EXECUTE, **dict(regs, cr4=PSE | SMEP))
    assert t.error_code == ERR_ID


def test_pae_pdptes_2m_pages_and_nx():
    mem, b = _setup(PagingMode.PAE)
    b.map(0x40200000, 0x1_0000_0000, page_size=2 << 20, no_execute=True)
    b.map(0xBFFFF000, 0x5000, user=False)
    regs = _registers(PagingMode.PAE, b, efer=NXE)
    t = pw.translate(mem, 0x402ABCDE, **regs)
    assert (t.gpa, t.page_size, t.level) == (0x1_000A_BCDE, 2 << 20, 2)
    assert pw.translate(mem, 0xBFFFF010, **regs).gpa == 0x5010
    # NX: fetches fault with I/D; without NXE bit 63 is reserved.
    assert pw.translate(mem, 0x40200000, access=Access.EXECUTE, **regs).error_code == ERR_P | ERR_ID
    t = pw.translate(mem, 0x40200000, **dict(regs, efer=0))
    assert t.error_code == ERR_P | ERR_RSVD
    # PDPTE 0 is absent: an ordinary not-present fault.
    assert pw.translate(mem, 0x1000, access=Access.WRITE, cpl=3, **regs).error_code == ERR_W | ERR_U
    # A PDPTE with R/W set (reserved there) is something a CPU refuses at MOV CR3.
    pdpte = b.entry_gpa(0x40000000, 3)
    b.write_entry(pdpte, b.read_entry(pdpte) | PTE_RW)
    assert pw.translate(mem, 0x402ABCDE, **regs).status == WalkStatus.BAD_PDPTE
    with pytest.raises(ValueError):
        pw.translate(mem, 1 << 32, **regs)


def test_level4_pages_and_canonical_addresses():
    mem, b = _setup(PagingMode.LEVEL4)
    b.map(0x7FFF_FFFF_F000, 0x3000)
    b.map(0xFFFF_8000_0020_0000, 0x8_0000_0000, page_size=2 << 20)
    b.map(0xFFFF_FFFF_C000_0000, 0x40_0000_0000, page_size=1 << 30, user=False)
    regs = _registers(PagingMode.LEVEL4, b)
    assert pw.translate(mem, 0x7FFF_FFFF_F123, **regs).gpa == 0x3123
    t = pw.translate(mem, 0xFFFF_8000_0021_2345, **regs)
    assert (t.gpa, t.page_size, t.level) == (0x8_0001_2345, 2 << 20, 2)
    t = pw.translate(mem, 0xFFFF_FFFF_C123_4567, **regs)
    assert (t.gpa, t.page_size, t.level) == (0x40_0123_4567, 1 << 30, 3)
    assert pw.translate(mem, 0x0000_8000_0000_0000, **regs).status == WalkStatus.NONCANONICAL
    assert pw.translate(mem, 0xFFFF_7FFF_FFFF_F000, **regs).status == WalkStatus.NONCANONICAL
    # User read of a supervisor page: P|U.
    assert pw.translate(mem, 0xFFFF_FFFF_C000_0000, cpl=3, **regs).error_code == ERR_P | ERR_U
    # A frame above MAXPHYADDR has reserved bits set.
    t = pw.translate(mem, 0xFFFF_FFFF_C000_0000, maxphyaddr=36, **regs)
    assert (t.status, t.error_code, t.level) == (WalkStatus.PAGE_FAULT, ERR_P | ERR_RSVD, 3)
    # PS in a PML4E is reserved; 2 MiB frame bits 20:13 are reserved.
    pml4e = b.entry_gpa(0x7FFF_FFFF_F000, 4)
    b.write_entry(pml4e, b.read_entry(pml4e) | PTE_PS)
    assert pw.translate(mem, 0x7FFF_FFFF_F000, **regs).error_code == ERR_P | ERR_RSVD
    pde = b.entry_gpa(0xFFFF_8000_0020_0000, 2)
    b.write_entry(pde, b.read_entry(pde) | 1 << 13)
    assert pw.translate(mem, 0xFFFF_8000_0020_0000, **regs).error_code == ERR_P | ERR_RSVD


def test_level4_supervisor_protections():
    mem, b = _setup(PagingMode.LEVEL4)
    b.map(0x1000, 0x5000, writable=False)  # user page, read-only
    b.map(0x2000, 0x6000, user=False, no_execute=True)
    regs = _registers(PagingMode.LEVEL4, b, efer=NXE)
    write = dict(access=Access.WRITE)
    assert not pw.translate(mem, 0x1000, **write, **regs).fault  # CR0.WP clear
    assert pw.translate(mem, 0x1000, **write, **dict(regs, cr0=PG | WP)).error_code == ERR_P | ERR_W
    fetch = dict(access=Access.EXECUTE)
    assert not pw.translate(mem, 0x1000, **fetch, **regs).fault
    smep = dict(regs, cr4=PAE | SMEP)
    assert pw.translate(mem, 0x1000, **fetch, **smep).error_code == ERR_P | ERR_ID
    assert pw.translate(mem, 0x2000, **fetch, **regs).error_code == ERR_P | ERR_ID
    assert pw.translate(mem, 0x2000, **fetch, cpl=3, **regs).error_code == ERR_P | ERR_U | ERR_ID
    # SMAP: supervisor data access to a user page needs EFLAGS.AC and an explicit access.
    smap = dict(regs, cr4=PAE | SMAP)
    assert pw.translate(mem, 0x1000, **smap).error_code == ERR_P
    assert not pw.translate(mem, 0x1000, rflags=AC, **smap).fault
    t = pw.translate(mem, 0x1000, rflags=AC, implicit_supervisor=True, **smap)
    assert t.error_code == ERR_P
    # An implicit access at CPL3 is a supervisor access: U/S clear in the error code.
    t = pw.translate(mem, 0x1000, cpl=3, implicit_supervisor=True, **smap)
    assert t.error_code == ERR_P
    assert not pw.translate(mem, 0x2000, cpl=3, implicit_supervisor=True, **regs).fault
    assert not pw.translate(mem, 0x1000, cpl=3, rflags=0, **smap).fault  # user access
    with pytest.raises(ValueError):
        pw.translate(mem, 0x1000, access=Access.EXECUTE, implicit_supervisor=True, **regs)


def test_level5_reaches_beyond_48_bits():
    mem, b = _setup(PagingMode.LEVEL5)
    b.map(0x00AB_CDEF_0000_0000, 0x7000)
    b.map(0xFF00_0000_0000_0000, 0x8000)
    regs = _registers(PagingMode.LEVEL5, b)
    t = pw.translate(mem, 0x00AB_CDEF_0000_0ABC, **regs)
    assert (t.gpa, t.level) == (0x7ABC, 1)
    assert pw.translate(mem, 0xFF00_0000_0000_0001, **regs).gpa == 0x8001
    assert pw.translate(mem, 0x0100_0000_0000_0000, **regs).status == WalkStatus.NONCANONICAL
    # The same address under 4-level paging is non-canonical.
    four = _registers(PagingMode.LEVEL4, b)
    assert pw.translate(mem, 0x00AB_CDEF_0000_0ABC, **four).status == WalkStatus.NONCANONICAL


@pytest.mark.parametrize("mode", [PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4,
                                  PagingMode.LEVEL5])
def test_accessed_and_dirty_bits(mode):
    mem, b = _setup(mode)
    leaf = b.map(0x3000, 0x9000)
    levels = {PagingMode.BITS32: [2, 1], PagingMode.PAE: [2, 1],
              PagingMode.LEVEL4: [4, 3, 2, 1], PagingMode.LEVEL5: [5, 4, 3, 2, 1]}[mode]
    entries = [b.entry_gpa(0x3000, level) for level in levels]
    assert entries[-1] == leaf
    regs = _registers(mode, b, cr0=WP, set_ad=True)
    # A fault changes nothing.
    b.write_entry(leaf, b.read_entry(leaf) & ~PTE_RW)
    before = mem.copy()
    assert pw.translate(mem, 0x3000, access=Access.WRITE, **regs).fault
    np.testing.assert_array_equal(mem, before)
    # A read sets A everywhere, D nowhere.
    assert not pw.translate(mem, 0x3000, **regs).fault
    assert all(b.read_entry(e) & (PTE_A | PTE_D) == PTE_A for e in entries)
    # A write sets D in the leaf only.
    b.write_entry(leaf, b.read_entry(leaf) | PTE_RW)
    assert not pw.translate(mem, 0x3000, access=Access.WRITE, **regs).fault
    assert b.read_entry(leaf) & PTE_D
    assert not any(b.read_entry(e) & PTE_D for e in entries[:-1])
    if mode == PagingMode.PAE:  # PDPTEs have no A bit
        assert not b.read_entry(b.entry_gpa(0x3000, 3)) & PTE_A


def _split_into_segments(mem, base, rng):
    """The same guest RAM as two segments placed out of order in a bigger host array, with
    garbage around and between them: (host array, segment rows, host offset of each byte)."""
    cut = int(rng.integers(1, mem.size // 4096)) * 4096
    low, high = mem[:cut], mem[cut:]
    gap = int(rng.integers(1, 16)) * 4096
    host = rng.integers(0, 256, high.size + gap + low.size + 4096, dtype=np.uint8)
    host[:high.size] = high
    low_at = high.size + gap
    host[low_at:low_at + low.size] = low
    rows = [(base + cut, high.size, 0), (base, cut, low_at)]
    offsets = np.concatenate([np.arange(low_at, low_at + cut), np.arange(0, high.size)])
    return host, rows, offsets


@pytest.mark.parametrize("mode", [PagingMode.BITS32, PagingMode.PAE, PagingMode.LEVEL4,
                                  PagingMode.LEVEL5])
def test_tables_in_several_segments_walk_as_in_one(mode):
    """Guest RAM in two segments (page tables in either, the later one first in the host
    array, garbage between): the same answers and A/D side effects as one flat array."""
    rng = np.random.default_rng(5000 + int(mode))
    for _ in range(15):
        mem, glas, access, implicit, registers = _random_case(rng, mode)
        if mem.size < 8192:
            continue
        base = registers["mem_base_gpa"]
        host, rows, offsets = _split_into_segments(mem, base, rng)
        garbage = host.copy()
        want = pw.translate_batch(mem, glas, access=access, implicit_supervisor=implicit, **registers)
        split = {k: v for k, v in registers.items() if k != "mem_base_gpa"}
        got = pw.translate_batch(host, glas, access=access, implicit_supervisor=implicit,
                                 segments=rows, **split)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(host[offsets], mem)  # A/D bits landed in the right place
        outside = np.ones(host.size, bool)
        outside[offsets] = False
        np.testing.assert_array_equal(host[outside], garbage[outside])  # nothing else touched


def test_page_tables_above_a_gap_and_bad_segment_tables():
    low = 0x10_0000
    high_gpa = 0x1_0000_0000
    mem = np.zeros(low + 0x10_0000, np.uint8)  # host: [low RAM][RAM at 4 GiB]
    rows = [(0, low, 0), (high_gpa, 0x10_0000, low)]
    b = PageTableBuilder(mem[low:], PagingMode.LEVEL4, table_area_gpa=high_gpa, mem_base_gpa=high_gpa)
    b.map(0x7000, 0x5000)
    b.map(0x8000, high_gpa + 0x3000)
    regs = _registers(PagingMode.LEVEL4, b, set_ad=True, segments=rows)
    assert pw.translate(mem, 0x7123, **regs).gpa == 0x5123
    assert pw.translate(mem, 0x8010, **regs).gpa == high_gpa + 0x3010
    assert b.read_entry(b.entry_gpa(0x7000, 1)) & PTE_A
    mem[0x5000:0x5004] = np.frombuffer(b"data", np.uint8)
    assert pw.copy_in(mem, 0x7000, 4, **regs) == b"data"
    pw.copy_out(mem, 0x8000, b"high", **regs)
    assert mem[low + 0x3000:low + 0x3004].tobytes() == b"high"
    b.write_entry(b.entry_gpa(0x7000, 2), 0x8000_0000 | PTE_P | PTE_RW)  # into the gap
    gpas, statuses, _ = pw.translate_batch(mem, np.array([0x7000], np.uint64), **regs)
    assert statuses[0] == WalkStatus.BAD_GPA and gpas[0] == 0x8000_0000 + 0x38
    for bad in ([(0, low, 0), (low - 4096, 8192, low)],  # overlapping segments
                [(0, mem.size + 1, 0)],  # past the array
                [(0, 0, 0)]):
        with pytest.raises(ValueError):
            pw.translate(mem, 0x7000, **dict(regs, segments=bad))


def test_accessed_dirty_updates_are_atomic_against_another_cpu():
    """A walker thread setting A in a PTE while another clears A and toggles another bit of
    the same byte with compare-and-swap: every toggle survives and every walk ends OK (or
    CONTENDED). A plain read-modify-write could lose a toggle, but too rarely for a test to
    catch: ``test_batch_loop_has_no_reference_counting`` checks the code is a cmpxchg."""
    import threading
    import time

    from hvjit._jit import atomic_cas64, kernel

    @kernel
    def flipper(mem, offset, rounds):
        done = 0
        while done < rounds:
            old = atomic_cas64(mem, offset, np.uint64(0), np.uint64(0))  # an atomic read
            new = (old ^ np.uint64(0x10)) & ~np.uint64(0x20)  # toggle PCD, clear A
            if atomic_cas64(mem, offset, old, new) == old:
                done += 1
        return done

    mem, b = _setup(PagingMode.LEVEL4, size=1 << 20)
    leaf = b.map(0x3000, 0x9000)
    regs = _registers(PagingMode.LEVEL4, b, set_ad=True)
    glas = np.full(20000, 0x3000, np.uint64)
    pw.translate_batch(mem, glas[:4], **regs)
    flips = flipper(mem, np.uint64(leaf), 1)
    statuses = []
    started, stop = threading.Event(), threading.Event()

    def walker():  # translate_batch releases the GIL: the two threads run at once
        while not stop.is_set():
            statuses.append(pw.translate_batch(mem, glas, **regs)[1])
            started.set()

    thread = threading.Thread(target=walker)
    thread.start()
    try:
        assert started.wait(30)
        before, deadline = len(statuses), time.monotonic() + 60
        while len(statuses) - before < 3 and time.monotonic() < deadline:  # however loaded the host
            flips += flipper(mem, np.uint64(leaf), 200_000)
        during = len(statuses) - before
    finally:
        stop.set()
        thread.join()
    assert during >= 3, "the walks did not overlap the flips"
    walked = np.concatenate(statuses)
    assert set(np.unique(walked).tolist()) <= {WalkStatus.OK, WalkStatus.CONTENDED}
    assert b.read_entry(leaf) & 0x10 == (0x10 if flips % 2 else 0)  # no toggle lost
    assert b.read_entry(leaf) & ~0x30 == 0x9000 | PTE_P | PTE_RW | PTE_US


def test_tables_outside_memory_and_nonzero_base():
    base = 0x4000_0000
    mem, b = _setup(PagingMode.LEVEL4, size=1 << 20, base=base)
    b.map(0x5000, base + 0x8000)
    regs = _registers(PagingMode.LEVEL4, b, mem_base_gpa=base)
    assert pw.translate(mem, 0x5004, **regs).gpa == base + 0x8004
    # Point the PDE's table pointer below the memory, then past its end.
    pde = b.entry_gpa(0x5000, 2)
    b.write_entry(pde, 0x1000 | PTE_P | PTE_RW)
    with pytest.raises(GuestMemoryError, match="0x1028"):
        pw.translate(mem, 0x5000, **regs)
    b.write_entry(pde, (base + mem.size) | PTE_P | PTE_RW)
    gpas, statuses, _ = pw.translate_batch(mem, np.array([0x5000], np.uint64), **regs)
    assert statuses[0] == WalkStatus.BAD_GPA and gpas[0] == base + mem.size + 0x28
    with pytest.raises(ValueError):
        pw.translate(mem, 0x5000, **dict(regs, cpl=4))
    with pytest.raises(TypeError):
        pw.translate(mem.astype(np.uint16), 0x5000, **regs)


# ---------------------------------------------------------------------------------------------
# Copy-in / copy-out.


def _copy_fixture():
    mem, b = _setup(PagingMode.LEVEL4)
    # Three consecutive linear pages backed by scattered physical pages; the fourth absent.
    for page, frame in zip((0x10000, 0x11000, 0x12000), (0x30000, 0x20000, 0x50000)):
        b.map(page, frame)
        mem[frame:frame + 4096] = np.arange(4096) % 251
    b.map(0x13000, 0x60000, writable=False)
    return mem, b, _registers(PagingMode.LEVEL4, b, cr0=WP, cpl=3)


def test_copy_setup_splits_at_page_boundaries():
    mem, b, regs = _copy_fixture()
    setup = pw.copy_setup(mem, 0x10FF0, 0x1020, **regs)
    assert setup.fault is None
    assert setup.chunks == ((0x30FF0, 0x10), (0x20000, 0x1000), (0x50000, 0x10))


def test_copy_in_and_out_across_pages():
    mem, b, regs = _copy_fixture()
    data = bytes(range(256)) * 20
    pw.copy_out(mem, 0x10F00, data, **regs)
    assert mem[0x30F00:0x31000].tobytes() == data[:0x100]
    assert mem[0x20000:0x21000].tobytes() == data[0x100:0x1100]
    assert mem[0x50000:0x50000 + len(data) - 0x1100].tobytes() == data[0x1100:]
    assert pw.copy_in(mem, 0x10F00, len(data), **regs) == data
    assert pw.copy_in(mem, 0x10F00, 0, **regs) == b""


def test_fault_mid_range_copies_nothing():
    mem, b, regs = _copy_fixture()
    before = mem.copy()
    # Writing into the read-only fourth page: a protection fault at its first byte.
    with pytest.raises(pw.GuestFault) as caught:
        pw.copy_out(mem, 0x12F00, b"\xAA" * 0x200, **regs)
    fault = caught.value.translation
    assert (fault.gla, fault.error_code) == (0x13000, ERR_P | ERR_W | ERR_U)
    np.testing.assert_array_equal(mem, before)
    with pytest.raises(pw.GuestFault) as caught:
        pw.copy_in(mem, 0x13F00, 0x200, **regs)  # runs into the unmapped 0x14000
    assert (caught.value.translation.gla, caught.value.translation.error_code) == (0x14000, ERR_U)
    setup = pw.copy_setup(mem, 0x13F00, 0x200, **regs)
    assert setup.chunks == () and setup.fault.gla == 0x14000


def test_copy_to_unbacked_physical_memory_raises():
    mem, b, regs = _copy_fixture()
    b.map(0x20000, 0x7FF000)
    b.map(0x21000, 0x800000)  # one page past the end of mem
    before = mem.copy()
    with pytest.raises(GuestMemoryError):
        pw.copy_out(mem, 0x20FFE, b"abcd", **regs)
    np.testing.assert_array_equal(mem, before)


# ---------------------------------------------------------------------------------------------
# The same comparisons with Numba's bounds checking on (a fresh cache: other flags).


@pytest.mark.skipif(os.environ.get("NUMBA_BOUNDSCHECK") == "1", reason="already bounds-checked")
def test_with_numba_boundscheck(tmp_path):
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", HVJIT_CACHE_DIR=str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "random_tables or outside_memory or accessed or copy or segments or gap"],
        env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout



def _blocks_in_cycles_calling_nrt(function_ir: str) -> list[str]:
    """Basic blocks of an LLVM function that call an NRT_ function and lie on a cycle."""
    successors, calls_nrt, label = {}, set(), "entry"
    for line in function_ir.splitlines()[1:]:
        head = re.match(r"^([-\w.$]+):", line)
        if head:
            label = head.group(1)
            continue
        successors.setdefault(label, set()).update(re.findall(r"label %([-\w.$]+)", line))
        if re.search(r"call [^@]*@NRT_", line):
            calls_nrt.add(label)

    def on_cycle(start):
        seen, stack = set(), list(successors.get(start, ()))
        while stack:
            block = stack.pop()
            if block == start:
                return True
            if block not in seen:
                seen.add(block)
                stack.extend(successors.get(block, ()))
        return False

    return sorted(block for block in calls_nrt if on_cycle(block))


def test_batch_loop_has_no_reference_counting(tmp_path):
    """The compiled batch walk calls NRT functions (reference counts, the uint64 view) only
    once per call, outside its loops: no allocation, slicing or aliasing per walk.

    Inspection needs a fresh compile (Numba cannot inspect cached code): a subprocess with an
    empty cache directory prints the kernel's LLVM IR.
    """
    code = (
        "from hvjit.kernels import pagewalk as pw\n"
        "from hvjit.benchmarks.pagewalk import _bench_case\n"
        "mem, glas, regs = _bench_case(pw.PagingMode.LEVEL5, 64)\n"
        "pw.translate_batch(mem, glas, **regs)\n"
        "print(*pw.walk_batch.inspect_llvm().values())\n"
    )
    env = dict(os.environ, HVJIT_CACHE_DIR=str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    body = re.search(r"define [^\n]*pagewalk10walk_batch[^\n]*\{.*?\n\}", done.stdout, re.S)
    assert body, "walk_batch's function not found in its LLVM IR"
    assert re.search(r"call [^@\n]*@NRT_incref", body.group(0))  # the check sees NRT calls
    assert _blocks_in_cycles_calling_nrt(body.group(0)) == []
    # Accessed/dirty updates are locked compare-and-swaps (other vCPUs share the tables).
    assert re.search(r"cmpxchg ptr [^\n]*i64", body.group(0))
    assert re.search(r"cmpxchg ptr [^\n]*i32", body.group(0))
