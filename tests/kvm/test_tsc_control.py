"""TSC frequency and offset control, and what ``Kvm.info()`` says the host can do.

The expectations for PVM are measured (Nov 2026 hosts): no KVM_CAP_TSC_CONTROL, and a TSC
offset that KVM accepts but reads back as 0 and does not apply.
"""

from __future__ import annotations

import pytest

from hvjit.abi import Cap
from hvjit.errors import UnsupportedError

from .guests import load

OFFSET = 1 << 60


def test_host_controls_are_reported():
    from hvjit.system import Kvm

    kvm = Kvm.instance()
    controls = kvm.info()["vcpu_controls"]
    assert set(controls) == {"nmi", "exception_payload", "triple_fault_event", "tsc_khz", "tsc_offset", "msr_filter"}
    assert controls["tsc_khz"] == kvm.has(Cap.TSC_CONTROL)
    assert controls["tsc_offset"] in ("applied", "ignored", "absent")
    if kvm.flavour == "pvm":
        assert controls == {"nmi": True, "exception_payload": True, "triple_fault_event": True, "tsc_khz": False,
                            "tsc_offset": "ignored", "msr_filter": True}


def test_set_tsc_khz(session):
    vm = session.create_vm("tsckhz", memory=2 << 20)
    v = vm.vcpu(0)
    khz = v.tsc_khz()
    if not vm.kvm.has(Cap.TSC_CONTROL):
        with pytest.raises(UnsupportedError, match=f"TSC_CONTROL.*{vm.kvm.flavour}") as e:
            v.set_tsc_khz(khz // 2)
        assert e.value.flavour == vm.kvm.flavour and isinstance(e.value, NotImplementedError)
    else:
        v.set_tsc_khz(khz // 2)
        assert abs(v.tsc_khz() - khz // 2) <= 1


def test_tsc_offset(session):
    vm = session.create_vm("tscoff", memory=2 << 20)
    load(vm, ".code64\n rdtsc\n shl $32, %rdx\n or %rdx, %rax\n mov %rax, 0x7000\n mov $1, %eax\n outl %eax, $0xf4\n",
         "long", 0)
    v = vm.vcpu(0)
    state = vm.kvm.vcpu_controls["tsc_offset"]
    if state == "applied":
        v.set_tsc_offset(OFFSET)
        assert v.get_tsc_offset() == OFFSET
        assert v.get_msr(0x10) >= OFFSET
        assert vm.run(timeout=20).code == 1 and vm.memory.read_u64(0x7000) >= OFFSET
        return
    with pytest.raises(UnsupportedError, match="KVM_VCPU_TSC_OFFSET"):
        v.set_tsc_offset(OFFSET)
    assert v.get_msr(0x10) < OFFSET  # the guest's TSC did not move
    if state == "ignored":
        assert v.get_tsc_offset() == 0
    assert vm.run(timeout=20).code == 1 and vm.memory.read_u64(0x7000) < OFFSET
