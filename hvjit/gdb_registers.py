"""What GDB sees of a vCPU: the target description (``i386:x86-64`` or ``i386``) and the
registers in that description's order, read from the vCPU and written back to it.

GDB's x86 code insists on the names and the order of its ``org.gnu.gdb.i386.core`` feature
(general registers, segment selectors, then the x87 registers); SSE, the FS/GS bases and
the control registers follow as optional features. x87 and SSE come from the vCPU's XSAVE
area (KVM_GET_FPU misreports MXCSR on some hosts); where the host gives no XSAVE area they
are sent as unavailable (``xx``), which GDB shows as ``<unavailable>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import HvjitError
from .gdb_protocol import GdbProtocolError, from_hex, to_hex

EFER_LMA = 1 << 10
# The XSAVE area's legacy (FXSAVE) region and header.
FX_ST0, FX_XMM0, FX_XSTATE_BV = 32, 160, 512
XSTATE_X87_SSE = 0b11


@dataclass(frozen=True)
class Reg:
    """One register of a description: GDB's name and type, and where its value lives.

    ``source``: ("gpr", name) in KVM_REGS, ("sel", segment) selector, ("base", segment),
    ("ctl", name) in KVM_SREGS, ("fx", offset, size) in the FXSAVE region, ("ftag",)
    the x87 tag word (stored abridged).
    """

    name: str
    bits: int
    type: str
    group: str
    source: tuple


@dataclass(frozen=True)
class Target:
    architecture: str
    features: tuple[tuple[str, str, tuple[Reg, ...]], ...]  # (name, type definitions XML, regs)

    @property
    def registers(self) -> tuple[Reg, ...]:
        return tuple(r for _, _, regs in self.features for r in regs)

    @property
    def bits(self) -> int:
        return 64 if self.architecture == "i386:x86-64" else 32

    def xml(self) -> bytes:
        parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
                 '<target version="1.0">', f"<architecture>{self.architecture}</architecture>"]
        n = 0
        for name, types, regs in self.features:
            parts.append(f'<feature name="{name}">{types}')
            for r in regs:
                parts.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" '
                             f'group="{r.group}" regnum="{n}"/>')
                n += 1
            parts.append("</feature>")
        parts.append("</target>")
        return "\n".join(parts).encode()


def _flags(ident: str, fields: list[tuple[str, int]]) -> str:
    body = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in fields)
    return f'<flags id="{ident}" size="4">{body}</flags>'


EFLAGS_TYPE = _flags("i386_eflags", [
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
    ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21)])
SSE_TYPES = (
    '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
    '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
    '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
    '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
    '<field name="uint128" type="uint128"/></union>'
    + _flags("i386_mxcsr", [("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
                            ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)]))

_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_X87 = (tuple(Reg(f"st{i}", 80, "i387_ext", "float", ("fx", FX_ST0 + 16 * i, 10)) for i in range(8)) + (
    Reg("fctrl", 32, "int", "float", ("fx", 0, 2)),
    Reg("fstat", 32, "int", "float", ("fx", 2, 2)),
    Reg("ftag", 32, "int", "float", ("ftag",)),
    Reg("fiseg", 32, "int", "float", ("fx", 12, 2)),
    Reg("fioff", 32, "int", "float", ("fx", 8, 4)),
    Reg("foseg", 32, "int", "float", ("fx", 20, 2)),
    Reg("fooff", 32, "int", "float", ("fx", 16, 4)),
    Reg("fop", 32, "int", "float", ("fx", 6, 2)),
))
_SYSTEM = tuple(Reg(n, 64, "int", "system", ("ctl", n)) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"))


def _core(gprs: tuple[tuple[str, str], ...], bits: int) -> tuple[Reg, ...]:
    ptr = {"sp": "data_ptr", "bp": "data_ptr", "ip": "code_ptr"}
    regs = tuple(Reg(gdb, bits, ptr.get(gdb[-2:], f"int{bits}"), "general", ("gpr", kvm)) for gdb, kvm in gprs)
    return regs + (Reg("eflags", 32, "i386_eflags", "general", ("gpr", "rflags")),) + tuple(
        Reg(s, 32, "int32", "general", ("sel", s)) for s in _SEGMENTS) + _X87


def _sse(count: int) -> tuple[Reg, ...]:
    return tuple(Reg(f"xmm{i}", 128, "vec128", "vector", ("fx", FX_XMM0 + 16 * i, 16)) for i in range(count)) + (
        Reg("mxcsr", 32, "i386_mxcsr", "vector", ("fx", 24, 4)),)


_AMD64_GPRS = tuple((n, n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip"))
_I386_GPRS = tuple(("e" + n[1:], n) for n in ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "rip"))

AMD64 = Target("i386:x86-64", (
    ("org.gnu.gdb.i386.core", EFLAGS_TYPE, _core(_AMD64_GPRS, 64)),
    ("org.gnu.gdb.i386.sse", SSE_TYPES, _sse(16)),
    ("org.gnu.gdb.i386.segments", "", tuple(Reg(f"{s}_base", 64, "int", "system", ("base", s)) for s in ("fs", "gs"))),
    ("org.hvjit.x86.system", "", _SYSTEM),
))
# Not org.gnu.gdb.i386.segments for i386: GDB 13's Linux ABI numbers orig_eax where i386
# puts fs_base and fails an internal assertion. The bases go with the system registers.
I386 = Target("i386", (
    ("org.gnu.gdb.i386.core", EFLAGS_TYPE, _core(_I386_GPRS, 32)),
    ("org.gnu.gdb.i386.sse", SSE_TYPES, _sse(8)),
    ("org.hvjit.x86.system", "", tuple(Reg(f"{s}_base", 32, "int", "system", ("base", s)) for s in ("fs", "gs"))
     + _SYSTEM),
))
TARGETS = {"x86-64": AMD64, "i386": I386}


def target_for(vcpu, arch: str = "auto") -> Target:
    """The description for ``arch`` ("x86-64", "i386"), or by the vCPU's mode now ("auto"):
    x86-64 once long mode is active, i386 in real and protected mode (addresses are linear,
    as with other x86 stubs: GDB has no notion of segment:offset)."""
    if arch == "auto":
        return AMD64 if int(vcpu.get_sregs()["efer"]) & EFER_LMA else I386
    try:
        return TARGETS[arch]
    except KeyError:
        raise ValueError(f"arch must be 'auto', 'x86-64' or 'i386', not {arch!r}") from None


# ---- the x87 tag word: FXSAVE keeps one bit per register, GDB shows two --------------------


def _tag_of(st: bytes) -> int:
    """Full tag of a non-empty x87 register from its 80-bit value: 0 valid, 1 zero, 2 special."""
    exponent = int.from_bytes(st[8:10], "little") & 0x7FFF
    integer = st[7] & 0x80
    fraction_zero = int.from_bytes(st[:8], "little") & ((1 << 63) - 1) == 0
    if exponent == 0x7FFF:
        return 2
    if exponent == 0:
        return 1 if fraction_zero and not integer else 2
    return 0 if integer else 2


def full_tag_word(fx: bytes) -> int:
    """The 16-bit tag word from an FXSAVE image (abridged tags, TOP in FSW, ST(i) values)."""
    abridged, top = fx[4], (int.from_bytes(fx[2:4], "little") >> 11) & 7
    word = 0
    for phys in range(8):
        if abridged & (1 << phys):
            st = (phys - top) & 7
            tag = _tag_of(fx[FX_ST0 + 16 * st: FX_ST0 + 16 * st + 10])
        else:
            tag = 3
        word |= tag << (2 * phys)
    return word


def abridged_tag(word: int) -> int:
    return sum(1 << phys for phys in range(8) if (word >> (2 * phys)) & 3 != 3)


# ---- one snapshot of a vCPU's registers --------------------------------------------------


class RegisterFile:
    """A vCPU's registers as GDB numbers them; changed values go back in :meth:`commit`."""

    def __init__(self, vcpu, target: Target):
        self.target = target
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self.fx: Optional[np.ndarray]
        try:
            self.fx = vcpu.get_xsave()
        except HvjitError:
            self.fx = None  # the host gives no x87/SSE state: sent as unavailable
        self._dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self.target.registers)

    def read(self, index: int) -> Optional[bytes]:
        """The register's bytes (little-endian, its bitsize), None where unavailable."""
        reg = self.target.registers[index]
        size, kind = reg.bits // 8, reg.source[0]
        if kind in ("fx", "ftag"):
            if self.fx is None:
                return None
            fx = self.fx.tobytes()[:FX_XSTATE_BV]
            if kind == "ftag":
                return full_tag_word(fx).to_bytes(size, "little")
            _, offset, length = reg.source
            raw = fx[offset:offset + length]
            if reg.name == "fop":
                raw = (int.from_bytes(raw, "little") & 0x7FF).to_bytes(2, "little")
            return raw.ljust(size, b"\0")
        value = self._scalar(reg)
        return (value & ((1 << reg.bits) - 1)).to_bytes(size, "little")

    def _scalar(self, reg: Reg) -> int:
        kind, key = reg.source[0], reg.source[1]
        if kind == "gpr":
            return int(self.regs[key])
        if kind == "sel":
            return int(self.sregs[key]["selector"])
        if kind == "base":
            return int(self.sregs[key]["base"])
        return int(self.sregs[key])

    def write(self, index: int, raw: bytes) -> None:
        reg = self.target.registers[index]
        if len(raw) != reg.bits // 8:
            raise GdbProtocolError(f"{reg.name} takes {reg.bits // 8} bytes, not {len(raw)}")
        kind, value = reg.source[0], int.from_bytes(raw, "little")
        if kind in ("fx", "ftag"):
            if self.fx is None:
                raise GdbProtocolError(f"{reg.name}: this host gives no x87/SSE state")
            if kind == "ftag":
                self.fx[4] = abridged_tag(value)
            else:
                _, offset, length = reg.source
                self.fx[offset:offset + length] = np.frombuffer(raw[:length], np.uint8)
            # XRSTOR takes the legacy region only for components marked present.
            bv = int.from_bytes(self.fx[FX_XSTATE_BV:FX_XSTATE_BV + 8].tobytes(), "little") | XSTATE_X87_SSE
            self.fx[FX_XSTATE_BV:FX_XSTATE_BV + 8] = np.frombuffer(bv.to_bytes(8, "little"), np.uint8)
            self._dirty.add("fx")
            return
        key = reg.source[1]
        if kind == "gpr":
            keep = int(self.regs[key]) & ~((1 << reg.bits) - 1) & ((1 << 64) - 1)
            self.regs[key] = keep | value  # a 32-bit write keeps the upper half
            self._dirty.add("regs")
        elif kind == "sel":
            if value > 0xFFFF:
                raise GdbProtocolError(f"segment selector {reg.name}: {value:#x} does not fit 16 bits")
            self.sregs[key]["selector"] = value
            self._dirty.add("sregs")
        elif kind == "base":
            self.sregs[key]["base"] = value
            self._dirty.add("sregs")
        else:
            self.sregs[key] = value
            self._dirty.add("sregs")

    def to_hex(self) -> bytes:
        """The ``g`` reply: every register in order, ``xx`` bytes where unavailable."""
        out = []
        for i, reg in enumerate(self.target.registers):
            raw = self.read(i)
            out.append(b"xx" * (reg.bits // 8) if raw is None else to_hex(raw))
        return b"".join(out)

    def from_hex(self, text: bytes) -> None:
        """A ``G`` request: registers in order; ``xx`` bytes leave a register as it is."""
        at = 0
        for i, reg in enumerate(self.target.registers):
            n = reg.bits // 4
            if at >= len(text):
                break
            field = text[at:at + n]
            at += n
            if len(field) != n:
                raise GdbProtocolError("G packet ends inside a register")
            if b"x" not in field:
                self.write(i, from_hex(field))
        if at < len(text):
            raise GdbProtocolError("G packet is longer than the register file")

    def commit(self, vcpu) -> None:
        """Write back the register sets that changed (one ioctl each)."""
        if "regs" in self._dirty:
            vcpu.set_regs(self.regs)
        if "sregs" in self._dirty:
            vcpu.set_sregs(self.sregs)
        if "fx" in self._dirty and self.fx is not None:
            vcpu.set_xsave(self.fx)
        self._dirty.clear()
