"""CPUID by feature name on a vCPU, checked against what guest code reads with ``cpuid``.

At CPL0 ``cpuid`` is intercepted on every flavour and answers from KVM's table
(``vcpu.get_cpuid()``). At CPL3 PVM does not intercept it: the guest reads the host's CPUID.
"""

from __future__ import annotations

import pytest

from hvjit.cpuid import FEATURES
from hvjit.errors import CpuidError, UnsupportedError

from .guests import load

OUT = 0x7000
# (leaf, subleaf) pairs the guest reads; each stores eax, ebx, ecx, edx at OUT + 16*i.
LEAVES = [(1, 0), (7, 0), (0x80000001, 0)]
GUEST = ".code64\n" + "".join(
    f" mov ${leaf:#x}, %eax\n mov ${sub}, %ecx\n cpuid\n"
    f" mov %eax, {OUT + 16 * i}\n mov %ebx, {OUT + 16 * i + 4}\n mov %ecx, {OUT + 16 * i + 8}\n mov %edx, {OUT + 16 * i + 12}\n"
    for i, (leaf, sub) in enumerate(LEAVES)) + " mov $0x55, %eax\n outl %eax, $0xf4\n"


def run_guest(vm) -> dict[tuple[int, str], int]:
    ex = vm.run(timeout=20)
    assert ex.code == 0x55, ex
    return {(leaf, reg): vm.memory.read_u32(OUT + 16 * i + 4 * j)
            for i, (leaf, _) in enumerate(LEAVES) for j, reg in enumerate(("eax", "ebx", "ecx", "edx"))}


def guest_features(seen: dict[tuple[int, str], int]) -> set[str]:
    return {n for n, f in FEATURES.items() if seen[(f.leaf, f.register)] >> f.bit & 1}


def host_features() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_cpl0_cpuid_reads_the_table_get_cpuid_returns(session):
    vm = session.create_vm("cpuid0", memory=2 << 20)
    load(vm, GUEST, "long", 0)
    v = vm.vcpu(0)
    v.set_cpuid_features(hypervisor=False)
    names = v.cpuid_features()
    assert "hypervisor" not in names and "lm" in names
    seen = run_guest(vm)
    assert guest_features(seen) == v.cpuid_features()
    for leaf, _ in LEAVES:  # leaf 1's EBX holds the APIC ID and CLFLUSH size: not compared
        row = next(e for e in v.get_cpuid() if e["function"] == leaf and e["index"] == 0)
        regs = ("ecx", "edx") if leaf == 1 else ("ebx", "ecx", "edx")
        assert [seen[(leaf, r)] for r in regs] == [int(row[r]) for r in regs], hex(leaf)

def test_cpl3_cpuid_is_intercepted_except_on_pvm(session):
    vm = session.create_vm("cpuid3", memory=2 << 20)
    load(vm, GUEST, "long", 3)
    vm.vcpu(0).set_cpuid_features(hypervisor=False)
    seen = guest_features(run_guest(vm))
    if vm.kvm.flavour == "pvm":  # not intercepted: the host's own CPUID
        assert ("hypervisor" in seen) == ("hypervisor" in host_features())
    else:
        assert "hypervisor" not in seen


def test_a_feature_kvm_keeps_is_an_unsupported_error_on_pvm(session):
    vm = session.create_vm("cpuid-sse2", memory=2 << 20)
    v = vm.vcpu(0)
    if vm.kvm.flavour == "pvm":  # measured: PVM keeps the host's bits for natively run features
        with pytest.raises(UnsupportedError, match="sse2") as e:
            v.set_cpuid_features(sse2=False, hypervisor=False)
        assert e.value.flavour == "pvm"
        assert "sse2" in v.cpuid_features() and "hypervisor" not in v.cpuid_features()
    else:
        v.set_cpuid_features(sse2=False)
        assert "sse2" not in v.cpuid_features()


def test_unknown_feature_names_are_typed_errors(session):
    vm = session.create_vm("cpuid-bad", memory=2 << 20)
    before = vm.vcpu(0).get_cpuid()
    with pytest.raises(CpuidError, match="no_such_feature"):
        vm.vcpu(0).set_cpuid_features(avx=False, no_such_feature=True)
    assert (vm.vcpu(0).get_cpuid() == before).all()
