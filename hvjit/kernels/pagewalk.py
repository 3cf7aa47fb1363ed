"""Guest page walks: guest-linear to guest-physical addresses for every x86 paging mode.

Modes (bhyve's list): FLAT (CR0.PG=0), BITS32 (2-level; 4 MiB pages with CR4.PSE, PSE-36
high bits), PAE (PDPTE + 2 levels; 2 MiB pages), LEVEL4 and LEVEL5 (2 MiB and 1 GiB pages).
Permissions follow the SDM (Vol. 3, ch. 4.6): U/S and R/W of every level, CR0.WP, NX with
EFER.NXE, CR4.SMEP, CR4.SMAP with EFLAGS.AC, implicit supervisor-mode accesses; reserved
bits (4.7) including those above MAXPHYADDR; canonical checks in 4/5-level mode.

The kernels
-----------
``walk_batch(mem, segs, cr3, mode, cr0, cr4, efer, rflags, glas, access, cpl, set_ad,
maxphyaddr, gpas, statuses, error_codes, details)`` walks every address of ``glas`` (the one
implementation; its loop works on scalars and preallocated arrays only, with no reference
counting per walk); ``walk(mem, segs, cr3, mode, cr0, cr4, efer, rflags, gla, access, cpl,
set_ad, maxphyaddr, out) -> status`` is the single-address convenience over it. Their
arguments:

- ``mem``: uint8 host memory; ``segs``: the segment table saying where guest RAM lies in it,
  uint64 rows ``(guest-physical start, size, offset in mem)`` (:func:`segment_table`; a
  VM's RAM in several segments is one window over their host memory, see
  ``GuestMemory.host_window``). Every table entry's address is looked up in it, and checked
  against ``mem``'s size, before it is read: page tables may lie in any segment.
- ``access``: ``ACCESS_READ``, ``ACCESS_WRITE`` or ``ACCESS_EXECUTE``, optionally or-ed with
  ``ACCESS_IMPLICIT_SUPERVISOR`` (descriptor-table/TSS style accesses: supervisor even at CPL3,
  and SMAP blocks them whatever EFLAGS.AC says).
- ``set_ad``: on a successful walk set A in every paging-structure entry used and D in the
  leaf for writes (PAE PDPTEs have no A bit). Nothing is written when the walk fails. Each
  update is a compare-and-swap against the value the walk read (other vCPUs run on the same
  tables): when an entry changed meanwhile the walk starts over, ``WALK_CONTENDED`` after
  ``MAX_WALK_RETRIES`` such restarts.
- ``out`` (and each row of ``details``): uint64, ``OUT_LEN`` long, filled as ``out[OUT_*]``:
  ``OUT_GPA`` (the translation; for ``WALK_BAD_GPA`` the entry address outside memory),
  ``OUT_ERROR_CODE`` (the #PF error code for ``WALK_PAGE_FAULT``), ``OUT_PAGE_SIZE``,
  ``OUT_LEVEL`` (level of the leaf, or of the entry where the walk stopped; 0 when FLAT) and
  ``OUT_ENTRY_GPA + level - 1``: the address of the entry read at each level.

Status: ``WALK_OK``; ``WALK_PAGE_FAULT`` (the CPU would raise #PF); ``WALK_NONCANONICAL``
(#GP/#SS, no walk); ``WALK_BAD_GPA`` (a table entry lies outside ``mem``: the answer is
unknowable here); ``WALK_BAD_PDPTE`` (a present PAE PDPTE has reserved bits: the CPU would
have raised #GP when CR3 was loaded, so no walk can see it); ``WALK_CONTENDED`` (see
``set_ad``).

In FLAT mode the linear address is the physical one. In BITS32/PAE mode linear addresses are
32 bits wide; the kernel drops higher bits, the Python wrappers reject them. The final
physical address is not checked against ``mem`` (it may be MMIO); ``copy_in``/``copy_out``
check it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from hvjit._jit import atomic_cas32, atomic_cas64, kernel
from hvjit.errors import GuestFault, GuestMemoryError  # noqa: F401  (GuestFault: re-exported)

_U = np.uint64


class PagingMode(enum.IntEnum):
    FLAT = 0
    BITS32 = 1
    PAE = 2
    LEVEL4 = 3
    LEVEL5 = 4


class Access(enum.IntEnum):
    READ = 0
    WRITE = 1
    EXECUTE = 2


class WalkStatus(enum.IntEnum):
    OK = 0
    PAGE_FAULT = 1
    NONCANONICAL = 2
    BAD_GPA = 3
    BAD_PDPTE = 4
    CONTENDED = 5


# Plain-int copies for the kernels.
MODE_FLAT, MODE_BITS32, MODE_PAE, MODE_LEVEL4, MODE_LEVEL5 = (int(m) for m in PagingMode)
ACCESS_READ, ACCESS_WRITE, ACCESS_EXECUTE = (int(a) for a in Access)
ACCESS_IMPLICIT_SUPERVISOR = 4
WALK_OK, WALK_PAGE_FAULT, WALK_NONCANONICAL, WALK_BAD_GPA, WALK_BAD_PDPTE, WALK_CONTENDED = (
    int(s) for s in WalkStatus
)
MAX_WALK_RETRIES = 16  # walks of one address whose entries changed under their A/D update

OUT_GPA = 0
OUT_ERROR_CODE = 1
OUT_PAGE_SIZE = 2
OUT_LEVEL = 3
OUT_ENTRY_GPA = 4
OUT_LEN = OUT_ENTRY_GPA + 5

# #PF error-code bits.
PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4

# Control-register bits.
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_NXE = 1 << 11
EFER_LMA = 1 << 10
RFLAGS_AC = 1 << 18

DEFAULT_MAXPHYADDR = 52

# uint64 constants for the kernels (mixing uint64 with int64 in Numba/numpy gives float64).
_ZERO = _U(0)
_ONE = _U(1)
_PTE_P = _U(1)
_PTE_RW = _U(2)
_PTE_US = _U(4)
_PTE_PS = _U(0x80)
_PTE_XD = _U(1 << 63)
_ACCESSED = np.uint8(0x20)
_DIRTY = np.uint8(0x40)
_LOW32 = _U(0xFFFFFFFF)
_PAGE_OFFSET = _U(0xFFF)
_INDEX9 = _U(0x1FF)
_INDEX10 = _U(0x3FF)
_BITS32_TABLE = _U(0xFFFFF000)
_BITS32_4M_FRAME = _U(0xFFC00000)
_PAE_CR3 = _U(0xFFFFFFE0)
_PAE_PDPTE_FIXED_RSVD = _U(0x1E6)  # bits 8:5 and 2:1
_PHYS_LIMIT_52 = _U((1 << 52) - 1)
_PAE_ENTRY_LIMIT = _U((1 << 63) - 1)
_RSVD_1G = _U(((1 << 30) - 1) & ~((1 << 13) - 1))  # bits 29:13
_RSVD_2M = _U(((1 << 21) - 1) & ~((1 << 13) - 1))  # bits 20:13
_BITS_21_0 = _U((1 << 22) - 1)
_NOWHERE = _U((1 << 64) - 1)


@kernel(inline="always")
def _load32(mem, offset):
    return (
        _U(mem[offset])
        | (_U(mem[offset + _U(1)]) << _U(8))
        | (_U(mem[offset + _U(2)]) << _U(16))
        | (_U(mem[offset + _U(3)]) << _U(24))
    )


@kernel(inline="always")
def _load64(mem, offset):
    return _load32(mem, offset) | (_load32(mem, offset + _U(4)) << _U(32))


@kernel(inline="always")
def _prepare(mode, cr0, cr4, efer, rflags, access, cpl, maxphyaddr):
    """Everything about a walk that does not depend on the address, computed once per call.

    Returns ``(error_code, addr_mask, reserved_high, pse, reserved_4m, high_4m, allow)``:
    the #PF error-code bits the access itself contributes (W, U, I/D), the frame-address
    mask, the reserved high bits of 8-byte entries, whether 32-bit paging has 4 MiB pages
    and their reserved/PSE-36 masks, and ``allow``: the access rules of SDM 4.6 as a truth
    table, bit ``rw | us << 1 | xd << 2`` set when a leaf with those combined rights admits
    the access. Scalars only.
    """
    cr0 = _U(cr0)
    cr4 = _U(cr4)
    efer = _U(efer)
    kind = access & 3
    is_write = kind == ACCESS_WRITE
    is_fetch = kind == ACCESS_EXECUTE
    implicit = access & ACCESS_IMPLICIT_SUPERVISOR != 0
    user = cpl == 3 and not implicit
    nxe = efer & _U(EFER_NXE) != _ZERO
    smep = cr4 & _U(CR4_SMEP) != _ZERO
    smap = cr4 & _U(CR4_SMAP) != _ZERO
    wp = cr0 & _U(CR0_WP) != _ZERO
    ac = _U(rflags) & _U(RFLAGS_AC) != _ZERO
    error_code = _ZERO
    if is_write:
        error_code |= _U(PFERR_WRITE)
    if user:
        error_code |= _U(PFERR_USER)
    # I/D is reported only when fetches can be refused (SDM 4.7).
    if is_fetch and (smep or (mode != MODE_BITS32 and nxe)):
        error_code |= _U(PFERR_FETCH)

    phys_mask = (_ONE << _U(maxphyaddr)) - _ONE
    addr_mask = phys_mask & ~_PAGE_OFFSET
    # Above MAXPHYADDR: bits 51:M are reserved in 4/5-level entries, bits 62:M in PAE ones.
    if mode == MODE_PAE:
        reserved_high = _PAE_ENTRY_LIMIT & ~phys_mask
    else:
        reserved_high = _PHYS_LIMIT_52 & ~phys_mask
    if not nxe:
        reserved_high |= _PTE_XD
    # PSE-36: physical bits (M-1):32 come from PDE bits (M-20):13, M = min(MAXPHYADDR, 40).
    pse = cr4 & _U(CR4_PSE) != _ZERO
    width = _U(min(maxphyaddr, 40))
    reserved_4m = _BITS_21_0 & ~((_ONE << (width - _U(19))) - _ONE)
    high_4m = (_ONE << (width - _U(32))) - _ONE

    allow = _ZERO
    for index in range(8):
        rw = index & 1 != 0
        us = index & 2 != 0
        xd = index & 4 != 0
        if user:
            ok = us and (not is_write or rw) and not (is_fetch and xd)
        elif is_fetch:
            ok = not (us and smep) and not xd
        else:
            smap_blocks = us and smap and (implicit or not ac)
            wp_blocks = is_write and not rw and wp
            ok = not smap_blocks and not wp_blocks
        if ok:
            allow |= _ONE << _U(index)
    return error_code, addr_mask, reserved_high, pse, reserved_4m, high_4m, allow


@kernel
def _offset(mem_size, segs, gpa, size):
    """Where guest-physical ``[gpa, gpa + size)`` lies in ``mem``: the offset, or ``_NOWHERE``
    when no one segment holds all of it (or the table points outside ``mem``)."""
    found = _NOWHERE
    k = 0
    n = segs.shape[0]
    while k < n:
        start = segs[k, 0]
        length = segs[k, 1]
        if gpa >= start and length >= size and gpa - start <= length - size:
            offset = segs[k, 2] + (gpa - start)
            if offset <= mem_size - size and mem_size >= size:
                found = offset
            k = n
        k += 1
    return found


@kernel(inline="always")
def _entry64(mem, mem64, offset):
    """The 8-byte entry at ``offset`` (checked by ``_offset``): one element of the uint64
    view where the offset is 8-aligned, else eight byte loads."""
    if offset & _U(7) == _ZERO:
        return mem64[offset >> _U(3)]
    return _load64(mem, offset)


@kernel
def walk_batch(mem, segs, cr3, mode, cr0, cr4, efer, rflags, glas, access, cpl,
               set_ad, maxphyaddr, gpas, statuses, error_codes, details):
    """Walk every address of ``glas``: the one implementation of the page walk.

    Per address ``i``: ``statuses[i]``, ``gpas[i]`` (the translation; for WALK_BAD_GPA the
    entry address outside memory), ``error_codes[i]`` (the #PF error code for
    WALK_PAGE_FAULT) and, for ``i < details.shape[0]``, the row ``details[i]`` laid out as
    ``out`` in the module docstring. Pass ``np.empty((0, OUT_LEN), np.uint64)`` for no
    details. Stops at the shortest of ``glas``, ``gpas``, ``statuses``, ``error_codes``.

    The walk is written out in this loop rather than in a helper taking ``mem``: an inlined
    helper would alias the array and make Numba count references on every walk. The loop
    touches scalars, ``segs``, ``mem`` (at offsets checked against its size) and the
    caller's arrays (at indices checked against their sizes) only.

    Returns a meaningless number (so that the prefetching loads are not optimized away).
    """
    count = min(glas.size, gpas.size, statuses.size, error_codes.size)
    detail_rows = details.shape[0] if details.shape[1] >= OUT_LEN else 0
    error_code, addr_mask, reserved_high, pse, reserved_4m, high_4m, allow = _prepare(
        mode, cr0, cr4, efer, rflags, access, cpl, maxphyaddr)
    is_write = error_code & _U(PFERR_WRITE) != _ZERO
    cr3 = _U(cr3)
    mem_size = _U(mem.size)
    if mode == MODE_LEVEL5:
        top_level = 5
        top_bit = _U(56)
    else:
        top_level = 4 if mode == MODE_LEVEL4 else 2  # PAE PDPTEs have no A bit
        top_bit = _U(47)
    canonical_high = (_ONE << (_U(64) - top_bit)) - _ONE
    entry_size = _U(4) if mode == MODE_BITS32 else _U(8)
    # A/D updates are compare-and-swaps (other vCPUs may be changing the same tables) where
    # the entry is naturally aligned in host memory; byte stores otherwise (a copy in a
    # misaligned array is nobody else's).
    address = _U(mem.ctypes.data)
    # 8-byte entries at 8-aligned offsets are single elements of a uint64 view of ``mem``
    # (made once per call, not per walk).
    mem64 = mem[:mem.size - mem.size % 8].view(np.uint64)
    # Walks are chains of dependent loads that mostly miss the L1 cache. Before each group
    # of four 4/5-level walks, run their chains side by side (loads only, indices clamped
    # into the first segment, results unchecked) so the misses overlap; the checked walks
    # that follow find their entries in the cache. No answer depends on this.
    prefetch = False
    first_gpa = _ZERO
    first_entry = _ZERO
    last_entry = _ZERO
    if (mode == MODE_LEVEL4 or mode == MODE_LEVEL5) and segs.shape[0] > 0:
        first_gpa = segs[0, 0]
        first_entry = segs[0, 2] >> _U(3)
        entries = segs[0, 1] >> _U(3)
        prefetch = (first_gpa % _U(8) == _ZERO and segs[0, 2] % _U(8) == _ZERO and entries > _ZERO
                    and first_entry + entries <= _U(mem64.size))
        if prefetch:
            last_entry = entries - _ONE
    touched = _ZERO
    for i in range(count):
        if prefetch and i % 4 == 0 and i + 4 <= count:
            la_a = _U(glas[i])
            la_b = _U(glas[i + 1])
            la_c = _U(glas[i + 2])
            la_d = _U(glas[i + 3])
            t_a = cr3 & addr_mask
            t_b = t_a
            t_c = t_a
            t_d = t_a
            shift = top_bit - _U(8)
            for _ in range(top_level):
                o_a = min((t_a + ((la_a >> shift) & _INDEX9) * _U(8) - first_gpa) >> _U(3),
                          last_entry)
                o_b = min((t_b + ((la_b >> shift) & _INDEX9) * _U(8) - first_gpa) >> _U(3),
                          last_entry)
                o_c = min((t_c + ((la_c >> shift) & _INDEX9) * _U(8) - first_gpa) >> _U(3),
                          last_entry)
                o_d = min((t_d + ((la_d >> shift) & _INDEX9) * _U(8) - first_gpa) >> _U(3),
                          last_entry)
                t_a = mem64[first_entry + o_a] & addr_mask
                t_b = mem64[first_entry + o_b] & addr_mask
                t_c = mem64[first_entry + o_c] & addr_mask
                t_d = mem64[first_entry + o_d] & addr_mask
                shift -= _U(9)
            touched ^= t_a ^ t_b ^ t_c ^ t_d
        la = _U(glas[i])
        attempt = 0
        while True:  # again when an entry changed between its read and its A/D update
            status = WALK_OK
            gpa = _ZERO
            code = _ZERO
            page_size = _ZERO
            level = 0
            e1 = _ZERO
            e2 = _ZERO
            e3 = _ZERO
            e4 = _ZERO
            e5 = _ZERO
            # Each entry's offset in ``mem`` and the value the walk read there.
            o1 = _ZERO
            o2 = _ZERO
            o3 = _ZERO
            o4 = _ZERO
            o5 = _ZERO
            v1 = _ZERO
            v2 = _ZERO
            v3 = _ZERO
            v4 = _ZERO
            v5 = _ZERO
            rights = _PTE_RW | _PTE_US  # and-ed over the entries that carry rights
            xd_bits = _ZERO  # or-ed over them: bit 63 tells NX
            if mode == MODE_FLAT:
                gpa = la
                page_size = _U(4096)
            elif mode == MODE_LEVEL4 or mode == MODE_LEVEL5:
                sign = la >> top_bit
                if sign != _ZERO and sign != canonical_high:
                    status = WALK_NONCANONICAL
                else:
                    table = cr3 & addr_mask
                    level = top_level
                    shift = top_bit - _U(8)  # 39 or 48
                    while True:
                        entry_gpa = table + ((la >> shift) & _INDEX9) * _U(8)
                        offset = _offset(mem_size, segs, entry_gpa, _U(8))
                        if offset == _NOWHERE:
                            status = WALK_BAD_GPA
                            gpa = entry_gpa
                            break
                        entry = _entry64(mem, mem64, offset)
                        if level == 1:
                            e1 = entry_gpa
                            o1 = offset
                            v1 = entry
                        elif level == 2:
                            e2 = entry_gpa
                            o2 = offset
                            v2 = entry
                        elif level == 3:
                            e3 = entry_gpa
                            o3 = offset
                            v3 = entry
                        elif level == 4:
                            e4 = entry_gpa
                            o4 = offset
                            v4 = entry
                        else:
                            e5 = entry_gpa
                            o5 = offset
                            v5 = entry
                        if entry & _PTE_P == _ZERO:
                            status = WALK_PAGE_FAULT
                            code = error_code
                            break
                        reserved = reserved_high
                        is_leaf = level == 1
                        if entry & _PTE_PS != _ZERO:  # in a PTE, bit 7 is PAT
                            if level >= 4:
                                reserved |= _PTE_PS
                            elif level == 3:
                                reserved |= _RSVD_1G
                                is_leaf = True
                            elif level == 2:
                                reserved |= _RSVD_2M
                                is_leaf = True
                        if entry & reserved != _ZERO:
                            status = WALK_PAGE_FAULT
                            code = error_code | _U(PFERR_PRESENT | PFERR_RSVD)
                            break
                        rights &= entry
                        xd_bits |= entry
                        table = entry & addr_mask
                        if is_leaf:
                            page_size = _ONE << shift
                            gpa = (table & ~(page_size - _ONE)) | (la & (page_size - _ONE))
                            break
                        level -= 1
                        shift -= _U(9)
            elif mode == MODE_PAE:
                la &= _LOW32
                while True:  # one pass; ``break`` ends the walk
                    level = 3
                    e3 = (cr3 & _PAE_CR3) + ((la >> _U(30)) & _U(3)) * _U(8)
                    o3 = _offset(mem_size, segs, e3, _U(8))
                    if o3 == _NOWHERE:
                        status = WALK_BAD_GPA
                        gpa = e3
                        break
                    pdpte = _entry64(mem, mem64, o3)
                    v3 = pdpte
                    if pdpte & _PTE_P == _ZERO:
                        status = WALK_PAGE_FAULT
                        code = error_code
                        break
                    if pdpte & (_PAE_PDPTE_FIXED_RSVD | ~(addr_mask | _PAGE_OFFSET)) != _ZERO:
                        status = WALK_BAD_PDPTE
                        break
                    level = 2
                    e2 = (pdpte & addr_mask) + ((la >> _U(21)) & _INDEX9) * _U(8)
                    o2 = _offset(mem_size, segs, e2, _U(8))
                    if o2 == _NOWHERE:
                        status = WALK_BAD_GPA
                        gpa = e2
                        break
                    pde = _entry64(mem, mem64, o2)
                    v2 = pde
                    if pde & _PTE_P == _ZERO:
                        status = WALK_PAGE_FAULT
                        code = error_code
                        break
                    large = pde & _PTE_PS != _ZERO
                    if pde & (reserved_high | (_RSVD_2M if large else _ZERO)) != _ZERO:
                        status = WALK_PAGE_FAULT
                        code = error_code | _U(PFERR_PRESENT | PFERR_RSVD)
                        break
                    rights &= pde
                    xd_bits |= pde
                    if large:
                        page_size = _U(0x200000)
                        gpa = (pde & addr_mask & ~(page_size - _ONE)) | (la & (page_size - _ONE))
                        break
                    level = 1
                    e1 = (pde & addr_mask) + ((la >> _U(12)) & _INDEX9) * _U(8)
                    o1 = _offset(mem_size, segs, e1, _U(8))
                    if o1 == _NOWHERE:
                        status = WALK_BAD_GPA
                        gpa = e1
                        break
                    pte = _entry64(mem, mem64, o1)
                    v1 = pte
                    if pte & _PTE_P == _ZERO:
                        status = WALK_PAGE_FAULT
                        code = error_code
                        break
                    if pte & reserved_high != _ZERO:
                        status = WALK_PAGE_FAULT
                        code = error_code | _U(PFERR_PRESENT | PFERR_RSVD)
                        break
                    rights &= pte
                    xd_bits |= pte
                    page_size = _U(4096)
                    gpa = (pte & addr_mask) | (la & _PAGE_OFFSET)
                    break
            else:  # MODE_BITS32
                la &= _LOW32
                while True:  # one pass; ``break`` ends the walk
                    level = 2
                    e2 = (cr3 & _BITS32_TABLE) + ((la >> _U(22)) & _INDEX10) * _U(4)
                    o2 = _offset(mem_size, segs, e2, _U(4))
                    if o2 == _NOWHERE:
                        status = WALK_BAD_GPA
                        gpa = e2
                        break
                    pde = _load32(mem, o2)
                    v2 = pde
                    if pde & _PTE_P == _ZERO:
                        status = WALK_PAGE_FAULT
                        code = error_code
                        break
                    rights &= pde
                    if pde & _PTE_PS != _ZERO and pse:
                        if pde & reserved_4m != _ZERO:
                            status = WALK_PAGE_FAULT
                            code = error_code | _U(PFERR_PRESENT | PFERR_RSVD)
                            break
                        page_size = _U(0x400000)
                        high = (pde >> _U(13)) & high_4m
                        gpa = (pde & _BITS32_4M_FRAME) | (high << _U(32)) | (la & (page_size - _ONE))
                        break
                    level = 1
                    e1 = (pde & _BITS32_TABLE) + ((la >> _U(12)) & _INDEX10) * _U(4)
                    o1 = _offset(mem_size, segs, e1, _U(4))
                    if o1 == _NOWHERE:
                        status = WALK_BAD_GPA
                        gpa = e1
                        break
                    pte = _load32(mem, o1)
                    v1 = pte
                    if pte & _PTE_P == _ZERO:
                        status = WALK_PAGE_FAULT
                        code = error_code
                        break
                    rights &= pte
                    page_size = _U(4096)
                    gpa = (pte & _BITS32_TABLE) | (la & _PAGE_OFFSET)
                    break

            changed = False
            if status == WALK_OK and mode != MODE_FLAT:
                # Without NXE bit 63 is reserved: a walk that got here has it only if NX counts.
                index = ((rights >> _ONE) & _U(3)) | ((xd_bits >> _U(63)) << _U(2))
                if (allow >> index) & _ONE == _ZERO:
                    status = WALK_PAGE_FAULT
                    code = error_code | _U(PFERR_PRESENT)
                    gpa = _ZERO
                    page_size = _ZERO
                elif set_ad:
                    # Top level first, as a CPU sets them; every o<k> used passed _offset. An
                    # entry that no longer holds what the walk read makes the walk start over
                    # (KVM's walker does the same).
                    for k in range(5, 0, -1):
                        if k > top_level or k < level:
                            continue
                        if k == 5:
                            offset, value = o5, v5
                        elif k == 4:
                            offset, value = o4, v4
                        elif k == 3:
                            offset, value = o3, v3
                        elif k == 2:
                            offset, value = o2, v2
                        else:
                            offset, value = o1, v1
                        bits = _U(_ACCESSED)
                        if is_write and k == level:
                            bits |= _U(_DIRTY)
                        if value & bits == bits:
                            continue
                        if (address + offset) % entry_size != _ZERO:
                            mem[offset] |= np.uint8(bits)
                        elif entry_size == _U(8):
                            if atomic_cas64(mem, offset, value, value | bits) != value:
                                changed = True
                                break
                        elif atomic_cas32(mem, offset, np.uint32(value), np.uint32(value | bits)) != np.uint32(value):
                            changed = True
                            break
            if not changed:
                break
            attempt += 1
            if attempt > MAX_WALK_RETRIES:
                status = WALK_CONTENDED
                gpa = _ZERO
                code = _ZERO
                break
        statuses[i] = status
        gpas[i] = gpa
        error_codes[i] = code
        if i < detail_rows:
            details[i, OUT_GPA] = gpa
            details[i, OUT_ERROR_CODE] = code
            details[i, OUT_PAGE_SIZE] = page_size
            details[i, OUT_LEVEL] = level
            details[i, OUT_ENTRY_GPA] = e1
            details[i, OUT_ENTRY_GPA + 1] = e2
            details[i, OUT_ENTRY_GPA + 2] = e3
            details[i, OUT_ENTRY_GPA + 3] = e4
            details[i, OUT_ENTRY_GPA + 4] = e5
    return touched  # meaningless; returned so the prefetching loads are kept


@kernel
def walk(mem, segs, cr3, mode, cr0, cr4, efer, rflags, gla, access, cpl, set_ad,
         maxphyaddr, out):
    """Translate one guest-linear address; see the module docstring for the contract.

    A convenience over ``walk_batch`` (it allocates one-element arrays per call): loops
    should call ``walk_batch``.
    """
    glas = np.full(1, gla, np.uint64)
    gpas = np.zeros(1, np.uint64)
    statuses = np.zeros(1, np.int64)
    error_codes = np.zeros(1, np.uint64)
    details = np.zeros((1, OUT_LEN), np.uint64)
    walk_batch(mem, segs, cr3, mode, cr0, cr4, efer, rflags, glas, access, cpl,
               set_ad, maxphyaddr, gpas, statuses, error_codes, details)
    for k in range(min(OUT_LEN, out.size)):
        out[k] = details[0, k]
    return statuses[0]


# ---------------------------------------------------------------------------------------------
# Python wrappers: validate inputs, name the results.


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """The paging mode selected by CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57."""
    if not cr0 & CR0_PG:
        return PagingMode.FLAT
    if not cr4 & CR4_PAE:
        return PagingMode.BITS32
    if not efer & EFER_LMA:
        return PagingMode.PAE
    return PagingMode.LEVEL5 if cr4 & CR4_LA57 else PagingMode.LEVEL4


@dataclass(frozen=True)
class Translation:
    """One translation's result. A guest fault is a result, not an exception.

    ``gpa`` is None unless ``status`` is OK; ``error_code`` is the #PF error code when
    ``status`` is PAGE_FAULT (0 otherwise); ``level`` is the leaf's level (1 = PTE), or the
    level of the entry where the walk stopped.
    """

    gla: int
    status: WalkStatus
    gpa: int | None
    page_size: int
    level: int
    error_code: int

    @property
    def fault(self) -> bool:
        return self.status != WalkStatus.OK


@dataclass(frozen=True)
class _Walker:
    """Validated register state in the kernels' argument types."""

    mem: np.ndarray
    segs: np.ndarray  # uint64 (n, 3): guest-physical start, size, offset in ``mem``
    cr3: np.uint64
    mode: int
    cr0: np.uint64
    cr4: np.uint64
    efer: np.uint64
    rflags: np.uint64
    cpl: int
    set_ad: bool
    maxphyaddr: int

    def access_code(self, access: Access, implicit_supervisor: bool) -> int:
        access = Access(access)
        if implicit_supervisor:
            if access == Access.EXECUTE:
                raise ValueError("instruction fetches are never implicit supervisor accesses")
            return int(access) | ACCESS_IMPLICIT_SUPERVISOR
        return int(access)

    def check_gla(self, gla: int) -> np.uint64:
        limit = 1 << (32 if self.mode in (MODE_BITS32, MODE_PAE) else 64)
        if not 0 <= gla < limit:
            raise ValueError(f"guest-linear address {gla:#x} out of range for {PagingMode(self.mode).name}")
        return np.uint64(gla)

    def walk(self, gla: int, access_code: int, out: np.ndarray) -> int:
        return walk(self.mem, self.segs, self.cr3, self.mode, self.cr0, self.cr4,
                    self.efer, self.rflags, self.check_gla(gla), access_code, self.cpl,
                    self.set_ad, self.maxphyaddr, out)


def _u64(name: str, value: int) -> np.uint64:
    value = int(value)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name}={value:#x} is not a 64-bit register value")
    return np.uint64(value)


def segment_table(mem: np.ndarray, segments) -> np.ndarray:
    """The kernels' segment table from ``(gpa, size, offset in mem)`` rows, checked: each
    segment lies inside ``mem`` and segments do not overlap in guest-physical space."""
    rows = [tuple(int(x) for x in row) for row in segments]
    for gpa, size, offset in rows:
        if size <= 0 or gpa < 0 or offset < 0 or offset + size > mem.size or gpa + size > 1 << 64:
            raise ValueError(f"segment {gpa:#x}+{size:#x} at offset {offset:#x} is not inside mem "
                             f"({mem.size:#x} bytes)")
    ordered = sorted(rows)
    for (g1, s1, _), (g2, _, _) in zip(ordered, ordered[1:]):
        if g1 + s1 > g2:
            raise ValueError(f"segments at {g1:#x} and {g2:#x} overlap")
    return np.array(rows, np.uint64).reshape(len(rows), 3)


def _walker(mem, *, cr3, cr0, cr4=0, efer=0, rflags=0, cpl=0, mode=None, set_ad=False,
            maxphyaddr=DEFAULT_MAXPHYADDR, mem_base_gpa=0, segments=None) -> _Walker:
    if not (isinstance(mem, np.ndarray) and mem.dtype == np.uint8 and mem.ndim == 1
            and mem.flags.c_contiguous):
        raise TypeError("mem must be a 1-D contiguous numpy uint8 array")
    if set_ad and not mem.flags.writeable:
        raise ValueError("set_ad needs a writeable mem")
    if not 32 <= maxphyaddr <= 52:
        raise ValueError(f"maxphyaddr={maxphyaddr} outside 32..52")
    if cpl not in (0, 1, 2, 3):
        raise ValueError(f"cpl={cpl} outside 0..3")
    if mode is None:
        mode = paging_mode(cr0, cr4, efer)
    if segments is None:
        segs = segment_table(mem, [(_u64("mem_base_gpa", mem_base_gpa), mem.size, 0)] if mem.size else [])
    elif isinstance(segments, np.ndarray) and segments.dtype == np.uint64 and segments.ndim == 2:
        segs = segments  # already a table (GuestMemory.host_window checks its own)
    else:
        segs = segment_table(mem, segments)
    return _Walker(mem, segs, _u64("cr3", cr3),
                   int(PagingMode(mode)), _u64("cr0", cr0), _u64("cr4", cr4),
                   _u64("efer", efer), _u64("rflags", rflags), int(cpl), bool(set_ad),
                   int(maxphyaddr))


def _translation(gla: int, status: int, out: np.ndarray) -> Translation:
    status = WalkStatus(status)
    if status == WalkStatus.BAD_GPA:
        raise GuestMemoryError(
            f"page walk for guest-linear {gla:#x} reads a level-{int(out[OUT_LEVEL])} entry "
            f"at guest-physical {int(out[OUT_GPA]):#x}, outside guest memory"
        )
    ok = status == WalkStatus.OK
    return Translation(gla, status, int(out[OUT_GPA]) if ok else None,
                       int(out[OUT_PAGE_SIZE]), int(out[OUT_LEVEL]), int(out[OUT_ERROR_CODE]))


def translate(mem: np.ndarray, gla: int, *, access: Access = Access.READ,
              implicit_supervisor: bool = False, **registers) -> Translation:
    """Translate ``gla`` as the CPU would for ``access`` at ``cpl``.

    Keywords: ``cr3``, ``cr0`` (required), ``cr4``, ``efer``, ``rflags``, ``cpl``,
    ``mode`` (derived from CR0/CR4/EFER when omitted), ``set_ad``, ``maxphyaddr``, and where
    ``mem`` is: ``mem_base_gpa`` (one segment, the whole array from that guest-physical
    address) or ``segments`` (``(gpa, size, offset in mem)`` rows, or a
    :func:`segment_table`). Raises GuestMemoryError when the walk needs a table entry outside
    ``mem`` (the answer cannot be known); every guest-visible outcome is a Translation.
    """
    walker = _walker(mem, **registers)
    out = np.zeros(OUT_LEN, np.uint64)
    status = walker.walk(gla, walker.access_code(access, implicit_supervisor), out)
    return _translation(int(gla), status, out)


_NO_DETAILS = np.empty((0, OUT_LEN), np.uint64)


def translate_batch(mem: np.ndarray, glas: np.ndarray, *, access: Access = Access.READ,
                    implicit_supervisor: bool = False, **registers):
    """Translate many addresses at once: returns ``(gpas, statuses, error_codes)``.

    ``statuses`` holds WalkStatus values; ``gpas`` is meaningful where the status is OK, and
    holds the out-of-memory entry address where it is BAD_GPA (nothing is raised here).
    """
    walker = _walker(mem, **registers)
    glas = np.ascontiguousarray(glas, dtype=np.uint64)
    if walker.mode in (MODE_BITS32, MODE_PAE) and glas.size and int(glas.max()) >> 32:
        raise ValueError("guest-linear addresses above 4 GiB in a 32-bit paging mode")
    gpas = np.empty(glas.size, np.uint64)
    statuses = np.empty(glas.size, np.int64)
    error_codes = np.empty(glas.size, np.uint64)
    walk_batch(walker.mem, walker.segs, walker.cr3, walker.mode, walker.cr0,
               walker.cr4, walker.efer, walker.rflags, glas,
               walker.access_code(access, implicit_supervisor), walker.cpl, walker.set_ad,
               walker.maxphyaddr, gpas, statuses, error_codes, _NO_DETAILS)
    return gpas, statuses, error_codes


@dataclass(frozen=True)
class CopySetup:
    """The guest-physical pieces of a guest-linear range (bhyve's ``vm_copy_setup``).

    ``chunks`` is a tuple of ``(gpa, length)``, one per page touched, in order; when a page
    faults, ``chunks`` is empty and ``fault`` is that page's Translation (its ``gla`` is the
    first faulting byte).
    """

    chunks: tuple[tuple[int, int], ...]
    fault: Translation | None = None


def copy_setup(mem: np.ndarray, gla: int, length: int, *, access: Access = Access.READ,
               implicit_supervisor: bool = False, **registers) -> CopySetup:
    """Split ``[gla, gla + length)`` into guest-physical chunks, or report the first fault.

    With ``set_ad`` the pages before a faulting one keep the A/D bits their walks set, as
    on a CPU. Linear addresses wrap at 4 GiB in 32-bit paging modes.
    """
    if length < 0:
        raise ValueError(f"negative length {length}")
    walker = _walker(mem, **registers)
    code = walker.access_code(access, implicit_supervisor)
    wrap = (1 << 32) - 1 if walker.mode in (MODE_BITS32, MODE_PAE) else (1 << 64) - 1
    out = np.zeros(OUT_LEN, np.uint64)
    chunks = []
    address = int(gla)
    while length:
        translation = _translation(address, walker.walk(address, code, out), out)
        if translation.fault:
            return CopySetup((), translation)
        size = min(length, translation.page_size - (translation.gpa % translation.page_size))
        chunks.append((translation.gpa, size))
        length -= size
        address = (address + size) & wrap
    return CopySetup(tuple(chunks))


def segment_offset(segs: np.ndarray, gpa: int, size: int) -> int | None:
    """Offset in the memory array of guest-physical ``[gpa, gpa + size)`` through a segment
    table, None where no one segment holds it (MMIO, or a gap)."""
    for start, length, offset in segs.tolist():
        if start <= gpa and gpa + size <= start + length:
            return offset + gpa - start
    return None


def _chunk_offsets(segs: np.ndarray, setup: CopySetup):
    if setup.fault is not None:
        raise GuestFault(setup.fault)
    offsets = []
    for gpa, size in setup.chunks:
        offset = segment_offset(segs, gpa, size)
        if offset is None:
            raise GuestMemoryError(f"guest-physical {gpa:#x}+{size:#x} is outside guest memory")
        offsets.append((offset, size))
    return offsets


def copy_in(mem: np.ndarray, gla: int, length: int, **registers) -> bytes:
    """Read ``length`` bytes at guest-linear ``gla`` (bhyve's ``vm_copyin``).

    Raises GuestFault (nothing read) if any page faults, GuestMemoryError if a page is not
    backed by ``mem``. Takes the same keywords as ``translate``.
    """
    setup = copy_setup(mem, gla, length, **registers)
    offsets = _chunk_offsets(_walker(mem, **registers).segs, setup)
    return b"".join(mem[offset:offset + size].tobytes() for offset, size in offsets)


def copy_out(mem: np.ndarray, gla: int, data: bytes, **registers) -> None:
    """Write ``data`` at guest-linear ``gla`` as a write access (bhyve's ``vm_copyout``).

    All-or-nothing: a fault or an unbacked page anywhere in the range writes nothing.
    """
    data = bytes(data)
    setup = copy_setup(mem, gla, len(data), access=Access.WRITE, **registers)
    position = 0
    for offset, size in _chunk_offsets(_walker(mem, **registers).segs, setup):
        mem[offset:offset + size] = np.frombuffer(data, np.uint8, size, position)
        position += size
