"""KVM's dirty ring as hvjit reads it (hvjit.dirty): enabled where the host has one, a full
ring handled mid-run without losing a page, and a VM's choice checked before KVM sees it."""

import numpy as np
import pytest

from hvjit import dirty, entry
from hvjit.asm import assemble
from hvjit.benchmarks.reset import BUFFER_GPA as BUFFER
from hvjit.benchmarks.reset import CODE_GPA as CODE
from hvjit.benchmarks.reset import WRITER  # a CPL3 guest: one byte into each of `pages` pages
from hvjit.system import Kvm

# Entries of a small ring: KVM keeps 64 of them in reserve, 576 where the CPU logs writes
# itself (Intel's PML), and refuses a ring without room beyond that.
SMALL = 1024


@pytest.fixture(autouse=True)
def _needs_a_ring():
    if not dirty.ring_capability(Kvm.instance())[0]:
        pytest.skip("the host has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")


def _writer(session, name, pages, memory=4 << 20, **kwargs):
    vm = session.create_vm(name, memory=memory, **kwargs)
    vm.memory.write(CODE, assemble(WRITER.format(buffer=BUFFER, pages=pages), CODE))
    entry.setup_long_mode(vm.vcpu(0), CODE, cpl=3)
    return vm


def test_rings_are_the_default_and_zero_keeps_the_bitmap(session):
    ring = _writer(session, "ring", 1)
    bitmap = _writer(session, "bitmap", 1, dirty_ring=0)
    ring.snapshot(), bitmap.snapshot()
    assert ring._dirty.rings is not None and ring._dirty.rings.entries == dirty.ring_entries(Kvm.instance(), None)
    assert bitmap._dirty.rings is None and bitmap._rings is None


def test_a_full_ring_stops_the_vcpu_and_loses_no_page(session):
    pages = 1500  # well past what a 1024-entry ring holds before it is full
    vm = _writer(session, "full", pages, memory=8 << 20, dirty_ring=SMALL)
    snap = vm.snapshot()
    before = vm.memory.read(BUFFER, pages * 4096)
    for _ in range(3):
        assert vm.run(timeout=30).reason == "poweroff"
        written = np.frombuffer(vm.memory.read(BUFFER, pages * 4096), np.uint8).reshape(pages, 4096)
        assert (written[:, 0] == 1).all()
        stats = vm.reset_to(snap, privileged=False)
        assert stats.pages >= pages  # every page the guest wrote came back
        assert vm.memory.read(BUFFER, pages * 4096) == before
    assert vm._rings.full_exits >= 2  # the first run fills it twice over
    assert vm._rings.stray_entries == 0


@pytest.mark.parametrize("entries", [100, 128, 1 << 30])
def test_a_ring_size_kvm_would_refuse_is_a_value_error(session, entries):
    with pytest.raises(ValueError, match="power of two"):
        session.create_vm(f"bad{entries}", memory=1 << 20, dirty_ring=entries)
    assert not any(vm.name == f"bad{entries}" for vm in session.vms)


def test_a_new_tracker_sees_writes_to_pages_the_old_one_had_read(session):
    # Pages a tracker read from the ring stay writable until the rings are reset; a tracker
    # made after the memory layout changed must protect them again, or the guest's next
    # write to them would not show and a reset would leave it.
    vm = _writer(session, "retrack", 4)
    first = vm.snapshot()
    assert vm.run(timeout=30).reason == "poweroff"
    vm.reset_to(first, privileged=False)  # the ring was read: the 4 pages stay writable
    vm.add_memory(64 << 20, 1 << 20)  # a new layout: the next snapshot makes a new tracker
    second = vm.snapshot()
    assert vm._dirty.rings is not None and vm._dirty.base is second
    assert vm.run(timeout=30).reason == "poweroff"
    assert vm.memory.read(BUFFER, 1) == b"\1"
    stats = vm.reset_to(second, privileged=False)
    assert not stats.full and stats.pages >= 4
    assert vm.memory.read(BUFFER, 4 * 4096) == bytes(4 * 4096)


def test_destroy_while_vcpus_drain_full_rings(session):
    # Two vCPUs keep filling small rings (each full ring is read in Python on its vCPU's
    # thread) while another thread destroys the VM: a ring leaves the harvest's record before
    # it is unmapped, so every trial ends with a stop, never a crash.
    import threading
    import time

    forever = WRITER.replace("    xor %eax, %eax\n    outl %eax, $0xf4\n", "    jmp 0b\n").replace(
        "    mov ${buffer}, %rdi", "0:  mov ${buffer}, %rdi")
    for trial in range(6):
        vm = session.create_vm(f"drain{trial}", memory=16 << 20, vcpus=2, dirty_ring=SMALL)
        # Both write the same 3000 pages: however the first writes split between the two
        # rings, one gets more than a full ring's worth.
        vm.memory.write(CODE, assemble(forever.format(buffer=BUFFER, pages=3000), CODE))
        for v in vm.vcpus:
            entry.setup_long_mode(v, CODE, cpl=3)
        vm.snapshot()  # the slots log from here on
        outcome: list = []
        runner = threading.Thread(target=lambda vm=vm, out=outcome: out.append(vm.run(timeout=20)))
        runner.start()
        deadline = time.monotonic() + 10
        while vm._rings.full_exits == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert vm._rings.full_exits >= 1, (outcome, runner.is_alive())  # the rings fill and get drained
        time.sleep(0.01 * trial)  # then at different points of the next drains
        vm.destroy()
        runner.join(20)
        assert not runner.is_alive() and [r.reason for r in outcome] == ["bogus"], outcome
