"""Emulating in user space what KVM could not run, and looking into guests.

- :mod:`.guest`: guest inspection (mode, page walks, memory by linear address, fetch,
  disassembly) and exception injection;
- :mod:`.failure`: the emulation-failure handler, one entry per instruction class;
- :mod:`.faults`: whether the CPU would refuse the instruction (#UD/#NM/#GP) instead;
- :mod:`.atomic`: locked read-modify-writes on guest RAM (compare-and-swap);
- :mod:`.special`: RDPRU, INVPCID, RD/WR FS/GS BASE, RDRAND/RDSEED;
- :mod:`.xstate`: the x87/SSE/XSAVE state instructions.
"""

from .failure import handle_emulation_failure
from .guest import GuestAccessError, cpu_mode, disassemble, fetch_code, translate
from .xstate import XStateLayout, compacted_offsets, xcr0_valid

__all__ = ["handle_emulation_failure", "GuestAccessError", "cpu_mode", "disassemble", "fetch_code",
           "translate", "XStateLayout", "compacted_offsets", "xcr0_valid"]
