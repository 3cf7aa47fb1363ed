"""The x87/SSE/XSAVE state instructions, emulated for guests whose KVM cannot run them:
``xsetbv``/``xgetbv``, the XSAVE family (standard and compacted formats), ``fxsave``/
``fxrstor``, ``ldmxcsr``/``stmxcsr`` and their VEX forms, ``fwait`` and x87 control.

:func:`fpu_handler` picks the emulation for a decoded instruction; the thunk it returns
either completes the instruction or raises :class:`~hvjit.emulation.guest.Fault` (the
exception is injected, RIP stays) or :class:`~hvjit.emulation.guest.NotEmulated`.
"""

from __future__ import annotations

import weakref
from typing import Optional

import numpy as np

from ..kernels.decode import OpClass
from .guest import Fault, GuestLinear, NotEmulated, cpl, operand_linear

XSTATE_X87, XSTATE_SSE, XSTATE_AVX = 1, 2, 4
XSTATE_AVX512 = 0xE0  # opmask, ZMM_Hi256, Hi16_ZMM
XSTATE_MPX = 0x18
XSTATE_AMX = 0x60000
XCOMP_COMPACTED = 1 << 63
XSAVE_HEADER = 512
XSAVE_LEGACY_END = 576  # legacy region + header: where the extended components start
MXCSR_DEFAULT = 0x1F80
MXCSR_MASK_DEFAULT = 0xFFBF
FCW_DEFAULT = 0x37F
MSR_IA32_XSS = 0xDA0
CR0_MP, CR0_EM, CR0_TS, CR0_NE = 1 << 1, 1 << 2, 1 << 3, 1 << 5
CR4_OSFXSR, CR4_OSXSAVE = 1 << 9, 1 << 18
VEC_UD, VEC_NM, VEC_GP, VEC_MF = 6, 7, 13, 16


class XStateLayout:
    """What CPUID leaf 0xD says about the XSAVE components (as KVM supports them).

    ``components[i] = (size, standard_offset, align64)`` for i >= 2; ``xcr0_supported`` is
    0xD.0 EDX:EAX, ``xss_supported`` 0xD.1 EDX:ECX; the 0xD.1 EAX feature bits say which of
    XSAVEOPT, XSAVEC, XGETBV with ECX=1 and XSAVES/XRSTORS exist.
    """

    def __init__(self, cpuid) -> None:
        self.components: dict[int, tuple[int, int, bool]] = {}
        self.xcr0_supported = XSTATE_X87 | XSTATE_SSE
        self.xss_supported = 0
        self.sub1_eax = _host_xsave_features()  # see _host_xsave_features
        for e in cpuid:
            if int(e["function"]) != 0xD:
                continue
            i = int(e["index"])
            eax, ebx, ecx, edx = (int(e[k]) for k in ("eax", "ebx", "ecx", "edx"))
            if i == 0:
                self.xcr0_supported = (edx << 32 | eax) | XSTATE_X87
            elif i == 1:
                self.sub1_eax |= eax
                self.xss_supported = edx << 32 | ecx
            elif i < 63 and eax:
                self.components[i] = (eax, ebx, bool(ecx & 2))

    xsaveopt = property(lambda self: bool(self.sub1_eax & 1))
    xsavec = property(lambda self: bool(self.sub1_eax & 2))
    xgetbv1 = property(lambda self: bool(self.sub1_eax & 4))
    xsaves = property(lambda self: bool(self.sub1_eax & 8))

    def sizes(self) -> dict[int, tuple[int, bool]]:
        return {i: (size, align) for i, (size, _, align) in self.components.items()}


_HOST_XSAVE_FEATURES: Optional[int] = None


def _host_xsave_features() -> int:
    """CPUID.(0xD, 1).EAX as far as the host CPU has it (XSAVEOPT, XSAVEC, XGETBV1, XSAVES).

    A PVM guest's CPL0 ``cpuid`` reports the host's XSAVE features whatever KVM_SET_CPUID2
    said (DESIGN.md; Debian's kernel picks the compacted format from it), so the emulation
    offers what either the vCPU's CPUID or the host CPU has: the instructions the guest was
    told it has work. On VMX/SVM these instructions never reach the exit path.
    """
    global _HOST_XSAVE_FEATURES
    if _HOST_XSAVE_FEATURES is None:
        bits = 0
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        for bit, name in enumerate(("xsaveopt", "xsavec", "xgetbv1", "xsaves")):
                            if name in flags:
                                bits |= 1 << bit
                        break
        except OSError:
            pass
        _HOST_XSAVE_FEATURES = bits
    return _HOST_XSAVE_FEATURES


def compacted_offsets(xcomp_bv: int, sizes: dict[int, tuple[int, bool]]) -> tuple[dict[int, int], int]:
    """Offsets of the components of a compacted XSAVE area (SDM Vol. 1, 13.4.3) and its size.

    ``sizes[i] = (bytes, align64)`` from CPUID 0xD sub-leaf i (EAX, ECX bit 1). Components
    i >= 2 present in ``xcomp_bv`` follow each other from byte 576 in increasing i, each
    starting on a 64-byte boundary if its align bit is set.
    """
    offsets: dict[int, int] = {}
    at = XSAVE_LEGACY_END
    for i in range(2, 63):
        if not (xcomp_bv >> i) & 1:
            continue
        if i not in sizes:
            raise NotEmulated(f"XSAVE component {i} is not described by CPUID leaf 0xD")
        size, align = sizes[i]
        if align:
            at = (at + 63) & ~63
        offsets[i] = at
        at += size
    return offsets, at


_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _layout(vcpu) -> XStateLayout:
    kvm = vcpu.vm.kvm
    try:
        layout = _LAYOUTS.get(kvm)
    except TypeError:
        layout = None
    if layout is None:
        layout = XStateLayout(kvm.vcpu_cpuid(vcpu.index))
        try:
            _LAYOUTS[kvm] = layout
        except TypeError:
            pass
    return layout


def _u16(b, off):
    return int.from_bytes(bytes(b[off:off + 2]), "little")


def _u32(b, off):
    return int.from_bytes(bytes(b[off:off + 4]), "little")


def _u64(b, off):
    return int.from_bytes(bytes(b[off:off + 8]), "little")


def _mxcsr_mask(area) -> int:
    return _u32(area, 28) or MXCSR_MASK_DEFAULT


def _xss(vcpu) -> int:
    try:
        return int(vcpu.get_msr(MSR_IA32_XSS))
    except Exception:  # noqa: BLE001 - KVM without IA32_XSS: no supervisor state
        return 0


def _xcr0(vcpu) -> int:
    return int(vcpu.get_xcrs().get(0, 1))


def _legacy_image(area, rex_w: bool, nxmm: int, x87: bool, mxcsr: bool, xmm: bool) -> list[tuple[int, bytes]]:
    """Pieces of the 512-byte legacy region (FXSAVE layout) from the vCPU's standard area."""
    a = bytes(area[:416])
    pieces = []
    if x87:
        head = bytearray(a[0:24])
        if not rex_w:  # 32-bit format: FIP[31:0], FCS, FDP[31:0], FDS (selectors not kept: 0)
            head[8:16] = a[8:12] + b"\0\0\0\0"
            head[16:24] = a[16:20] + b"\0\0\0\0"
        pieces.append((0, bytes(head)))
        pieces.append((32, a[32:160]))
    if mxcsr:
        pieces.append((24, a[24:32]))
    if xmm:
        pieces.append((160, a[160:160 + 16 * nxmm]))
    return pieces


def _check_sse_state(sregs, *, need_osxsave=False, need_osfxsr=False, em_is_ud=False, em_is_nm=False) -> None:
    cr0, cr4 = int(sregs["cr0"]), int(sregs["cr4"])
    if need_osxsave and not cr4 & CR4_OSXSAVE:
        raise Fault(VEC_UD)
    if need_osfxsr and not cr4 & CR4_OSFXSR:
        raise Fault(VEC_UD)
    if em_is_ud and cr0 & CR0_EM:
        raise Fault(VEC_UD)
    if em_is_nm and cr0 & CR0_EM:
        raise Fault(VEC_NM)
    if cr0 & CR0_TS:
        raise Fault(VEC_NM)


def _xsave(vcpu, rec, regs, sregs, bitness, variant: str) -> None:
    """XSAVE / XSAVEOPT (standard format), XSAVEC / XSAVES (compacted)."""
    layout = _layout(vcpu)
    if variant == "xsaveopt" and not layout.xsaveopt or variant == "xsavec" and not layout.xsavec \
            or variant == "xsaves" and not layout.xsaves:
        raise Fault(VEC_UD)
    _check_sse_state(sregs, need_osxsave=True)
    if variant == "xsaves" and cpl(sregs, regs):
        raise Fault(VEC_GP, 0)
    gla = operand_linear(rec, regs, sregs, bitness)
    if gla & 63:
        raise Fault(VEC_GP, 0)
    xcr0 = _xcr0(vcpu)
    mask = (int(regs["rdx"]) & 0xFFFFFFFF) << 32 | (int(regs["rax"]) & 0xFFFFFFFF)
    enabled = xcr0 | (_xss(vcpu) if variant == "xsaves" else 0)
    rfbm = enabled & mask
    area = vcpu.get_xsave()
    xinuse = _u64(area, XSAVE_HEADER) | (XSTATE_X87 | XSTATE_SSE)  # legacy: save as in use
    rex_w = bool(rec["rex_w"])
    nxmm = 16 if bitness == 64 else 8
    compacted = variant in ("xsavec", "xsaves")
    saved = rfbm & xinuse if compacted else rfbm
    pieces = _legacy_image(area, rex_w, nxmm, bool(saved & XSTATE_X87), bool(rfbm & (XSTATE_SSE | XSTATE_AVX)),
                           bool(saved & XSTATE_SSE))
    if compacted:
        offsets, _ = compacted_offsets(rfbm, layout.sizes())
        header = (rfbm & xinuse).to_bytes(8, "little") + (rfbm | XCOMP_COMPACTED).to_bytes(8, "little")
        pieces.append((XSAVE_HEADER, header))
    else:
        offsets = {i: layout.components[i][1] for i in layout.components if (rfbm >> i) & 1}
        old_bv = _u64(GuestLinear(vcpu, sregs, regs).read(gla + XSAVE_HEADER, 8), 0)
        bv = (old_bv & ~rfbm) | (rfbm & xinuse)
        pieces.append((XSAVE_HEADER, bv.to_bytes(8, "little")))
    for i in range(2, 63):
        if not (rfbm >> i) & 1 or (compacted and not (xinuse >> i) & 1):
            continue
        if i not in layout.components:
            raise NotEmulated(f"XSAVE component {i} is not described by CPUID leaf 0xD")
        size, std, _ = layout.components[i]
        if std + size > len(area):
            raise NotEmulated(f"XSAVE component {i} is not in KVM's XSAVE area")
        pieces.append((offsets[i], bytes(area[std:std + size])))
    GuestLinear(vcpu, sregs, regs).write_pieces(gla, pieces)


def _init_component(area, i: int, layout: XStateLayout) -> None:
    if i == 0:
        area[0:24] = 0
        area[0:2] = np.frombuffer(FCW_DEFAULT.to_bytes(2, "little"), np.uint8)
        area[32:160] = 0
    elif i == 1:
        area[160:416] = 0
    else:
        size, std, _ = layout.components[i]
        area[std:std + size] = 0


def _xrstor(vcpu, rec, regs, sregs, bitness, variant: str) -> None:
    """XRSTOR (standard or compacted form, per XCOMP_BV bit 63) and XRSTORS (compacted)."""
    layout = _layout(vcpu)
    if variant == "xrstors" and not layout.xsaves:
        raise Fault(VEC_UD)
    _check_sse_state(sregs, need_osxsave=True)
    if variant == "xrstors" and cpl(sregs, regs):
        raise Fault(VEC_GP, 0)
    gla = operand_linear(rec, regs, sregs, bitness)
    if gla & 63:
        raise Fault(VEC_GP, 0)
    guest = GuestLinear(vcpu, sregs, regs)
    xcr0 = _xcr0(vcpu)
    enabled = xcr0 | (_xss(vcpu) if variant == "xrstors" else 0)
    mask = (int(regs["rdx"]) & 0xFFFFFFFF) << 32 | (int(regs["rax"]) & 0xFFFFFFFF)
    rfbm = enabled & mask
    header = guest.read(gla + XSAVE_HEADER, 64)
    xstate_bv, xcomp_bv = _u64(header, 0), _u64(header, 8)
    compacted = bool(xcomp_bv & XCOMP_COMPACTED)
    if variant == "xrstors" and not compacted:
        raise Fault(VEC_GP, 0)
    if compacted:
        comp = xcomp_bv & ~XCOMP_COMPACTED
        if not layout.xsavec or comp & ~enabled or xstate_bv & ~comp or any(header[16:64]):
            raise Fault(VEC_GP, 0)
        offsets, end = compacted_offsets(comp, layout.sizes())
    else:
        if xstate_bv & ~xcr0 or any(header[8:24]):
            raise Fault(VEC_GP, 0)
        offsets = {i: layout.components[i][1] for i in layout.components if (rfbm >> i) & 1}
        end = max([off + layout.components[i][0] for i, off in offsets.items()] + [XSAVE_LEGACY_END])
    for i in range(2, 63):
        if (rfbm >> i) & 1 and i not in layout.components:
            raise NotEmulated(f"XSAVE component {i} is not described by CPUID leaf 0xD")
    image = guest.read(gla, end)
    area = vcpu.get_xsave()
    old_bv = _u64(area, XSAVE_HEADER)
    mxcsr_mask = _mxcsr_mask(area)
    nxmm = 16 if bitness == 64 else 8
    load = rfbm & xstate_bv
    # MXCSR: standard form loads it whenever SSE or AVX is requested; the compacted form
    # only if one of them is also in XSTATE_BV (else it is initialized).
    new_mxcsr = None
    if rfbm & (XSTATE_SSE | XSTATE_AVX):
        if not compacted or load & (XSTATE_SSE | XSTATE_AVX):
            new_mxcsr = _u32(image, 24)
            if new_mxcsr & ~mxcsr_mask:
                raise Fault(VEC_GP, 0)
        else:
            new_mxcsr = MXCSR_DEFAULT
    if rfbm & XSTATE_X87:
        if load & XSTATE_X87:
            area[0:24] = np.frombuffer(image[0:24], np.uint8)
            area[32:160] = np.frombuffer(image[32:160], np.uint8)
            if not rec["rex_w"]:  # 32-bit format: FIP/FDP upper halves are selectors, not addresses
                area[12:16] = 0
                area[20:24] = 0
        else:
            _init_component(area, 0, layout)
    if rfbm & XSTATE_SSE:
        if load & XSTATE_SSE:
            area[160:160 + 16 * nxmm] = np.frombuffer(image[160:160 + 16 * nxmm], np.uint8)
        else:
            area[160:160 + 16 * nxmm] = 0
    if new_mxcsr is not None:
        area[24:28] = np.frombuffer(new_mxcsr.to_bytes(4, "little"), np.uint8)
    for i in range(2, 63):
        if not (rfbm >> i) & 1:
            continue
        size, std, _ = layout.components[i]
        if std + size > len(area):
            raise NotEmulated(f"XSAVE component {i} is not in KVM's XSAVE area")
        if (load >> i) & 1:
            off = offsets[i]
            area[std:std + size] = np.frombuffer(image[off:off + size], np.uint8)
        else:
            area[std:std + size] = 0
    # The area handed to KVM has the legacy components materialized (their XSTATE_BV bits
    # set, so KVM copies them, MXCSR included); the others follow the image's XSTATE_BV.
    new_bv = (old_bv & ~rfbm) | load
    if rfbm & XSTATE_X87:
        new_bv |= XSTATE_X87
    if rfbm & (XSTATE_SSE | XSTATE_AVX):
        new_bv |= XSTATE_SSE
    area[XSAVE_HEADER:XSAVE_HEADER + 8] = np.frombuffer(new_bv.to_bytes(8, "little"), np.uint8)
    area[XSAVE_HEADER + 8:XSAVE_HEADER + 16] = 0
    vcpu.set_xsave(area)


def _fxsave(vcpu, rec, regs, sregs, bitness) -> None:
    _check_sse_state(sregs, em_is_nm=True)
    gla = operand_linear(rec, regs, sregs, bitness)
    if gla & 15:
        raise Fault(VEC_GP, 0)
    area = vcpu.get_xsave()
    nxmm = 16 if bitness == 64 else 8
    pieces = _legacy_image(area, bool(rec["rex_w"]), nxmm, True, True, True)
    GuestLinear(vcpu, sregs, regs).write_pieces(gla, pieces)


def _fxrstor(vcpu, rec, regs, sregs, bitness) -> None:
    _check_sse_state(sregs, em_is_nm=True)
    gla = operand_linear(rec, regs, sregs, bitness)
    if gla & 15:
        raise Fault(VEC_GP, 0)
    image = GuestLinear(vcpu, sregs, regs).read(gla, 416)
    area = vcpu.get_xsave()
    mxcsr = _u32(image, 24)
    if mxcsr & ~_mxcsr_mask(area):
        raise Fault(VEC_GP, 0)
    nxmm = 16 if bitness == 64 else 8
    area[0:24] = np.frombuffer(image[0:24], np.uint8)
    if not rec["rex_w"]:
        area[12:16] = 0
        area[20:24] = 0
    area[24:28] = np.frombuffer(image[24:28], np.uint8)
    area[32:160 + 16 * nxmm] = np.frombuffer(image[32:160 + 16 * nxmm], np.uint8)
    bv = _u64(area, XSAVE_HEADER) | XSTATE_X87 | XSTATE_SSE
    area[XSAVE_HEADER:XSAVE_HEADER + 8] = np.frombuffer(bv.to_bytes(8, "little"), np.uint8)
    vcpu.set_xsave(area)


def _set_legacy(vcpu, area, bits: int) -> None:
    bv = _u64(area, XSAVE_HEADER) | bits
    area[XSAVE_HEADER:XSAVE_HEADER + 8] = np.frombuffer(bv.to_bytes(8, "little"), np.uint8)
    vcpu.set_xsave(area)


def _mxcsr_op(vcpu, rec, regs, sregs, bitness, store: bool, vex: bool) -> None:
    if vex:
        _check_sse_state(sregs, need_osxsave=True)
        if (_xcr0(vcpu) & (XSTATE_SSE | XSTATE_AVX)) != (XSTATE_SSE | XSTATE_AVX):
            raise Fault(VEC_UD)
    else:
        _check_sse_state(sregs, need_osfxsr=True, em_is_ud=True)
    gla = operand_linear(rec, regs, sregs, bitness)
    guest = GuestLinear(vcpu, sregs, regs)
    area = vcpu.get_xsave()
    if store:
        guest.write_pieces(gla, [(0, bytes(area[24:28]))])
        return
    value = _u32(guest.read(gla, 4), 0)
    if value & ~_mxcsr_mask(area):
        raise Fault(VEC_GP, 0)
    area[24:28] = np.frombuffer(value.to_bytes(4, "little"), np.uint8)
    _set_legacy(vcpu, area, XSTATE_SSE)


def _x87_pending(area) -> bool:
    fcw, fsw = _u16(area, 0), _u16(area, 2)
    return bool(fsw & 0x3F & ~fcw)


def _fwait(vcpu, sregs) -> None:
    cr0 = int(sregs["cr0"])
    if cr0 & CR0_TS and cr0 & CR0_MP:
        raise Fault(VEC_NM)
    if _x87_pending(vcpu.get_xsave()):
        if not cr0 & CR0_NE:
            raise NotEmulated("unmasked x87 exception with CR0.NE=0 (FERR#/IRQ 13 not modelled)")
        raise Fault(VEC_MF)


def _x87_form(rec) -> Optional[str]:
    """FNINIT, FNCLEX, FNSTCW, FLDCW, FNSTSW (memory or AX): the form, else None."""
    opcode, modrm, mod = int(rec["opcode"]), int(rec["modrm"]), int(rec["mod"])
    reg = (modrm >> 3) & 7
    if opcode == 0xDB and modrm in (0xE2, 0xE3):
        return "fnclex" if modrm == 0xE2 else "fninit"
    if opcode == 0xD9 and mod != 3 and reg in (5, 7):
        return "fldcw" if reg == 5 else "fnstcw"
    if opcode == 0xDD and mod != 3 and reg == 7:
        return "fnstsw"
    if opcode == 0xDF and modrm == 0xE0:
        return "fnstsw ax"
    return None


def _x87(vcpu, rec, regs, sregs, bitness, form: str) -> None:
    cr0 = int(sregs["cr0"])
    if cr0 & (CR0_EM | CR0_TS):
        raise Fault(VEC_NM)
    area = vcpu.get_xsave()
    if form == "fninit":
        area[0:24] = 0
        area[0:2] = np.frombuffer(FCW_DEFAULT.to_bytes(2, "little"), np.uint8)
        _set_legacy(vcpu, area, XSTATE_X87)
    elif form == "fnclex":
        fsw = _u16(area, 2) & ~0x80FF
        area[2:4] = np.frombuffer(fsw.to_bytes(2, "little"), np.uint8)
        _set_legacy(vcpu, area, XSTATE_X87)
    elif form == "fldcw":
        gla = operand_linear(rec, regs, sregs, bitness)
        value = GuestLinear(vcpu, sregs, regs).read(gla, 2)
        fcw = _u16(value, 0)
        area[0:2] = np.frombuffer(value, np.uint8)
        fsw = _u16(area, 2)  # ES and B follow the unmasked exceptions
        fsw = (fsw | 0x8080) if fsw & 0x3F & ~fcw else (fsw & ~0x8080)
        area[2:4] = np.frombuffer(fsw.to_bytes(2, "little"), np.uint8)
        _set_legacy(vcpu, area, XSTATE_X87)
    elif form == "fnstsw ax":
        regs["rax"] = (int(regs["rax"]) & ~0xFFFF) | _u16(area, 2)
    else:
        gla = operand_linear(rec, regs, sregs, bitness)
        off = 0 if form == "fnstcw" else 2
        GuestLinear(vcpu, sregs, regs).write_pieces(gla, [(0, bytes(area[off:off + 2]))])


def _xsetbv(vcpu, regs, sregs) -> None:
    if not int(sregs["cr4"]) & CR4_OSXSAVE:
        raise Fault(VEC_UD)
    if cpl(sregs, regs) or int(regs["rcx"]) & 0xFFFFFFFF:
        raise Fault(VEC_GP, 0)
    value = (int(regs["rdx"]) & 0xFFFFFFFF) << 32 | (int(regs["rax"]) & 0xFFFFFFFF)
    if not xcr0_valid(value, _layout(vcpu).xcr0_supported):
        raise Fault(VEC_GP, 0)
    try:
        vcpu.set_xcrs({0: value})
    except Exception as e:  # noqa: BLE001 - KVM refusing a value the CPU would refuse too
        raise Fault(VEC_GP, 0) from e


def xcr0_valid(value: int, supported: int) -> bool:
    """XSETBV's checks on a new XCR0 (SDM Vol. 2, XSETBV; Vol. 1, 13.3)."""
    if not value & XSTATE_X87 or value & ~supported:
        return False
    if value & XSTATE_AVX and not value & XSTATE_SSE:
        return False
    if value & XSTATE_AVX512 and (value & XSTATE_AVX512 != XSTATE_AVX512 or not value & XSTATE_AVX):
        return False
    if value & XSTATE_MPX and value & XSTATE_MPX != XSTATE_MPX:
        return False
    if value & XSTATE_AMX and value & XSTATE_AMX != XSTATE_AMX:
        return False
    return True


def _xgetbv(vcpu, regs, sregs) -> None:
    if not int(sregs["cr4"]) & CR4_OSXSAVE:
        raise Fault(VEC_UD)
    ecx = int(regs["rcx"]) & 0xFFFFFFFF
    xcr0 = _xcr0(vcpu)
    if ecx == 0:
        value = xcr0
    elif ecx == 1 and _layout(vcpu).xgetbv1:
        value = xcr0 & (_u64(vcpu.get_xsave(), XSAVE_HEADER) | XSTATE_X87 | XSTATE_SSE)
    else:
        raise Fault(VEC_GP, 0)
    regs["rax"], regs["rdx"] = value & 0xFFFFFFFF, value >> 32


_XSAVE_FAMILY = {(0xAE, 4): "xsave", (0xAE, 5): "xrstor", (0xAE, 6): "xsaveopt",
                 (0xC7, 3): "xrstors", (0xC7, 4): "xsavec", (0xC7, 5): "xsaves"}


def fpu_handler(vcpu, rec, regs, sregs, bitness: int, oc: int):
    """For the x87/SSE/XSAVE state instructions: ``(name to count, thunk)``, else None.

    The thunk emulates (registers in ``regs``, memory written) or raises Fault (inject,
    RIP unchanged), NotEmulated or GuestAccessError (report).
    """
    reg3 = (int(rec["modrm"]) >> 3) & 7
    mem = int(rec["mod"]) != 3
    args = (vcpu, rec, regs, sregs, bitness)
    if oc == OpClass.XSETBV:
        return "xsetbv", lambda: _xsetbv(vcpu, regs, sregs)
    if oc == OpClass.XGETBV:
        return "xgetbv", lambda: _xgetbv(vcpu, regs, sregs)
    if oc == OpClass.XSAVE_FAMILY and mem:
        name = _XSAVE_FAMILY.get((int(rec["opcode"]), reg3))
        if name is None:
            return None
        fn = _xrstor if name.startswith("xrstor") else _xsave
        return name, lambda: fn(*args, name)
    if oc == OpClass.FXSAVE and mem:
        return "fxsave", lambda: _fxsave(*args)
    if oc == OpClass.FXRSTOR and mem:
        return "fxrstor", lambda: _fxrstor(*args)
    if oc in (OpClass.LDMXCSR, OpClass.STMXCSR) and mem:
        store = oc == OpClass.STMXCSR
        return ("stmxcsr" if store else "ldmxcsr"), lambda: _mxcsr_op(*args, store, False)
    if (oc == OpClass.SSE_AVX and int(rec["vex"]) in (2, 3) and int(rec["vex_map"]) == 1
            and int(rec["opcode"]) == 0xAE and mem and reg3 in (2, 3) and int(rec["vex_l"]) == 0
            and int(rec["vex_pp"]) == 0):
        return ("vstmxcsr" if reg3 == 3 else "vldmxcsr"), lambda: _mxcsr_op(*args, reg3 == 3, True)
    if oc == OpClass.FWAIT:
        return "fwait", lambda: _fwait(vcpu, sregs)
    if oc == OpClass.X87:
        form = _x87_form(rec)
        if form is not None:
            return form.split()[0], lambda: _x87(*args, form)
    return None


