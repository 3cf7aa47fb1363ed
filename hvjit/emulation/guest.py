"""Looking into a guest from the host: CPU mode, page walks through a vCPU's registers,
guest-physical and guest-linear reads and writes, instruction fetch and disassembly, and
injecting an exception into the guest.

Used by the emulation-failure path, by ``Vcpu.disassemble``/``Vcpu.translate`` and by
anything that inspects a stopped guest.
"""

from __future__ import annotations

from typing import Optional

from ..abi import KvmInternalError
from ..errors import GuestFault
from ..exits import VmExit
from ..kernels import pagewalk as pw
from ..kernels.decode import decode
from ..kernels.emulate import REG_NAMES
from ..kernels.format import format_instruction

EMULATION_FLAG_INSTRUCTION_BYTES = 1
RFLAGS_VM = 1 << 17


def cpl(sregs, regs=None) -> int:
    """The current privilege level: SS.DPL, which VMX and SVM (and KVM's own ``get_cpl``)
    keep equal to it. Not CS.DPL: a conforming code segment's DPL can be below the CPL.
    0 in real mode, 3 in virtual-8086 mode (RFLAGS.VM, when ``regs`` are given)."""
    if not int(sregs["cr0"]) & 1:
        return 0
    if regs is not None and int(regs["rflags"]) & RFLAGS_VM:
        return 3
    return int(sregs["ss"]["dpl"]) & 3


def cpu_mode(sregs) -> tuple[str, int]:
    """A human name for the vCPU's mode and its bitness for the decoder."""
    cr0, efer = int(sregs["cr0"]), int(sregs["efer"])
    if not cr0 & 1:
        return "real", 16
    if efer & (1 << 10):
        if sregs["cs"]["l"]:
            return f"long (CPL{cpl(sregs)})", 64
        return f"compatibility (CPL{cpl(sregs)})", 32 if sregs["cs"]["db"] else 16
    return f"protected (CPL{cpl(sregs)})", 32 if sregs["cs"]["db"] else 16


def instruction_bytes(exit_: VmExit) -> bytes:
    """The bytes KVM handed over with an emulation failure, if it did."""
    info = exit_.info
    if exit_.suberror != KvmInternalError.EMULATION or len(info) < 3:
        return b""
    if not info[0] & EMULATION_FLAG_INSTRUCTION_BYTES:
        return b""
    raw = b"".join(int(x).to_bytes(8, "little") for x in info[1:3])
    return raw[1 : 1 + min(raw[0], 15)]


def disassemble_text(code: bytes, bitness: int, address: int) -> str:
    if not code:
        return "(no instruction bytes)"
    rec = decode(code, bitness=bitness, address=address)
    return format_instruction(rec, code)


# ---- guest-linear access through the vCPU's page tables --------------------------------------


class GuestAccessError(Exception):
    """A guest-linear access the emulator cannot complete (fault, unbacked, no device)."""


_ACCESS_NAMES = {"r": 0, "read": 0, "w": 1, "write": 1, "x": 2, "execute": 2, "exec": 2}


def paging_registers(vcpu, sregs=None, regs=None) -> dict:
    sregs = vcpu.get_sregs() if sregs is None else sregs
    regs = vcpu.get_regs() if regs is None else regs
    mem, segs = vcpu.vm.memory.host_window()
    return dict(cr3=int(sregs["cr3"]), cr0=int(sregs["cr0"]), cr4=int(sregs["cr4"]),
                efer=int(sregs["efer"]), rflags=int(regs["rflags"]), cpl=cpl(sregs, regs),
                segments=segs), mem


def translate(vcpu, gla: int, access: str = "r"):
    """Translate a guest-linear address with the vCPU's CR0/CR3/CR4/EFER, RFLAGS and CPL.

    ``access`` is "r", "w" or "x"; returns a ``pagewalk.Translation`` (a fault is a result).
    """

    try:
        code = _ACCESS_NAMES[access.lower() if isinstance(access, str) else access]
    except KeyError:
        raise ValueError(f"access must be 'r', 'w' or 'x', not {access!r}") from None
    kw, mem = paging_registers(vcpu)
    return pw.translate(mem, int(gla), access=pw.Access(code), **kw)


def chunks(vcpu, kw, mem, gla: int, size: int, access: int):

    setup = pw.copy_setup(mem, gla, size, access=pw.Access(access), **kw)
    if setup.fault is not None:
        t = setup.fault
        raise GuestAccessError(f"{t.status.name.lower().replace('_', ' ')} at guest-linear {t.gla:#x} "
                               f"(error code {t.error_code:#x})")
    return setup.chunks


def _pieces(vcpu, gla: int, n: int, access: int):
    """(gpa, length) pieces of a guest-linear range, or GuestFault with the #PF error code."""
    kw, mem = paging_registers(vcpu)
    setup = pw.copy_setup(mem, int(gla), int(n), access=pw.Access(access), **kw)
    if setup.fault is not None:
        raise GuestFault(setup.fault)
    return setup.chunks


def read_virtual(vcpu, gla: int, n: int, *, raw: bool = False) -> bytes:
    """``n`` bytes at guest-linear ``gla`` through the vCPU's current paging (bhyve's
    copy-in). ``raw``: the bytes the CPU sees (software breakpoints included)."""
    memory = vcpu.vm.memory
    out = bytearray()
    for gpa, size in _pieces(vcpu, gla, n, 0):
        if not memory.is_mapped(gpa, size):
            raise GuestAccessError(f"guest-linear {gla:#x} maps to {gpa:#x}, which is not RAM")
        out += memory.read_raw(gpa, size) if raw else memory.read(gpa, size)
    return bytes(out)


def write_virtual(vcpu, gla: int, data: bytes) -> None:
    """Write ``data`` at guest-linear ``gla`` (bhyve's copy-out): every page is checked
    (present, writable as the vCPU's CPL would find it) before any byte is stored."""
    memory = vcpu.vm.memory
    pieces = _pieces(vcpu, gla, len(data), 1)
    for gpa, size in pieces:
        if not memory.is_mapped(gpa, size):
            raise GuestAccessError(f"guest-linear {gla:#x} maps to {gpa:#x}, which is not RAM")
    at = 0
    for gpa, size in pieces:
        memory.write(gpa, bytes(data[at:at + size]))
        at += size


def read_phys(vcpu, gpa: int, n: int, *, raw: bool = False) -> bytes:
    memory = vcpu.vm.memory
    if memory.is_mapped(gpa, n):
        return memory.read_raw(gpa, n) if raw else memory.read(gpa, n)
    handler = vcpu.vm.bus.mmio_handler(gpa, n)
    if handler is None:
        raise GuestAccessError(f"MMIO read at {gpa:#x} ({n} bytes) has no Python handler")
    value = int(handler(gpa, n, False, 0) or 0) & ((1 << (8 * n)) - 1)
    return value.to_bytes(n, "little")


def write_phys(vcpu, gpa: int, data: bytes) -> None:
    memory = vcpu.vm.memory
    if memory.is_mapped(gpa, len(data)):
        memory.write(gpa, data)
        return
    handler = vcpu.vm.bus.mmio_handler(gpa, len(data))
    if handler is None:
        raise GuestAccessError(f"MMIO write at {gpa:#x} ({len(data)} bytes) has no Python handler")
    handler(gpa, len(data), True, int.from_bytes(data, "little"))


def fetch_code(vcpu, linear: int, length: int = 15, sregs=None, regs=None, *, raw: bool = True) -> bytes:
    """Up to ``length`` instruction bytes at a guest-linear address (fewer if a page faults):
    as the CPU fetches them (``raw``, software breakpoints included) or as the guest wrote them."""
    kw, mem = paging_registers(vcpu, sregs, regs)
    out = b""
    address = int(linear)
    while len(out) < length:
        n = min(length - len(out), 0x1000 - (address & 0xFFF))
        try:
            for gpa, size in chunks(vcpu, kw, mem, address, n, 2):
                out += read_phys(vcpu, gpa, size, raw=raw)
        except Exception:  # noqa: BLE001 - a fault or unbacked page ends the fetch
            break
        address += n
    return out


def disassemble(vcpu, rip: Optional[int] = None, count: int = 1) -> list[tuple[int, bytes, str]]:
    """Decode ``count`` instructions from ``rip`` (default: the vCPU's) through its page tables.

    Returns ``[(address, bytes, text)]``; stops early where the code is unreadable.
    """

    sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
    _, bitness = cpu_mode(sregs)
    address = int(regs["rip"]) if rip is None else int(rip)
    cs_base = int(sregs["cs"]["base"]) if bitness != 64 else 0
    wrap = (1 << 64) - 1 if bitness == 64 else 0xFFFFFFFF
    out = []
    for _ in range(int(count)):
        code = fetch_code(vcpu, (cs_base + address) & wrap, 15, sregs, regs, raw=False)  # breakpoints hidden
        if not code:
            break
        rec = decode(code, bitness, address)
        n = int(rec["length"])
        out.append((address, code[:n], format_instruction(rec, code)))
        if rec["status"] != 0:
            break
        address = (address + n) & wrap
    return out


def inject_vector(vcpu, vector: int) -> None:
    """DESIGN.md's recipe: vectors 0-31 as an exception, higher ones as a soft interrupt."""
    ev = vcpu.get_events()
    if vector < 32:
        ev["exception"]["injected"] = 1
        ev["exception"]["nr"] = vector
        ev["exception"]["has_error_code"] = 0
        ev["exception"]["pending"] = 0
    else:
        ev["interrupt"]["injected"] = 1
        ev["interrupt"]["nr"] = vector
        ev["interrupt"]["soft"] = 1
    vcpu.set_events(ev)


def inject_fault(vcpu, vector: int, error_code: Optional[int]) -> None:
    """An exception with (``error_code`` not None) or without an error code; flags kept."""
    ev = vcpu.get_events()
    ev["exception"]["injected"] = 1
    ev["exception"]["nr"] = vector
    ev["exception"]["has_error_code"] = 0 if error_code is None else 1
    ev["exception"]["error_code"] = 0 if error_code is None else error_code
    ev["exception"]["pending"] = 0
    vcpu.set_events(ev)


class Fault(Exception):
    """The emulated instruction raises an exception: inject it, RIP stays on the instruction."""

    def __init__(self, vector: int, error_code: Optional[int] = None):
        super().__init__(vector, error_code)
        self.vector, self.error_code = vector, error_code


class NotEmulated(Exception):
    pass


def operand_linear(rec, regs, sregs, bitness: int) -> int:
    """The guest-linear address of the ModRM memory operand."""

    asz = int(rec["address_size"])
    amask = (1 << (8 * asz)) - 1
    ea = int(rec["disp"])
    base, index = int(rec["base_reg"]), int(rec["index_reg"])
    seg = "ds"
    if base == 16:
        ea += int(regs["rip"]) + int(rec["length"])
    elif base >= 0:
        ea += int(regs[REG_NAMES[base]])
        if base in (4, 5):
            seg = "ss"
    if index >= 0:
        ea += int(regs[REG_NAMES[index]]) * int(rec["scale"])
    ea &= amask
    if int(rec["segment"]) >= 0:
        seg = ("es", "cs", "ss", "ds", "fs", "gs")[int(rec["segment"])]
    if bitness == 64:
        if seg in ("fs", "gs"):
            return (int(sregs[seg]["base"]) + ea) & ((1 << 64) - 1)
        return ea
    return (int(sregs[seg]["base"]) + ea) & 0xFFFFFFFF


class GuestLinear:
    """Guest-linear reads and (fault-checked-first) writes through the vCPU's page tables."""

    def __init__(self, vcpu, sregs, regs) -> None:
        self.vcpu = vcpu
        self.kw, self.mem = paging_registers(vcpu, sregs, regs)
        self.kw["set_ad"] = True

    def read(self, gla: int, n: int) -> bytes:
        return b"".join(read_phys(self.vcpu, gpa, sz) for gpa, sz in chunks(self.vcpu, self.kw, self.mem, gla, n, 0))

    def write_pieces(self, gla: int, pieces: list[tuple[int, bytes]]) -> None:
        """Write ``(offset, data)`` pieces at ``gla + offset``, after checking the whole extent."""
        if not pieces:
            return
        end = max(off + len(data) for off, data in pieces)
        chunks(self.vcpu, self.kw, self.mem, gla, end, 1)  # any fault before any store
        for off, data in pieces:
            at = 0
            for gpa, sz in chunks(self.vcpu, self.kw, self.mem, gla + off, len(data), 1):
                write_phys(self.vcpu, gpa, data[at:at + sz])
                at += sz


