"""Whether an instruction KVM could not run is one the CPU would have refused.

Test kernels execute instructions on purpose that must fault: ``movbe`` with a register
operand, VEX-encoded instructions with AVX off, ``invpcid`` or ``rdpru`` the CPU does not
advertise, a LOCK prefix where none is allowed. Such an instruction is not "unsupported":
the architecture says #UD (or #GP, #NM), and the guest's IDT expects it. :func:`refusal`
decides that from the instruction, the guest's CR0/CR4/EFER/XCR0, its CPL and the CPUID
KVM holds for the vCPU (what the guest's own ``cpuid`` at CPL0 reads), before the
emulation table runs it. The rules, in the CPU's order (#UD before #NM before #GP):

- an encoding the decoder rejects: #UD (a LOCK prefix on a non-lockable instruction, an
  undefined opcode, VEX after a legacy prefix), #GP(0) for more than 15 bytes;
- VEX/EVEX/XOP: #UD in real and virtual-8086 mode, with CR4.OSXSAVE clear, with XCR0
  lacking the state the encoding needs (SSE+AVX; +opmask/ZMM for EVEX), or without the
  encoding's CPUID bit (AVX, AVX512F, XOP); then #NM with CR0.TS. VEX-encoded
  general-purpose instructions (BMI1/BMI2) need only their CPUID bit and VEX.L=0;
- legacy SSE/MMX/3DNow!: #UD with CR0.EM, with CR4.OSFXSR clear for XMM forms, or without
  the CPUID bit of the instruction's extension (SSE ... SSE4.2, AES, PCLMULQDQ, SHA);
  then #NM with CR0.TS;
- one instruction each: ``movbe`` (register form, CPUID.MOVBE), ``crc32`` (SSE4.2),
  ``popcnt``, ``cmpxchg8b``/``cmpxchg16b`` (CX8/CX16), ``rdtscp`` (CPUID; #GP(0) with
  CR4.TSD above CPL0), ``rdpid``, ``rdpru`` (CPUID 8000_0008 EBX[4]; #GP(0) with CR4.TSD
  above CPL0), ``invpcid`` (register form, CPUID; #GP(0) above CPL0 and in v8086 mode),
  ``clac``/``stac`` (SMAP; CPL0 only), ``clwb``/``clflushopt``/``clflush``,
  ``rdrand``/``rdseed``, ``rd``/``wr{fs,gs}base`` (64-bit mode, CR4.FSGSBASE, CPUID),
  ``rdpkru``/``wrpkru`` (CR4.PKE), ``ud0``/``ud1``/``ud2``.

Where no rule applies the instruction is one the CPU would run: the emulation table runs it
or stops the VM with a report. The x87/SSE/XSAVE state instructions keep their own checks
in :mod:`.xstate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import cpuid
from ..kernels.decode import DecodeStatus, OpClass, VexKind, decode

VEC_UD, VEC_NM, VEC_GP = 6, 7, 13
CR0_PE, CR0_EM, CR0_TS = 1 << 0, 1 << 2, 1 << 3
CR4_TSD, CR4_OSFXSR, CR4_FSGSBASE, CR4_OSXSAVE, CR4_PKE = 1 << 2, 1 << 9, 1 << 16, 1 << 18, 1 << 22
RFLAGS_VM = 1 << 17
XCR0_SSE_AVX = 0x6  # SSE and AVX state
XCR0_AVX512 = 0xE6  # SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM

# Feature bits hvjit.cpuid does not name.
EXTRA_FEATURES = {
    "rdpru": cpuid.FeatureBit(0x80000008, 0, "ebx", 4),
    "3dnow": cpuid.FeatureBit(0x80000001, 0, "edx", 31),
}

LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})


@dataclass(frozen=True)
class Refusal:
    """The exception the CPU raises instead of running the instruction."""

    vector: int
    error_code: Optional[int]
    reason: str

    @property
    def name(self) -> str:
        return {VEC_UD: "ud", VEC_NM: "nm", VEC_GP: "gp"}.get(self.vector, str(self.vector))


def _ud(reason: str) -> Refusal:
    return Refusal(VEC_UD, None, reason)


def _gp(reason: str) -> Refusal:
    return Refusal(VEC_GP, 0, reason)


@dataclass(frozen=True)
class CpuView:
    """What the rules read of the vCPU. ``xcr0`` is asked for only by VEX rules (an ioctl)."""

    cr0: int
    cr4: int
    efer: int
    rflags: int
    cpl: int
    bitness: int
    features: frozenset
    read_xcr0: Callable[[], int] = field(default=lambda: 1, compare=False)

    @property
    def real(self) -> bool:
        return not self.cr0 & CR0_PE

    @property
    def v86(self) -> bool:
        return not self.real and bool(self.rflags & RFLAGS_VM)

    def has(self, name: str) -> bool:
        return name in self.features


# ---- the guest's CPUID ------------------------------------------------------------------------


def features_of(entries) -> frozenset:
    """Feature names (hvjit.cpuid's, plus EXTRA_FEATURES) set in a CPUID table."""
    names = set(cpuid.features(entries))
    for name, bit in EXTRA_FEATURES.items():
        for e in entries:
            if int(e["function"]) == bit.leaf and int(e[bit.register]) >> bit.bit & 1:
                names.add(name)
    return frozenset(names)


def guest_features(vcpu) -> frozenset:
    """The vCPU's CPUID features as KVM holds them, read once per KVM_SET_CPUID2."""
    cached = vcpu.fault_features
    if cached is None:
        cached = vcpu.fault_features = features_of(cpuid.get_cpuid(vcpu))
    return cached


def cpu_view(vcpu, regs, sregs, bitness: int, cpl: int) -> CpuView:
    return CpuView(int(sregs["cr0"]), int(sregs["cr4"]), int(sregs["efer"]), int(regs["rflags"]),
                   cpl, bitness, guest_features(vcpu), lambda: vcpu.get_xcrs().get(0, 1))


# ---- encodings the decoder rejects ------------------------------------------------------------


def invalid_encoding(code: bytes, bitness: int) -> Optional[Refusal]:
    """The fault for bytes that do not decode (None: too few bytes to tell)."""
    prefixes = 0
    while prefixes < len(code) and code[prefixes] in LEGACY_PREFIXES:
        prefixes += 1
    if 0xF0 in code[:prefixes]:
        unlocked = bytes(b for b in code[:prefixes] if b != 0xF0) + code[prefixes:]
        if decode(unlocked, bitness)["status"] == DecodeStatus.OK:
            return _ud("LOCK prefix on an instruction that cannot take it")
    rest = decode(code[prefixes:], bitness)["status"]
    if rest == DecodeStatus.TRUNCATED and prefixes and len(code) >= 15:
        return _gp("longer than 15 bytes")
    if rest == DecodeStatus.TRUNCATED and len(code) < 15:
        return None  # the fetch stopped short: the rest is unknown
    return _ud("undefined encoding")


# ---- which instruction it is, where the OpClass lumps several together ------------------------


def special_name(rec) -> str:
    """A name for instructions the decoder's OpClass does not single out ("" otherwise)."""
    omap, opc, mod = int(rec["opcode_map"]), int(rec["opcode"]), int(rec["mod"])
    if int(rec["vex"]) != 0:
        return ""
    if omap == 1 and opc == 0x01 and int(rec["modrm"]) == 0xFD:
        return "rdpru"
    if omap == 2 and opc == 0x82 and rec["opsize_prefix"]:
        return "invpcid"
    if omap == 2 and opc in (0x80, 0x81) and rec["opsize_prefix"]:
        return "invept" if opc == 0x80 else "invvpid"
    if omap == 1 and opc == 0xAE and mod == 3 and rec["rep"] and (int(rec["modrm"]) >> 3) & 7 < 4:
        return "fsgsbase"
    return ""


# ---- the rules --------------------------------------------------------------------------------


def _mandatory_prefix(rec) -> int:
    if rec["opsize_prefix"]:
        return 0x66
    if rec["repne"]:
        return 0xF2
    if rec["rep"]:
        return 0xF3
    return 0


_SSE_0F = set(range(0x10, 0x18)) | set(range(0x28, 0x30)) | set(range(0x50, 0x60)) | {0xC2, 0xC6}
_SSE2_WITHOUT_PREFIX = {0x5A, 0x5B}
_SSE3 = {(0xF2, 0x12), (0xF3, 0x12), (0xF3, 0x16), (0x66, 0x7C), (0xF2, 0x7C), (0x66, 0x7D),
         (0xF2, 0x7D), (0x66, 0xD0), (0xF2, 0xD0), (0xF2, 0xF0)}
_MAP_0F38 = {**{o: "ssse3" for o in [*range(0x00, 0x0C), 0x1C, 0x1D, 0x1E]},
             **{o: "sse4_1" for o in [0x10, 0x14, 0x15, 0x17, *range(0x20, 0x26), *range(0x28, 0x2C),
                                      *range(0x30, 0x36), *range(0x38, 0x42)]},
             0x37: "sse4_2", **{o: "sha_ni" for o in range(0xC8, 0xCE)},
             **{o: "aes" for o in range(0xDB, 0xE0)}}
_MAP_0F3A = {0x0F: "ssse3", **{o: "sse4_1" for o in [*range(0x08, 0x0F), *range(0x14, 0x18), 0x20, 0x21,
                                                     0x22, 0x40, 0x41, 0x42]},
             0x44: "pclmulqdq", **{o: "sse4_2" for o in range(0x60, 0x64)}, 0xCC: "sha_ni", 0xDF: "aes"}


def legacy_vector_kind(rec) -> tuple[bool, str]:
    """(uses XMM registers, the CPUID feature it needs) of a legacy-encoded vector
    instruction; the feature is "" where the table does not know it."""
    omap, opc, pfx = int(rec["opcode_map"]), int(rec["opcode"]), _mandatory_prefix(rec)
    if omap == 4 or (omap == 1 and opc == 0x0E):
        return False, "3dnow"
    if omap == 2:
        return pfx == 0x66, _MAP_0F38.get(opc, "")
    if omap == 3:
        return pfx == 0x66, _MAP_0F3A.get(opc, "")
    if omap != 1:
        return True, ""
    if opc == 0x77:
        return False, "mmx"  # emms
    if (pfx, opc) in _SSE3:
        return True, "sse3"
    if opc in _SSE_0F:
        if pfx in (0x66, 0xF2) or (pfx == 0 and opc in _SSE2_WITHOUT_PREFIX) or (pfx == 0xF3 and opc in (0x5A, 0x5B)):
            return True, "sse2"
        return True, "sse"
    if pfx == 0:
        return False, "mmx"
    return True, "sse2"


_BMI = {0xF2: "bmi1", 0xF3: "bmi1", 0xF5: "bmi2", 0xF6: "bmi2", 0xF7: "bmi1"}


def _vex(rec, cpu: CpuView) -> Optional[Refusal]:
    kind = int(rec["vex"])
    if cpu.real or cpu.v86:
        return _ud("VEX/EVEX/XOP encoding in real or virtual-8086 mode")
    omap, opc = int(rec["opcode_map"]), int(rec["opcode"])
    if kind in (VexKind.VEX2, VexKind.VEX3) and ((omap == 2 and opc in _BMI) or (omap == 3 and opc == 0xF0)):
        feature = "bmi2" if omap == 3 or opc in (0xF5, 0xF6) or (opc == 0xF7 and int(rec["vex_pp"])) else _BMI[opc]
        if rec["vex_l"]:
            return _ud("VEX.L=1 on a general-purpose VEX instruction")
        if not cpu.has(feature):
            return _ud(f"CPUID does not advertise {feature.upper()}")
        return None
    if not cpu.cr4 & CR4_OSXSAVE:
        return _ud("VEX/EVEX/XOP encoding with CR4.OSXSAVE clear")
    need, feature = (XCR0_AVX512, "avx512f") if kind == VexKind.EVEX else (
        (XCR0_SSE_AVX, "xop") if kind == VexKind.XOP else (XCR0_SSE_AVX, "avx"))
    if cpu.read_xcr0() & need != need:
        return _ud(f"XCR0 lacks the state {feature.upper()} instructions use")
    if not cpu.has(feature):
        return _ud(f"CPUID does not advertise {feature.upper()}")
    if cpu.cr0 & CR0_TS:
        return Refusal(VEC_NM, None, "CR0.TS set")
    return None


def _legacy_vector(rec, cpu: CpuView) -> Optional[Refusal]:
    xmm, feature = legacy_vector_kind(rec)
    if cpu.cr0 & CR0_EM:
        return _ud("SSE/MMX instruction with CR0.EM set")
    if xmm and not cpu.cr4 & CR4_OSFXSR:
        return _ud("SSE instruction with CR4.OSFXSR clear")
    if feature and not cpu.has(feature):
        return _ud(f"CPUID does not advertise {feature.upper()}")
    if cpu.cr0 & CR0_TS:
        return Refusal(VEC_NM, None, "CR0.TS set")
    return None


def _needs(cpu: CpuView, feature: str) -> Optional[Refusal]:
    return None if cpu.has(feature) else _ud(f"CPUID does not advertise {feature.upper()}")


def _tsd(cpu: CpuView) -> Optional[Refusal]:
    return _gp("CR4.TSD set above CPL0") if cpu.cr4 & CR4_TSD and cpu.cpl else None


def _special(name: str, rec, cpu: CpuView) -> Optional[Refusal]:
    if name == "rdpru":
        return _needs(cpu, "rdpru") or _tsd(cpu)
    if name == "invpcid":
        if int(rec["mod"]) == 3:
            return _ud("INVPCID with a register operand")
        if not cpu.has("invpcid"):
            return _ud("CPUID does not advertise INVPCID")
        if cpu.v86 or cpu.cpl:
            return _gp("INVPCID above CPL0")
        return None
    if name in ("invept", "invvpid"):
        return _ud(f"{name.upper()} outside VMX operation")
    if name == "fsgsbase":
        if cpu.bitness != 64:
            return _ud("RD/WR FS/GS BASE outside 64-bit mode")
        if not cpu.cr4 & CR4_FSGSBASE:
            return _ud("RD/WR FS/GS BASE with CR4.FSGSBASE clear")
        return _needs(cpu, "fsgsbase")
    return None


_BY_CLASS_FEATURE = {
    OpClass.POPCNT: "popcnt", OpClass.CMPXCHG8B: "cx8", OpClass.CMPXCHG16B: "cx16",
    OpClass.RDPID: "rdpid", OpClass.CLWB: "clwb", OpClass.CLFLUSHOPT: "clflushopt",
    OpClass.CLFLUSH: "clflush", OpClass.RDRAND: "rdrand", OpClass.RDSEED: "rdseed",
    OpClass.CRC32: "sse4_2", OpClass.SERIALIZE: "serialize",
}


def refusal(rec, cpu: CpuView, name: Optional[str] = None) -> Optional[Refusal]:
    """The exception the CPU raises for decoded instruction ``rec`` in state ``cpu``, or
    None where it would run it. ``name``: :func:`special_name` of ``rec``, if known."""
    if int(rec["vex"]) != 0:
        return _vex(rec, cpu)
    name = special_name(rec) if name is None else name
    if name:
        return _special(name, rec, cpu)
    oc = int(rec["op_class"])
    if oc == OpClass.UD:
        return _ud("an undefined-instruction opcode (UD0/UD1/UD2)")
    if oc == OpClass.SSE_AVX:
        return _legacy_vector(rec, cpu)
    if oc == OpClass.MOVBE:
        if int(rec["mod"]) == 3:
            return _ud("MOVBE with a register operand")
        return _needs(cpu, "movbe")
    if oc in (OpClass.CLAC, OpClass.STAC):
        return _needs(cpu, "smap") or (_ud("CLAC/STAC above CPL0") if cpu.cpl else None)
    if oc == OpClass.RDTSCP:
        return _needs(cpu, "rdtscp") or _tsd(cpu)
    if oc == OpClass.WRPKRU_RDPKRU and not cpu.cr4 & CR4_PKE:
        return _ud("RDPKRU/WRPKRU with CR4.PKE clear")
    feature = _BY_CLASS_FEATURE.get(oc)
    return _needs(cpu, feature) if feature else None
