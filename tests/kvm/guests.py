"""Tiny guests for the KVM tests, assembled with GNU as at test time."""

from hvjit import entry
from hvjit.asm import assemble

LOAD = 0x1000

# Print the NUL-terminated string at `msg` on COM1, then write `code` to the debug-exit port.
# {si}: the string register for the mode (si/esi/rsi).
HELLO = """
.code{bits}
    mov $msg, %{si}
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  mov ${code}, %eax
    outl %eax, $0xf4
3:  jmp 3b
msg: .asciz "{text}"
"""

MODES = {  # mode -> (bits, string register)
    "real": (16, "si"),
    "protected": (32, "esi"),
    "long": (64, "rsi"),
}


def hello_source(mode: str, text: str, code: int) -> str:
    bits, si = MODES[mode]
    return HELLO.format(bits=bits, si=si, text=text, code=code)


def load(vm, source: str, mode: str = "long", cpl: int = 0, at: int = LOAD):
    """Assemble, load at `at`, and put vCPU 0 into `mode` at `cpl` entering there."""
    vm.memory.write(at, assemble(source, at))
    return entry.setup_mode(vm.vcpu(0), mode, at, cpl=cpl)


# A long-mode ELF guest with symbols: calls add_two until rbx is 6, then exits with it.
ELF_ADD_TWO = """
.globl _start, add_two, finish
.text
_start:
    xor %ebx, %ebx
again:
    call add_two
    cmp $6, %ebx
    jne again
    call finish
add_two:
    add $2, %ebx
    ret
finish:
    mov %ebx, %eax
    outl %eax, $0xf4
    hlt
"""


def build_elf(tmp_path, source: str = ELF_ADD_TWO, bits: int = 64, text: int = 0x200000) -> bytes:
    """Assemble and link ``source`` with GNU as/ld into an ELF with symbols (text at ``text``)."""
    import subprocess

    src, obj, out = tmp_path / f"g{bits}.s", tmp_path / f"g{bits}.o", tmp_path / f"g{bits}.elf"
    src.write_text(source)
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64" if bits == 64 else "elf_i386", f"-Ttext={text:#x}", "-e", "_start",
                    "-o", str(out), str(obj)], check=True)
    return out.read_bytes()


# A loop whose `add` at TARGET runs three times: rbx goes 1, 12, 23, then the guest exits 33.
LOOP = """
.code64
    xor %ebx, %ebx
1:  inc %ebx
target:
    add $10, %ebx
    cmp $33, %ebx
    jne 1b
    mov %ebx, %eax
    outl %eax, $0xf4
"""
LOOP_TARGET = LOAD + 2 + 2  # xor (2 bytes) + inc (2 bytes)
