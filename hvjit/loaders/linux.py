"""The Linux x86 boot protocol: bzImage (64-bit or 32-bit entry) and vmlinux ELF (PVH or
64-bit entry).

bzImage (Documentation/arch/x86/boot.rst): the setup header ("HdrS" at 0x202) is checked
(protocol >= 2.06, LOADED_HIGH), the protected-mode kernel goes to 0x100000 (``pref_address``
when not relocatable), a zero page (``struct boot_params``) gets the setup header, the e820
table, the command line pointer and the initrd (page-aligned, top-down below
``initrd_addr_max`` and the top of RAM). With XLF_KERNEL_64 the vCPU enters at load + 0x200 in
long mode (identity-mapped low 4 GiB) with RSI = zero page; otherwise at load in 32-bit
protected mode with ESI = zero page. Both use a GDT of the loader's with __BOOT_CS = 0x10 and
__BOOT_DS = 0x18, as the protocol requires.

vmlinux: loaded by its program headers (p_paddr). With a PVH entry note (Xen
XEN_ELFNOTE_PHYS32_ENTRY) it enters there in 32-bit protected mode, paging off, EBX = a
``struct hvm_start_info`` (command line, memory map, the initrd as module 0); otherwise at
e_entry in long mode with a zero page, as for a bzImage.
"""

from __future__ import annotations

import struct
from typing import Optional

from ..errors import HvjitError, LoaderError
from . import PAGE, BootInfo, Placer, encode_cmdline, read_image

# Kernel arguments that spare a stock kernel boot-time work which is cheap on hardware but
# costs minutes where KVM emulates ring 0 (PVM; docs/linux-on-pvm.md has the measurements):
# the W+X page-table walk (rodata=off), ftrace's weak-function check, the trace-event enum
# rewrite (trace_eval_init), the tracefs files of every trace event (tracer_init_tracefs), the crypto self-tests (RSA private-key operations in bignum
# code), the BPF type information parse that the first kfunc registration triggers (BTF_INITCALLS),
# the Spectre-class thunks on every indirect call and return (mitigations=off), and code
# paths KVM's emulator cannot run (SSSE3 blake2s, cmpxchg16b-based SLUB fast paths,
# XSAVE-managed FPU state, SMAP's clac/stac at every user access and kernel entry).
BTF_INITCALLS = ("bpf_key_sig_kfuncs_init", "bpf_prog_test_run_init", "bpf_rstat_kfunc_init",
                 "bpf_tcp_ca_kfunc_init", "cubictcp_register", "kfunc_init")
EMULATED_RING0_ARGS = ("rodata=off noxsave clearcpuid=cx16,ssse3,smap mitigations=off cryptomgr.notests "
                       "initcall_blacklist=" + ",".join(("ftrace_check_for_weak_functions", "trace_eval_init", "tracer_init_tracefs",
                                                          *BTF_INITCALLS)))

# Setup header offsets (in the image and in struct boot_params).
OFF_SETUP_SECTS = 0x1F1
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
HDR_LIMIT = 0x290  # struct setup_header ends before edd_mbr_sig_buffer
# struct boot_params outside the header.
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0
E820_MAX = 128
E820_ENTRY = struct.Struct("<QQI")
ZERO_PAGE_SIZE = 0x1000

MIN_VERSION = 0x206
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
DEFAULT_LOAD = 0x100000
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF
LEGACY_CMDLINE_MAX = 2047  # COMMAND_LINE_SIZE - 1 when the header does not say
LOADER_TYPE = 0xFF  # "undefined" boot loader

# hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), version 1.
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO = struct.Struct("<IIIIQQQQII")  # magic version flags nr_modules modlist cmdline rsdp memmap entries reserved
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr size cmdline_paddr reserved
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr size type reserved

# Boot GDT: null, unused, __BOOT_CS 0x10, __BOOT_DS 0x18 (the TSS slot stays at 0x38).
BOOT_CS, BOOT_DS = 0x10, 0x18
DESC_CODE64 = 0x00AF9B000000FFFF
DESC_CODE32 = 0x00CF9B000000FFFF
DESC_DATA = 0x00CF93000000FFFF
GDT_SIZE = 0x48
LIMIT_4G = 1 << 32


class SetupHeader:
    """The checked fields of a bzImage's setup header."""

    def __init__(self, data: bytes):
        if len(data) < OFF_CMDLINE_SIZE + 4:
            raise LoaderError(f"bzImage of {len(data):#x} bytes is too short for a setup header")
        if data[OFF_HEADER:OFF_HEADER + 4] != b"HdrS":
            raise LoaderError("not a bzImage: no 'HdrS' magic at offset 0x202")
        (boot_flag,) = struct.unpack_from("<H", data, OFF_BOOT_FLAG)
        if boot_flag != 0xAA55:
            raise LoaderError(f"bzImage boot_flag at 0x1fe is {boot_flag:#x}, not 0xaa55")
        u8 = lambda o: data[o]
        u16 = lambda o: struct.unpack_from("<H", data, o)[0]
        u32 = lambda o: struct.unpack_from("<I", data, o)[0]
        self.version = u16(OFF_VERSION)
        if self.version < MIN_VERSION:
            raise LoaderError(f"boot protocol version {self.version >> 8}.{self.version & 0xFF:02d} is "
                              f"too old (hvjit needs {MIN_VERSION >> 8}.{MIN_VERSION & 0xFF:02d})")
        self.setup_sects = u8(OFF_SETUP_SECTS) or 4
        self.setup_size = (self.setup_sects + 1) * 512
        if self.setup_size >= len(data):
            raise LoaderError(f"bzImage setup_sects {self.setup_sects} puts the protected-mode kernel "
                              f"at {self.setup_size:#x}, at or past the end of the file "
                              f"({len(data):#x} bytes)")
        self.header_end = min(OFF_HEADER + u8(OFF_JUMP + 1), HDR_LIMIT)
        if self.header_end < OFF_CMDLINE_SIZE + 4:
            raise LoaderError(f"bzImage setup header ends at {self.header_end:#x} (jump offset byte "
                              f"{u8(OFF_JUMP + 1):#x}), before the protocol 2.06 fields")
        if self.header_end > len(data):
            raise LoaderError(f"bzImage setup header end {self.header_end:#x} is past the end of the file")
        self.loadflags = u8(OFF_LOADFLAGS)
        if not self.loadflags & LOADED_HIGH:
            raise LoaderError("bzImage loadflags lack LOADED_HIGH: zImages loaded at 0x10000 are not supported")
        self.cmdline_size = u32(OFF_CMDLINE_SIZE)
        self.initrd_addr_max = u32(OFF_INITRD_ADDR_MAX) or DEFAULT_INITRD_ADDR_MAX
        self.relocatable = bool(u8(OFF_RELOCATABLE))
        self.kernel_alignment = u32(OFF_KERNEL_ALIGNMENT)
        has = lambda off, size: self.header_end >= off + size
        self.xloadflags = u16(OFF_XLOADFLAGS) if self.version >= 0x20C and has(OFF_XLOADFLAGS, 2) else 0
        self.pref_address = (struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)[0]
                             if self.version >= 0x20A and has(OFF_PREF_ADDRESS, 8) else DEFAULT_LOAD)
        self.init_size = u32(OFF_INIT_SIZE) if self.version >= 0x20A and has(OFF_INIT_SIZE, 4) else 0
        self.kernel_64 = bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def _e820(zp: bytearray, memory_map) -> None:
    if len(memory_map) > E820_MAX:
        raise LoaderError(f"memory map of {len(memory_map)} entries exceeds the zero page's {E820_MAX}")
    zp[OFF_E820_ENTRIES] = len(memory_map)
    for i, r in enumerate(memory_map):
        E820_ENTRY.pack_into(zp, OFF_E820_TABLE + 20 * i, r.base, r.length, r.type)


def _set_cmdline(zp: bytearray, gpa: int) -> None:
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, gpa & 0xFFFFFFFF)
    struct.pack_into("<I", zp, OFF_EXT_CMD_LINE_PTR, gpa >> 32)


def _set_initrd(zp: bytearray, gpa: int, size: int) -> None:
    struct.pack_into("<II", zp, OFF_RAMDISK_IMAGE, gpa & 0xFFFFFFFF, size & 0xFFFFFFFF)
    struct.pack_into("<II", zp, OFF_EXT_RAMDISK_IMAGE, gpa >> 32, size >> 32)


def _check_cmdline(cmd: bytes, limit: int, where: str) -> None:
    if len(cmd) - 1 > limit:
        raise LoaderError(f"command line of {len(cmd) - 1} bytes is too long: {where} allows {limit}")


def _place_initrd(vm, placer: Placer, initrd, hi: int) -> Optional[tuple[int, int]]:
    if initrd is None:
        return None
    data = read_image(initrd, "initrd")
    if not data:
        raise LoaderError("initrd is empty")
    try:
        gpa = placer.alloc(len(data), "initrd", align=PAGE, lo=0x100000, hi=hi, top_down=True)
    except LoaderError as e:
        raise LoaderError(f"initrd of {len(data):#x} bytes does not fit in guest RAM below "
                          f"{hi:#x}: {e}") from None
    vm.memory.write(gpa, data)
    return gpa, len(data)


def _enter_boot_gdt(vm, vcpu, placer: Placer, *, long_mode: bool, rip: int, rsi: int) -> dict:
    """Enter at ``rip`` with __BOOT_CS/__BOOT_DS from a GDT of the loader's; ESI/RSI = ``rsi``."""
    from .. import entry as _entry

    stack = placer.boot_stack()
    gdt_gpa = placer.alloc(GDT_SIZE, "boot GDT", align=16, lo=0x6000)
    try:
        if long_mode:
            state = _entry.setup_long_mode(vcpu, rip, cpl=0, stack=stack)
        else:
            state = _entry.setup_protected_mode(vcpu, rip, cpl=0, stack=stack)
        gdt = bytearray(vm.memory.read(state.sysarea + _entry.GDT_OFF, GDT_SIZE))
        struct.pack_into("<QQ", gdt, BOOT_CS, DESC_CODE64 if long_mode else DESC_CODE32, DESC_DATA)
        vm.memory.write(gdt_gpa, bytes(gdt))
        sregs = vcpu.get_sregs()
        sregs["gdt"]["base"], sregs["gdt"]["limit"] = gdt_gpa, GDT_SIZE - 1
        sregs["cs"]["selector"] = BOOT_CS
        for name in ("ds", "es", "fs", "gs", "ss"):
            sregs[name]["selector"] = BOOT_DS
        vcpu.set_sregs(sregs)
        vcpu.set_registers(rsi=rsi, rbx=0, rbp=0, rdi=0)
    except HvjitError as e:
        raise LoaderError(f"cannot enter the Linux kernel: {e}") from None
    return {"stack": state.stack, "gdt": gdt_gpa}


def load_bzimage(vm, vcpu, data: bytes, *, cmdline="", initrd=None,
                 entry: Optional[int] = None) -> BootInfo:
    hdr = SetupHeader(data)
    cmd = encode_cmdline(cmdline)
    _check_cmdline(cmd, hdr.cmdline_size, "this kernel's cmdline_size")
    kernel = data[hdr.setup_size:]
    load_addr = DEFAULT_LOAD
    if not hdr.relocatable and hdr.pref_address != DEFAULT_LOAD:
        load_addr = hdr.pref_address
    if load_addr >= LIMIT_4G or load_addr % PAGE:
        raise LoaderError(f"bzImage pref_address {load_addr:#x} is not a page-aligned address below 4 GiB")
    # The kernel needs init_size bytes from its runtime start (the aligned load address, at
    # least pref_address) for decompression: keep the initrd and boot data out of there.
    align = hdr.kernel_alignment if hdr.kernel_alignment and not hdr.kernel_alignment & (
        hdr.kernel_alignment - 1) else 1
    runtime = load_addr if not hdr.relocatable else max((load_addr + align - 1) // align * align,
                                                       hdr.pref_address if hdr.pref_address < LIMIT_4G else 0)
    span = max(load_addr + len(kernel), runtime + hdr.init_size) - load_addr
    placer = Placer(vm, limit=LIMIT_4G)
    placer.claim(load_addr, span, f"Linux kernel (protected-mode part and init_size {hdr.init_size:#x})")
    vm.memory.write(load_addr, kernel)

    zp_gpa = placer.alloc(ZERO_PAGE_SIZE, "zero page", align=PAGE, lo=0x7000)
    cmd_gpa = placer.alloc(len(cmd), "kernel command line", align=16, lo=0x20000)
    vm.memory.write(cmd_gpa, cmd)
    initrd_at = _place_initrd(vm, placer, initrd, min(hdr.initrd_addr_max + 1, LIMIT_4G))

    zp = bytearray(ZERO_PAGE_SIZE)
    zp[OFF_SETUP_SECTS:hdr.header_end] = data[OFF_SETUP_SECTS:hdr.header_end]
    struct.pack_into("<H", zp, OFF_VID_MODE, 0xFFFF)  # "normal"
    zp[OFF_TYPE_OF_LOADER] = LOADER_TYPE
    struct.pack_into("<I", zp, OFF_CODE32_START, load_addr)
    _set_cmdline(zp, cmd_gpa)
    if initrd_at:
        _set_initrd(zp, *initrd_at)
    memory_map = placer.memory_map
    _e820(zp, memory_map)
    vm.memory.write(zp_gpa, bytes(zp))

    long_mode = hdr.kernel_64
    rip = (load_addr + 0x200 if long_mode else load_addr) if entry is None else entry
    done = _enter_boot_gdt(vm, vcpu, placer, long_mode=long_mode, rip=rip, rsi=zp_gpa)
    return BootInfo(
        format="linux", entry=rip, mode="long" if long_mode else "protected", stack=done["stack"],
        registers={"rsi" if long_mode else "esi": zp_gpa},
        selectors={"cs": BOOT_CS, "ds": BOOT_DS, "gdt": done["gdt"]},
        boot_info_gpa=zp_gpa, boot_info_kind="zero page (struct boot_params)",
        memory_map=memory_map, loaded=[("bzImage protected-mode kernel", load_addr, len(kernel))],
        cmdline=cmd[:-1].decode("utf-8", "replace"), cmdline_gpa=cmd_gpa, initrd=initrd_at,
        notes=[(f"bzImage, boot protocol {hdr.version_str}, {'64' if long_mode else '32'}-bit entry, "
                f"setup {hdr.setup_size:#x} bytes, init_size {hdr.init_size:#x}")])


def load_vmlinux(vm, vcpu, data: bytes, *, cmdline="", initrd=None, entry: Optional[int] = None,
                 rsdp: Optional[int] = None) -> BootInfo:
    from .. import entry as _entry
    from .elf import ElfImage

    img = ElfImage(data, "vmlinux")
    pvh = img.pvh_entry
    if pvh is None and img.bits != 64:
        raise LoaderError("vmlinux: an ELF32 image without a PVH entry note (Xen "
                          "XEN_ELFNOTE_PHYS32_ENTRY) cannot be booted with the Linux boot protocol")
    cmd = encode_cmdline(cmdline)
    _check_cmdline(cmd, LEGACY_CMDLINE_MAX, "the kernel's COMMAND_LINE_SIZE (2048)")
    placer = Placer(vm, limit=LIMIT_4G)
    loaded = img.load_into(vm.memory, placer)
    cmd_gpa = placer.alloc(len(cmd), "kernel command line", align=16, lo=0x20000)
    vm.memory.write(cmd_gpa, cmd)
    memory_map = placer.memory_map
    if pvh is not None:
        info_gpa = placer.alloc(PAGE, "hvm_start_info", align=PAGE, lo=0x7000)
        initrd_at = _place_initrd(vm, placer, initrd, LIMIT_4G)
        memmap = b"".join(HVM_MEMMAP_ENTRY.pack(r.base, r.length, r.type, 0) for r in memory_map)
        memmap_off = HVM_START_INFO.size
        modlist_off = memmap_off + len(memmap)
        blob = bytearray(modlist_off + (HVM_MODLIST_ENTRY.size if initrd_at else 0))
        if len(blob) > PAGE:
            raise LoaderError(f"memory map of {len(memory_map)} entries does not fit the start-info page")
        HVM_START_INFO.pack_into(blob, 0, HVM_START_MAGIC, 1, 0, 1 if initrd_at else 0,
                                 info_gpa + modlist_off if initrd_at else 0, cmd_gpa, rsdp or 0,
                                 info_gpa + memmap_off, len(memory_map), 0)
        blob[memmap_off:modlist_off] = memmap
        if initrd_at:
            HVM_MODLIST_ENTRY.pack_into(blob, modlist_off, initrd_at[0], initrd_at[1], 0, 0)
        vm.memory.write(info_gpa, bytes(blob))
        rip = pvh if entry is None else entry
        stack = placer.boot_stack()
        try:
            state = _entry.setup_protected_mode(vcpu, rip, cpl=0, stack=stack)
            vcpu.set_registers(rbx=info_gpa)
        except HvjitError as e:
            raise LoaderError(f"cannot enter the PVH kernel: {e}") from None
        return BootInfo(
            format="linux", entry=rip, mode="protected", stack=state.stack,
            registers={"ebx": info_gpa}, boot_info_gpa=info_gpa,
            boot_info_kind="hvm_start_info (PVH)", memory_map=memory_map, loaded=loaded,
            cmdline=cmd[:-1].decode("utf-8", "replace"), cmdline_gpa=cmd_gpa, initrd=initrd_at,
            image=img, notes=[f"vmlinux, PVH entry {pvh:#x}"])

    # No PVH note: the 64-bit boot protocol at e_entry with a zero page of our own.
    if rsdp:
        raise LoaderError("an RSDP address can be passed only through the PVH start info")
    zp_gpa = placer.alloc(ZERO_PAGE_SIZE, "zero page", align=PAGE, lo=0x7000)
    initrd_at = _place_initrd(vm, placer, initrd, DEFAULT_INITRD_ADDR_MAX + 1)
    zp = bytearray(ZERO_PAGE_SIZE)
    struct.pack_into("<H", zp, OFF_BOOT_FLAG, 0xAA55)
    zp[OFF_HEADER:OFF_HEADER + 4] = b"HdrS"
    struct.pack_into("<H", zp, OFF_VERSION, 0x20F)
    struct.pack_into("<H", zp, OFF_VID_MODE, 0xFFFF)
    zp[OFF_TYPE_OF_LOADER] = LOADER_TYPE
    zp[OFF_LOADFLAGS] = LOADED_HIGH
    struct.pack_into("<I", zp, OFF_KERNEL_ALIGNMENT, 0x1000000)
    struct.pack_into("<I", zp, OFF_CMDLINE_SIZE, LEGACY_CMDLINE_MAX)
    _set_cmdline(zp, cmd_gpa)
    if initrd_at:
        _set_initrd(zp, *initrd_at)
    _e820(zp, memory_map)
    vm.memory.write(zp_gpa, bytes(zp))
    rip = img.entry_physical if entry is None else entry
    done = _enter_boot_gdt(vm, vcpu, placer, long_mode=True, rip=rip, rsi=zp_gpa)
    return BootInfo(
        format="linux", entry=rip, mode="long", stack=done["stack"], registers={"rsi": zp_gpa},
        selectors={"cs": BOOT_CS, "ds": BOOT_DS, "gdt": done["gdt"]}, boot_info_gpa=zp_gpa,
        boot_info_kind="zero page (struct boot_params)", memory_map=memory_map, loaded=loaded,
        cmdline=cmd[:-1].decode("utf-8", "replace"), cmdline_gpa=cmd_gpa, initrd=initrd_at,
        image=img, notes=["vmlinux without a PVH note: 64-bit boot protocol"])


def load(vm, vcpu, data: bytes, *, cmdline="", initrd=None, entry: Optional[int] = None,
         rsdp: Optional[int] = None) -> BootInfo:
    if data[:4] == b"\x7fELF":
        return load_vmlinux(vm, vcpu, data, cmdline=cmdline, initrd=initrd, entry=entry, rsdp=rsdp)
    if rsdp:
        raise LoaderError("an RSDP address can be passed only to a PVH vmlinux")
    return load_bzimage(vm, vcpu, data, cmdline=cmdline, initrd=initrd, entry=entry)
