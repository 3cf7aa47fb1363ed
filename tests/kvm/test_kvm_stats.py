"""KVM's own per-vCPU counters (KVM_GET_STATS_FD), read through hvjit."""

import os

import pytest

from hvjit.abi import Cap

from .guests import load

PORT_LOOP = """
.code64
    mov $500, %ecx
1:  outb %al, $0x80
    dec %ecx
    jnz 1b
    mov $3, %eax
    outl %eax, $0xf4
"""


def test_kvm_counts_what_the_guest_did(session):
    vm = session.create_vm("stats", memory=2 << 20)
    if not vm.kvm.has(Cap.BINARY_STATS_FD):
        assert vm.vcpu(0).kvm_stats() == {} and vm.vcpu(0).kvm_stat("exits") is None
        pytest.skip("this KVM has no binary statistics")
    load(vm, PORT_LOOP, "long", 0)
    v = vm.vcpu(0)
    before = v.kvm_stats()
    assert before["io_exits"] == 0 and "insn_emulation" in before
    assert vm.run(timeout=10).code == 3
    after = v.kvm_stats()
    assert after["exits"] >= 501  # one per port write, one for the exit port
    assert v.kvm_stat("exits") == after["exits"]
    assert v.kvm_stat("no_such_counter") is None
    if vm.kvm.flavour == "pvm":
        # CPL0 runs in KVM's emulator there: 3 instructions per round. (PVM does not keep
        # io_exits; elsewhere it counts the port writes.)
        assert after["insn_emulation"] >= 3 * 500
    else:
        assert after["io_exits"] >= 501


def test_the_stats_fd_is_closed_with_the_vcpu(session):
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        vm = session.create_vm(f"stats-fd{i}", memory=2 << 20)
        vm.vcpu(0).kvm_stats()
        vm.destroy()
    assert len(os.listdir("/proc/self/fd")) <= fds
