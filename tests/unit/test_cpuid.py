"""CPUID feature bits by name, on tables built here (no KVM)."""

import numpy as np
import pytest

from hvjit.abi import KVM_CPUID_ENTRY2_DTYPE
from hvjit.cpuid import FEATURES, features, with_features
from hvjit.errors import CpuidError


def table(*rows):
    t = np.zeros(len(rows), KVM_CPUID_ENTRY2_DTYPE)
    for i, (fn, index, flags, regs) in enumerate(rows):
        t[i]["function"], t[i]["index"], t[i]["flags"] = fn, index, flags
        for r, v in regs.items():
            t[i][r] = v
    return t


# A Skylake-like table: leaf 7 has a significant index, so subleaf 1 must not be read as 0.
TABLE = table(
    (1, 0, 0, {"ecx": 1 << 0 | 1 << 22 | 1 << 31, "edx": 1 << 25 | 1 << 26}),
    (7, 1, 1, {"ebx": 0xFFFFFFFF, "ecx": 0xFFFFFFFF}),
    (7, 0, 1, {"ebx": 1 << 7 | 1 << 16, "ecx": 1 << 16}),
    (0x80000001, 0, 0, {"edx": 1 << 29 | 1 << 20}),
)


def test_features_by_name():
    assert features(TABLE) == {"sse3", "movbe", "hypervisor", "sse", "sse2", "smep", "avx512f", "la57", "lm", "nx"}


def test_the_table_has_the_common_names_at_the_sdm_positions():
    expect = {"sse": (1, "edx", 25), "avx": (1, "ecx", 28), "avx512f": (7, "ebx", 16), "smap": (7, "ebx", 20),
              "la57": (7, "ecx", 16), "rdpid": (7, "ecx", 22), "rdtscp": (0x80000001, "edx", 27),
              "popcnt": (1, "ecx", 23), "x2apic": (1, "ecx", 21), "invpcid": (7, "ebx", 10),
              "tsc_deadline": (1, "ecx", 24), "xsave": (1, "ecx", 26), "aes": (1, "ecx", 25)}
    for name, (leaf, reg, bit) in expect.items():
        f = FEATURES[name]
        assert (f.leaf, f.register, f.bit) == (leaf, reg, bit), name
    positions = [(f.leaf, f.subleaf, f.register, f.bit) for f in FEATURES.values()]
    assert len(positions) == len(set(positions))


def test_with_features_sets_and_clears_only_the_named_bits():
    out = with_features(TABLE, avx=True, sse2=False, smap=True, la57=False)
    assert features(out) == features(TABLE) - {"sse2", "la57"} | {"avx", "smap"}
    assert out[1]["ebx"] == 0xFFFFFFFF  # subleaf 1 untouched
    assert features(TABLE) == {"sse3", "movbe", "hypervisor", "sse", "sse2", "smep", "avx512f", "la57", "lm", "nx"}


def test_unknown_and_derived_names_are_typed_errors():
    with pytest.raises(CpuidError, match="unknown CPUID feature 'avx9'"):
        with_features(TABLE, avx9=True)
    with pytest.raises(CpuidError, match="CR4"):
        with_features(TABLE, osxsave=True)


def test_a_missing_leaf_can_be_cleared_but_not_set():
    no_ext = TABLE[:3]
    assert features(with_features(no_ext, lm=False)) == features(no_ext)
    with pytest.raises(CpuidError, match="0x80000001"):
        with_features(no_ext, lm=True)
