"""Entry-state helpers: put a vCPU into real mode, 32-bit protected mode or 64-bit long mode.

The host builds what the guest would otherwise build itself — a GDT, a TSS whose I/O bitmap
is all zero (user-mode port IO is granted by the bitmap; IOPL 3 is set too), and page tables
identity-mapping the low 4 GiB with user-accessible pages — in a 64 KiB system area at the
top of low RAM (``sysarea_gpa``). At CPL3 a guest does port IO and runs at native speed even
where KVM emulates CPL0 code.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Optional

from .errors import HvjitError, MemoryMapError

SYSAREA_SIZE = 0x10000

# Offsets inside the system area.
GDT_OFF = 0x0000
TSS_OFF = 0x1000
IOBITMAP_OFF = TSS_OFF + 0x68
PML4_OFF = 0x4000
PDPT_OFF = 0x5000
PD_OFF = 0x6000  # four page directories: 0x6000-0x9fff
PD32_OFF = 0xA000  # a 32-bit page directory of 4 MiB pages
TSS_LIMIT = 0x68 + 0x2000  # the TSS and a full 8 KiB I/O bitmap (+ the 0xff terminator byte)

# GDT selectors.
SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18
SEL_USER_CODE64 = 0x23
SEL_USER_DATA = 0x2B
SEL_USER_CODE32 = 0x33
SEL_TSS = 0x38

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE = 0x10, 0x20
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_FIXED, RFLAGS_IOPL3 = 0x2, 0x3000


class Mode(str, enum.Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte GDT descriptor: access byte (P DPL S type) and flags nibble (G D/B L AVL)."""
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | flags << 52 | ((base >> 24) & 0xFF) << 56)


# (selector, access byte, flags nibble) for the flat code and data segments.
_FLAT_SEGMENTS = (
    (SEL_CODE64, 0x9B, 0xA),
    (SEL_DATA, 0x93, 0xC),
    (SEL_CODE32, 0x9B, 0xC),
    (SEL_USER_CODE64 & ~3, 0xFB, 0xA),
    (SEL_USER_DATA & ~3, 0xF3, 0xC),
    (SEL_USER_CODE32 & ~3, 0xFB, 0xC),
)


def sysarea_gpa(vm) -> int:
    """Where the system area goes: the top 64 KiB of the segment at guest-physical 0."""
    seg = next((s for s in vm.memory.segments if s.gpa == 0), None)
    if seg is None or seg.size < 2 * SYSAREA_SIZE:
        raise MemoryMapError("protected and long mode entry need at least 128 KiB of RAM at gpa 0")
    return min(seg.end, 1 << 32) - SYSAREA_SIZE


def build_system_tables(vm, long_mode: bool) -> int:
    """Write GDT, TSS (zero I/O bitmap) and identity page tables; returns the area's gpa."""
    base = sysarea_gpa(vm)
    mem = vm.memory
    mem.fill(base, SYSAREA_SIZE, 0)
    gdt = bytearray(0x48)
    for sel, access, flags in _FLAT_SEGMENTS:
        struct.pack_into("<Q", gdt, sel, _descriptor(0, 0xFFFFF, access, flags))
    tss = base + TSS_OFF
    struct.pack_into("<Q", gdt, SEL_TSS, _descriptor(tss, TSS_LIMIT, 0x8B, 0))
    struct.pack_into("<Q", gdt, SEL_TSS + 8, tss >> 32)
    mem.write(base + GDT_OFF, gdt)
    # TSS: the ring-0 stack just below the system area (64-bit: RSP0 at 4; 32-bit: ESP0 at 4
    # and SS0 at 8, which would be RSP0's high half), the I/O map base -> the bitmap (all
    # zero = every port allowed), then the terminating 0xff byte the architecture requires.
    if long_mode:
        mem.write_u64(tss + 4, base)
    else:
        mem.write_u32(tss + 4, base)
        mem.write_u32(tss + 8, SEL_DATA)
    mem.write_u16(tss + 0x66, 0x68)
    mem.write_u8(base + IOBITMAP_OFF + 0x2000, 0xFF)
    # 4-level tables: PML4[0] -> PDPT, PDPT[0..3] -> 4 PDs of 2 MiB user-writable pages.
    mem.write_u64(base + PML4_OFF, (base + PDPT_OFF) | 0x7)
    for i in range(4):
        mem.write_u64(base + PDPT_OFF + 8 * i, (base + PD_OFF + 0x1000 * i) | 0x7)
    pds = mem.view(base + PD_OFF, 0x4000).view("<u8")
    pds[:] = [(i << 21) | 0x87 for i in range(2048)]
    pd32 = mem.view(base + PD32_OFF, 0x1000).view("<u4")
    pd32[:] = [(i << 22) | 0x87 for i in range(1024)]
    return base


@dataclass(frozen=True)
class EntryState:
    mode: Mode
    cpl: int
    entry: int
    stack: int
    sysarea: Optional[int]


def _segment(sregs, name: str, selector: int, base: int, limit: int, type_: int, *, dpl: int,
             s: int = 1, db: int = 0, l: int = 0, g: int = 0) -> None:
    seg = sregs[name]
    seg["selector"], seg["base"], seg["limit"], seg["type"] = selector, base, limit, type_
    seg["present"], seg["dpl"], seg["db"], seg["s"], seg["l"], seg["g"] = 1, dpl, db, s, l, g
    seg["avl"], seg["unusable"] = 0, 0


def setup_real_mode(vcpu, entry: int, *, stack: Optional[int] = None) -> EntryState:
    """Real mode at CPL0, ``cs:ip`` reaching ``entry`` (below 1 MiB)."""
    if not 0 <= entry < 0x100000:
        raise HvjitError(f"real-mode entry {entry:#x} is above 1 MiB")
    cs = (entry >> 4) & 0xF000
    sregs = vcpu.get_sregs()
    _segment(sregs, "cs", cs, cs << 4, 0xFFFF, 0xB, dpl=0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(sregs, name, 0, 0, 0xFFFF, 0x3, dpl=0)
    sregs["cr0"] = CR0_ET
    sregs["cr4"] = 0
    sregs["efer"] = 0
    vcpu.set_sregs(sregs)
    sp = 0x7000 if stack is None else stack
    vcpu.set_registers(rip=entry - (cs << 4), rsp=sp, rflags=RFLAGS_FIXED)
    return EntryState(Mode.REAL, 0, entry, sp, None)


def _enter_paged_mode(vcpu, mode: Mode, entry: int, cpl: int, stack: Optional[int],
                      control: dict) -> EntryState:
    """What protected and long mode share: system tables, flat segments, TR/GDT, registers."""
    _check_cpl(cpl)
    long_mode = mode == Mode.LONG
    sysarea = build_system_tables(vcpu.vm, long_mode=long_mode)
    sregs = vcpu.get_sregs()
    if long_mode:
        code, data = (SEL_CODE64, SEL_DATA) if cpl == 0 else (SEL_USER_CODE64, SEL_USER_DATA)
    else:
        code, data = (SEL_CODE32, SEL_DATA) if cpl == 0 else (SEL_USER_CODE32, SEL_USER_DATA)
    _segment(sregs, "cs", code, 0, 0xFFFFFFFF, 0xB, dpl=cpl, db=0 if long_mode else 1,
             l=1 if long_mode else 0, g=1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(sregs, name, data, 0, 0xFFFFFFFF, 0x3, dpl=cpl, db=1, g=1)
    _segment(sregs, "tr", SEL_TSS, sysarea + TSS_OFF, TSS_LIMIT, 0xB, dpl=0, s=0)
    sregs["ldt"]["unusable"], sregs["ldt"]["present"] = 1, 0
    sregs["gdt"]["base"], sregs["gdt"]["limit"] = sysarea + GDT_OFF, 0x47
    sregs["idt"]["base"], sregs["idt"]["limit"] = 0, 0
    for name, value in control.items():
        sregs[name] = value(sysarea) if callable(value) else value
    vcpu.set_sregs(sregs)
    sp = sysarea if stack is None else stack
    vcpu.set_registers(rip=entry, rsp=sp, rflags=RFLAGS_FIXED | (RFLAGS_IOPL3 if cpl == 3 else 0))
    return EntryState(mode, cpl, entry, sp, sysarea)


def setup_protected_mode(vcpu, entry: int, *, cpl: int = 0, stack: Optional[int] = None,
                         paging: bool = False) -> EntryState:
    """32-bit protected mode with flat 4 GiB segments, at CPL0 or CPL3.

    ``paging`` turns on 32-bit paging (4 MiB user pages identity-mapping 4 GiB).
    """
    return _enter_paged_mode(vcpu, Mode.PROTECTED, entry, cpl, stack, {
        "cr0": CR0_PE | CR0_ET | CR0_NE | ((CR0_PG | CR0_WP) if paging else 0),
        "cr4": CR4_PSE if paging else 0,
        "cr3": (lambda sysarea: sysarea + PD32_OFF) if paging else 0,
        "efer": 0,
    })


def setup_long_mode(vcpu, entry: int, *, cpl: int = 0, stack: Optional[int] = None) -> EntryState:
    """64-bit long mode, identity-mapped low 4 GiB (2 MiB user pages), at CPL0 or CPL3."""
    return _enter_paged_mode(vcpu, Mode.LONG, entry, cpl, stack, {
        "cr0": CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        "cr4": CR4_PAE,
        "cr3": lambda sysarea: sysarea + PML4_OFF,
        "efer": EFER_LME | EFER_LMA,
    })


def setup_mode(vcpu, mode, entry: int, *, cpl: int = 0, stack: Optional[int] = None) -> EntryState:
    mode = Mode(mode)
    if mode == Mode.REAL:
        if cpl != 0:
            raise HvjitError("real mode runs at CPL0 only")
        return setup_real_mode(vcpu, entry, stack=stack)
    if mode == Mode.PROTECTED:
        return setup_protected_mode(vcpu, entry, cpl=cpl, stack=stack)
    return setup_long_mode(vcpu, entry, cpl=cpl, stack=stack)


def _check_cpl(cpl: int) -> None:
    if cpl not in (0, 3):
        raise HvjitError(f"CPL must be 0 or 3, got {cpl!r}")
