"""Minimal ACPI tables in the BIOS area: RSDP -> RSDT/XSDT -> FADT (-> FACS, DSDT) and MADT.

Layout (defaults): the tables from 0xE0000 (FACS first, 64-byte aligned), the RSDP at 0xF0000
(16-byte aligned: found both by scans of 0xE0000-0xFFFFF, as Linux and current kvm-unit-tests
do, and of 0xF0000-0xFFFFF, as older kvm-unit-tests do). The RSDP is revision 2 and points to
both an RSDT and an XSDT listing the FADT and the MADT.

- FADT (revision 3, 244 bytes): SCI on IRQ 9, no SMI_CMD (ACPI is always enabled: SCI_EN
  reads 1), PM1a_EVT_BLK = pm_base, PM1a_CNT_BLK = pm_base + 4, PM_TMR_BLK = pm_base + 8
  (24-bit timer), the same in the X_ fields; RESET_REG = IO port 0xcf9 value 0x06 (see
  :mod:`hvjit.devices.pci`); IAPC_BOOT_ARCH: legacy devices and an 8042; CENTURY = 0x32.
- DSDT: a header and one object, ``Name(\\_S5, Package(4){0, 0, 0, 0})``, so an OS can power
  off through PM1a_CNT (SLP_TYP 0 | SLP_EN -> :mod:`hvjit.devices.pm_timer` stops the VM).
- MADT: local APIC at 0xFEE00000 (PCAT_COMPAT), one enabled Processor Local APIC per vCPU
  (processor id = APIC id = index), the IOAPIC at 0xFEC00000 with GSI base 0, interrupt
  source overrides IRQ0 -> GSI2 and IRQ9 -> GSI9 level/active-high (the SCI), and a local
  APIC NMI on LINT1 for all processors.
"""

from __future__ import annotations

import itertools
import struct

from ..errors import HvjitError

BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000
DEFAULT_TABLE_BASE = 0xE0000
DEFAULT_RSDP_GPA = 0xF0000

LAPIC_GPA = 0xFEE00000
IOAPIC_GPA = 0xFEC00000
SCI_IRQ = 9
CENTURY_CMOS_REGISTER = 0x32
RESET_PORT = 0xCF9
RESET_VALUE = 0x06

DEFAULT_PM_BASE = 0x600
# Must match hvjit.devices.pm_timer (a unit test checks).
PM1_EVT_OFFSET = 0
PM1_CNT_OFFSET = 4
PM_TMR_OFFSET = 8
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR_LEN = 4

OEM_ID = b"HVJIT "
OEM_TABLE_ID = b"HVJITPC "
CREATOR_ID = b"HVJT"

HEADER_SIZE = 36
FADT_SIZE = 244
FACS_SIZE = 64
RSDP_SIZE = 36

# FADT flags
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1

# GAS address spaces and access sizes
GAS_SYSTEM_IO = 1
ACCESS_BYTE = 1
ACCESS_WORD = 2
ACCESS_DWORD = 3

# MADT entry types
MADT_LOCAL_APIC = 0
MADT_IOAPIC = 1
MADT_INT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4

# AML: Name(\_S5, Package(4){Zero, Zero, Zero, Zero})
S5_AML = bytes([0x08, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00])


class AcpiError(HvjitError, ValueError):
    """ACPI tables that cannot be written (no RAM there, too many CPUs...)."""


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = HEADER_SIZE + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID,
                         OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def _gas(address: int, bit_width: int, access_size: int, space: int = GAS_SYSTEM_IO) -> bytes:
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def build_fadt(*, facs: int, dsdt: int, pm_base: int) -> bytes:
    evt, cnt, tmr = pm_base + PM1_EVT_OFFSET, pm_base + PM1_CNT_OFFSET, pm_base + PM_TMR_OFFSET
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset, fmt, *values):
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(36, "<II", facs, dsdt)
    put(45, "<B", 0)  # preferred PM profile: unspecified
    put(46, "<H", SCI_IRQ)
    put(48, "<IBBBB", 0, 0, 0, 0, 0)  # no SMI_CMD: ACPI mode is always on
    put(56, "<IIIIIIII", evt, 0, cnt, 0, 0, tmr, 0, 0)
    put(88, "<BBBBBBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN, 0, 0, 0, 0)
    put(96, "<HH", 101, 1001)  # C2/C3 latencies above the limits: not supported
    put(108, "<BH", CENTURY_CMOS_REGISTER, IAPC_LEGACY_DEVICES | IAPC_8042)
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON
        | FADT_RESET_REG_SUP)
    put(116, "<12sB", _gas(RESET_PORT, 8, ACCESS_BYTE), RESET_VALUE)
    put(132, "<QQ", 0, dsdt)  # X_FIRMWARE_CTRL 0: FIRMWARE_CTRL holds the FACS (as QEMU)
    put(148, "<12s", _gas(evt, PM1_EVT_LEN * 8, ACCESS_WORD))
    put(172, "<12s", _gas(cnt, PM1_CNT_LEN * 8, ACCESS_WORD))
    put(208, "<12s", _gas(tmr, PM_TMR_LEN * 8, ACCESS_DWORD))
    return _table(b"FACP", 3, bytes(body))


def build_facs() -> bytes:
    facs = bytearray(FACS_SIZE)
    struct.pack_into("<4sI", facs, 0, b"FACS", FACS_SIZE)
    facs[32] = 1  # version
    return bytes(facs)


def build_dsdt() -> bytes:
    return _table(b"DSDT", 2, S5_AML)


def build_madt(cpus: int, *, ioapic_id: int = 0) -> bytes:
    body = bytearray(struct.pack("<II", LAPIC_GPA, 1))  # flags: PCAT_COMPAT (8259s present)
    for i in range(cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, i, i, 1)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, ioapic_id, 0, IOAPIC_GPA, 0)
    body += struct.pack("<BBBBIH", MADT_INT_OVERRIDE, 10, 0, 0, 2, 0)  # IRQ0 -> GSI2
    body += struct.pack("<BBBBIH", MADT_INT_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ, 0x000D)  # level, high
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)  # all CPUs, LINT1
    return _table(b"APIC", 1, bytes(body))


def build_rsdp(rsdt: int, xsdt: int) -> bytes:
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt, RSDP_SIZE,
                                 xsdt, 0, b"\0\0\0"))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def acpi_tables(*, cpus: int, pm_base: int = DEFAULT_PM_BASE, table_base: int = DEFAULT_TABLE_BASE,
                rsdp_gpa: int = DEFAULT_RSDP_GPA, ioapic_id: int = 0) -> dict[int, bytes]:
    """The tables as ``{gpa: bytes}`` (what :func:`write_acpi_tables` writes)."""
    if not 1 <= cpus <= 255:
        raise AcpiError(f"cpus must be 1..255 (xAPIC ids), got {cpus}")
    if not 0 < pm_base <= 0xFFFF - 12:
        raise AcpiError(f"pm_base {pm_base:#x} is not an IO port block")
    if rsdp_gpa % 16 or not BIOS_AREA_START <= rsdp_gpa <= BIOS_AREA_END - RSDP_SIZE:
        raise AcpiError(f"the RSDP must be 16-byte aligned inside 0xE0000-0xFFFFF, not {rsdp_gpa:#x}")
    out: dict[int, bytes] = {}
    at = _align(table_base, 64)

    def place(data: bytes, alignment: int = 16) -> int:
        nonlocal at
        at = _align(at, alignment)
        gpa = at
        out[gpa] = data
        at += len(data)
        return gpa

    facs = place(build_facs(), 64)
    dsdt = place(build_dsdt())
    fadt = place(build_fadt(facs=facs, dsdt=dsdt, pm_base=pm_base))
    madt = place(build_madt(cpus, ioapic_id=ioapic_id))
    rsdt = place(_table(b"RSDT", 1, struct.pack("<II", fadt, madt)))
    xsdt = place(_table(b"XSDT", 1, struct.pack("<QQ", fadt, madt)))
    out[rsdp_gpa] = build_rsdp(rsdt, xsdt)
    spans = sorted((g, g + len(d)) for g, d in out.items())
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise AcpiError(f"ACPI tables overlap at {start:#x}: move table_base or rsdp_gpa")
    if spans[-1][1] > BIOS_AREA_END:
        raise AcpiError("ACPI tables run past 1 MiB: move table_base")
    return out


def write_acpi_tables(memory, *, cpus: int, pm_base: int = DEFAULT_PM_BASE,
                      table_base: int = DEFAULT_TABLE_BASE, rsdp_gpa: int = DEFAULT_RSDP_GPA,
                      ioapic_id: int = 0) -> int:
    """Write RSDP, RSDT, XSDT, FADT, FACS, DSDT and MADT into guest RAM; returns the RSDP's gpa.

    ``memory``: the VM's :class:`~hvjit.memory.GuestMemory` (anything with ``write(gpa,
    bytes)``; ``is_mapped(gpa, n)`` is checked when present). ``pm_base`` must be the
    :class:`~hvjit.devices.pm_timer.PmTimer`'s base port.
    """
    tables = acpi_tables(cpus=cpus, pm_base=pm_base, table_base=table_base, rsdp_gpa=rsdp_gpa,
                         ioapic_id=ioapic_id)
    is_mapped = getattr(memory, "is_mapped", None)
    for gpa, data in tables.items():
        if is_mapped is not None and not is_mapped(gpa, len(data)):
            raise AcpiError(f"no guest RAM at {gpa:#x}+{len(data):#x} for the ACPI tables")
    for gpa, data in tables.items():
        memory.write(gpa, data)
    return rsdp_gpa
