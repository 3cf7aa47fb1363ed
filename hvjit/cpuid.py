"""CPUID feature bits by name, and a vCPU's CPUID read and changed through them.

The names are mostly Linux's ``/proc/cpuinfo`` flags (``sse4_2``, ``avx512f``, ``lm``; but
``sse3``, ``tsc_deadline``, ``prefetchw``) for leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX and leaf
0x80000001 ECX/EDX.

What a guest sees is not always what KVM_SET_CPUID2 said, so :func:`set_features` reads the
vCPU's CPUID back (KVM_GET_CPUID2) and raises UnsupportedError for names that did not take:

- ``cpuid`` at CPL0 is intercepted everywhere and answers from KVM's table, which
  :func:`get_cpuid` returns. On PVM that table keeps the host's value for features the guest
  executes natively (clearing ``sse2`` or ``smep`` does not stick); KVM's own bits
  (``hypervisor``, ``x2apic``, ``tsc_deadline``, ``pcid``) follow the request.
- ``cpuid`` at CPL3 is not intercepted on PVM: it returns the host's CPUID, whatever KVM's
  table says. On VMX/SVM it answers from KVM's table at every CPL.
- KVM keeps ``osxsave``, ``ospke`` and ``apic`` in step with CR4 and APIC_BASE itself; they
  are read-only here.
- KVM refuses KVM_SET_CPUID2 with a different table once the vCPU has run (EINVAL).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from . import _trampoline as _t
from .abi import KVM_CPUID_ENTRY2_DTYPE
from .errors import CpuidError, UnsupportedError

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
KVM_MAX_CPUID_ENTRIES = 256


@dataclass(frozen=True)
class FeatureBit:
    leaf: int
    subleaf: int
    register: str  # "eax", "ebx", "ecx" or "edx"
    bit: int


def _bits(leaf: int, register: str, names: dict[int, str], subleaf: int = 0) -> dict[str, FeatureBit]:
    return {name: FeatureBit(leaf, subleaf, register, bit) for bit, name in names.items()}


FEATURES: dict[str, FeatureBit] = {
    **_bits(1, "ecx", {
        0: "sse3", 1: "pclmulqdq", 2: "dtes64", 3: "monitor", 4: "ds_cpl", 5: "vmx", 6: "smx",
        7: "est", 8: "tm2", 9: "ssse3", 10: "cid", 11: "sdbg", 12: "fma", 13: "cx16", 14: "xtpr",
        15: "pdcm", 17: "pcid", 18: "dca", 19: "sse4_1", 20: "sse4_2", 21: "x2apic", 22: "movbe",
        23: "popcnt", 24: "tsc_deadline", 25: "aes", 26: "xsave", 27: "osxsave", 28: "avx",
        29: "f16c", 30: "rdrand", 31: "hypervisor",
    }),
    **_bits(1, "edx", {
        0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce", 8: "cx8",
        9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov", 16: "pat", 17: "pse36",
        19: "clflush", 21: "ds", 22: "acpi", 23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2",
        27: "ss", 28: "ht", 29: "tm", 31: "pbe",
    }),
    **_bits(7, "ebx", {
        0: "fsgsbase", 1: "tsc_adjust", 2: "sgx", 3: "bmi1", 4: "hle", 5: "avx2", 7: "smep",
        8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm", 14: "mpx", 16: "avx512f", 17: "avx512dq",
        18: "rdseed", 19: "adx", 20: "smap", 21: "avx512ifma", 23: "clflushopt", 24: "clwb",
        25: "intel_pt", 26: "avx512pf", 27: "avx512er", 28: "avx512cd", 29: "sha_ni",
        30: "avx512bw", 31: "avx512vl",
    }),
    **_bits(7, "ecx", {
        1: "avx512vbmi", 2: "umip", 3: "pku", 4: "ospke", 5: "waitpkg", 6: "avx512_vbmi2",
        7: "shstk", 8: "gfni", 9: "vaes", 10: "vpclmulqdq", 11: "avx512_vnni", 12: "avx512_bitalg",
        14: "avx512_vpopcntdq", 16: "la57", 22: "rdpid", 25: "cldemote", 27: "movdiri",
        28: "movdir64b", 29: "enqcmd", 30: "sgx_lc",
    }),
    **_bits(7, "edx", {
        2: "avx512_4vnniw", 3: "avx512_4fmaps", 4: "fsrm", 8: "avx512_vp2intersect", 10: "md_clear",
        14: "serialize", 15: "hybrid_cpu", 16: "tsxldtrk", 18: "pconfig", 20: "ibt",
        22: "amx_bf16", 23: "avx512_fp16", 24: "amx_tile", 25: "amx_int8", 26: "spec_ctrl",
        27: "intel_stibp", 28: "flush_l1d", 29: "arch_capabilities", 31: "ssbd",
    }),
    **_bits(0x80000001, "ecx", {
        0: "lahf_lm", 1: "cmp_legacy", 2: "svm", 3: "extapic", 4: "cr8_legacy", 5: "abm",
        6: "sse4a", 7: "misalignsse", 8: "prefetchw", 9: "osvw", 10: "ibs", 11: "xop",
        12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid_msr", 21: "tbm",
        22: "topoext", 23: "perfctr_core", 24: "perfctr_nb", 26: "bpext", 27: "ptsc",
        28: "perfctr_llc", 29: "mwaitx",
    }),
    **_bits(0x80000001, "edx", {
        11: "syscall", 20: "nx", 22: "mmxext", 25: "fxsr_opt", 26: "pdpe1gb", 27: "rdtscp",
        29: "lm",
    }),
}
# Mirrors KVM keeps in step with CR4.OSXSAVE, CR4.PKE and IA32_APIC_BASE.EN.
DERIVED = frozenset({"osxsave", "ospke", "apic"})


def feature_bit(name: str) -> FeatureBit:
    try:
        return FEATURES[name]
    except KeyError:
        raise CpuidError(f"unknown CPUID feature {name!r}; known: {', '.join(sorted(FEATURES))}") from None


def _entry_index(entries: np.ndarray, bit: FeatureBit) -> int:
    """The row holding ``bit``'s leaf (subleaf 0 matches a leaf without significant index)."""
    for i, e in enumerate(entries):
        if int(e["function"]) != bit.leaf:
            continue
        if int(e["flags"]) & KVM_CPUID_FLAG_SIGNIFCANT_INDEX and int(e["index"]) != bit.subleaf:
            continue
        return i
    return -1


def features(entries: np.ndarray) -> set[str]:
    """The names of every feature bit set in a CPUID table."""
    out = set()
    for name, bit in FEATURES.items():
        i = _entry_index(entries, bit)
        if i >= 0 and int(entries[i][bit.register]) >> bit.bit & 1:
            out.add(name)
    return out


def with_features(entries: np.ndarray, **flags: bool) -> np.ndarray:
    """A copy of a CPUID table with the named feature bits set (True) or cleared (False)."""
    out = np.array(entries, KVM_CPUID_ENTRY2_DTYPE, copy=True)
    for name, on in flags.items():
        bit = feature_bit(name)
        if name in DERIVED:
            raise CpuidError(f"{name} mirrors vCPU state KVM maintains (CR4 or APIC_BASE): set that instead")
        i = _entry_index(out, bit)
        if i < 0:
            if not on:
                continue  # an absent leaf already reads as zeros
            raise CpuidError(f"the vCPU's CPUID has no leaf {bit.leaf:#x}.{bit.subleaf} for {name!r}")
        value = int(out[i][bit.register])
        out[i][bit.register] = value | 1 << bit.bit if on else value & ~(1 << bit.bit)
    return out


def get_cpuid(vcpu) -> np.ndarray:
    """The vCPU's CPUID table as KVM holds it (KVM_GET_CPUID2)."""
    vcpu._check_access("get_cpuid")
    size = KVM_MAX_CPUID_ENTRIES
    while True:
        entries = np.zeros(size, KVM_CPUID_ENTRY2_DTYPE)
        rc = _t.lib.hvt_vcpu_get_cpuid(vcpu.fd, _t.ptr(entries), size)
        if rc == -errno.E2BIG and size < 16 * KVM_MAX_CPUID_ENTRIES:
            size *= 2
            continue
        n = vcpu._call(rc, "KVM_GET_CPUID2")
        return entries[:n].copy()


def set_features(vcpu, **flags: bool) -> None:
    """Change named feature bits of the vCPU's CPUID; UnsupportedError names those KVM did
    not take (the others are set)."""
    vcpu.set_cpuid(with_features(get_cpuid(vcpu), **flags))
    now = features(get_cpuid(vcpu))
    refused = sorted(n for n, on in flags.items() if (n in now) != bool(on))
    if refused:
        raise UnsupportedError(
            "changing CPUID " + ", ".join(refused), vcpu.vm.kvm.flavour,
            "KVM kept its own value for " + ", ".join(f"{n}={n in now}" for n in refused)
            + " (the other bits were changed)")

