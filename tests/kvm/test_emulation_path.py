"""The emulation-failure exit path on a long-mode CPL0 guest (KVM's emulator runs CPL0 here).

The guest has an IDT with a #BP handler (vector 3) and an ``int $0x80`` handler that write
markers to COM1 and ``iretq``; it runs int3, int $0x80, cmpxchg16b (both outcomes), movbe
(load and store), xgetbv, clwb, clflush, popcnt and rdtscp, then ``outl`` to 0xf4. Each
instruction either fails in KVM (then hvjit emulates it and counts it in
``vcpu.emulation_counts``) or is run by KVM itself: either way the architectural results are
asserted, and the test records which ones actually reached hvjit.
"""

from __future__ import annotations

import struct

from hvjit import entry
from hvjit.abi import SuspendHow, VmExitCode
from hvjit.asm import assemble
from hvjit.emulation import disassemble, translate

CODE = 0x1000
HANDLERS = 0x2000
IDT = 0x3000
DATA = 0x4000  # 16-byte aligned data for cmpxchg16b / movbe
EXIT_CODE = 0x42

# Each instruction KVM might refuse with #UD (its CPUID check) is bracketed: %rbp holds the
# continuation, the #UD handler prints 'U' and resumes there; the normal path prints a letter.
GUEST = f"""
.code64
.macro mark c
    mov $0x3f8, %dx
    mov $\\c, %al
    outb %al, %dx
.endm
    int3
    int $0x80
    mov $0x1111111111111111, %rax
    mov $0x2222222222222222, %rdx
    mov $0x3333333333333333, %rbx
    mov $0x4444444444444444, %rcx
    mov ${DATA}, %edi
    cmpxchg16b (%rdi)            # equal: stores rcx:rbx, ZF=1
    setz %r8b
    cmpxchg16b 16(%rdi)          # different: loads rdx:rax from memory, ZF=0
    setz %r9b
    mov %rax, %r14
    mov %rdx, %r15
    lea 1f(%rip), %rbp
    movbe 32(%rdi), %r10         # load big-endian
    mark 'm'
1:  mov $0x0102030405060708, %rsi
    lea 1f(%rip), %rbp
    movbe %esi, 48(%rdi)         # store big-endian (32-bit)
    mark 'n'
1:  xor %ecx, %ecx
    lea 1f(%rip), %rbp
    xgetbv
    mov %eax, %r11d
    mark 'x'
1:  lea 1f(%rip), %rbp
    clwb (%rdi)
    mark 'w'
1:  lea 1f(%rip), %rbp
    clflush 64(%rdi)
    mark 'f'
1:  mov $0xf0f0f0f0f0f0f0f1, %rbx
    lea 1f(%rip), %rbp
    popcnt %rbx, %r12
    mark 'p'
1:  lea 1f(%rip), %rbp
    rdtscp
    mov %ecx, %r13d
    mark 'r'
1:  mov ${EXIT_CODE}, %eax
    outl %eax, $0xf4
1:  jmp 1b
"""

HANDLER_SRC = """
.code64
bp_handler:
    push %rax
    push %rdx
    mov $0x3f8, %dx
    mov $'B', %al
    outb %al, %dx
    pop %rdx
    pop %rax
    iretq
.org 0x40
int80_handler:
    push %rax
    push %rdx
    mov $0x3f8, %dx
    mov $'S', %al
    outb %al, %dx
    pop %rdx
    pop %rax
    iretq
.org 0x80
other_handler:
    mov $0x3f8, %dx
    mov $'X', %al
    outb %al, %dx
    mov $0xEE, %eax
    outl %eax, $0xf4
.org 0xc0
ud_handler:
    push %rax
    push %rdx
    mov $0x3f8, %dx
    mov $'U', %al
    outb %al, %dx
    pop %rdx
    pop %rax
    mov %rbp, (%rsp)
    iretq
"""

CPUID1_ECX = (1 << 22) | (1 << 23) | (1 << 26)  # MOVBE, POPCNT, XSAVE
CR4_OSXSAVE = 1 << 18

KINDS = ("int3", "intn", "cmpxchg16b", "movbe", "xgetbv", "clwb", "clflush", "popcnt", "rdtscp")


def _gate(offset: int) -> bytes:
    """A 64-bit interrupt gate (type 0xE, DPL3, present) to CS 0x08."""
    return struct.pack("<HHBBHII", offset & 0xFFFF, entry.SEL_CODE64, 0, 0xEE,
                       (offset >> 16) & 0xFFFF, offset >> 32, 0)


def _setup(vm, source: str):
    vm.memory.write(CODE, assemble(source, CODE))
    vm.memory.write(HANDLERS, assemble(HANDLER_SRC, HANDLERS))
    idt = bytearray()
    for vector in range(256):
        target = {3: HANDLERS, 6: HANDLERS + 0xC0, 0x80: HANDLERS + 0x40}.get(vector, HANDLERS + 0x80)
        idt += _gate(target)
    vm.memory.write(IDT, bytes(idt))
    vcpu = vm.vcpu(0)
    # Advertise what the guest uses (KVM's default CPUID here lacks MOVBE, POPCNT and XSAVE,
    # and KVM's emulator then raises #UD, as a CPU without them would).
    cpuid = vm.kvm.vcpu_cpuid(0).copy()
    leaf1 = cpuid["function"] == 1
    cpuid["ecx"][leaf1] |= CPUID1_ECX
    cpuid["edx"][cpuid["function"] == 0x80000001] |= 1 << 27  # RDTSCP (or hvjit raises #UD)
    vcpu.set_cpuid(cpuid)
    entry.setup_long_mode(vcpu, CODE, cpl=0)
    sregs = vcpu.get_sregs()
    sregs["cr4"] |= CR4_OSXSAVE
    sregs["idt"]["base"], sregs["idt"]["limit"] = IDT, 256 * 16 - 1
    vcpu.set_sregs(sregs)
    return vcpu


def test_cpl0_instructions_are_emulated_or_run_by_kvm(session):
    vm = session.create_vm("emulpath", memory=2 << 20)
    vcpu = _setup(vm, GUEST)
    data = bytearray(0x60)
    data[0:16] = struct.pack("<QQ", 0x1111111111111111, 0x2222222222222222)  # matches rdx:rax
    data[16:32] = struct.pack("<QQ", 0xAAAAAAAAAAAAAAAA, 0xBBBBBBBBBBBBBBBB)  # does not
    data[32:40] = (0x1122334455667788).to_bytes(8, "little")
    vm.memory.write(DATA, bytes(data))
    vcpu.set_msr(0xC0000103, 0x5A5)  # TSC_AUX for rdtscp
    ex = vm.run(timeout=60)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.POWEROFF, str(ex)
    assert ex.code == EXIT_CODE
    console = vm.console
    assert console[:2] == b"BS", console  # #BP handler, then the int $0x80 handler, once each
    marks = console[2:].decode()
    assert len(marks) == 7 and all(c in "mnxwfprU" for c in marks), console
    outcome = dict(zip(("movbe load", "movbe store", "xgetbv", "clwb", "clflush", "popcnt", "rdtscp"), marks))
    ran = {k: c != "U" for k, c in outcome.items()}
    r = vcpu.get_registers()
    assert bytes(vm.memory.read(DATA, 16)) == struct.pack("<QQ", 0x3333333333333333, 0x4444444444444444)
    assert r["r8"] & 0xFF == 1 and r["r9"] & 0xFF == 0
    assert (r["r14"], r["r15"]) == (0xAAAAAAAAAAAAAAAA, 0xBBBBBBBBBBBBBBBB)
    assert bytes(vm.memory.read(DATA + 16, 16)) == struct.pack("<QQ", 0xAAAAAAAAAAAAAAAA, 0xBBBBBBBBBBBBBBBB)
    if ran["movbe load"]:
        assert r["r10"] == 0x8877665544332211
    assert bytes(vm.memory.read(DATA + 48, 4)) == (bytes([0x05, 0x06, 0x07, 0x08]) if ran["movbe store"] else b"\0" * 4)
    if ran["xgetbv"]:
        assert r["r11"] == vcpu.get_xcrs()[0]  # the real XCR0 (x87 only on a fresh vCPU)
    assert ran["clwb"] and ran["clflush"]
    if ran["popcnt"]:
        assert r["r12"] == bin(0xF0F0F0F0F0F0F0F1).count("1")
    if ran["rdtscp"]:
        assert r["r13"] == 0x5A5
    counts = dict(vcpu.emulation_counts)
    expected = {"int3": 1, "intn": 1, "cmpxchg16b": 2, "movbe": ran["movbe load"] + ran["movbe store"],
                "xgetbv": 1, "clwb": 1, "clflush": 1, "popcnt": 1, "rdtscp": 1}
    for k in KINDS:
        assert counts.get(k, 0) in (0, expected[k]), (k, counts)
    assert counts.get("movbe", 0) == 0 or ran["movbe load"] or ran["movbe store"]
    assert set(counts) <= set(KINDS), counts  # nothing else needed emulating
    handled_by_kvm = [k for k in KINDS if counts.get(k, 0) == 0]
    refused = [k for k, v in ran.items() if not v]
    print(f"\nemulated by hvjit: {counts}; not reaching hvjit: {handled_by_kvm}; #UD from KVM: {refused}")
    assert vcpu.stats().get("emulated_int3", 0) == counts.get("int3", 0)


def test_an_instruction_not_emulated_gives_a_report(session):
    vm = session.create_vm("emulwrfs", memory=2 << 20)
    # wrfsbase: KVM's emulator cannot run it here, and hvjit does not emulate it.
    vcpu = _setup(vm, ".code64\n mov $0x1234, %eax\n wrfsbase %rax\n mov $1, %eax\n outl %eax, $0xf4\n")
    ex = vm.run(timeout=30)
    want = bytes(vm.memory.read(CODE + 5, 5))  # f3 48 0f ae d0
    if ex.exitcode == VmExitCode.SUSPENDED:  # a host whose KVM runs it: then it ran it right
        assert ex.code == 1 and vcpu.get_desc("fs").base == 0x1234
        return
    assert ex.exitcode == VmExitCode.EMULATION_FAILURE, str(ex)
    assert ex.report is not None and ex.report.text, ex.report
    assert ex.report.instruction == want and ex.report.reason.startswith("not emulated")
    assert ex.rip == ex.report.rip == CODE + 5
    assert "long" in ex.report.mode
    assert vcpu.emulation_counts == {}


def test_clac_and_stac_toggle_eflags_ac(session):
    vm = session.create_vm("emulsmap", memory=2 << 20)
    vcpu = _setup(vm, """.code64
    stac
    pushfq
    pop %rbx
    clac
    pushfq
    pop %rcx
    shr $18, %rbx
    and $1, %ebx
    shr $17, %rcx
    and $2, %ecx
    lea 0x10(%rbx,%rcx), %eax
    outl %eax, $0xf4
""")
    ex = vm.run(timeout=30)
    assert ex.code == 0x11, str(ex)  # AC was set after stac, clear after clac
    if vcpu.emulation_counts:  # KVM could not run them here: hvjit did
        assert vcpu.emulation_counts == {"stac": 1, "clac": 1}


def test_disassemble_and_translate_use_the_page_tables(session):
    vm = session.create_vm("emuldis", memory=2 << 20)
    vcpu = _setup(vm, GUEST)
    out = disassemble(vcpu, count=3)
    assert [t for _, _, t in out] == ["int3", "int 0x80", "mov rax, 0x1111111111111111"], out
    assert out[0][0] == CODE and out[1][0] == CODE + 1 and out[1][1] == b"\xcd\x80"
    t = translate(vcpu, DATA + 0x123, "w")
    assert not t.fault and t.gpa == DATA + 0x123
    t = translate(vcpu, 1 << 40)  # not mapped by the entry tables
    assert t.fault


def test_vcpu_disassemble_and_vm_translate(session):
    from .guests import load

    vm = session.create_vm("look", memory=2 << 20)
    load(vm, ".code64\n mov $0x3f8, %dx\n outb %al, %dx\n hlt\n", "long", 0)
    listing = vm.vcpu(0).disassemble(count=3)
    assert [text for _, _, text in listing] == ["mov dx, 0x3f8", "out dx, al", "hlt"]
    assert listing[0][0] == 0x1000 and listing[1][1] == b"\xee"
    t = vm.translate(0x1234)
    assert t.gpa == 0x1234 and not t.fault


HIGH = 0x4000_0000  # a second RAM segment, holding the page tables and the data


def test_page_tables_above_the_first_segment(session):
    """The walks of an emulated instruction find page tables in any RAM segment."""
    vm = session.create_vm("hightables", memory=[(0, 1 << 20), (HIGH, 1 << 20)])
    data_va = 0x8000_0000 + 0x8000  # mapped to HIGH + 0x8000 by the tables below
    vcpu = _setup(vm, f""".code64
    mov ${data_va:#x}, %rdi
    mov (%rdi), %rax
    mov 8(%rdi), %rdx
    mov $0x5555, %ebx
    mov $0x6666, %ecx
    cmpxchg16b (%rdi)
    setz %al
    movzbl %al, %eax
    outl %eax, $0xf4
""")
    pml4, pdpt, pd_low, pd_high = HIGH, HIGH + 0x1000, HIGH + 0x2000, HIGH + 0x3000
    mem = vm.memory
    mem.write_u64(pml4, pdpt | 0x3)
    mem.write_u64(pdpt, pd_low | 0x3)  # 0-1 GiB: identity (code, IDT, GDT, stack)
    mem.write_u64(pdpt + 16, pd_high | 0x3)  # 2-3 GiB: the high segment
    for i in range(8):
        mem.write_u64(pd_low + 8 * i, (i << 21) | 0x83)
    mem.write_u64(pd_high, HIGH | 0x83)
    mem.write(HIGH + 0x8000, struct.pack("<QQ", 0x1111, 0x2222))
    vcpu.set_register("cr3", pml4)
    assert vm.translate(data_va).gpa == HIGH + 0x8000
    ex = vm.run(timeout=60)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == 1, str(ex)
    assert struct.unpack("<QQ", mem.read(HIGH + 0x8000, 16)) == (0x5555, 0x6666)
    if vcpu.emulation_counts:  # KVM handed it to hvjit, whose walk read the high tables
        assert vcpu.emulation_counts == {"cmpxchg16b": 1}
        assert mem.read_u64(pd_high) & 0x60 == 0x60  # accessed and dirty, set by that walk


def test_the_bytes_kvm_captured_win_over_memory(session):
    """Memory at RIP no longer holds what KVM failed on (another vCPU rewrote it): hvjit
    runs the instruction KVM reported, not the one it would fetch now."""
    from hvjit.abi import KvmExit, KvmInternalError
    from hvjit.emulation import handle_emulation_failure
    from hvjit.exits import VmExit

    vm = session.create_vm("kvmbytes", memory=2 << 20)
    vcpu = _setup(vm, ".code64\n popcnt %rbx, %r12\n hlt\n")  # what memory holds now
    vcpu.set_registers(rbx=0xFF, r12=0, r13=0)
    ran = assemble(".code64\n popcnt %rbx, %r13\n", 0)  # what KVM saw: same length
    raw = bytes([len(ran)]) + ran + b"\x90" * (15 - len(ran))
    info = (1, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little"))
    exit_ = VmExit(exitcode=VmExitCode.EMULATION_FAILURE, rip=CODE, kvm_reason=KvmExit.INTERNAL_ERROR,
                   suberror=KvmInternalError.EMULATION, info=info)
    assert handle_emulation_failure(vcpu, exit_) is None
    r = vcpu.get_registers("r12", "r13", "rip")
    assert (r["r12"], r["r13"], r["rip"]) == (0, 8, CODE + len(ran))
