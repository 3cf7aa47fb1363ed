"""XSETBV, XGETBV, the XSAVE family, FXSAVE/FXRSTOR, LDMXCSR/STMXCSR, FWAIT and the x87
control instructions on a long-mode CPL0 guest (KVM's emulator runs CPL0 on the PVM host and
fails on most of these: hvjit emulates them, see hvjit/emulation.py).

Each instruction is bracketed: %rbp holds the continuation and %r15 the stack pointer before
it; the exception handlers print a letter (G #GP, U #UD, N #NM, M #MF, X other), store the
exception frame size (40: no error code, 48: with one) at FRAME_SIZE_SLOT and resume at %rbp.
The normal path prints a lower-case letter. Whatever ran the instruction (KVM itself or
hvjit's emulation, told apart by ``vcpu.emulation_counts``), the architectural result is
asserted: memory images against the vCPU's real state (``get_xsave``), registers after
restores, exceptions delivered to the guest's handlers.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from hvjit import entry
from hvjit.abi import SuspendHow, VmExitCode
from hvjit.asm import assemble
from hvjit.emulation import XStateLayout, compacted_offsets, xcr0_valid

CODE = 0x1000
HANDLERS = 0x3000
IDT = 0x4000
FRAME_SIZE_SLOT = 0x5000
AREA_A, AREA_B, AREA_C, AREA_D, AREA_E, AREA_G = (0x10000 + i * 0x1000 for i in range(6))
SCRATCH = 0x18000  # MXCSR / x87 words
EXIT_CODE = 0x42
MXCSR_INITIAL = 0x1F80 | 0x3F  # all exception flags set, all masked
MXCSR_B = 0x1F80 | 0x6000  # round toward zero
MXCSR_E = 0x1F80 | 0x2000  # round down
MXCSR_H = 0x0F80 | 0x8000  # flush to zero, precision unmasked

HANDLER_SRC = f"""
.code64
.macro handler c
    mov %rsp, %rax
    mov %r15, %rcx
    sub %rax, %rcx
    mov %rcx, {FRAME_SIZE_SLOT}
    mov $0x3f8, %dx
    mov $\\c, %al
    outb %al, %dx
    mov %r15, %rsp
    jmp *%rbp
.endm
gp: handler 'G'
.org 0x40
ud: handler 'U'
.org 0x80
nm: handler 'N'
.org 0xc0
mf: handler 'M'
.org 0x100
other: handler 'X'
"""
VECTOR_HANDLER = {13: 0x0, 6: 0x40, 7: 0x80, 16: 0xC0}

PRELUDE = """
.code64
.macro mark c
    mov $0x3f8, %dx
    mov $\\c, %al
    outb %al, %dx
.endm
.macro try                       # (mark clobbers %al and %dx: reload operands after it)
    lea 1f(%rip), %rbp
    mov %rsp, %r15
.endm
"""
EPILOGUE = f"""
    mov ${EXIT_CODE}, %eax
    outl %eax, $0xf4
2:  jmp 2b
"""

CR0_MP, CR0_EM, CR0_TS = 1 << 1, 1 << 2, 1 << 3
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 18
CPUID1_ECX_XSAVE, CPUID1_ECX_AVX = 1 << 26, 1 << 28


def _gate(offset: int) -> bytes:
    return struct.pack("<HHBBHII", offset & 0xFFFF, entry.SEL_CODE64, 0, 0x8E,
                       (offset >> 16) & 0xFFFF, offset >> 32, 0)


def _setup(vm, body: str):
    vm.memory.write(CODE, assemble(PRELUDE + body + EPILOGUE, CODE))
    vm.memory.write(HANDLERS, assemble(HANDLER_SRC, HANDLERS))
    idt = b"".join(_gate(HANDLERS + VECTOR_HANDLER.get(v, 0x100)) for v in range(256))
    vm.memory.write(IDT, idt)
    vcpu = vm.vcpu(0)
    cpuid = vm.kvm.vcpu_cpuid(0).copy()
    layout = XStateLayout(cpuid)
    cpuid["ecx"][cpuid["function"] == 1] |= CPUID1_ECX_XSAVE | (CPUID1_ECX_AVX if layout.xcr0_supported & 4 else 0)
    vcpu.set_cpuid(cpuid)
    entry.setup_long_mode(vcpu, CODE, cpl=0)
    sregs = vcpu.get_sregs()
    sregs["cr4"] |= CR4_OSXSAVE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs["cr0"] = (int(sregs["cr0"]) | CR0_MP) & ~(CR0_EM | CR0_TS)
    sregs["idt"]["base"], sregs["idt"]["limit"] = IDT, 256 * 16 - 1
    vcpu.set_sregs(sregs)
    return vcpu, layout


def _run(vm):
    ex = vm.run(timeout=60)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.POWEROFF, (str(ex), vm.console)
    assert ex.code == EXIT_CODE
    return vm.console.decode()


def _u64(b, off):
    return int.from_bytes(bytes(b[off:off + 8]), "little")


def _u16(b, off):
    return int.from_bytes(bytes(b[off:off + 2]), "little")


def _u32(b, off):
    return int.from_bytes(bytes(b[off:off + 4]), "little")


def _put(area, off, data: bytes):
    area[off:off + len(data)] = np.frombuffer(data, np.uint8)


def _pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 37 + i * 11) & 0xFF for i in range(n))


def _fill_state(area, layout, seed: int, mxcsr: int, ymm: bool):
    """Known x87 / SSE / AVX values in a standard-format area (as KVM_SET_XSAVE takes it)."""
    _put(area, 0, struct.pack("<HHBBH", 0x027F, 0x0000, 0x03, 0, 0))  # fcw (53-bit), fsw, ftw: st0/st1 valid
    _put(area, 8, bytes(16))  # fip, fdp
    _put(area, 24, struct.pack("<I", mxcsr))
    for i in range(8):  # st0..st7 (80-bit values in 16-byte slots)
        _put(area, 32 + 16 * i, _pattern(seed + i, 10) + bytes(6))
    _put(area, 160, _pattern(seed + 100, 256))  # xmm0-15
    bv = 3
    if ymm:
        size, off, _ = layout.components[2]
        _put(area, off, _pattern(seed + 200, size))
        bv |= 4
    _put(area, 512, struct.pack("<QQ", bv, 0))


def _xcr0_for(layout) -> int:
    return 7 if layout.xcr0_supported & 4 and 2 in layout.components else 3


def test_compacted_layout_matches_the_sdm_rules():
    # SDM Vol. 1, 13.4.3: compacted components follow from byte 576 in increasing order,
    # each 64-byte aligned if CPUID.(0xD, i).ECX[1] says so. Standard Intel sizes: AVX 256,
    # opmask 64, ZMM_Hi256 512, Hi16_ZMM 1024, PKRU 8, AMX TILECFG 64 (aligned), TILEDATA 8192.
    sizes = {2: (256, False), 5: (64, False), 6: (512, False), 7: (1024, False), 9: (8, False),
             17: (64, True), 18: (8192, False)}
    offsets, end = compacted_offsets((1 << 63) | 0x2E7 & ~3, sizes)  # AVX, AVX-512, PKRU
    assert offsets == {2: 576, 5: 832, 6: 896, 7: 1408, 9: 2432} and end == 2440
    offsets, end = compacted_offsets((1 << 2) | (1 << 9) | (1 << 17) | (1 << 18), sizes)
    # 576 + 256 = 832 (PKRU), 840 -> aligned up to 896 for TILECFG, 960 TILEDATA
    assert offsets == {2: 576, 9: 832, 17: 896, 18: 960} and end == 960 + 8192
    offsets, end = compacted_offsets(1 << 17, sizes)  # first component, aligned: 576 already is
    assert offsets == {17: 576} and end == 640
    assert compacted_offsets(0x3, sizes) == ({}, 576)


def test_xcr0_validation_rules():
    supported = 0xE7
    assert xcr0_valid(0x1, supported) and xcr0_valid(0x3, supported) and xcr0_valid(0x7, supported)
    assert xcr0_valid(0xE7, supported)
    assert not xcr0_valid(0x0, supported) and not xcr0_valid(0x2, supported)  # x87 bit clear
    assert not xcr0_valid(0x5, supported)  # AVX without SSE
    assert not xcr0_valid(0x27, supported) and not xcr0_valid(0xE3, supported)  # AVX-512 partial / no AVX
    assert not xcr0_valid(0x207, supported)  # PKRU not supported here


def test_xsave_xrstor_fxsave_round_trip(session):
    vm = session.create_vm("xsave", memory=2 << 20)
    xcr0 = _xcr0_for(layout_probe(vm))
    body = f"""
    mov ${xcr0}, %eax            # a valid XCR0 (x87|SSE, |AVX if offered)
    xor %edx, %edx
    xor %ecx, %ecx
    try
    xsetbv
    mark 'y'
1:  mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    mov ${AREA_A}, %edi
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xsave64 (%rdi)               # A: the state the host set up
    mark 'a'
1:  mov ${AREA_B}, %edi
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xrstor64 (%rdi)              # load B (prepared by the test)
    mark 'b'
1:  mov ${AREA_C}, %edi
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xsave64 (%rdi)               # C: must hold B's values
    mark 'c'
1:  mov ${AREA_D}, %edi
    try
    fxsave64 (%rdi)              # D: B's legacy state
    mark 'd'
1:  mov ${AREA_E}, %edi
    try
    fxrstor64 (%rdi)             # load E's legacy state
    mark 'e'
1:  xor %ecx, %ecx
    try
    xgetbv
    mov %eax, %r12d
    mark 'x'
1:  try
    stmxcsr {SCRATCH}            # E's MXCSR
    mark 's'
1:  try
    ldmxcsr {SCRATCH + 4}        # MXCSR_H
    mark 'l'
1:  try
    stmxcsr {SCRATCH + 8}
    mark 's'
1:  try
    ldmxcsr {SCRATCH + 12}       # reserved bit 31: #GP
    mark 'l'
1:  mov $4, %eax                 # XCR0 without x87: #GP
    xor %edx, %edx
    xor %ecx, %ecx
    try
    xsetbv
    mark 'v'
1:  mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    mov ${AREA_A + 8}, %edi      # misaligned: #GP
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xsave64 (%rdi)
    mark 'm'
1:  mov ${AREA_D}, %edi          # header with an XSTATE_BV bit outside XCR0 (bit 9): #GP
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xrstor64 (%rdi)
    mark 'r'
1:  mov ${AREA_G}, %edi
    try
    fxsave64 (%rdi)              # G: E's legacy state with MXCSR_H
    mark 'g'
1:  try
    fwait                        # nothing pending: a no-op
    mark 'w'
1:
"""
    vcpu, layout = _setup(vm, body)
    assert _xcr0_for(layout) == xcr0
    ymm = bool(xcr0 & 4)
    vcpu.set_xcrs({0: 3})
    # The state the guest starts with, and the two images it restores.
    area = vcpu.get_xsave()
    _fill_state(area, layout, 1, MXCSR_INITIAL, ymm)
    vcpu.set_xsave(area)
    s0 = vcpu.get_xsave()
    image_b = np.zeros(4096, np.uint8)
    _fill_state(image_b, layout, 50, MXCSR_B, ymm)
    _put(image_b, 512, struct.pack("<QQ", xcr0, 0))
    vm.memory.write(AREA_B, image_b.tobytes())
    image_e = np.zeros(4096, np.uint8)
    _fill_state(image_e, layout, 90, MXCSR_E, False)
    vm.memory.write(AREA_E, image_e[:512].tobytes())
    bad = bytearray(4096)
    bad[512:520] = struct.pack("<Q", (1 << 9) | 3)
    vm.memory.write(AREA_D, bytes(bad))  # fxsave64 overwrites only bytes 0-415
    vm.memory.write(AREA_G, b"\xee" * 512)
    vm.memory.write(SCRATCH, struct.pack("<IIII", 0, MXCSR_H, 0, 0x80000000 | 0x1F80))
    marks = _run(vm)
    counts = dict(vcpu.emulation_counts)
    print(f"\nconsole {marks!r}; emulated by hvjit: {counts}")
    assert marks == "yabcdexslsGGGGgw", (marks, counts)
    frame = struct.unpack("<Q", vm.memory.read(FRAME_SIZE_SLOT, 8))[0]
    assert frame in (40, 48)  # the last #GP's frame (error code pushed or not, per the host)
    assert vcpu.get_xcrs()[0] == xcr0
    r = vcpu.get_registers()
    assert r["r12"] & 0xFFFFFFFF == xcr0

    def check_image(addr, ref, rfbm, what):
        img = np.frombuffer(vm.memory.read(addr, 4096), np.uint8)
        assert _u32(img, 0) & 0xFFFF == _u32(ref, 0) & 0xFFFF, what  # fcw
        assert bytes(img[2:4]) == bytes(ref[2:4]) and img[4] == ref[4], what  # fsw, ftw
        assert _u32(img, 24) == _u32(ref, 24), (what, hex(_u32(img, 24)), hex(_u32(ref, 24)))  # mxcsr
        assert bytes(img[32:160]) == bytes(ref[32:160]), what  # st0-7
        assert bytes(img[160:416]) == bytes(ref[160:416]), what  # xmm0-15
        bv, xcomp = _u64(img, 512), _u64(img, 520)
        assert xcomp == 0 and bv & ~rfbm == 0 and bv & 3 in (0, 1, 2, 3), what
        if rfbm & 4:
            size, off, _ = layout.components[2]
            if bv & 4:
                assert bytes(img[off:off + size]) == bytes(ref[off:off + size]), what
            else:
                assert not any(ref[off:off + size]), what
        return img

    check_image(AREA_A, s0, xcr0, "xsave of the initial state")
    check_image(AREA_C, image_b, xcr0, "xsave after xrstor")
    d = np.frombuffer(vm.memory.read(AREA_D, 512), np.uint8)
    assert bytes(d[0:2]) == bytes(image_b[0:2]) and _u32(d, 24) == MXCSR_B
    assert bytes(d[32:416]) == bytes(image_b[32:416])
    assert _u32(d, 28) == _u32(s0, 28)  # MXCSR_MASK as the vCPU reports it
    g = np.frombuffer(vm.memory.read(AREA_G, 512), np.uint8)
    assert bytes(g[0:2]) == bytes(image_e[0:2]) and bytes(g[32:416]) == bytes(image_e[32:416])
    assert _u32(g, 24) == MXCSR_H
    if counts.get("fxsave"):  # hvjit's fxsave leaves bytes 416-511 alone (464-511 are software's)
        assert bytes(g[416:512]) == b"\xee" * 96
    else:  # KVM's own emulator ran it; recorded, not asserted: it writes the whole 512 bytes here
        kvm_wrote = bytes(g[464:512]) != b"\xee" * 48
        print(f"KVM's fxsave wrote bytes 464-511: {kvm_wrote}")
    assert struct.unpack("<III", vm.memory.read(SCRATCH, 12)) == (MXCSR_E, MXCSR_H, MXCSR_H)
    # The vCPU's final state: E's legacy registers, MXCSR_H, B's YMM upper halves.
    final = vcpu.get_xsave()
    assert bytes(final[160:416]) == bytes(image_e[160:416])
    assert bytes(final[32:160]) == bytes(image_e[32:160])
    # (MXCSR from the XSAVE area: KVM_GET_FPU reports 0 for it on this host)
    assert _u32(final, 24) == MXCSR_H and int(vcpu.get_fpu()["fcw"]) == 0x027F
    if ymm:
        size, off, _ = layout.components[2]
        assert bytes(final[off:off + size]) == bytes(image_b[off:off + size])
    for k in counts:
        assert k in {"xsetbv", "xgetbv", "xsave", "xrstor", "fxsave", "fxrstor", "ldmxcsr", "stmxcsr",
                     "fwait"}, counts


def layout_probe(vm) -> XStateLayout:
    return XStateLayout(vm.kvm.vcpu_cpuid(0))


def test_xrstor_init_and_compacted_forms(session):
    """XSTATE_BV bits clear restore the init state; XSAVEC/XSAVES #UD unless CPUID has them."""
    vm = session.create_vm("xrstorinit", memory=2 << 20)
    layout = layout_probe(vm)
    xcr0 = _xcr0_for(layout)
    body = f"""
    mov ${AREA_B}, %edi
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xrstor64 (%rdi)              # XSTATE_BV = 0: everything requested goes to init
    mark 'b'
1:  mov ${AREA_C}, %edi
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xsave64 (%rdi)
    mark 'c'
1:  mov ${AREA_D}, %edi
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xsavec64 (%rdi)
    mark 'k'
1:  mov ${AREA_E}, %edi
    mov $0xffffffff, %eax
    mov $0xffffffff, %edx
    try
    xsaveopt64 (%rdi)
    mark 'o'
1:
"""
    vcpu, layout = _setup(vm, body)
    vcpu.set_xcrs({0: xcr0})
    area = vcpu.get_xsave()
    _fill_state(area, layout, 7, MXCSR_INITIAL, bool(xcr0 & 4))
    vcpu.set_xsave(area)
    image_b = np.zeros(4096, np.uint8)
    _put(image_b, 24, struct.pack("<I", MXCSR_B))  # standard form: MXCSR is loaded anyway
    vm.memory.write(AREA_B, image_b.tobytes())
    vm.memory.write(AREA_C, b"\xcc" * 4096)
    marks = _run(vm)
    counts = dict(vcpu.emulation_counts)
    print(f"\nconsole {marks!r}; emulated by hvjit: {counts}")
    expect_k = "k" if layout.xsavec else "U"
    expect_o = "o" if layout.xsaveopt else "U"
    assert marks == "bc" + expect_k + expect_o, (marks, counts)
    c = np.frombuffer(vm.memory.read(AREA_C, 4096), np.uint8)
    assert struct.unpack("<HHB", bytes(c[0:5])) == (0x037F, 0, 0)  # x87 init
    assert not any(c[32:160]) and not any(c[160:416])
    assert _u32(c, 24) == MXCSR_B
    bv = _u64(c, 512)
    assert bv & ~xcr0 == 0xCCCCCCCCCCCCCCCC & ~xcr0  # bits outside RFBM keep the memory's value
    assert bv & 3 in (0, 1, 2, 3) and _u64(c, 520) == 0xCCCCCCCCCCCCCCCC  # XCOMP_BV not written
    if xcr0 & 4:
        size, off, _ = layout.components[2]
        assert not any(c[off:off + size]) or not bv & 4
    assert bytes(c[416:512]) == b"\xcc" * 96  # xsave does not write the reserved legacy bytes
    now = vcpu.get_xsave()
    assert _u16(now, 0) == 0x037F and _u32(now, 24) == MXCSR_B and not any(now[160:416])
    if layout.xsavec:
        d = np.frombuffer(vm.memory.read(AREA_D, 4096), np.uint8)
        assert _u64(d, 520) == (1 << 63) | xcr0


def test_x87_control_and_fwait(session):
    vm = session.create_vm("x87ctl", memory=2 << 20)
    body = f"""
    try
    fwait                        # unmasked invalid-operation pending: #MF
    mark 'w'
1:  try
    fnstsw {SCRATCH}             # the pending status
    mark 's'
1:  try
    fnclex
    mark 'c'
1:  try
    fwait                        # now nothing pending
    mark 'w'
1:  try
    fnstsw %ax
    mov %eax, %r12d
    mark 'a'
1:  try
    fldcw {SCRATCH + 4}
    mark 'l'
1:  try
    fnstcw {SCRATCH + 6}
    mark 't'
1:  try
    fninit
    mark 'i'
1:  try
    fnstcw {SCRATCH + 8}
    mark 't'
1:
"""
    vcpu, layout = _setup(vm, body)
    vcpu.set_xcrs({0: 3})
    area = vcpu.get_xsave()
    _put(area, 0, struct.pack("<HH", 0x037E, 0x8081))  # IM unmasked; IE, ES and B set
    _put(area, 512, struct.pack("<Q", 3))
    vcpu.set_xsave(area)
    vm.memory.write(SCRATCH, struct.pack("<HHHHH", 0xAAAA, 0x0F7F, 0xBBBB, 0xCCCC, 0xDDDD))
    marks = _run(vm)
    counts = dict(vcpu.emulation_counts)
    print(f"\nconsole {marks!r}; emulated by hvjit: {counts}")
    assert marks == "Mscwaltit", (marks, counts)
    fsw0, _, fcw1, fcw2 = struct.unpack("<HHHH", vm.memory.read(SCRATCH, 8)[:2] + vm.memory.read(SCRATCH + 4, 6))
    assert fsw0 & 0x3F == 0x01 and fsw0 & 0x80  # IE and ES
    r = vcpu.get_registers()
    assert r["r12"] & 0xFFFF & 0x80FF == 0  # fnclex cleared the flags, ES and B
    assert fcw2 == 0x037F  # fnstcw after fninit
    fpu = vcpu.get_fpu()
    # KVM's own emulator (fnstcw, fninit: not in ``counts`` on this PVM host) works on an x87
    # state that is not the vCPU's: after hvjit's fldcw (KVM_SET_XSAVE) its fnstcw stored
    # 0x1b7b, and its fninit left the vCPU's FCW unchanged. A host bug, reported, not hidden;
    # hvjit's own fnstcw/fninit are checked through the exit path in the next test.
    host_bugs = []
    if fcw1 != 0x0F7F:
        assert "fnstcw" not in counts
        host_bugs.append(f"KVM's fnstcw stored {fcw1:#x} for FCW 0x0f7f")
    if (int(fpu["fcw"]), int(fpu["fsw"]), int(fpu["ftwx"])) != (0x037F, 0, 0):
        assert "fninit" not in counts
        host_bugs.append(f"after KVM's fninit the vCPU has FCW {int(fpu['fcw']):#x} FSW {int(fpu['fsw']):#x}")
    if host_bugs:
        pytest.xfail("; ".join(host_bugs))


def _exit_path(vcpu, vm, code_bytes: bytes, regs: dict):
    """Put ``code_bytes`` at CODE and hand the exit path a synthetic emulation failure for it
    (for the instructions KVM's emulator runs itself on this host)."""
    from hvjit.abi import KvmInternalError
    from hvjit.abi import VmExitCode as C
    from hvjit.emulation import handle_emulation_failure
    from hvjit.exits import VmExit

    vm.memory.write(CODE, code_bytes)
    r = vcpu.get_regs()
    r["rip"] = CODE
    for k, v in regs.items():
        r[k] = v
    vcpu.set_regs(r)
    ex = VmExit(exitcode=C.EMULATION_FAILURE, rip=CODE, kvm_reason=17, suberror=int(KvmInternalError.EMULATION))
    return handle_emulation_failure(vcpu, ex)


def test_fxsave_fxrstor_x87_control_through_the_exit_path(session):
    vm = session.create_vm("fxpath", memory=2 << 20)
    vcpu, layout = _setup(vm, "")
    vcpu.set_xcrs({0: 3})
    area = vcpu.get_xsave()
    _fill_state(area, layout, 3, MXCSR_INITIAL, False)
    vcpu.set_xsave(area)
    s0 = vcpu.get_xsave()
    vm.memory.write(AREA_G, b"\xee" * 512)
    assert _exit_path(vcpu, vm, bytes.fromhex("480fae07"), {"rdi": AREA_G}) is None  # fxsave64 [rdi]
    g = np.frombuffer(vm.memory.read(AREA_G, 512), np.uint8)
    assert bytes(g[0:416]) == bytes(s0[0:416]) and bytes(g[416:512]) == b"\xee" * 96
    assert int(vcpu.get_regs()["rip"]) == CODE + 4
    image = np.zeros(4096, np.uint8)
    _fill_state(image, layout, 77, MXCSR_E, False)
    vm.memory.write(AREA_E, image[:512].tobytes())
    assert _exit_path(vcpu, vm, bytes.fromhex("480fae0f"), {"rdi": AREA_E}) is None  # fxrstor64 [rdi]
    now = vcpu.get_xsave()
    assert bytes(now[0:2]) == bytes(image[0:2]) and bytes(now[32:416]) == bytes(image[32:416])
    assert _u32(vcpu.get_xsave(), 24) == MXCSR_E
    # misaligned fxsave: #GP injected, RIP stays on the instruction
    assert _exit_path(vcpu, vm, bytes.fromhex("480fae07"), {"rdi": AREA_G + 8}) is None
    ev = vcpu.get_events()
    assert (int(ev["exception"]["injected"]), int(ev["exception"]["nr"]), int(ev["exception"]["has_error_code"])) == (1, 13, 1)
    assert int(vcpu.get_regs()["rip"]) == CODE
    ev["exception"]["injected"] = 0
    vcpu.set_events(ev)
    # fxrstor of a reserved MXCSR bit: #GP, state unchanged
    bad = image.copy()
    _put(bad, 24, struct.pack("<I", 0x80001F80))
    vm.memory.write(AREA_D, bad[:512].tobytes())
    assert _exit_path(vcpu, vm, bytes.fromhex("480fae0f"), {"rdi": AREA_D}) is None
    assert int(vcpu.get_events()["exception"]["nr"]) == 13 and _u32(vcpu.get_xsave(), 24) == MXCSR_E
    ev = vcpu.get_events()
    ev["exception"]["injected"] = 0
    vcpu.set_events(ev)
    # x87 control: fldcw, fnstcw, fnstsw, fnclex, fninit
    vm.memory.write(SCRATCH, struct.pack("<HHH", 0x0F7F, 0, 0))
    assert _exit_path(vcpu, vm, bytes.fromhex("d92c25") + struct.pack("<I", SCRATCH), {}) is None  # fldcw
    assert int(vcpu.get_fpu()["fcw"]) == 0x0F7F
    assert _exit_path(vcpu, vm, bytes.fromhex("d93c25") + struct.pack("<I", SCRATCH + 2), {}) is None  # fnstcw
    assert struct.unpack("<H", vm.memory.read(SCRATCH + 2, 2))[0] == 0x0F7F
    fpu = vcpu.get_fpu()
    fpu["fsw"] = 0x0021
    vcpu.set_fpu(fpu)
    assert _exit_path(vcpu, vm, bytes.fromhex("dd3c25") + struct.pack("<I", SCRATCH + 4), {}) is None  # fnstsw
    assert struct.unpack("<H", vm.memory.read(SCRATCH + 4, 2))[0] == 0x0021
    assert _exit_path(vcpu, vm, bytes.fromhex("dbe2"), {}) is None  # fnclex
    assert int(vcpu.get_fpu()["fsw"]) == 0
    assert _exit_path(vcpu, vm, bytes.fromhex("dbe3"), {}) is None  # fninit
    fpu = vcpu.get_fpu()
    assert (int(fpu["fcw"]), int(fpu["fsw"]), int(fpu["ftwx"])) == (0x037F, 0, 0)
    assert _u32(vcpu.get_xsave(), 24) == MXCSR_E  # fninit leaves SSE alone
    assert vcpu.emulation_counts == {"fxsave": 2, "fxrstor": 2, "fldcw": 1, "fnstcw": 1, "fnstsw": 1,
                                     "fnclex": 1, "fninit": 1}


def test_xsavec_compacted_image_and_xrstor_of_it(session):
    """XSAVEC through the exit path (where the host has it): the compacted image, then XRSTOR
    of that image after clobbering the state."""
    vm = session.create_vm("xsavec", memory=2 << 20)
    vcpu, layout = _setup(vm, "")
    if not layout.xsavec:
        out = _exit_path(vcpu, vm, bytes.fromhex("480fc727"), {"rdi": AREA_D, "rax": 0xFFFFFFFF, "rdx": 0xFFFFFFFF})
        assert out is None and int(vcpu.get_events()["exception"]["nr"]) == 6  # #UD
        return
    xcr0 = _xcr0_for(layout) | (layout.xcr0_supported & 0xE0)  # with AVX-512 if offered
    vcpu.set_xcrs({0: xcr0})
    area = vcpu.get_xsave()
    _fill_state(area, layout, 11, MXCSR_B, bool(xcr0 & 4))
    vcpu.set_xsave(area)
    s0 = vcpu.get_xsave()
    vm.memory.write(AREA_D, b"\xcc" * 512 + bytes(64) + b"\xcc" * 3520)  # software zeroes the header
    rfbm = xcr0 & ~0x20  # leave the opmask component out of the request
    assert _exit_path(vcpu, vm, bytes.fromhex("480fc727"), {"rdi": AREA_D, "rax": rfbm, "rdx": 0}) is None
    d = np.frombuffer(vm.memory.read(AREA_D, 4096), np.uint8)
    xstate_bv, xcomp_bv = _u64(d, 512), _u64(d, 520)
    assert xcomp_bv == (1 << 63) | rfbm and xstate_bv & ~rfbm == 0 and xstate_bv & 7 == xcr0 & 7
    assert bytes(d[0:24]) == bytes(s0[0:24]) and bytes(d[32:416]) == bytes(s0[32:416])
    offsets, _ = compacted_offsets(rfbm, layout.sizes())
    if xcr0 & 4:
        size, std, _ = layout.components[2]
        assert offsets[2] == 576 and bytes(d[576:576 + size]) == bytes(s0[std:std + size])
    # clobber and restore from the compacted image
    other = vcpu.get_xsave()
    _fill_state(other, layout, 99, MXCSR_E, bool(xcr0 & 4))
    vcpu.set_xsave(other)
    assert _exit_path(vcpu, vm, bytes.fromhex("480fae2f"), {"rdi": AREA_D, "rax": 0xFFFFFFFF, "rdx": 0xFFFFFFFF}) is None
    back = vcpu.get_xsave()
    assert int(vcpu.get_events()["exception"]["injected"]) == 0
    assert bytes(back[0:2]) == bytes(s0[0:2]) and bytes(back[32:416]) == bytes(s0[32:416])
    assert _u32(back, 24) == MXCSR_B
    if xcr0 & 4:
        size, std, _ = layout.components[2]
        assert bytes(back[std:std + size]) == bytes(s0[std:std + size])
    assert vcpu.emulation_counts == {"xsavec": 1, "xrstor": 1}
