"""Guest image loaders: flat binaries, ELF, multiboot v1 and the Linux x86 boot protocol.

``load(vm, image)`` detects the format, writes the image and whatever boot information its
protocol wants (multiboot information, Linux zero page, PVH start info) into guest memory and
puts vCPU 0 into the protocol's entry state; it returns a :class:`BootInfo` saying what it did::

    from hvjit import loaders
    info = loaders.load(vm, "kernel.elf", cmdline="console=ttyS0", modules=[b"data"])
    print(info)

Every size and offset read from an image is checked first: a malformed image or one that does
not fit the guest raises :class:`~hvjit.errors.LoaderError` naming the problem.

Placement: loaders share one guest-memory map (:func:`pc_memory_map`: the PC hole
[0x9fc00, 0x100000) and hvjit's entry system area at the top of low RAM are reserved) and one
first-fit :class:`Placer`, so nothing the loader writes overlaps the image or each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import HvjitError, LoaderError

PAGE = 0x1000
E820_RAM, E820_RESERVED = 1, 2
BIOS_AREA = (0xE0000, 0x100000)  # where firmware tables go (ACPI, MP)
BIOS_HOLE = (0x9FC00, 0x100000)  # EBDA, VGA and BIOS ROM area: reserved in every memory map
BOOT_STACK_SIZE = 0x4000  # a scratch stack for the entry state (not reserved in the map)
MAX_IMAGE_SIZE = 1 << 32  # refuse absurd inputs before reading them

FORMATS = ("flat", "elf", "multiboot", "linux")

ImageSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]

__all__ = [
    "FORMATS",
    "BootInfo",
    "MemoryRegion",
    "Placer",
    "detect_format",
    "load",
    "pc_memory_map",
    "read_image",
]


@dataclass(frozen=True)
class MemoryRegion:
    """One memory-map entry (e820 / multiboot mmap / PVH memmap): [base, base+length)."""

    base: int
    length: int
    type: int  # 1 RAM, 2 reserved

    @property
    def end(self) -> int:
        return self.base + self.length

    def __str__(self) -> str:
        kind = {E820_RAM: "RAM", E820_RESERVED: "reserved"}.get(self.type, f"type {self.type}")
        return f"[{self.base:#012x}-{self.end:#012x}) {kind}"


@dataclass
class BootInfo:
    """What a loader did: format, entry state, where the boot information went."""

    format: str
    entry: int
    mode: str  # "real", "protected" or "long"
    registers: dict = field(default_factory=dict)  # general registers set besides rip/rsp
    selectors: dict = field(default_factory=dict)  # segment selectors, when not entry.py's
    boot_info_gpa: Optional[int] = None  # MBI, zero page or hvm_start_info
    boot_info_kind: str = ""
    memory_map: list = field(default_factory=list)  # [MemoryRegion] as handed to the guest
    loaded: list = field(default_factory=list)  # [(what, gpa, size)] in guest memory
    cmdline: str = ""  # as the guest receives it (multiboot: "<image name> <arguments>")
    cmdline_gpa: Optional[int] = None
    image_name: str = ""  # argv[0] of a multiboot command line
    modules: list = field(default_factory=list)  # [(gpa, size, string)]
    initrd: Optional[tuple] = None  # (gpa, size)
    image: Any = None  # an ElfImage (symbols) for ELF-based formats
    stack: Optional[int] = None
    notes: list = field(default_factory=list)  # human-readable remarks

    def __str__(self) -> str:
        lines = [f"{self.format} image, entry {self.entry:#x} in {self.mode} mode"]
        if self.stack is not None:
            lines[0] += f", stack {self.stack:#x}"
        regs = {k: v for k, v in self.registers.items() if k not in ("rip", "rsp")}
        if regs:
            lines.append("  registers: " + ", ".join(f"{k}={v:#x}" for k, v in regs.items()))
        if self.selectors:
            lines.append("  selectors: " + ", ".join(f"{k}={v:#x}" for k, v in self.selectors.items()))
        if self.boot_info_gpa is not None:
            lines.append(f"  {self.boot_info_kind or 'boot information'} at {self.boot_info_gpa:#x}")
        if self.cmdline_gpa is not None:
            lines.append(f"  command line at {self.cmdline_gpa:#x}: {self.cmdline!r}")
        for what, gpa, size in self.loaded:
            lines.append(f"  loaded {what}: [{gpa:#x}-{gpa + size:#x}) {size:#x} bytes")
        for gpa, size, string in self.modules:
            lines.append(f"  module [{gpa:#x}-{gpa + size:#x}) {string!r}")
        if self.initrd is not None:
            lines.append(f"  initrd [{self.initrd[0]:#x}-{self.initrd[0] + self.initrd[1]:#x})")
        if self.memory_map:
            lines.append("  memory map:")
            lines.extend(f"    {r}" for r in self.memory_map)
        if self.image is not None and getattr(self.image, "symbols", None):
            lines.append(f"  symbols: {len(self.image.symbols)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# ---- inputs ------------------------------------------------------------------------------


def read_image(source: ImageSource, what: str = "image") -> bytes:
    """The bytes of an image given as bytes or a path; ``LoaderError`` if unreadable."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            size = os.path.getsize(source)
            if size > MAX_IMAGE_SIZE:
                raise LoaderError(f"{what} {os.fspath(source)!r} is {size:#x} bytes: too large")
            with open(source, "rb") as f:
                return f.read()
        except OSError as e:
            raise LoaderError(f"cannot read {what} {os.fspath(source)!r}: {e.strerror or e}") from None
    raise LoaderError(f"{what} must be bytes or a path, not {type(source).__name__}")


def source_name(source: ImageSource, default: str) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else default


def encode_cmdline(cmdline, what: str = "command line") -> bytes:
    """The NUL-terminated bytes of a command line (str or bytes)."""
    if cmdline is None:
        cmdline = ""
    if isinstance(cmdline, str):
        try:
            raw = cmdline.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LoaderError(f"{what} is not encodable: {e}") from None
    elif isinstance(cmdline, (bytes, bytearray)):
        raw = bytes(cmdline)
    else:
        raise LoaderError(f"{what} must be str or bytes, not {type(cmdline).__name__}")
    if b"\0" in raw:
        raise LoaderError(f"{what} contains a NUL byte")
    return raw + b"\0"


# ---- guest memory map and placement --------------------------------------------------------


def _sysarea(vm) -> Optional[tuple[int, int]]:
    from ..entry import SYSAREA_SIZE, sysarea_gpa

    try:
        base = sysarea_gpa(vm)
    except HvjitError:
        return None
    return base, base + SYSAREA_SIZE


def pc_memory_map(vm) -> list[MemoryRegion]:
    """The PC memory map of a VM's RAM, as e820 / multiboot / PVH want it.

    RAM segments are type 1 except the BIOS hole [0x9fc00, 0x100000) and hvjit's entry system
    area (GDT, TSS, page tables at the top of low RAM), which are reserved; read-only segments
    are reserved too. Sorted, adjacent entries of one type merged.
    """
    holes = [BIOS_HOLE]
    sa = _sysarea(vm)
    if sa is not None:
        holes.append(sa)
    pieces: list[tuple[int, int, int]] = []
    for seg in vm.memory.segments:
        if getattr(seg, "readonly", False):
            pieces.append((seg.gpa, seg.end, E820_RESERVED))
            continue
        cuts = sorted({seg.gpa, seg.end} | {p for h in holes for p in h if seg.gpa < p < seg.end})
        for a, b in zip(cuts, cuts[1:]):
            inside = any(h0 <= a and b <= h1 for h0, h1 in holes)
            pieces.append((a, b, E820_RESERVED if inside else E820_RAM))
    pieces.sort()
    out: list[MemoryRegion] = []
    for a, b, t in pieces:
        if out and out[-1].end == a and out[-1].type == t:
            out[-1] = MemoryRegion(out[-1].base, b - out[-1].base, t)
        else:
            out.append(MemoryRegion(a, b - a, t))
    return out


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class Placer:
    """First-fit placement in a VM's usable RAM, remembering what went where.

    ``claim`` puts something at a fixed address (an image's segments) and raises
    ``LoaderError`` naming the conflict if the range is not inside one RAM segment or overlaps
    something already placed (the entry system area is placed from the start). The BIOS hole
    is RAM here and may be claimed by an image that asks for it (``ld -Ttext 0x100000`` puts
    the ELF headers just below 1 MiB), but ``alloc`` never chooses it: ``alloc`` finds room in
    the memory map's free RAM (bottom-up from ``lo``, or top-down below ``hi``).
    """

    def __init__(self, vm, *, limit: Optional[int] = None):
        self.memory_map = pc_memory_map(vm)
        self.limit = limit  # addresses must stay below this (e.g. 4 GiB for 32-bit entry)
        self.ram = [(s.gpa, s.end) for s in vm.memory.segments if not getattr(s, "readonly", False)]
        self.free = [(r.base, r.end) for r in self.memory_map if r.type == E820_RAM]
        self.claimed: list[tuple[int, int, str]] = []
        sa = _sysarea(vm)
        self.sysarea = sa
        if sa is not None:
            self._take(sa[0], sa[1], "hvjit's entry system area (GDT, TSS, page tables)")

    def _describe_ram(self) -> str:
        return ", ".join(f"{a:#x}-{b:#x}" for a, b in self.ram) or "none"

    def _take(self, start: int, end: int, what: str) -> None:
        free = []
        for a, b in self.free:
            free.extend(iv for iv in ((a, min(b, start)), (max(a, end), b)) if iv[1] > iv[0])
        self.free = free
        self.claimed.append((start, end, what))

    def claim(self, start: int, size: int, what: str) -> None:
        end = start + size
        if start < 0 or size < 0:
            raise LoaderError(f"{what}: invalid range {start:#x}+{size:#x}")
        if size == 0:
            return
        if self.limit is not None and end > self.limit:
            raise LoaderError(f"{what} [{start:#x}-{end:#x}) lies above {self.limit:#x}, which this "
                              "entry mode cannot reach")
        for a, b, other in self.claimed:
            if start < b and a < end:
                raise LoaderError(f"{what} [{start:#x}-{end:#x}) overlaps {other} [{a:#x}-{b:#x})")
        if not any(a <= start and end <= b for a, b in self.ram):
            raise LoaderError(f"{what} [{start:#x}-{end:#x}) is not inside guest RAM "
                              f"(RAM: {self._describe_ram()})")
        self._take(start, end, what)

    def alloc(self, size: int, what: str, *, align: int = 16, lo: int = PAGE,
              hi: Optional[int] = None, top_down: bool = False) -> int:
        if size <= 0:
            size = 1
        hi = min(h for h in (hi, self.limit, 1 << 64) if h is not None)
        ivs = reversed(self.free) if top_down else self.free
        for a, b in ivs:
            a, b = max(a, lo), min(b, hi)
            if top_down:
                start = (b - size) // align * align
                ok = start >= a
            else:
                start = _align_up(a, align)
                ok = start + size <= b
            if ok:
                self.claim(start, size, what)
                return start
        raise LoaderError(f"no room for {what} ({size:#x} bytes) in guest RAM between {lo:#x} and "
                          f"{hi:#x} (usable RAM: {self._describe_ram()}; taken: "
                          + ", ".join(f"{w} {a:#x}-{b:#x}" for a, b, w in sorted(self.claimed)) + ")")

    def boot_stack(self, lo: int = PAGE) -> int:
        """A scratch stack for the entry state; returns its top."""
        return self.alloc(BOOT_STACK_SIZE, "boot stack", align=PAGE, lo=lo) + BOOT_STACK_SIZE


# ---- detection and the front door ------------------------------------------------------------


def detect_format(data: bytes) -> str:
    """``"linux"`` (bzImage, or an ELF vmlinux with a PVH entry note), ``"multiboot"`` (a
    multiboot v1 header in the first 8 KiB), ``"elf"`` or ``"flat"``."""
    data = bytes(data[:]) if not isinstance(data, bytes) else data
    if len(data) >= 0x206 and data[0x202:0x206] == b"HdrS" and data[0x1FE:0x200] == b"\x55\xaa":
        return "linux"
    from . import multiboot

    if multiboot.find_header(data) is not None:
        return "multiboot"
    if data[:4] == b"\x7fELF":
        from . import elf

        try:
            if elf.pvh_entry(data) is not None:
                return "linux"
        except LoaderError:
            pass  # a malformed ELF is reported by the ELF loader
        return "elf"
    return "flat"


def write_firmware(vm, cmdline: str = "") -> Optional[int]:
    """What a PC firmware leaves behind: ACPI tables (RSDP, RSDT/XSDT, FADT with the PM timer,
    MADT) and an MP table in the BIOS area, and the command line in fw_cfg. Returns the RSDP's
    address, or None when RAM does not cover the BIOS area."""
    from ..firmware.acpi import write_acpi_tables
    from ..firmware.mptable import write_mp_table
    from ..vm import PM_BASE

    if getattr(vm, "fw_cfg", None) is not None and cmdline:
        vm.fw_cfg.set_cmdline(cmdline)
    if not vm.memory.is_mapped(BIOS_AREA[0], BIOS_AREA[1] - BIOS_AREA[0]):
        return None
    cpus = len(vm.vcpus)
    rsdp = write_acpi_tables(vm.memory, cpus=cpus, pm_base=PM_BASE)
    write_mp_table(vm.memory, cpus=cpus)
    return rsdp


def load(vm, image: ImageSource, *, format: str = "auto", cmdline="", initrd=None, modules=(),
         gpa: Optional[int] = None, entry: Optional[int] = None, mode: Optional[str] = None,
         cpl: int = 0, vcpu: int = 0, rsdp: Optional[int] = None, name: Optional[str] = None) -> BootInfo:
    """Load ``image`` into ``vm`` and put vCPU ``vcpu`` into its entry state.

    ``format``: ``"auto"`` (see :func:`detect_format`) or one of :data:`FORMATS`.
    ``cmdline``: the kernel's arguments (multiboot, Linux). A multiboot kernel receives
    "<name> <cmdline>", ``name`` defaulting to the image's path as given, or "kernel" for bytes
    (``name=""`` passes the arguments alone).
    ``initrd``: bytes or path (Linux); for multiboot, the first module(s), as QEMU's ``-initrd``:
    a str "FILE [ARGS][,FILE [ARGS]...]", a path object or bytes.
    ``modules``: multiboot modules, each bytes, a path, or ``(bytes_or_path, string)``.
    ``gpa``/``mode``/``cpl``: where and how a flat binary (or a plain ELF) starts; ``entry``
    overrides any format's entry point. ``rsdp``: the ACPI RSDP for a PVH vmlinux.
    """
    data = read_image(image)
    fmt = detect_format(data) if format == "auto" else format
    if fmt not in FORMATS:
        raise LoaderError(f"unknown image format {format!r}; known: auto, {', '.join(FORMATS)}")
    if fmt != "multiboot" and modules:
        raise LoaderError(f"modules are a multiboot feature; this is a {fmt} image")
    if fmt not in ("linux", "multiboot") and initrd is not None:
        raise LoaderError(f"an initrd needs the Linux or multiboot protocol; this is a {fmt} image")
    if fmt != "linux" and rsdp is not None:
        raise LoaderError(f"an RSDP address is passed only to a PVH Linux kernel, not a {fmt} image")
    if fmt in ("multiboot", "linux") and (mode is not None or cpl != 0):
        raise LoaderError(f"the {fmt} protocol fixes the entry mode; mode/cpl apply to flat and ELF images")
    if fmt != "flat" and gpa is not None:
        raise LoaderError(f"a load address (gpa) applies to flat binaries; a {fmt} image says where it goes")
    if fmt in ("flat", "elf") and cmdline:
        raise LoaderError(f"a {fmt} image has no way to receive a command line")
    v = vm.vcpu(vcpu)
    if fmt != "flat":
        from . import elf

        # Firmware first, so an image that overlaps the BIOS area wins over it.
        found = write_firmware(vm, cmdline)
        if rsdp is None and fmt == "linux" and data[:4] == b"\x7fELF" and elf.pvh_entry(data) is not None:
            rsdp = found  # a PVH kernel is told where it is; the others scan the BIOS area
    info = _load_format(vm, v, data, fmt, image, cmdline=cmdline, initrd=initrd, modules=modules, gpa=gpa,
                        entry=entry, mode=mode, cpl=cpl, rsdp=rsdp, name=name)
    if getattr(info.image, "symbols", None):
        vm.symbols = info.image  # breakpoints and exits by symbol name
    if fmt in ("linux", "multiboot"):
        # PC software probes ports nobody decodes (Linux: ISA DMA page registers, COM2-4)
        # and expects what a PC bus gives: all ones, writes lost.
        vm.unassigned_ports = "ones"
        if getattr(vm, "syscall_fixup", False) is None and vm.syscall_stats is None and vm.kvm.flavour == "pvm":
            from .. import syscall_entry  # an OS with user mode: complete its syscall entries

            syscall_entry.install(vm)
    return info


def _load_format(vm, v, data, fmt, image, *, cmdline, initrd, modules, gpa, entry, mode, cpl, rsdp, name):
    if fmt == "flat":
        from . import flat

        return flat.load(vm, v, data, gpa=gpa, entry=entry, mode=mode or "long", cpl=cpl)
    if fmt == "elf":
        from . import elf

        return elf.load(vm, v, data, entry=entry, mode=mode, cpl=cpl)
    if fmt == "multiboot":
        from . import multiboot

        if name is None:
            name = source_name(image, multiboot.DEFAULT_IMAGE_NAME)
        return multiboot.load(vm, v, data, cmdline=cmdline, modules=modules, initrd=initrd, entry=entry,
                              image_name=name)
    from . import linux

    return linux.load(vm, v, data, cmdline=cmdline, initrd=initrd, entry=entry, rsdp=rsdp)
