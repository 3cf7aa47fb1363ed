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
