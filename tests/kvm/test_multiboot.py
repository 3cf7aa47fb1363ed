"""Real multiboot v1 guests: assembled and linked at test time (GNU as/ld, elf_i386, at 1 MiB),
loaded by hvjit.loaders, they print what the MBI says through COM1 and exit through port 0xf4.

The guests run at CPL0 in protected mode, which this host's KVM emulates (~1 us/instruction):
they print a few lines and nothing more.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hvjit import entry, loaders
from hvjit.abi import VmExitCode

pytestmark = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                reason="GNU as/ld (binutils) not installed")

OK, BAD_MAGIC = 0x2A, 0x0B

GUEST = r"""
.set FLAGS, {flags}
.section .text
.align 4
mb_header:
    .long 0x1BADB002
    .long FLAGS
    .long -(0x1BADB002 + FLAGS)
    .long mb_header, _image, _edata, _end, _start   # used only with flags bit 16
.globl _start
_start:
    mov $stack_top, %esp
    cmp $0x2BADB002, %eax
    jne bad_magic
    mov %ebx, %ebp                  # the MBI
    mov $s_upper, %esi
    call puts
    mov 8(%ebp), %eax               # mem_upper
    call puthex
    call newline
    mov $s_cmd, %esi
    call puts
    mov 16(%ebp), %esi              # cmdline
    call puts
    call newline
    mov $s_mods, %esi
    call puts
    mov 20(%ebp), %eax              # mods_count
    call puthex
    call newline
    mov 24(%ebp), %edi              # mods_addr: the first module
    mov $s_mod, %esi
    call puts
    mov (%edi), %esi                # mod_start
    mov 4(%edi), %ecx               # mod_end
    sub %esi, %ecx
    call putn
    mov $s_str, %esi
    call puts
    mov 8(%edi), %esi               # its string
    call puts
    call newline
    mov 48(%ebp), %edi              # mmap_addr
    mov 44(%ebp), %ebx              # mmap_length
    add %edi, %ebx
1:  cmp %ebx, %edi
    jae 2f
    mov $s_mmap, %esi
    call puts
    mov 4(%edi), %eax               # base (low half)
    call puthex
    call space
    mov 12(%edi), %eax              # length (low half)
    call puthex
    call space
    mov 20(%edi), %eax              # type
    call puthex
    call newline
    add (%edi), %edi                # size does not count itself
    add $4, %edi
    jmp 1b
2:  mov ${ok}, %eax
    outl %eax, $0xf4
3:  hlt
    jmp 3b
bad_magic:
    mov ${bad}, %eax
    outl %eax, $0xf4
    jmp 3b

puts:                               # print the NUL-terminated string at %esi
    mov $0x3f8, %dx
4:  lodsb
    test %al, %al
    jz 5f
    outb %al, %dx
    jmp 4b
5:  ret
putn:                               # print %ecx bytes at %esi
    mov $0x3f8, %dx
    jecxz 7f
6:  lodsb
    outb %al, %dx
    loop 6b
7:  ret
puthex:                             # print %eax as 8 hex digits
    mov $0x3f8, %dx
    mov $8, %ecx
8:  rol $4, %eax
    push %eax
    and $0xf, %eax
    mov hexdigits(%eax), %al
    outb %al, %dx
    pop %eax
    loop 8b
    ret
space:
    mov $' ', %al
    jmp putc
newline:
    mov $'\n', %al
putc:
    mov $0x3f8, %dx
    outb %al, %dx
    ret

.section .data
hexdigits: .ascii "0123456789abcdef"
s_upper: .asciz "mem_upper="
s_cmd: .asciz "cmdline="
s_mods: .asciz "mods="
s_mod: .asciz "module="
s_str: .asciz " string="
s_mmap: .asciz "mmap "
.section .bss
.align 16
    .space 0x1000
stack_top:
"""

LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
  . = 0x100000;
  _image = .;
  .text : { *(.text*) }
  .data : { *(.data*) *(.rodata*) }
  _edata = .;
  .bss : { *(.bss*) *(COMMON) }
  _end = .;
}
"""


def build(tmp_path, flags: int, *, binary: bool = False) -> bytes:
    (tmp_path / "g.S").write_text(GUEST.format(flags=flags, ok=OK, bad=BAD_MAGIC))
    (tmp_path / "g.ld").write_text(LINKER_SCRIPT)
    subprocess.run(["as", "--32", "-o", str(tmp_path / "g.o"), str(tmp_path / "g.S")], check=True,
                   capture_output=True)
    ld = ["ld", "-m", "elf_i386", "-T", str(tmp_path / "g.ld"), "-o", str(tmp_path / "g.elf"),
          str(tmp_path / "g.o")]
    if subprocess.run(ld + ["--no-warn-rwx-segments"], capture_output=True, check=False).returncode:
        subprocess.run(ld, check=True, capture_output=True)
    if not binary:
        return (tmp_path / "g.elf").read_bytes()
    subprocess.run(["objcopy", "-O", "binary", str(tmp_path / "g.elf"), str(tmp_path / "g.bin")],
                   check=True, capture_output=True)
    return (tmp_path / "g.bin").read_bytes()


def expected_console(vm, module: bytes, string: str, cmdline: str) -> str:
    sa = entry.sysarea_gpa(vm)
    lines = [f"mem_upper={(sa - 0x100000) // 1024:08x}", f"cmdline={cmdline}", "mods=00000001",
             f"module={module.decode()} string={string}"]
    for base, length, typ in ((0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, sa - 0x100000, 1),
                              (sa, 0x10000, 2)):
        lines.append(f"mmap {base:08x} {length:08x} {typ:08x}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("flags, binary", [
    (0x0, False),  # what conformance-suite kernels use: ELF, no requirements
    (0x3, False),  # page-aligned modules, memory information wanted
    (0x10003, True),  # a flat image: the a.out-kludge addresses in the header
], ids=["elf-flags0", "elf-meminfo", "aout-kludge"])
def test_multiboot_guest_reads_its_mbi(session, tmp_path, flags, binary):
    image = build(tmp_path, flags, binary=binary)
    vm = session.create_vm("mb", memory=16 << 20)
    cmdline = "console=ttyS0 answer=42"
    module = b"hello from a module"
    info = loaders.load(vm, image, cmdline=cmdline, modules=[(module, "mod.bin arg=1")])
    assert info.format == "multiboot"
    assert (info.image is None) == binary
    if not binary:
        assert info.entry == info.image.lookup("_start")
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.SUSPENDED, (ex, vm.console)
    assert ex.code == OK, vm.console
    # argv[0] first: an image given as bytes is called "kernel"
    assert vm.console.decode() == expected_console(vm, module, "mod.bin arg=1", f"kernel {cmdline}")
