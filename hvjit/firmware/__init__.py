"""Firmware tables a PC guest looks for in memory: ACPI (:mod:`.acpi`) and the Intel MP table
(:mod:`.mptable`), written into the BIOS area 0xE0000-0xFFFFF of guest RAM."""

from .acpi import write_acpi_tables
from .mptable import write_mp_table

__all__ = ["write_acpi_tables", "write_mp_table"]
