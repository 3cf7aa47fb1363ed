"""The page-walk kernel against the real CPU: random 4-level tables, real CPL3 accesses.

The host builds 4-level page tables in guest memory: an identity-mapped "infrastructure" part
in PML4 slot 0 (guest code, probe list, user stack, IDT, GDT/TSS, the CPL0 stack) and a
random "test" part in other PML4 slots (4 KiB and 2 MiB pages with random P/RW/US/NX/A/D,
random rights on intermediate entries, some entries not present, some with reserved bits).
A CPL3 guest loop then touches every probe address (read, write, or ``call`` to a ``ret``
byte) and reports each success through a port; a fault enters a CPL0 #PF handler through
the guest IDT (TSS.RSP0 stack switch) which reports CR2 and the error code through ports
and resumes the loop at the next probe. The host compares every probe's outcome, error
code and CR2, and afterwards every byte of the test tables (A/D updates), with
``translate(..., set_ad=True)`` run in the same order on a copy of the memory taken before
the run.

Host facts (DESIGN.md, "The PVM host"): user accesses in PML4 slot 256 always fault, so the
test avoids it; 1 GiB pages, SMEP, SMAP and LA57 are not offered, so the test uses 4 KiB and
2 MiB pages with NX and CR0.WP only; CPL0 code is emulated, so the handler stays short.
"""

from __future__ import annotations

import numpy as np
import pytest

from hvjit import entry
from hvjit.abi import SuspendHow, VmExitCode
from hvjit.asm import assemble
from hvjit.benchmarks.pagetables import (
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    PTE_XD,
    PageTableBuilder,
)
from hvjit.kernels import pagewalk as pw
from hvjit.kernels.pagewalk import Access, WalkStatus

MEMORY = 8 << 20
CODE = 0x1000  # guest code (loop and #PF handler), two pages
PROBES = 0x10000  # probe list: (address, kind) pairs of u64, kind 3 ends it
PROBES_SIZE = 0x4000
USER_STACK = 0x20000  # top of the user stack page below it
IDT = 0x30000
TABLES = 0x100000  # page tables are allocated from here (1 MiB)
TEST_FRAMES_4K = 0x200000  # 512 frames of 4 KiB for the test pages
TEST_FRAME_2M = 0x400000  # one 2 MiB frame, shared by every 2 MiB test page

PORT_OK = 0x700  # a probe succeeded (value: its kind)
PORT_CR2_LOW = 0x701
PORT_CR2_HIGH = 0x702
PORT_ERROR = 0x703  # written last by the #PF handler
PORT_UNEXPECTED = 0x704  # another exception (value: vector)

PAGE_FAULT = CODE + 0x800  # the #PF handler
UNEXPECTED = CODE + 0x900  # every other exception vector
EXIT_DONE = 0x5A
KIND_READ, KIND_WRITE, KIND_EXEC, KIND_END = 0, 1, 2, 3
KINDS = {KIND_READ: Access.READ, KIND_WRITE: Access.WRITE, KIND_EXEC: Access.EXECUTE}

CR0 = entry.CR0_PE | entry.CR0_ET | entry.CR0_NE | entry.CR0_WP | entry.CR0_PG
CR4 = entry.CR4_PAE
EFER = entry.EFER_LME | entry.EFER_LMA | pw.EFER_NXE
SEL_CODE64 = entry.SEL_CODE64

GUEST = rf"""
.code64
    mov ${PROBES}, %rsi
next:
    mov ${USER_STACK}, %rsp
    mov (%rsi), %rdi
    mov 8(%rsi), %rax
    cmp ${KIND_END}, %rax
    je done
    cmp ${KIND_READ}, %rax
    je do_read
    cmp ${KIND_WRITE}, %rax
    je do_write
    call *%rdi                  # the byte there is 0xc3 (ret)
    jmp ok
do_read:
    mov (%rdi), %cl
    jmp ok
do_write:
    movb $0xc3, (%rdi)
ok:
    mov 8(%rsi), %rax
    mov ${PORT_OK}, %dx
    outl %eax, %dx
resume:
    add $16, %rsi
    jmp next
done:
    mov ${EXIT_DONE}, %eax
    outl %eax, $0xf4
1:  jmp 1b

# CPL0, entered through the IDT with the error code on top of the RSP0 stack.
.org {PAGE_FAULT - CODE}
page_fault:
    mov %cr2, %rax
    mov ${PORT_CR2_LOW}, %dx
    outl %eax, %dx
    shr $32, %rax
    mov ${PORT_CR2_HIGH}, %dx
    outl %eax, %dx
    mov (%rsp), %rax
    mov ${PORT_ERROR}, %dx
    outl %eax, %dx
    add $8, %rsp                # drop the error code: RIP CS RFLAGS RSP SS remain
    movq $resume, (%rsp)        # carry on with the next probe
    iretq

.org {UNEXPECTED - CODE}
unexpected:
    mov ${PORT_UNEXPECTED}, %dx
    mov $0xffff, %eax
    outl %eax, %dx
    mov $0xee, %eax
    outl %eax, $0xf4
2:  jmp 2b
"""


def _gate(handler: int) -> bytes:
    """A 64-bit interrupt gate (type 0xE, DPL0, present) to ``handler`` in the CPL0 code."""
    low = ((handler & 0xFFFF) | SEL_CODE64 << 16 | 0x8E << 40 | ((handler >> 16) & 0xFFFF) << 48)
    return low.to_bytes(8, "little") + (handler >> 32).to_bytes(8, "little")


def _build_tables(mem: np.ndarray, sysarea: int, rng: np.random.Generator):
    """Infrastructure and random test mappings; returns (builder, test pages, test tables).

    Test pages are (gla, page size); the test tables are the table pages holding only test
    entries, plus the root's test slots, as (gpa, length) ranges.
    """
    b = PageTableBuilder(mem, pw.PagingMode.LEVEL4, table_area_gpa=TABLES)
    infra = [(CODE, 2, True), (PROBES, PROBES_SIZE // 4096, True),
             (USER_STACK - 0x1000, 1, True), (IDT, 1, False),
             (sysarea - 0x1000, 1 + entry.SYSAREA_SIZE // 4096, False)]
    for start, pages, user in infra:
        for page in range(pages):
            b.map(start + page * 4096, start + page * 4096, user=user)
    first_test_table = b._next_table

    pages = []
    frame = TEST_FRAMES_4K
    for slot in rng.choice(np.arange(1, 250), 10, replace=False):  # never slot 256
        for pdpt_index in rng.choice(512, 2, replace=False):
            region = int(slot) << 39 | int(pdpt_index) << 30
            for pd_index in rng.choice(512, 4, replace=False):
                if rng.random() < 0.3:
                    gla = region | int(pd_index) << 21
                    size = 2 << 20
                    gpa = TEST_FRAME_2M
                else:
                    gla = region | int(pd_index) << 21 | int(rng.integers(0, 512)) << 12
                    size = 4096
                    gpa = frame
                    frame += 4096
                extra = (PTE_A if rng.random() < 0.3 else 0) | (PTE_D if rng.random() < 0.2 else 0)
                leaf = b.map(gla, gpa, page_size=size, writable=rng.random() < 0.7,
                             user=rng.random() < 0.85, no_execute=rng.random() < 0.25,
                             extra_bits=extra)
                value = b.read_entry(leaf)
                if rng.random() < 0.08:
                    value &= ~PTE_P
                elif size == 2 << 20 and rng.random() < 0.25:
                    value |= 1 << int(rng.integers(13, 21))  # reserved in a 2 MiB PDE
                b.write_entry(leaf, value)
                pages.append((gla, size))
    assert frame <= TEST_FRAME_2M and b._next_table <= TEST_FRAMES_4K

    # Random rights on the intermediate entries of the test part (each entry once).
    intermediate = {}
    for gla, size in pages:
        for level in (4, 3, 2) if size == 4096 else (4, 3):
            intermediate[b.entry_gpa(gla, level)] = level
    for gpa, level in sorted(intermediate.items()):
        value = b.read_entry(gpa)
        roll = rng.random(5)
        if roll[0] < 0.08:
            value &= ~PTE_RW
        if roll[1] < 0.05:
            value &= ~PTE_US
        if roll[2] < 0.06:
            value |= PTE_XD
        if roll[3] < 0.02:
            value &= ~PTE_P
        if level == 4 and roll[4] < 0.05:
            value |= PTE_PS  # reserved in a PML4E
        value |= PTE_A if rng.random() < 0.2 else 0
        b.write_entry(gpa, value)
    root = b.cr3
    tables = [(root + 8, 4096 - 8), (first_test_table, b._next_table - first_test_table)]
    return b, pages, tables


def _probes(pages, rng: np.random.Generator):
    probes = []
    for gla, size in pages:
        for _ in range(int(rng.integers(2, 5))):
            offset = int(rng.integers(0, size // 16)) * 16
            probes.append((gla + offset, int(rng.integers(0, 3))))
    # Unmapped addresses: a free PML4 slot, or a free part of a mapped region.
    for _ in range(30):
        gla, size = pages[int(rng.integers(0, len(pages)))]
        if rng.random() < 0.3:
            address = int(rng.integers(250, 256)) << 39 | int(rng.integers(0, 1 << 39))
        else:
            address = gla ^ (int(rng.integers(1, 512)) << int(rng.choice([12, 21, 30])))
        probes.append((address & ~0xF, int(rng.integers(0, 3))))
    order = rng.permutation(len(probes))
    return [probes[i] for i in order]


@pytest.mark.parametrize("seed", [20261115, 7])
def test_kernel_agrees_with_the_cpu_on_random_tables(session, seed):
    rng = np.random.default_rng(seed)
    vm = session.create_vm("pagewalk", memory=MEMORY)
    code = assemble(GUEST, CODE)
    assert len(code) <= 0x2000
    vm.memory.write(CODE, code)
    v = vm.vcpu(0)
    state = entry.setup_long_mode(v, CODE, cpl=3, stack=USER_STACK)
    sysarea = state.sysarea
    # entry.py writes the 32-bit TSS's SS0 at offset 8, which in a 64-bit TSS is the high
    # half of RSP0 (RSP0 read back as 0x10_007f_0000): set RSP0 to the stack meant.
    vm.memory.write_u64(sysarea + entry.TSS_OFF + 4, sysarea)
    assert IDT + 0x1000 <= TABLES and TEST_FRAME_2M + (2 << 20) <= sysarea - 0x1000

    mem = vm.memory.view(0, MEMORY)
    builder, pages, tables = _build_tables(mem, sysarea, rng)
    mem[TEST_FRAMES_4K:TEST_FRAME_2M + (2 << 20)] = 0xC3  # every test byte is a `ret`

    # IDT: #PF to the handler, every other exception vector to `unexpected`.
    idt = b"".join(_gate(PAGE_FAULT if vector == 14 else UNEXPECTED) for vector in range(32))
    vm.memory.write(IDT, idt)

    probes = _probes(pages, rng)
    table = np.array(probes + [(0, KIND_END)], np.uint64).reshape(-1)
    assert table.nbytes <= PROBES_SIZE
    vm.memory.write(PROBES, table.tobytes())

    sregs = v.get_sregs()
    sregs["cr3"] = builder.cr3
    sregs["efer"] |= pw.EFER_NXE
    assert (int(sregs["cr0"]), int(sregs["cr4"]), int(sregs["efer"])) == (CR0 | entry.CR0_MP, CR4, EFER)
    sregs["idt"]["base"], sregs["idt"]["limit"] = IDT, len(idt) - 1
    v.set_sregs(sregs)

    # The model: the same probes, in order, on a copy of the memory as it is now.
    before = mem.copy()
    model = mem.copy()
    registers = dict(cr3=builder.cr3, cr0=CR0, cr4=CR4, efer=EFER, cpl=3, set_ad=True,
                     maxphyaddr=36)  # every frame lies far below any MAXPHYADDR
    expected = []
    for address, kind in probes:
        t = pw.translate(model, address, access=KINDS[kind], **registers)
        assert t.status in (WalkStatus.OK, WalkStatus.PAGE_FAULT)
        expected.append(("ok", kind) if t.status == WalkStatus.OK
                        else ("fault", address, t.error_code))

    events = []

    def ports(port, size, is_write, value):
        assert is_write and size == 4, (port, size, is_write)
        events.append((port, int(value)))
        return 0

    vm.add_port_handler(PORT_OK, ports, count=5, name="pagewalk-probes")
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.POWEROFF, ex
    assert (PORT_UNEXPECTED, 0xFFFF) not in events, "an exception other than #PF"
    assert ex.code == EXIT_DONE, ex

    observed = []
    pending = []
    for port, value in events:
        if port == PORT_OK:
            assert not pending
            observed.append(("ok", value))
        else:
            pending.append(value)
            if port == PORT_ERROR:
                low, high, error = pending
                observed.append(("fault", high << 32 | low, error))
                pending = []
    assert len(observed) == len(probes) >= 250
    mismatches = [(i, probes[i], want, got)
                  for i, (want, got) in enumerate(zip(expected, observed)) if want != got]
    assert not mismatches, mismatches[:10]

    # Coverage: successes of every kind, and the fault kinds the tables can produce.
    outcomes = {o[0] if o[0] == "ok" else o[2] for o in expected}
    assert "ok" in outcomes and {pw.PFERR_USER, pw.PFERR_USER | pw.PFERR_PRESENT} & outcomes
    errors = {o[2] for o in expected if o[0] == "fault"}
    assert any(e & pw.PFERR_RSVD for e in errors)
    assert any(e & pw.PFERR_FETCH and e & pw.PFERR_PRESENT for e in errors)
    assert any(e & pw.PFERR_WRITE and e & pw.PFERR_PRESENT for e in errors)
    assert len({o[1] for o in expected if o[0] == "ok"}) == 3

    # Accessed/dirty updates: every byte of the test tables matches the model.
    for start, length in tables:
        got, want = mem[start:start + length], model[start:start + length]
        differ = np.flatnonzero(got != want)
        assert differ.size == 0, [(hex(start + int(i)), int(got[i]), int(want[i]))
                                  for i in differ[:10]]
    start, length = tables[1]
    changed = model[start:start + length] != before[start:start + length]
    assert changed.any(), "the probes set no A/D bit at all"
