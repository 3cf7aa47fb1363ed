"""Multiboot v1: find the header, load the kernel, build the multiboot information (MBI).

The header (magic 0x1BADB002, flags, checksum) lies 4-aligned in the first 8 KiB. With flags
bit 16 clear the kernel must be ELF and is loaded by its program headers (what
conformance-suite kernels use, with flags 0); with bit 16 set the a.out-kludge addresses in the
header say where the bytes go. Modules are loaded page-aligned above the kernel, then the MBI
with its command line, module list, memory map and boot loader name, all below 4 GiB. Entry:
32-bit protected mode, paging off, CPL0, EAX=0x2BADB002, EBX=MBI.

The command line is "<image> <arguments>", as QEMU and GRUB pass it: conformance-suite kernels
parse it into argv with argv[0] = the image. An initrd becomes modules the way QEMU's
``-initrd`` does for a multiboot kernel (kvm-unit-tests read their environment from the first).
"""

from __future__ import annotations

import os
import struct
from typing import Optional

from ..errors import HvjitError, LoaderError
from . import (
    E820_RAM,
    PAGE,
    BootInfo,
    MemoryRegion,
    Placer,
    encode_cmdline,
    read_image,
    source_name,
)

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192

# Header flags.
F_PAGE_ALIGN = 1 << 0  # modules page aligned
F_MEMORY_INFO = 1 << 1  # mem_* and mmap_* wanted
F_VIDEO_MODE = 1 << 2  # video mode table wanted (not offered)
F_AOUT_KLUDGE = 1 << 16  # the address fields are valid
SUPPORTED_REQUIRED = F_PAGE_ALIGN | F_MEMORY_INFO

# MBI flags.
MBI_MEMORY, MBI_CMDLINE, MBI_MODS, MBI_MMAP, MBI_LOADER_NAME = 1 << 0, 1 << 2, 1 << 3, 1 << 6, 1 << 9
MBI_SIZE = 0x80  # 116 bytes of the v0.6.96 structure, rounded
MMAP_ENTRY = struct.Struct("<IQQI")  # size (=20, not counting itself), base, length, type
MODULE_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
LOADER_NAME = "hvjit"
MAX_MODULES = 256
MAX_CMDLINE = 0x10000
LIMIT_4G = 1 << 32
DEFAULT_IMAGE_NAME = "kernel"  # argv[0] for an image given as bytes, which has no file name


def find_header(data: bytes) -> Optional[tuple[int, int, int]]:
    """(offset, flags, checksum) of the first multiboot header in the first 8 KiB whose
    checksum is right, else of the first magic found; None without a magic."""
    first = None
    end = min(len(data), SEARCH_LIMIT) - 12
    magic = struct.pack("<I", HEADER_MAGIC)
    pos = data.find(magic, 0, end + 4)
    while 0 <= pos <= end:
        if pos % 4 == 0:
            _, flags, checksum = struct.unpack_from("<III", data, pos)
            if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
                return pos, flags, checksum
            first = first or (pos, flags, checksum)
        pos = data.find(magic, pos + 1, end + 4)
    return first


class _Kernel:
    """What the kernel loading produced: loaded ranges, entry, end, ELF image (or None)."""

    def __init__(self, loaded, entry, end, image=None):
        self.loaded, self.entry, self.end, self.image = loaded, entry, end, image


def _load_aout_kludge(vm, data: bytes, off: int, placer: Placer) -> _Kernel:
    if off + 32 > len(data):
        raise LoaderError(f"multiboot header at {off:#x}: flags bit 16 (a.out kludge) set but the "
                          f"address fields run past the end of the file ({len(data):#x} bytes)")
    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = struct.unpack_from(
        "<5I", data, off + 12)
    if load_addr > header_addr:
        raise LoaderError(f"multiboot a.out kludge: load_addr {load_addr:#x} is above header_addr "
                          f"{header_addr:#x}")
    file_off = off - (header_addr - load_addr)
    if file_off < 0:
        raise LoaderError(f"multiboot a.out kludge: header_addr {header_addr:#x} - load_addr "
                          f"{load_addr:#x} puts the text start {header_addr - load_addr:#x} bytes "
                          f"before the header, which is only {off:#x} bytes into the file")
    if load_end_addr == 0:
        load_end_addr = load_addr + (len(data) - file_off)
    if load_end_addr < load_addr:
        raise LoaderError(f"multiboot a.out kludge: load_end_addr {load_end_addr:#x} is below "
                          f"load_addr {load_addr:#x}")
    size = load_end_addr - load_addr
    if file_off + size > len(data):
        raise LoaderError(f"multiboot a.out kludge: [load_addr {load_addr:#x}, load_end_addr "
                          f"{load_end_addr:#x}) needs {size:#x} bytes from file offset {file_off:#x}, "
                          f"beyond the end of the file ({len(data):#x} bytes)")
    if bss_end_addr == 0:
        bss_end_addr = load_end_addr
    if bss_end_addr < load_end_addr:
        raise LoaderError(f"multiboot a.out kludge: bss_end_addr {bss_end_addr:#x} is below "
                          f"load_end_addr {load_end_addr:#x}")
    if not load_addr <= entry_addr < bss_end_addr:
        raise LoaderError(f"multiboot a.out kludge: entry_addr {entry_addr:#x} is outside the "
                          f"loaded image [{load_addr:#x}-{bss_end_addr:#x})")
    placer.claim(load_addr, bss_end_addr - load_addr, "multiboot kernel (a.out kludge)")
    vm.memory.write(load_addr, data[file_off:file_off + size])
    if bss_end_addr > load_end_addr:
        vm.memory.fill(load_end_addr, bss_end_addr - load_end_addr, 0)
    return _Kernel([("multiboot kernel", load_addr, bss_end_addr - load_addr)], entry_addr,
                   bss_end_addr)


def _load_elf(vm, data: bytes, placer: Placer) -> _Kernel:
    from .elf import ElfImage

    img = ElfImage(data, "multiboot ELF kernel")
    loaded = img.load_into(vm.memory, placer)
    entry = img.entry_physical
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in img.segments):
        raise LoaderError(f"multiboot ELF kernel: entry point {img.entry:#x} is outside every "
                          "loaded segment")
    return _Kernel(loaded, entry, img.physical_range[1], img)


def parse_initrd_spec(spec: str) -> list[tuple[str, str]]:
    """QEMU's ``-initrd`` for a multiboot kernel: comma-separated modules ("``,,``" is a comma
    in a name), each "FILE [ARGS]". Returns [(file, string)]: the module's string is the whole
    "FILE ARGS", as QEMU passes it."""
    entries, current, i = [], [], 0
    while i < len(spec):
        if spec[i] == ",":
            if spec[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            entries.append("".join(current))
            current = []
        else:
            current.append(spec[i])
        i += 1
    entries.append("".join(current))
    out = []
    for n, entry in enumerate(entries):
        path = entry.split(" ", 1)[0]
        if not path:
            raise LoaderError(f"initrd {spec!r}: module {n} has no file name "
                              "(modules are 'FILE [ARGS]', separated by commas)")
        out.append((path, entry))
    return out


def initrd_modules(initrd) -> list:
    """The multiboot modules an initrd stands for: a str is a QEMU ``-initrd`` list (see
    :func:`parse_initrd_spec`), a path object one file, bytes one module named "initrd"."""
    if initrd is None:
        return []
    if isinstance(initrd, str):
        return parse_initrd_spec(initrd)
    if isinstance(initrd, (bytes, bytearray, memoryview)):
        return [(initrd, "initrd")]
    return [initrd]


def multiboot_cmdline(image_name: str, args) -> bytes:
    """The NUL-terminated command line "<image> <args>" (the image alone without arguments, as
    GRUB passes it); the arguments alone when ``image_name`` is empty."""
    raw = encode_cmdline(args)[:-1]
    if not image_name:
        return raw + b"\0"
    return encode_cmdline(image_name, "image name")[:-1] + (b" " + raw if raw else b"") + b"\0"


def _module_specs(modules) -> list[tuple[bytes, str]]:
    out = []
    for i, m in enumerate(modules):
        if len(out) >= MAX_MODULES:
            raise LoaderError(f"too many multiboot modules (at most {MAX_MODULES})")
        if isinstance(m, tuple):
            if len(m) != 2:
                raise LoaderError(f"module {i}: expected (bytes or path, string), got a {len(m)}-tuple")
            src, string = m
        else:
            src, string = m, None
        data = read_image(src, f"module {i}")
        if string is None:
            string = source_name(src, f"module{i}")
        out.append((data, string))
    return out


def mem_lower_upper(memory_map: list[MemoryRegion]) -> tuple[int, int]:
    """KiB of RAM from 0 (at most 640) and KiB of RAM contiguous from 1 MiB."""
    lower = next((min(r.end, 0xA0000) // 1024 for r in memory_map if r.type == E820_RAM and r.base == 0), 0)
    upper = next((r.length // 1024 for r in memory_map if r.type == E820_RAM and r.base == 0x100000), 0)
    return lower, min(upper, 0xFFFFFFFF)


def load(vm, vcpu, data: bytes, *, cmdline="", modules=(), initrd=None, entry: Optional[int] = None,
         image_name: str = DEFAULT_IMAGE_NAME) -> BootInfo:
    """``image_name`` becomes argv[0] of the command line (empty: pass ``cmdline`` alone);
    ``initrd`` becomes the first module(s) (see :func:`initrd_modules`), before ``modules``."""
    from .. import entry as _entry

    hdr = find_header(data)
    if hdr is None:
        raise LoaderError(f"no multiboot header (magic {HEADER_MAGIC:#x}, 4-aligned) in the first "
                          f"{SEARCH_LIMIT} bytes")
    off, flags, checksum = hdr
    if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF:
        raise LoaderError(f"multiboot header at {off:#x}: bad checksum {checksum:#x} (magic + flags "
                          f"{flags:#x} + checksum must be 0 mod 2^32)")
    unsupported = flags & 0xFFFF & ~SUPPORTED_REQUIRED
    if unsupported:
        what = "video mode information (bit 2)" if unsupported & F_VIDEO_MODE else f"bits {unsupported:#x}"
        raise LoaderError(f"multiboot header flags {flags:#x} require {what}, which hvjit's loader "
                          "does not provide")
    cmd = multiboot_cmdline(image_name, cmdline)
    if len(cmd) > MAX_CMDLINE:
        raise LoaderError(f"command line of {len(cmd) - 1} bytes is too long (at most {MAX_CMDLINE - 1})")
    if isinstance(modules, (bytes, bytearray, str, os.PathLike)):
        modules = [modules]
    mods = _module_specs([*initrd_modules(initrd), *modules])
    mod_strings = [encode_cmdline(s, f"module {i} string") for i, (_, s) in enumerate(mods)]

    placer = Placer(vm, limit=LIMIT_4G)
    if flags & F_AOUT_KLUDGE:
        kernel = _load_aout_kludge(vm, data, off, placer)
    elif data[:4] == b"\x7fELF":
        kernel = _load_elf(vm, data, placer)
    else:
        raise LoaderError(f"multiboot header flags {flags:#x}: bit 16 (a.out kludge addresses) is "
                          "clear, so the kernel must be ELF, and this image is not")
    top = (kernel.end + PAGE - 1) // PAGE * PAGE

    mod_records = []
    for i, (mdata, string) in enumerate(mods):
        gpa = placer.alloc(len(mdata), f"module {i} ({string})", align=PAGE, lo=top)
        vm.memory.write(gpa, mdata)
        mod_records.append((gpa, len(mdata), string))

    # The MBI and everything it points to, above the kernel and the modules.
    def put(blob: bytes, what: str, align: int = 8) -> int:
        gpa = placer.alloc(len(blob), what, align=align, lo=top)
        vm.memory.write(gpa, blob)
        return gpa

    mbi = placer.alloc(MBI_SIZE, "multiboot information", align=PAGE, lo=top)
    cmd_gpa = put(cmd, "multiboot command line", 1)
    name_gpa = put(encode_cmdline(LOADER_NAME), "boot loader name", 1)
    mods_table = b"".join(MODULE_ENTRY.pack(gpa, gpa + size, put(s, f"module {i} string", 1), 0)
                          for i, ((gpa, size, _), s) in enumerate(zip(mod_records, mod_strings)))
    mods_addr = put(mods_table, "multiboot module list") if mods_table else 0
    memory_map = placer.memory_map
    mmap = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, r.base, r.length, r.type) for r in memory_map)
    mmap_addr = put(mmap, "multiboot memory map")
    lower, upper = mem_lower_upper(memory_map)

    info = bytearray(MBI_SIZE)
    struct.pack_into("<III", info, 0, MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME,
                     lower, upper)
    struct.pack_into("<III", info, 16, cmd_gpa, len(mod_records), mods_addr)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, name_gpa)
    vm.memory.write(mbi, bytes(info))

    rip = kernel.entry if entry is None else entry
    stack = placer.boot_stack(lo=top)
    try:
        state = _entry.setup_protected_mode(vcpu, rip, cpl=0, stack=stack)
        vcpu.set_registers(rax=BOOTLOADER_MAGIC, rbx=mbi)
    except HvjitError as e:
        raise LoaderError(f"cannot enter the multiboot kernel: {e}") from None
    return BootInfo(format="multiboot", entry=rip, mode="protected", stack=state.stack,
                    registers={"eax": BOOTLOADER_MAGIC, "ebx": mbi}, boot_info_gpa=mbi,
                    boot_info_kind="multiboot information", memory_map=memory_map,
                    loaded=kernel.loaded, cmdline=cmd[:-1].decode("utf-8", "replace"),
                    cmdline_gpa=cmd_gpa, image_name=image_name, modules=mod_records, image=kernel.image,
                    notes=[f"header at file offset {off:#x}, flags {flags:#x}"])
