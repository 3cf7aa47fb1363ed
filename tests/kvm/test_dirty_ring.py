"""KVM's dirty ring as hvjit reads it (hvjit.dirty): enabled where the host has one, a full
ring handled mid-run without losing a page, and a VM's choice checked before KVM sees it."""

import numpy as np
import pytest

from hvjit import dirty, entry
from hvjit.asm import assemble
from hvjit.system import Kvm

CODE = 0x1000
BUFFER = 0x100000
SMALLEST = 256  # entries: one page of ring; KVM keeps 64 of them (more with PML) in reserve

WRITER = """
.code64
    mov ${buffer}, %rdi
    mov ${pages}, %ecx
1:  incb (%rdi)
    add $4096, %rdi
    dec %ecx
    jnz 1b
    xor %eax, %eax
    outl %eax, $0xf4
"""


@pytest.fixture(autouse=True)
def _needs_a_ring():
    if not dirty.ring_capability(Kvm.instance())[0]:
        pytest.skip("the host has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")


def _writer(session, name, pages, **kwargs):
    vm = session.create_vm(name, memory=4 << 20, **kwargs)
    vm.memory.write(CODE, assemble(WRITER.format(buffer=BUFFER, pages=pages), CODE))
    entry.setup_long_mode(vm.vcpu(0), CODE, cpl=3)
    return vm


def test_rings_are_the_default_and_zero_keeps_the_bitmap(session):
    ring = _writer(session, "ring", 1)
    bitmap = _writer(session, "bitmap", 1, dirty_ring=0)
    ring.snapshot(), bitmap.snapshot()
    assert ring._dirty.rings is not None and ring._dirty.rings.entries == dirty.DEFAULT_RING_ENTRIES
    assert bitmap._dirty.rings is None and bitmap._rings is None


def test_a_full_ring_stops_the_vcpu_and_loses_no_page(session):
    pages = 600  # well past what a 256-entry ring holds before it is full
    vm = _writer(session, "full", pages, dirty_ring=SMALLEST)
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
