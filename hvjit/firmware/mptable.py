"""The Intel MultiProcessor Specification 1.4 table, for guests that do not read ACPI.

A floating pointer (``_MP_``, 16 bytes, 16-byte aligned in the BIOS ROM area 0xF0000-0xFFFFF)
points to a configuration table (``PCMP``) right after it: one processor entry per vCPU
(APIC id = index, CPU 0 the bootstrap processor), bus 0 "ISA", the IOAPIC at 0xFEC00000,
I/O interrupt entries for ISA IRQs 0-15 (IRQ0 -> INTIN2 as PCs wire it, IRQ2 skipped,
the rest identity), ExtINT on LINT0 and NMI on LINT1 of every local APIC.
"""

from __future__ import annotations

import struct

from .acpi import BIOS_AREA_END, IOAPIC_GPA, LAPIC_GPA, AcpiError, checksum

DEFAULT_MP_GPA = 0xF0040  # after the RSDP at 0xF0000 (see hvjit.firmware.acpi)

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
CPU_ENABLED = 1
CPU_BSP = 2
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x00000600  # family 6
CPU_FEATURES = 0x00000201  # FPU, APIC
HEADER_SIZE = 44


def mp_table(*, cpus: int, gpa: int = DEFAULT_MP_GPA, ioapic_id: int | None = None) -> bytes:
    """Floating pointer + configuration table, to be placed at ``gpa``."""
    if not 1 <= cpus <= 254:
        raise AcpiError(f"cpus must be 1..254 for an MP table, got {cpus}")
    if gpa % 16:
        raise AcpiError(f"the MP floating pointer must be 16-byte aligned, not {gpa:#x}")
    ioapic_id = cpus if ioapic_id is None else ioapic_id  # unique among APIC ids (SeaBIOS)
    entries = bytearray()
    for i in range(cpus):
        flags = CPU_ENABLED | (CPU_BSP if i == 0 else 0)
        entries += struct.pack("<BBBBII8s", ENTRY_PROCESSOR, i, LAPIC_VERSION, flags,
                               CPU_SIGNATURE, CPU_FEATURES, bytes(8))
    entries += struct.pack("<BB6s", ENTRY_BUS, 0, b"ISA   ")
    entries += struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_GPA)
    count = cpus + 2
    for irq in range(16):
        if irq == 2:
            continue  # the cascade: IRQ0 takes INTIN2
        pin = 2 if irq == 0 else irq
        entries += struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, irq, ioapic_id, pin)
        count += 1
    for kind, lint in ((INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)):
        entries += struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0xFF, lint)
        count += 1
    config_gpa = gpa + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", HEADER_SIZE + len(entries), 4, 0,
                                   b"HVJIT   ", b"PC          ", 0, 0, count, LAPIC_GPA, 0, 0, 0))
    config = header + entries
    config[7] = checksum(config)
    floating = bytearray(struct.pack("<4sIBBB5s", b"_MP_", config_gpa, 1, 4, 0, bytes(5)))
    floating[10] = checksum(floating)
    return bytes(floating + config)


def write_mp_table(memory, *, cpus: int, gpa: int = DEFAULT_MP_GPA,
                   ioapic_id: int | None = None) -> int:
    """Write the MP floating pointer and configuration table at ``gpa``; returns ``gpa``."""
    data = mp_table(cpus=cpus, gpa=gpa, ioapic_id=ioapic_id)
    if gpa + len(data) > BIOS_AREA_END:
        raise AcpiError(f"the MP table ({len(data)} bytes) does not fit below 1 MiB at {gpa:#x}")
    is_mapped = getattr(memory, "is_mapped", None)
    if is_mapped is not None and not is_mapped(gpa, len(data)):
        raise AcpiError(f"no guest RAM at {gpa:#x}+{len(data):#x} for the MP table")
    memory.write(gpa, data)
    return gpa
