"""Loaders on synthetic images, into a fake VM (real GuestMemory, a register-file vCPU): no KVM.

ELF images are built with GNU as/ld in a temporary directory; every malformed variant must end
in LoaderError with a message naming the problem.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

from hvjit import entry as hentry
from hvjit import loaders
from hvjit.abi import GPR_NAMES, KVM_SREGS_DTYPE
from hvjit.errors import LoaderError
from hvjit.loaders import bzimage as lbz
from hvjit.loaders import elf as lelf
from hvjit.loaders import linux as llinux
from hvjit.loaders import multiboot as lmb
from hvjit.memory import GuestMemory, MemorySegment, allocate_segment

needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="GNU as/ld (binutils) not installed")


# ---- a VM without KVM ------------------------------------------------------------------------


class FakeVcpu:
    def __init__(self, vm):
        self.vm = vm
        self.sregs = np.zeros(1, KVM_SREGS_DTYPE)[0]
        self.regs = dict.fromkeys(GPR_NAMES, 0)

    def get_sregs(self):
        return self.sregs.copy()

    def set_sregs(self, sregs):
        self.sregs = sregs.copy()

    def set_registers(self, **values):
        for k, v in values.items():
            if k in self.regs:
                self.regs[k] = int(v)
            else:
                self.sregs[k] = v


class FakeVm:
    def __init__(self, layout=((0, 64 << 20),)):
        self.memory = GuestMemory()
        for i, (gpa, size) in enumerate(layout):
            host, array = allocate_segment(size)
            self.memory._add(MemorySegment(gpa, size, i, False, f"mem{i}", host, array))
        self.vcpus = [FakeVcpu(self)]

    def vcpu(self, i=0):
        return self.vcpus[i]


@pytest.fixture
def vm():
    return FakeVm()


# ---- building images ---------------------------------------------------------------------------


LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
  . = %#x;
  .text : { *(.text*) }
  .rodata : { *(.rodata*) }
  .notes : { *(.note*) }
  .data : { *(.data*) }
  .bss : { *(.bss*) *(COMMON) }
}
"""


def build_elf(tmp_path, source: str, *, bits: int = 32, base: int = 0x100000, script=None,
              extra_ld=()) -> bytes:
    """Assemble and link; the default script puts .text at ``base`` (no headers loaded)."""
    src = tmp_path / "k.S"
    src.write_text(source)
    obj, out, lds = tmp_path / "k.o", tmp_path / "k.elf", tmp_path / "k.ld"
    lds.write_text(script or LINKER_SCRIPT % base)
    subprocess.run(["as", "--32" if bits == 32 else "--64", "-o", str(obj), str(src)], check=True,
                   capture_output=True)
    cmd = ["ld", "-m", "elf_i386" if bits == 32 else "elf_x86_64", "-T", str(lds),
           "-z", "max-page-size=0x1000", *extra_ld, "-o", str(out), str(obj)]
    proc = subprocess.run(cmd + ["--no-warn-rwx-segments"], capture_output=True, check=False)
    if proc.returncode:
        subprocess.run(cmd, check=True, capture_output=True)
    return out.read_bytes()


KERNEL32 = """
.text
.globl _start, helper
.type _start, @function
_start:
    nop
    nop
    call helper
1:  jmp 1b
.size _start, . - _start
.type helper, @function
helper:
    ret
.size helper, . - helper
.data
.globl table
.type table, @object
table: .long 1, 2, 3, 4
.size table, 16
.bss
.globl big
big: .space 0x3000
"""

MULTIBOOT32 = """
.section .text
.align 4
mb_header:
    .long 0x1BADB002
    .long {flags}
    .long -(0x1BADB002 + {flags})
.globl _start
_start:
    hlt
""" + ".bss\n.space 0x2000\n"

PVH64 = """
.pushsection .note.Xen, "a", @note
    .align 4
    .long 4, 8, 18
    .asciz "Xen"
    .align 4
    .quad pvh_start
    .align 4
.popsection
.text
.globl _start
_start:
    hlt
.code32
.globl pvh_start
pvh_start:
    hlt
"""


# ---- format detection and the memory map ----------------------------------------------------------


def test_memory_map_reserves_the_bios_hole_and_the_system_area(vm):
    mm = loaders.pc_memory_map(vm)
    sa = hentry.sysarea_gpa(vm)
    assert [(r.base, r.end, r.type) for r in mm] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x100000, 2), (0x100000, sa, 1), (sa, sa + 0x10000, 2)]
    assert sa + 0x10000 == 64 << 20


def test_memory_map_with_a_high_segment():
    vm = FakeVm(((0, 4 << 20), (1 << 32, 2 << 20)))
    mm = loaders.pc_memory_map(vm)
    assert mm[-1] == loaders.MemoryRegion(1 << 32, 2 << 20, 1)
    assert str(mm[0]) == "[0x0000000000-0x000009fc00) RAM"


def test_detect_format(tmp_path):
    assert loaders.detect_format(b"\x90" * 100) == "flat"
    bz = bytearray(0x1000)
    bz[0x1FE:0x200] = b"\x55\xaa"
    bz[0x202:0x206] = b"HdrS"
    assert loaders.detect_format(bytes(bz)) == "linux"
    mb = b"\0" * 64 + struct.pack("<III", 0x1BADB002, 0x10000, (-(0x1BADB002 + 0x10000)) & 0xFFFFFFFF)
    assert loaders.detect_format(mb) == "multiboot"
    if shutil.which("as"):
        assert loaders.detect_format(build_elf(tmp_path, KERNEL32)) == "elf"
        assert loaders.detect_format(build_elf(tmp_path, MULTIBOOT32.format(flags=0))) == "multiboot"
        assert loaders.detect_format(build_elf(tmp_path, PVH64, bits=64)) == "linux"


def test_multiboot_magic_past_8k_is_not_a_header():
    img = b"\0" * 8192 + struct.pack("<III", 0x1BADB002, 0, (-0x1BADB002) & 0xFFFFFFFF)
    assert lmb.find_header(img) is None
    assert loaders.detect_format(img) == "flat"


# ---- flat ---------------------------------------------------------------------------------------


def test_flat_load_and_entry_state(vm):
    info = loaders.load(vm, b"\xf4\x90\x90", mode="protected")
    assert info.format == "flat" and info.entry == 0x1000 and info.mode == "protected"
    assert vm.memory.read(0x1000, 3) == b"\xf4\x90\x90"
    v = vm.vcpu(0)
    assert v.regs["rip"] == 0x1000 and v.regs["rsp"] == info.stack
    assert v.sregs["cr0"] & 1 and not v.sregs["efer"]
    assert "flat image, entry 0x1000 in protected mode" in str(info)


def test_flat_errors(vm):
    with pytest.raises(LoaderError, match="empty"):
        loaders.load(vm, b"", format="flat")
    with pytest.raises(LoaderError, match="overlaps hvjit's entry system area"):
        loaders.load(vm, b"\x90" * 0x100, gpa=(64 << 20) - 0x80)
    with pytest.raises(LoaderError, match="not inside guest RAM"):
        loaders.load(vm, b"\x90", gpa=128 << 20)
    info = loaders.load(vm, b"\x90", gpa=0xA0000)  # the BIOS hole is RAM: an image may ask for it
    assert info.entry == 0xA0000
    with pytest.raises(LoaderError, match="entry 0x5000 is outside"):
        loaders.load(vm, b"\x90", entry=0x5000)
    with pytest.raises(LoaderError, match="unknown image format"):
        loaders.load(vm, b"\x90", format="pe")
    with pytest.raises(LoaderError, match="command line"):
        loaders.load(vm, b"\x90", cmdline="x")
    with pytest.raises(LoaderError, match="cannot read image"):
        loaders.load(vm, "/nonexistent/kernel")


# ---- ELF ----------------------------------------------------------------------------------------


@needs_binutils
def test_elf32_load_bss_and_symbols(vm, tmp_path):
    data = build_elf(tmp_path, KERNEL32)
    vm.memory.fill(0, 4 << 20, 0xCC)  # bss must be zeroed by the loader
    info = loaders.load(vm, data)
    img = info.image
    assert info.format == "elf" and info.mode == "protected" and img.bits == 32
    start, helper, table, big = (img.lookup(n) for n in ("_start", "helper", "table", "big"))
    assert info.entry == start == 0x100000
    assert vm.memory.read(start, 2) == b"\x90\x90"
    assert vm.memory.read_u32(table + 8) == 3
    assert vm.memory.read(big, 0x3000) == b"\0" * 0x3000
    assert img.symbolize(start) == "_start"
    assert img.symbolize(start + 2) == "_start+0x2"
    assert img.symbolize(helper) == "helper"
    assert img.symbolize(table + 4) == "table+0x4"
    assert img.symbolize(0x50) == "0x50"
    assert "helper" in img and img.symbol("table").size == 16 and img.symbol("helper").type == "func"
    with pytest.raises(KeyError, match="no symbol 'nothere'"):
        img.lookup("nothere")
    assert vm.vcpu(0).regs["rip"] == start
    assert "symbols:" in str(info) and "ELF segment" in str(info)


@needs_binutils
def test_elf64_enters_long_mode_and_paddr_differs_from_vaddr(vm, tmp_path):
    # Linked high (vaddr 0xffffffff80100000), loaded low (paddr 0x200000) as kernels are.
    script = """
ENTRY(_start)
SECTIONS {
  . = 0xffffffff80100000;
  .text : AT(0x200000) { *(.text) }
}
"""
    data = build_elf(tmp_path, ".text\n.globl _start\n_start: nop\n hlt\n", bits=64, script=script)
    info = loaders.load(vm, data)
    assert info.mode == "long" and info.entry == 0x200000
    assert vm.memory.read(0x200000, 2) == b"\x90\xf4"
    assert info.image.symbolize(0xFFFFFFFF80100001) == "_start+0x1"
    assert info.image.to_physical(0xFFFFFFFF80100001) == 0x200001
    assert vm.vcpu(0).sregs["efer"] & hentry.EFER_LMA


@needs_binutils
@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:30], "truncated ELF header"),
    (lambda d: d[:4] + b"\x03" + d[5:], "unsupported ELF class 3"),
    (lambda d: d[:5] + b"\x02" + d[6:], "little-endian"),
    (lambda d: d[:16] + struct.pack("<H", 1) + d[18:], "ET_REL"),
    (lambda d: d[:18] + struct.pack("<H", 40) + d[20:], "machine 40 is not x86"),
    (lambda d: d[:28] + struct.pack("<I", 0x7FFFFF00) + d[32:], "program headers .* extend beyond"),
    (lambda d: d[:42] + struct.pack("<H", 20) + d[44:], "e_phentsize=20"),
    (lambda d: d[:44] + struct.pack("<H", 0) + d[46:], "no program headers"),
    (lambda d: d[:44] + struct.pack("<H", 0xFFFF) + d[46:], "absurd program header count"),
    (lambda d: d[:32] + struct.pack("<I", 0x7FFFFF00) + d[36:], "section headers .* extend beyond"),
])
def test_malformed_elf_headers(vm, tmp_path, mutate, message):
    data = build_elf(tmp_path, KERNEL32)
    with pytest.raises(LoaderError, match=message):
        loaders.load(vm, mutate(data), format="elf")


def _first_load_phdr(data: bytes) -> int:
    phoff, = struct.unpack_from("<I", data, 28)
    phnum, = struct.unpack_from("<H", data, 44)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + 32 * i)[0] == 1:
            return phoff + 32 * i
    raise AssertionError("no PT_LOAD")


@needs_binutils
@pytest.mark.parametrize("field, value, message", [
    (4, 0x7FFFFFF0, "file range .* extends beyond the end of the file"),  # p_offset
    (16, 0x7FFFFFF0, "file range .* extends beyond"),  # p_filesz
    (12, 0x7F000000, "not inside guest RAM"),  # p_paddr
    (12, (64 << 20) - 0x1000, "overlaps hvjit's entry system area"),  # p_paddr
    (20, 1, "p_filesz .* exceeds p_memsz"),  # p_memsz
])
def test_malformed_elf_segments(vm, tmp_path, field, value, message):
    data = bytearray(build_elf(tmp_path, KERNEL32))
    struct.pack_into("<I", data, _first_load_phdr(data) + field, value)
    with pytest.raises(LoaderError, match=message):
        loaders.load(vm, bytes(data), format="elf")


@needs_binutils
def test_overlapping_segments(vm, tmp_path):
    data = bytearray(build_elf(tmp_path, KERNEL32))
    phoff, = struct.unpack_from("<I", data, 28)
    phnum, = struct.unpack_from("<H", data, 44)
    first = _first_load_phdr(data)
    end = phoff + 32 * phnum
    assert data[end:end + 32] == bytes(32)  # padding before the first section
    data[end:end + 32] = data[first:first + 32]  # a second PT_LOAD at the same address
    struct.pack_into("<H", data, 44, phnum + 1)
    with pytest.raises(LoaderError, match=r"ELF segment \d+ \(.*\) .* overlaps ELF segment 0"):
        loaders.load(vm, bytes(data))


@needs_binutils
def test_malformed_symbol_table(vm, tmp_path):
    data = bytearray(build_elf(tmp_path, KERNEL32))
    shoff, = struct.unpack_from("<I", data, 32)
    shnum, = struct.unpack_from("<H", data, 48)
    for i in range(shnum):
        at = shoff + 40 * i
        if struct.unpack_from("<I", data, at + 4)[0] == lelf.SHT_SYMTAB:
            bad = bytearray(data)
            struct.pack_into("<I", bad, at + 24, 1)  # sh_link -> section 1 (.text), not a strtab
            with pytest.raises(LoaderError, match="not a string table"):
                lelf.ElfImage.parse(bytes(bad))
            bad = bytearray(data)
            struct.pack_into("<I", bad, at + 36, 7)  # sh_entsize
            with pytest.raises(LoaderError, match="symbol table entry size 7"):
                lelf.ElfImage.parse(bytes(bad))
            bad = bytearray(data)
            strtab_at = shoff + 40 * struct.unpack_from("<I", data, at + 24)[0]
            struct.pack_into("<I", bad, strtab_at + 20, 1)  # the string table shrinks to 1 byte
            with pytest.raises(LoaderError, match="name offset .* is outside its string table"):
                lelf.ElfImage.parse(bytes(bad)).symbolize(0x100000)
            bad = bytearray(data)
            struct.pack_into("<I", bad, at + 20, 0x7FFFFFF0)  # sh_size
            with pytest.raises(LoaderError, match="section .* extends beyond"):
                lelf.ElfImage.parse(bytes(bad))
            return
    raise AssertionError("no symbol table")


@needs_binutils
@pytest.mark.parametrize("bits", [32, 64])
def test_symbols_match_pyelftools(tmp_path, bits):
    """pyelftools is the slow reference for the numpy symbol-table decoder."""
    from io import BytesIO

    ELFFile = pytest.importorskip("elftools.elf.elffile").ELFFile

    src = KERNEL32 + "".join(f".globl g{i}\n.type g{i},@function\ng{i}: nop\n.size g{i},1\n"
                             for i in range(50)) + ".local lab\nlab: nop\n.weak w\nw: nop\n"
    data = build_elf(tmp_path, src.replace(".data", ".text\n.data", 1), bits=bits)
    ours = {(s.name, s.value, s.size, s.type, s.bind) for s in lelf.ElfImage.parse(data).symbols}
    ref = set()
    for sym in ELFFile(BytesIO(data)).get_section_by_name(".symtab").iter_symbols():
        if sym.name:
            info = sym["st_info"]
            ref.add((sym.name, sym["st_value"], sym["st_size"], info["type"][4:].lower(),
                     info["bind"][4:].lower()))
    assert ours == ref and len(ours) > 55
    img = lelf.ElfImage.parse(data)
    assert img.symbol("w").bind == "weak" and img.symbolize(img.lookup("g7")) == "g7"


@needs_binutils
def test_stripped_elf_has_no_symbols(vm, tmp_path):
    data = build_elf(tmp_path, KERNEL32, extra_ld=("-s",))
    img = lelf.ElfImage.parse(data)
    assert img.symbols == () and img.symbolize(0x100000) == "0x100000"
    with pytest.raises(KeyError, match="no symbol table"):
        img.lookup("_start")


def test_elf_fuzz_never_crashes(vm):
    """Random corruption of a valid ELF: either loads or raises LoaderError."""
    if not shutil.which("as"):
        pytest.skip("binutils missing")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        base = build_elf(Path(d), KERNEL32)
    rng = np.random.default_rng(1)
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.integers(1, 6)):
            pos = int(rng.integers(0, min(len(data), 0x200) if rng.random() < 0.7 else len(data)))
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(0, len(data)))]
        try:
            lelf.ElfImage.parse(bytes(data))
        except LoaderError:
            pass


# ---- multiboot ----------------------------------------------------------------------------------


def _read_cstr(vm, gpa):
    out = b""
    while (c := vm.memory.read(gpa + len(out), 1)) != b"\0":
        out += c
    return out.decode()


@needs_binutils
def test_multiboot_elf_mbi(vm, tmp_path):
    data = build_elf(tmp_path, MULTIBOOT32.format(flags=3))
    mod = tmp_path / "mod.bin"
    mod.write_bytes(b"module two")
    info = loaders.load(vm, data, cmdline="console=ttyS0 x=1",
                        modules=[(b"hello module", "mod1 arg"), mod])
    v = vm.vcpu(0)
    assert info.format == "multiboot" and info.mode == "protected"
    assert v.regs["rax"] == 0x2BADB002 and v.regs["rbx"] == info.boot_info_gpa
    assert v.regs["rip"] == info.entry == info.image.lookup("_start")
    assert not v.sregs["cr0"] & hentry.CR0_PG and v.sregs["cs"]["db"] == 1
    mbi = info.boot_info_gpa
    m = vm.memory
    flags = m.read_u32(mbi)
    assert flags & (1 | 4 | 8 | 64 | 512) == (1 | 4 | 8 | 64 | 512)
    sa = hentry.sysarea_gpa(vm)
    assert m.read_u32(mbi + 4) == 639 and m.read_u32(mbi + 8) == (sa - 0x100000) // 1024
    # argv[0] first, as QEMU and GRUB pass it; bytes have no file name
    assert _read_cstr(vm, m.read_u32(mbi + 16)) == "kernel console=ttyS0 x=1"
    assert info.cmdline == "kernel console=ttyS0 x=1" and info.image_name == "kernel"
    assert _read_cstr(vm, m.read_u32(mbi + 64)) == "hvjit"
    assert m.read_u32(mbi + 20) == 2
    mods = m.read_u32(mbi + 24)
    kernel_end = info.image.physical_range[1]
    seen = []
    for i in range(2):
        start, end, string = (m.read_u32(mods + 16 * i + k) for k in (0, 4, 8))
        assert start % 0x1000 == 0 and start >= kernel_end
        seen.append((m.read(start, end - start), _read_cstr(vm, string)))
    assert seen == [(b"hello module", "mod1 arg"), (b"module two", str(mod))]
    length, addr = m.read_u32(mbi + 44), m.read_u32(mbi + 48)
    entries = []
    for off in range(0, length, 24):
        size, base, ln, typ = struct.unpack("<IQQI", m.read(addr + off, 24))
        assert size == 20
        entries.append((base, ln, typ))
    assert entries == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, sa - 0x100000, 1),
                       (sa, 0x10000, 2)]
    # Nothing the loader placed overlaps another thing.
    ranges = sorted([(a, a + s) for _, a, s in info.loaded] + [(a, a + s) for a, s, _ in info.modules]
                    + [(mbi, mbi + 0x80), (addr, addr + length)])
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert "multiboot information at" in str(info) and "module [" in str(info)


def test_multiboot_aout_kludge(vm):
    hdr_off = 0x40
    load_addr, header_addr = 0x200000, 0x200000 + hdr_off
    code = b"\x90\xf4"
    img = bytearray(0x100)
    flags = 0x10000
    struct.pack_into("<8I", img, hdr_off, 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF,
                     header_addr, load_addr, load_addr + 0x100, load_addr + 0x2000, load_addr + 0x80)
    img[0x80:0x82] = code
    vm.memory.fill(load_addr, 0x3000, 0xCC)
    info = loaders.load(vm, bytes(img))
    assert info.entry == load_addr + 0x80
    assert vm.memory.read(load_addr + 0x80, 2) == code
    assert vm.memory.read(load_addr + 0x100, 0x1F00) == b"\0" * 0x1F00  # bss zeroed
    assert info.loaded == [("multiboot kernel", load_addr, 0x2000)]


def _mb_image(flags, fields=(), size=0x100, checksum=None):
    img = bytearray(size)
    cs = (-(0x1BADB002 + flags)) & 0xFFFFFFFF if checksum is None else checksum
    struct.pack_into("<III", img, 0, 0x1BADB002, flags, cs)
    for i, f in enumerate(fields):
        struct.pack_into("<I", img, 12 + 4 * i, f)
    return bytes(img)


@pytest.mark.parametrize("image, message", [
    (_mb_image(0, checksum=5), "bad checksum"),
    (_mb_image(4), "video mode information"),
    (_mb_image(0x20), "require bits 0x20"),
    (_mb_image(0), "kernel must be ELF"),
    (_mb_image(0x10000, size=20), "run past the end of the file"),
    (_mb_image(0x10000, (0x100000, 0x100010)), "load_addr 0x100010 is above header_addr"),
    (_mb_image(0x10000, (0x100010, 0x100000)), "before the header"),
    (_mb_image(0x10000, (0x100000, 0x100000, 0x100000 - 4)), "load_end_addr .* below load_addr"),
    (_mb_image(0x10000, (0x100000, 0x100000, 0x101000)), "beyond the end of the file"),
    (_mb_image(0x10000, (0x100000, 0x100000, 0x100080, 0x100040)), "bss_end_addr .* below"),
    (_mb_image(0x10000, (0x100000, 0x100000, 0, 0, 0x300000)), "entry_addr 0x300000 is outside"),
    (_mb_image(0x10000, (0x7F000000, 0x7F000000, 0, 0, 0x7F000000)), "not inside guest RAM"),
    (b"\0" * 0x100, "no multiboot header"),
])
def test_malformed_multiboot(vm, image, message):
    with pytest.raises(LoaderError, match=message):
        loaders.load(vm, image, format="multiboot")


def test_multiboot_module_errors(vm):
    good = _mb_image(0x10000, (0x100000, 0x100000, 0, 0, 0x10000C))
    with pytest.raises(LoaderError, match="cannot read module 0"):
        loaders.load(vm, good, modules=["/nonexistent/mod"])
    with pytest.raises(LoaderError, match="no room for module 0"):
        loaders.load(vm, good, modules=[b"x" * (80 << 20)])
    with pytest.raises(LoaderError, match="module 0 string contains a NUL"):
        loaders.load(vm, good, modules=[(b"x", "a\0b")])
    with pytest.raises(LoaderError, match="initrd needs the Linux or multiboot protocol"):
        loaders.load(vm, b"\x90", initrd=b"x")
    with pytest.raises(LoaderError, match="cannot read module 0 .*'/nonexistent/env'"):
        loaders.load(vm, good, initrd="/nonexistent/env arg")
    with pytest.raises(LoaderError, match="module 1 has no file name"):
        loaders.load(vm, good, initrd="env,")
    with pytest.raises(LoaderError, match="image name contains a NUL"):
        loaders.load(vm, good, name="a\0b", cmdline=b"x")
    with pytest.raises(LoaderError, match="command line must be str or bytes, not int"):
        loaders.load(vm, good, cmdline=5)


def _mbi_cmdline_and_modules(vm, info):
    m, mbi = vm.memory, info.boot_info_gpa
    mods = m.read_u32(mbi + 24)
    modules = []
    for i in range(m.read_u32(mbi + 20)):
        start, end, string = (m.read_u32(mods + 16 * i + k) for k in (0, 4, 8))
        modules.append((m.read(start, end - start), _read_cstr(vm, string)))
    return _read_cstr(vm, m.read_u32(mbi + 16)), modules


@pytest.mark.parametrize("name, cmdline, expected", [
    (None, "console=ttyS0 x=1", "{path} console=ttyS0 x=1"),  # the path as given, as QEMU's -kernel
    (None, "", "{path}"),  # no arguments: the name alone, as GRUB passes it
    ("x86/apic.flat", "-smp 2", "x86/apic.flat -smp 2"),
    ("x86/apic.flat", b"raw bytes", "x86/apic.flat raw bytes"),
    ("", "only args", "only args"),  # an empty name: the arguments alone
])
def test_multiboot_cmdline_starts_with_the_image_name(vm, tmp_path, name, cmdline, expected):
    path = tmp_path / "apic.elf"
    path.write_bytes(_mb_image(0x10000, (0x100000, 0x100000, 0, 0, 0x10000C)))
    info = loaders.load(vm, str(path), cmdline=cmdline, name=name)
    want = expected.format(path=path)
    assert _mbi_cmdline_and_modules(vm, info)[0] == want == info.cmdline
    assert info.image_name == (str(path) if name is None else name)
    assert f"command line at {info.cmdline_gpa:#x}: {want!r}" in str(info)


@pytest.mark.parametrize("spec, expected", [
    ("env", [("env", "env")]),
    ("env arg=1 b", [("env", "env arg=1 b")]),
    ("a arg,b", [("a", "a arg"), ("b", "b")]),
    ("a,,b c,d", [("a,b", "a,b c"), ("d", "d")]),  # ",," is a comma in the name, as QEMU has it
])
def test_parse_initrd_spec_as_qemu(spec, expected):
    assert lmb.parse_initrd_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", ",a", "a,", " arg"])
def test_parse_initrd_spec_refuses_a_module_without_a_file(spec):
    with pytest.raises(LoaderError, match="has no file name"):
        lmb.parse_initrd_spec(spec)


def test_multiboot_initrd_becomes_the_first_modules(vm, tmp_path, monkeypatch):
    """QEMU's -initrd for a multiboot kernel: kvm-unit-tests read KEY=VALUE lines from module 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "env").write_bytes(b"QEMU_ACCEL=kvm\nBOOTLOADER=1\n")
    (tmp_path / "b,c").write_bytes(b"second")
    good = _mb_image(0x10000, (0x100000, 0x100000, 0, 0, 0x10000C))
    info = loaders.load(vm, good, initrd="env x=1,b,,c", modules=[(b"extra", "extra")])
    assert _mbi_cmdline_and_modules(vm, info)[1] == [
        (b"QEMU_ACCEL=kvm\nBOOTLOADER=1\n", "env x=1"), (b"second", "b,c"), (b"extra", "extra")]
    assert [s for _, _, s in info.modules] == ["env x=1", "b,c", "extra"]
    from pathlib import Path

    info = loaders.load(vm, good, initrd=Path("b,c"))  # a path object is one file, never a list
    assert _mbi_cmdline_and_modules(vm, info)[1] == [(b"second", "b,c")]
    info = loaders.load(vm, good, initrd=b"A=1\n")
    assert _mbi_cmdline_and_modules(vm, info)[1] == [(b"A=1\n", "initrd")]


# ---- Linux: bzImage -----------------------------------------------------------------------------


def make_bzimage(*, version=0x20F, loadflags=1, xloadflags=1, setup_sects=4, cmdline_size=255,
                 initrd_addr_max=0x7FFFFFFF, relocatable=1, pref=0x1000000, init_size=0x400000,
                 kernel=b"\x90" * 0x300 + b"\xf4", jump=0x66) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, jump])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel


def test_bzimage_64bit_zero_page_e820_cmdline_initrd(vm):
    img = make_bzimage()
    initrd = bytes(range(256)) * 64 + b"end"
    info = loaders.load(vm, img, cmdline="console=ttyS0 root=/dev/ram0", initrd=initrd)
    m, v = vm.memory, vm.vcpu(0)
    zp = info.boot_info_gpa
    assert info.format == "linux" and info.mode == "long"
    assert info.entry == 0x100000 + 0x200 and v.regs["rip"] == 0x100200 and v.regs["rsi"] == zp
    assert m.read(0x100000, 0x301) == b"\x90" * 0x300 + b"\xf4"
    # setup header copied, loader fields filled
    assert m.read(zp + 0x202, 4) == b"HdrS" and m.read_u16(zp + 0x206) == 0x20F
    assert m.read_u8(zp + 0x210) == 0xFF
    assert m.read_u16(zp + 0x1FE) == 0xAA55
    assert m.read_u32(zp + 0x260) == 0x400000
    assert _read_cstr(vm, m.read_u32(zp + 0x228)) == "console=ttyS0 root=/dev/ram0"
    # e820
    n = m.read_u8(zp + 0x1E8)
    e820 = [struct.unpack("<QQI", m.read(zp + 0x2D0 + 20 * i, 20)) for i in range(n)]
    sa = hentry.sysarea_gpa(vm)
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, sa - 0x100000, 1), (sa, 0x10000, 2)]
    # initrd: page aligned, just below the system area (the top of usable RAM), intact
    rd, rd_size = m.read_u32(zp + 0x218), m.read_u32(zp + 0x21C)
    assert rd % 0x1000 == 0 and rd_size == len(initrd) and rd + rd_size <= sa and sa - rd < 0x6000
    assert m.read(rd, rd_size) == initrd and info.initrd == (rd, rd_size)
    # __BOOT_CS / __BOOT_DS from the loader's GDT
    s = v.sregs
    assert s["cs"]["selector"] == 0x10 and s["cs"]["l"] == 1 and s["ds"]["selector"] == 0x18
    gdt = s["gdt"]["base"]
    assert m.read_u64(gdt + 0x10) == llinux.DESC_CODE64 and m.read_u64(gdt + 0x18) == llinux.DESC_DATA
    assert s["efer"] & hentry.EFER_LMA and s["cr3"] == sa + hentry.PML4_OFF
    text = str(info)
    assert "zero page" in text and "initrd [" in text and "boot protocol 2.15" in text


def test_bzimage_initrd_respects_initrd_addr_max(vm):
    info = loaders.load(vm, make_bzimage(initrd_addr_max=0x1FFFFFF), initrd=b"x" * 0x1800)
    rd, size = info.initrd
    assert rd + size <= 0x2000000 and rd == 0x2000000 - 0x2000


def test_bzimage_32bit_entry(vm):
    info = loaders.load(vm, make_bzimage(xloadflags=0))
    v = vm.vcpu(0)
    assert info.mode == "protected" and v.regs["rip"] == 0x100000 and v.regs["rsi"] == info.boot_info_gpa
    assert v.sregs["cs"]["selector"] == 0x10 and v.sregs["cs"]["l"] == 0 and v.sregs["cs"]["db"] == 1
    assert vm.memory.read_u64(v.sregs["gdt"]["base"] + 0x10) == llinux.DESC_CODE32


def test_bzimage_non_relocatable_goes_to_pref_address(vm):
    info = loaders.load(vm, make_bzimage(relocatable=0, pref=0x400000))
    assert info.entry == 0x400200 and vm.memory.read(0x400000, 1) == b"\x90"


@pytest.mark.parametrize("kwargs, load_kw, message", [
    (dict(version=0x204), {}, "too old"),
    (dict(loadflags=0), {}, "LOADED_HIGH"),
    (dict(setup_sects=60, kernel=b""), {}, "past the end of the file"),
    (dict(jump=0x10), {}, "before the protocol 2.06 fields"),
    (dict(cmdline_size=8), dict(cmdline="console=ttyS0"), "13 bytes is too long.*allows 8"),
    (dict(init_size=0x8000000), {}, r"init_size 0x8000000\) \[0x100000-0x9000000\) overlaps hvjit's entry"),
    (dict(relocatable=0, pref=0x100000001), {}, "pref_address"),
    (dict(initrd_addr_max=0x100000), dict(initrd=b"x" * 0x1000), "initrd of 0x1000 bytes does not fit"),
    ({}, dict(initrd=b"x" * (70 << 20)), "initrd of 0x4600000 bytes does not fit"),
    ({}, dict(initrd=b""), "initrd is empty"),
    ({}, dict(modules=[b"x"]), "modules are a multiboot feature"),
    ({}, dict(mode="long"), "fixes the entry mode"),
])
def test_malformed_bzimage(vm, kwargs, load_kw, message):
    with pytest.raises(LoaderError, match=message):
        loaders.load(vm, make_bzimage(**kwargs), **load_kw)


def test_bzimage_truncated_header(vm):
    img = make_bzimage()[:0x220]
    with pytest.raises(LoaderError, match="too short for a setup header"):
        loaders.load(vm, img, format="linux")
    bad = bytearray(make_bzimage())
    bad[0x1FE] = 0
    with pytest.raises(LoaderError, match="boot_flag"):
        loaders.load(vm, bytes(bad), format="linux")


# ---- Linux: vmlinux with a PVH note, and without ----------------------------------------------------


@needs_binutils
def test_vmlinux_pvh_start_info(vm, tmp_path):
    data = build_elf(tmp_path, PVH64, bits=64, base=0x1000000)
    info = loaders.load(vm, data, cmdline="console=hvc0", initrd=b"RD" * 100, rsdp=0xE0000)
    img = info.image
    assert info.mode == "protected" and info.entry == img.lookup("pvh_start")
    v, m = vm.vcpu(0), vm.memory
    si = info.boot_info_gpa
    assert v.regs["rbx"] == si and v.regs["rip"] == info.entry and not v.sregs["cr0"] & hentry.CR0_PG
    magic, version, flags, nr_modules, modlist, cmd, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", m.read(si, 56))
    assert (magic, version, flags, nr_modules, rsdp) == (0x336EC578, 1, 0, 1, 0xE0000)
    assert _read_cstr(vm, cmd) == "console=hvc0"
    table = [struct.unpack("<QQII", m.read(memmap + 24 * i, 24)) for i in range(entries)]
    sa = hentry.sysarea_gpa(vm)
    assert table[2] == (0x100000, sa - 0x100000, 1, 0) and table[3] == (sa, 0x10000, 2, 0)
    paddr, size, _, _ = struct.unpack("<QQQQ", m.read(modlist, 32))
    assert m.read(paddr, size) == b"RD" * 100 and paddr % 0x1000 == 0
    assert "hvm_start_info (PVH)" in str(info)


@needs_binutils
def test_vmlinux_without_pvh_uses_the_64bit_protocol(vm, tmp_path):
    data = build_elf(tmp_path, ".text\n.globl _start\n_start: hlt\n", bits=64, base=0x1000000)
    info = loaders.load(vm, data, format="linux", cmdline="quiet")
    zp, m, v = info.boot_info_gpa, vm.memory, vm.vcpu(0)
    assert info.mode == "long" and v.regs["rip"] == 0x1000000 and v.regs["rsi"] == zp
    assert m.read(zp + 0x202, 4) == b"HdrS" and m.read_u8(zp + 0x210) == 0xFF
    assert _read_cstr(vm, m.read_u32(zp + 0x228)) == "quiet"
    assert m.read_u8(zp + 0x1E8) == 4
    assert v.sregs["cs"]["selector"] == 0x10


@needs_binutils
def test_vmlinux_errors(vm, tmp_path):
    data = build_elf(tmp_path, KERNEL32)
    with pytest.raises(LoaderError, match="ELF32 image without a PVH entry note"):
        loaders.load(vm, data, format="linux")
    pvh = build_elf(tmp_path, PVH64, bits=64, base=0x1000000)
    with pytest.raises(LoaderError, match="COMMAND_LINE_SIZE"):
        loaders.load(vm, pvh, cmdline="x" * 3000)
    bad = bytearray(pvh)
    at = bad.find(b"Xen\0")
    struct.pack_into("<I", bad, at - 8, 0x1000)  # descsz runs past the note
    with pytest.raises(LoaderError, match="run past its note segment"):
        loaders.load(vm, bytes(bad), format="linux")
    # A PVH note with a 3-byte value
    bad = bytearray(pvh)
    struct.pack_into("<I", bad, at - 8, 3)
    with pytest.raises(LoaderError, match="3-byte value"):
        loaders.load(vm, bytes(bad), format="linux")


# ---- fuzzing: every corruption either loads or raises LoaderError ------------------------------------


def _corruptions(base: bytes, seed: int, rounds: int, hot):
    """``rounds`` randomly corrupted copies of ``base``; 80% of the writes land in ``hot``
    (an end offset, or a list of (start, end) ranges)."""
    ranges = [(0, hot)] if isinstance(hot, int) else hot
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 6))):
            if rng.random() < 0.8:
                lo, hi = ranges[int(rng.integers(0, len(ranges)))] if len(ranges) > 1 else ranges[0]
                pos = int(rng.integers(lo, min(len(data), hi)))
            else:
                pos = int(rng.integers(0, len(data)))
            if rng.random() < 0.5:
                data[pos] = int(rng.integers(0, 256))
            else:  # a plausible-looking big or small 32-bit value
                val = int(rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x100000, 0xFFFF, int(rng.integers(0, 1 << 32))]))
                data[pos:pos + 4] = val.to_bytes(4, "little")[: len(data) - pos]
        if rng.random() < 0.1:
            data = data[: int(rng.integers(0, len(data)))]
        yield bytes(data)


def _fuzz(vm, base: bytes, seed: int, rounds: int, hot: int, **kw):
    for data in _corruptions(base, seed, rounds, hot):
        try:
            loaders.load(vm, data, **kw)
        except LoaderError:
            pass


@needs_binutils
def test_fuzz_multiboot_elf(vm, tmp_path):
    base = build_elf(tmp_path, MULTIBOOT32.format(flags=3))
    _fuzz(vm, base, 2, 300, 0x1100, cmdline="x", modules=[b"m"])


def test_fuzz_multiboot_aout():
    vm = FakeVm(((0, 4 << 20),))
    img = bytearray(0x200)
    struct.pack_into("<8I", img, 0x40, 0x1BADB002, 0x10000, (-(0x1BADB002 + 0x10000)) & 0xFFFFFFFF,
                     0x100040, 0x100000, 0x100100, 0x102000, 0x100080)
    _fuzz(vm, bytes(img), 3, 300, 0x60, format="multiboot", modules=[b"m"])


def test_fuzz_bzimage():
    vm = FakeVm(((0, 32 << 20),))
    _fuzz(vm, make_bzimage(init_size=0x100000), 4, 400, 0x270, format="linux", cmdline="console=ttyS0",
          initrd=b"i" * 5000)


@needs_binutils
def test_fuzz_pvh(vm, tmp_path):
    base = build_elf(tmp_path, PVH64, bits=64, base=0x1000000)
    _fuzz(vm, base, 5, 300, 0x1200, format="linux", initrd=b"i")


# ---- a bzImage's compressed vmlinux: bounded extraction -----------------------------------------------


def tiny_vmlinux(padding: int = 0) -> bytes:
    """An ELF64 kernel with one PT_LOAD (hlt at 16 MiB), bootable through the 64-bit protocol;
    ``padding`` zero bytes after it (a large, very compressible image)."""
    code = b"\xf4"
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 0x3E, 1, 0x1000000,
                       64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, 0x1000000, 0x1000000, len(code), 0x1000, 0x1000)
    return ehdr + phdr + code + bytes(padding)


def compress(kind: str, data: bytes, zeros: int = 0) -> bytes:
    """``data`` plus ``zeros`` zero bytes compressed as the kernel's build does (xz and lzma get
    the 4-byte size appended), without holding the zeros in memory."""
    if kind == "gzip":
        c = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    elif kind == "zstd":
        import zstandard

        c = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=len(data) + zeros)
    else:
        c = lzma.LZMACompressor(format=lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE,
                                **({"check": lzma.CHECK_CRC32} if kind == "xz" else {}), preset=0)
    chunk = bytes(1 << 20)
    parts = [c.compress(data)]
    for at in range(0, zeros, len(chunk)):
        parts.append(c.compress(chunk[:zeros - at]))
    parts.append(c.flush())
    out = b"".join(parts)
    return out if kind == "gzip" else out + struct.pack("<I", (len(data) + zeros) & 0xFFFFFFFF)


def bzimage_with_payload(payload: bytes) -> bytes:
    """A bzImage (boot protocol 2.15) whose protected-mode part is a stub then ``payload``."""
    stub = b"\x90" * 0x100 + b"\xf4"
    img = bytearray(make_bzimage(kernel=stub + payload + b"\0" * 7))
    struct.pack_into("<II", img, 0x248, len(stub), len(payload))
    return bytes(img)


PAYLOAD_KINDS = ("gzip", "xz", "lzma")


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_extract_vmlinux_and_boot_it(vm, kind):
    vmlinux = tiny_vmlinux(padding=5000)
    image = bzimage_with_payload(compress(kind, vmlinux))
    assert lbz.payload(image)[0] == kind
    assert lbz.extract_vmlinux(image, max_size=len(vmlinux)) == vmlinux  # a cap of exactly its size
    with pytest.raises(LoaderError, match=f"decompresses to more than {len(vmlinux) - 1:#x} bytes"):
        lbz.extract_vmlinux(image, max_size=len(vmlinux) - 1)
    info = loaders.load(vm, lbz.extract_vmlinux(image), format="linux")
    assert info.mode == "long" and vm.memory.read(0x1000000, 1) == b"\xf4"


def _payload_errors():
    elf = tiny_vmlinux(3000)
    gz = compress("gzip", elf)
    yield "gzip-crc", gz[:-8] + bytes(4) + gz[-4:], "payload \\(gzip\\) does not decompress: .*check"
    yield "gzip-header", gz[:3] + b"\xff" + gz[4:], "payload \\(gzip\\) does not decompress"
    for kind in PAYLOAD_KINDS:
        full = compress(kind, elf)
        yield f"{kind}-truncated", full[:len(full) // 2], f"payload \\({kind}\\) is truncated"
        yield f"{kind}-not-elf", compress(kind, b"MZ" + bytes(100)), "not an ELF kernel \\(it starts 4d5a0000\\)"
        yield f"{kind}-empty", compress(kind, b""), "not an ELF kernel \\(it decompresses to 0 bytes\\)"
    xz = bytearray(compress("xz", elf))
    xz[len(xz) // 2] ^= 0xFF
    yield "xz-corrupt", bytes(xz), "payload \\(xz\\) does not decompress"
    huge_dict = bytearray(compress("lzma", elf))
    struct.pack_into("<I", huge_dict, 1, 0xFFFF0000)  # liblzma would allocate a 4 GiB dictionary
    yield "lzma-4g-dictionary", bytes(huge_dict), "payload \\(lzma\\) does not decompress: Memory usage limit"
    yield "unknown", b"\x42\x5a\x68" + bytes(50), "unknown compression \\(starts 425a68"


@pytest.mark.parametrize("payload, message", [p[1:] for p in _payload_errors()],
                         ids=[p[0] for p in _payload_errors()])
def test_extract_vmlinux_errors_are_loader_errors(payload, message):
    with pytest.raises(LoaderError, match=message):
        lbz.extract_vmlinux(bzimage_with_payload(payload), max_size=1 << 20)


def test_extract_vmlinux_header_errors():
    image = bytearray(bzimage_with_payload(compress("gzip", tiny_vmlinux())))
    with pytest.raises(LoaderError, match="max_size must be positive"):
        lbz.extract_vmlinux(bytes(image), max_size=0)
    struct.pack_into("<I", image, 0x24C, 0x7FFFFFFF)
    with pytest.raises(LoaderError, match="lies outside the"):
        lbz.extract_vmlinux(bytes(image))
    with pytest.raises(LoaderError, match="no 'HdrS'"):
        lbz.extract_vmlinux(b"\x90" * 0x300)
    with pytest.raises(LoaderError, match="boot protocol 2.7 has no payload fields"):
        lbz.extract_vmlinux(make_bzimage(version=0x207))


def test_extract_vmlinux_zstd():
    try:
        import zstandard
    except ImportError:
        with pytest.raises(LoaderError, match="zstd-compressed: install the 'zstandard' package"):
            lbz.extract_vmlinux(bzimage_with_payload(b"\x28\xb5\x2f\xfd" + bytes(20)))
        pytest.skip("zstd payloads need the zstandard package")
    vmlinux = tiny_vmlinux(5000)
    payload = zstandard.ZstdCompressor().compress(vmlinux) + struct.pack("<I", len(vmlinux))
    assert lbz.extract_vmlinux(bzimage_with_payload(payload)) == vmlinux
    with pytest.raises(LoaderError, match="decompresses to more than"):
        lbz.extract_vmlinux(bzimage_with_payload(payload), max_size=4096)


BOMB_SIZE = 64 << 20
BOMB_CAP = 1 << 20


@pytest.fixture(scope="module")
def bombs():
    """An ELF header then 64 MiB of zeros, compressed (gzip ~65 KB, xz and lzma ~10 KB)."""
    return {kind: bzimage_with_payload(compress(kind, tiny_vmlinux(), zeros=BOMB_SIZE)) for kind in PAYLOAD_KINDS}


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_decompression_bomb_stops_at_the_cap(bombs, kind):
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(LoaderError, match=f"\\({kind}, .*\\) decompresses to more than {BOMB_CAP:#x} bytes"):
            lbz.extract_vmlinux(bombs[kind], max_size=BOMB_CAP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The cap, a step or two of output, the decoder's state and the compressed input (measured:
    # 1.7-1.8 MiB): never the 64 MiB.
    assert peak < BOMB_CAP + (1 << 20) + 2 * len(bombs[kind]), peak


def test_extraction_peak_memory_stays_near_the_output(bombs):
    """A large image that fits: built in place, handed over without a second copy."""
    import tracemalloc

    tracemalloc.start()
    try:
        out = lbz.extract_vmlinux(bombs["xz"], max_size=BOMB_SIZE + 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == len(tiny_vmlinux()) + BOMB_SIZE
    assert peak < len(out) * 1.2 + lbz.OUTPUT_STEP, peak


@pytest.mark.parametrize("kind, seed", [("gzip", 11), ("xz", 12), ("lzma", 13), ("zstd", 14)])
def test_fuzz_bzimage_extraction(kind, seed):
    """Random corruptions of a bzImage's header fields and compressed payload: the extraction and
    the boot of what it gives either work or raise LoaderError, and nothing outgrows the cap."""
    vm = FakeVm(((0, 32 << 20),))
    image = bzimage_with_payload(compress(kind, tiny_vmlinux(2000), zeros=200 << 10))
    start = (image[0x1F1] + 1) * 512 + struct.unpack_from("<I", image, 0x248)[0]
    hot = [(0x1F0, 0x250), (start, start + 64), (start, len(image))]
    cap = 1 << 20
    outcomes = {"extracted": 0, "refused": 0}
    for data in _corruptions(image, seed, 600, hot):
        try:
            vmlinux = lbz.extract_vmlinux(data, max_size=cap)
        except LoaderError:
            outcomes["refused"] += 1
            continue
        outcomes["extracted"] += 1
        assert len(vmlinux) <= cap
        try:
            loaders.load(vm, vmlinux, format="linux")
        except LoaderError:
            pass
    assert outcomes["extracted"] > 10 and outcomes["refused"] > 100, outcomes
