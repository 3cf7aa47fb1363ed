"""The MSR name table, range parsing, IDT gates and the table printer (no KVM needed)."""

import pytest

from hvjit.errors import HvjitError
from hvjit.msr import (
    DEFAULT_EXTRA_MSRS,
    MSR_NAMES,
    _idt_gate,
    format_table,
    msr_name,
    parse_range,
)


@pytest.mark.parametrize("index,name", [
    (0x10, "TSC"), (0x1B, "APIC_BASE"), (0x3A, "FEATURE_CONTROL"), (0x48, "SPEC_CTRL"),
    (0x49, "PRED_CMD"), (0xCE, "PLATFORM_INFO"), (0xFE, "MTRRCAP"), (0x10A, "ARCH_CAPABILITIES"),
    (0x174, "SYSENTER_CS"), (0x175, "SYSENTER_ESP"), (0x176, "SYSENTER_EIP"),
    (0x179, "MCG_CAP"), (0x17A, "MCG_STATUS"), (0x1A0, "MISC_ENABLE"), (0x277, "PAT"),
    (0x2FF, "MTRR_DEF_TYPE"), (0xC0000080, "EFER"), (0xC0000081, "STAR"), (0xC0000082, "LSTAR"),
    (0xC0000083, "CSTAR"), (0xC0000084, "SFMASK"), (0xC0000100, "FS_BASE"),
    (0xC0000101, "GS_BASE"), (0xC0000102, "KERNEL_GS_BASE"), (0xC0000103, "TSC_AUX"),
    (0xC0010015, "AMD_HWCR"), (0xC0010114, "AMD_VM_CR"),
])
def test_well_known_names(index, name):
    assert msr_name(index) == name


def test_patterned_names():
    assert msr_name(0x200) == "MTRR_PHYSBASE0" and msr_name(0x20F) == "MTRR_PHYSMASK7"
    assert msr_name(0x269) == "MTRR_FIX4K_C8000" and msr_name(0x26F) == "MTRR_FIX4K_F8000"
    assert msr_name(0x401) == "MC0_STATUS" and msr_name(0x40E) == "MC3_ADDR"
    assert msr_name(0x281) == "MC1_CTL2"
    assert msr_name(0x481) == "VMX_PINBASED_CTLS" and msr_name(0x491) == "VMX_VMFUNC"
    assert msr_name(0xC2) == "PMC1" and msr_name(0xC0010005) == "AMD_PERF_CTR1"
    assert msr_name(0xDEADBEEF) is None


def test_table_is_consistent():
    assert len(MSR_NAMES) >= 40
    assert len(set(MSR_NAMES.values())) == len(MSR_NAMES)
    assert all(0 <= i < 1 << 32 for i in MSR_NAMES)
    assert all(msr_name(i) for i in DEFAULT_EXTRA_MSRS)


@pytest.mark.parametrize("text,expected", [
    ("0x10-0x12", (0x10, 0x12)), ("10-12", (0x10, 0x12)), ("c0000080-C0000084", (0xC0000080, 0xC0000084)),
    ("0x3a", (0x3A, 0x3A)), (" 0-ffffffff ", (0, 0xFFFFFFFF)),
])
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["", "x", "12-10", "0-1-2", "0-100000000", "-5"])
def test_parse_range_rejects(text):
    with pytest.raises(HvjitError):
        parse_range(text)


def test_idt_gate_layout():
    gate = _idt_gate(0x1234_5678_9ABC_DEF0, 0x08)
    assert len(gate) == 16
    assert gate[0:2] == bytes.fromhex("f0de")  # offset 15:0
    assert gate[2:4] == bytes.fromhex("0800")  # selector
    assert gate[4] == 0 and gate[5] == 0x8E  # IST 0; P, DPL0, 64-bit interrupt gate
    assert gate[6:8] == bytes.fromhex("bc9a")  # offset 31:16
    assert gate[8:12] == bytes.fromhex("78563412")  # offset 63:32
    assert gate[12:16] == bytes(4)


def test_format_table():
    doc = {
        "host": {"flavour": "vmx", "cpu": "Some CPU", "msr_device": False,
                 "host_probe": "absent: /dev/cpu/0/msr is absent: no driver"},
        "guest": {"runs": 3, "seconds": 0.01},
        "msrs": [
            {"index": 0xC0000080, "name": "EFER", "kvm_value": 0x500, "guest_value": 0x500,
             "guest_fault": None, "writable_mask": 0x801, "feature_value": None},
            {"index": 0xDEADBEEF, "name": None, "kvm_value": None, "guest_value": None,
             "guest_fault": "#GP", "writable_mask": None, "feature_value": None},
        ],
    }
    text = format_table(doc)
    assert "EFER" in text and "0000000000000801" in text
    assert "0xdeadbeef" in text and "refused" in text and "#GP" in text
    assert "2 MSRs: 1 fault in the guest, 1 refused by KVM_GET_MSRS" in text
    assert "host MSRs: absent: /dev/cpu/0/msr is absent" in text
