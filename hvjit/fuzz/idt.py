"""A crash-reporting IDT for 64-bit guests that have none (flat CPL3 fuzz targets).

Every vector's gate leads to a stub that reports to the harness port: eax = EXCEPTION |
vector << 8, rsi = the faulting rip, rdi = the error code (0 where the CPU pushes none).
The handlers run at CPL0 on the TSS's RSP0 stack, a few instructions once per crash. They
live in the free tail of hvjit's entry system area (``hvjit.entry``), so only a guest put
into long mode by hvjit gets them; any other guest without an IDT triple-faults instead,
which the harness also reports.
"""

from __future__ import annotations

import struct

from .. import entry
from ..asm import assemble
from ..errors import MemoryMapError

PF = 14
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
IDT_OFF = 0xC000  # in the system area, after the entry's 32-bit page directory
STUBS_OFF = 0xD000  # 256 stubs of 16 bytes, then the common tail
EFER_LMA = 1 << 10

assert entry.PD32_OFF + 0x1000 <= IDT_OFF and STUBS_OFF + 0x1100 <= entry.SYSAREA_SIZE


def _stubs_source(port: int, report: int) -> str:
    lines = [".code64"]
    for v in range(256):
        lines.append(".balign 16")
        if v not in ERROR_CODE_VECTORS:
            lines.append("pushq $0")
        lines += [f"pushq ${v}", "jmp common"]
    lines += [
        ".balign 16",
        "common:",
        "pop %rax",            # vector
        "pop %rdi",            # error code
        "mov (%rsp), %rsi",    # faulting rip (the frame: rip, cs, rflags, rsp, ss)
        "shl $8, %eax",
        f"or ${report}, %eax",
        f"mov ${port:#x}, %dx",
        "outl %eax, %dx",
        "1: jmp 1b",
    ]
    return "\n".join(lines) + "\n"


def _gate(offset: int) -> bytes:
    """A 64-bit interrupt gate, DPL3 (so `int3` at CPL3 reports #BP, not #GP)."""
    return struct.pack("<HHBBHII", offset & 0xFFFF, entry.SEL_CODE64, 0, 0xEE,
                       (offset >> 16) & 0xFFFF, offset >> 32, 0)


def install(vm, port: int, report: int) -> bool:
    """Install the IDT if the guest is in long mode with hvjit's system area and no IDT.

    Returns whether it was installed.
    """
    vcpu = vm.vcpu(0)
    sregs = vcpu.get_sregs()
    if not int(sregs["efer"]) & EFER_LMA or int(sregs["idt"]["limit"]) != 0:
        return False
    try:
        sysarea = entry.sysarea_gpa(vm)
    except MemoryMapError:  # no room for a system area: not set up by hvjit.entry
        return False
    if int(sregs["tr"]["base"]) != sysarea + entry.TSS_OFF:
        return False
    stubs = sysarea + STUBS_OFF
    vm.memory.write(stubs, assemble(_stubs_source(port, report), stubs))
    vm.memory.write(sysarea + IDT_OFF, b"".join(_gate(stubs + 16 * v) for v in range(256)))
    sregs["idt"]["base"], sregs["idt"]["limit"] = sysarea + IDT_OFF, 256 * 16 - 1
    vcpu.set_sregs(sregs)
    return True
