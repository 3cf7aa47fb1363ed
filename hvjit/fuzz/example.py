"""A small CPL3 guest with a planted bug, for the fuzzing docs, tests and ``hvjit fuzz`` demos.

The guest parses a tiny format — a 4-byte magic ``HVJT``, then records: ``S len bytes...``
(summed), ``D a b`` (two 16-bit words, divided), ``E`` (end); other bytes are skipped — and
follows the harness convention of docs/fuzzing.md: it reports ready with its input buffer,
an 8-bit coverage map (one counter per basic block of the parser) and a comparison log,
parses, and reports done. The planted bug: a ``D`` record divides without checking for a
zero divisor, so ``HVJT D 01 00 00 00`` raises #DE. The magic is compared as one 32-bit
word: no byte-wise coverage leads to it, the comparison log does.
"""

from __future__ import annotations

from ..asm import assemble

LOAD_GPA = 0x1000
INPUT_GPA = 0x10000
INPUT_CAPACITY = 0x1008  # 8-byte length + 4 KiB of data
COVERAGE_GPA = 0x20000
COVERAGE_SIZE = 64
CMPLOG_GPA = 0x21000
CMPLOG_ENTRIES = 64
MAGIC = 0x544A5648  # b"HVJT" little-endian
MEMORY = 2 << 20

# The planted bug's input: the magic, one 'D' record with divisor 0.
CRASHING_INPUT = b"HVJTD\x01\x00\x00\x00"

SOURCE = f"""
.code64
.set INPUT, {INPUT_GPA:#x}
.set COV, {COVERAGE_GPA:#x}
.set CMPLOG, {CMPLOG_GPA:#x}
.set CMPLOG_CAP, {CMPLOG_ENTRIES}

# One coverage counter per block (AFL style: a byte that wraps).
.macro COV n
    incb COV+\\n
.endm

# Log a comparison (site id, operand size, register, immediate): after the log's u64 count,
# entries of three u64: size | site << 8, the register's value, the immediate.
.macro CMPLOG site, size, reg, imm
    push %rdi
    push %rax
    mov \\reg, %rax
    mov CMPLOG, %rdi
    cmp $CMPLOG_CAP, %rdi
    jae .Lfull\\@
    imul $24, %rdi, %rdi
    movq $(\\size | \\site << 8), CMPLOG+8(%rdi)
    mov %rax, CMPLOG+16(%rdi)
    movq $\\imm, CMPLOG+24(%rdi)
    mov CMPLOG, %rdi
.Lfull\\@:
    inc %rdi
    mov %rdi, CMPLOG
    pop %rax
    pop %rdi
.endm

start:
    mov $INPUT, %edi
    mov ${INPUT_CAPACITY}, %esi
    mov $COV, %r8d
    mov ${COVERAGE_SIZE}, %r9d
    mov $CMPLOG, %r10d
    mov $CMPLOG_CAP, %r11d
    mov $1, %eax                # READY: hvjit snapshots here and writes each input
    mov $0x6f0, %dx
    outl %eax, %dx

parse:
    COV 1
    mov INPUT, %rcx             # input length
    lea INPUT+8, %rsi           # input bytes
    cmp $4, %rcx
    jb done
    COV 2
    mov (%rsi), %eax
    CMPLOG 1, 4, %rax, {MAGIC:#x}
    cmp ${MAGIC:#x}, %eax
    jne done
    COV 3
    lea 4(%rsi), %r12           # next record
    lea (%rsi,%rcx), %r13       # end of input
    xor %r15d, %r15d            # checksum
record:
    cmp %r13, %r12
    jae done
    COV 4
    movzbl (%r12), %eax         # type
    CMPLOG 2, 1, %rax, 0x53
    cmp $0x53, %eax             # 'S' len bytes...: sum the bytes
    je rec_sum
    CMPLOG 3, 1, %rax, 0x44
    cmp $0x44, %eax             # 'D' u16 a, u16 b: a / b
    je rec_div
    CMPLOG 4, 1, %rax, 0x45
    cmp $0x45, %eax             # 'E': end of records
    je done
    COV 5
    inc %r12                    # unknown types are skipped
    jmp record
rec_sum:
    COV 6
    lea 2(%r12), %rbx
    cmp %r13, %rbx
    ja done
    movzbl 1(%r12), %edx
    lea (%rbx,%rdx), %r14       # the record after this one
    cmp %r13, %r14
    ja done
    COV 7
1:  cmp %r14, %rbx
    jae 2f
    COV 8
    movzbl (%rbx), %eax
    add %rax, %r15
    inc %rbx
    jmp 1b
2:  mov %r14, %r12
    jmp record
rec_div:
    COV 9
    lea 5(%r12), %r14
    cmp %r13, %r14
    ja done
    COV 10
    movzwl 1(%r12), %eax
    movzwl 3(%r12), %ecx
    xor %edx, %edx
    div %ecx                    # the planted bug: no check for a zero divisor (#DE)
    add %rax, %r15
    COV 11
    mov %r14, %r12
    jmp record
done:
    COV 12
    mov $2, %eax                # DONE
    mov $0x6f0, %dx
    outl %eax, %dx
1:  jmp 1b
"""


def image() -> bytes:
    """The guest as a flat binary to load at ``LOAD_GPA`` (long mode, CPL3)."""
    return assemble(SOURCE, LOAD_GPA)
