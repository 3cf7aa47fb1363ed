"""Long `rep stos`/`rep movs` at CPL0: the result is the architecture's, whoever ran them
(hvjit's accelerator where KVM emulates ring 0, the CPU elsewhere), faults included."""

import struct

import pytest

from hvjit import entry
from hvjit.asm import assemble
from hvjit.rep_strings import decode

CODE, IDT = 0x1000, 0x3000
FILL, FILL_LEN = 0x400000, 0x400000  # 4 MiB of rep stosb
COPY_TO = 0xC00000
HOLE = 0x1400000  # a 2 MiB page made not-present


def _gate(target: int) -> bytes:
    return struct.pack("<HHBBHII", target & 0xFFFF, entry.SEL_CODE64, 0, 0x8E,
                       (target >> 16) & 0xFFFF, target >> 32, 0)


SOURCE = f"""
.code64
    lidt idtr(%rip)
    mov ${FILL}, %rdi
    mov $0x5a, %eax
    mov ${FILL_LEN}, %rcx
    rep stosb
    mov ${FILL}, %rsi
    mov ${COPY_TO}, %rdi
    mov ${FILL_LEN // 2 // 8}, %rcx
    rep movsq
    cmp ${COPY_TO + FILL_LEN // 2}, %rdi
    jne bad
    test %rcx, %rcx
    jne bad
    mov ${HOLE - 0x100000}, %rdi    # into the hole: the #PF handler reports
    mov $0x11223344, %eax
    mov $0x80000, %rcx
    rep stosl
bad:
    mov $0xbad, %eax
    outl %eax, $0xf4
pf:
    mov %cr2, %rax
    cmp ${HOLE}, %rax
    jne bad
    cmp ${HOLE}, %rdi               # the fault stops the instruction at the hole
    jne bad
    cmp ${0x80000 - 0x100000 // 4}, %rcx
    jne bad
    mov $0x77, %eax
    outl %eax, $0xf4
.balign 8
idtr:
    .word 16 * 32 - 1
    .quad {IDT}
"""


@pytest.mark.parametrize("accelerate", [True, False], ids=["hvjit-accelerates", "kvm-alone"])
def test_long_string_instructions_at_cpl0(session, accelerate):
    vm = session.create_vm(f"rep{int(accelerate)}", memory=32 << 20, accelerate_strings=accelerate)
    code = assemble(SOURCE, CODE)
    vm.memory.write(CODE, code)
    state = entry.setup_mode(vm.vcpu(0), "long", CODE, cpl=0)
    vm.memory.write(IDT + 14 * 16, _gate(CODE + code.index(b"\x0f\x20\xd0")))  # mov %cr2, %rax
    pde = state.sysarea + entry.PD_OFF + 8 * (HOLE >> 21)
    vm.memory.write_u64(pde, 0)
    result = vm.run(timeout=60)
    assert result.code == 0x77, str(result)
    mem = vm.memory
    assert mem.view(FILL, FILL_LEN).min() == 0x5A == mem.view(FILL, FILL_LEN).max()
    assert bytes(mem.view(COPY_TO, FILL_LEN // 2)) == b"\x5a" * (FILL_LEN // 2)
    tail = mem.view(HOLE - 0x100000, 0x100000).view("<u4")
    assert (tail == 0x11223344).all()
    assert mem.read_u64(COPY_TO + FILL_LEN // 2) == 0  # nothing past the copy
    stats = vm.rep_string_stats
    if accelerate and vm.kvm.flavour == "pvm":
        assert stats is not None and stats.finished >= 1 and stats.bytes > 0, stats
    if not accelerate:
        assert stats is None


@pytest.mark.parametrize("code,expected", [
    (b"\xf3\xaa", (True, 1, 2)),
    (b"\xf3\x48\xab", (True, 8, 3)),
    (b"\xf3\xab", (True, 4, 2)),
    (b"\x66\xf3\xab", (True, 2, 3)),
    (b"\xf3\xa4", (False, 1, 2)),
    (b"\xf3\x48\xa5", (False, 8, 3)),
])
def test_decode_the_string_instructions_it_takes(code, expected):
    op = decode(code + b"\x90" * 4)
    assert (op.store, op.width, op.length) == expected


@pytest.mark.parametrize("code", [b"\xaa", b"\xf3\x67\xaa", b"\xf3\x2e\xa4", b"\xf3\x48\x90", b"", b"\xf3" * 15])
def test_decode_leaves_the_rest_to_kvm(code):
    assert decode(code) is None
