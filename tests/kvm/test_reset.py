"""Fast reset (``vm.reset_to``): its fast paths restore exactly what a whole restore would —
FPU/SSE, SREGS and MSR state a run changed, several vCPUs, device rows the guest or the host
wrote — and take the cheap route (KVM_SET_REGS alone, untouched devices left) only when it
is sound."""

import functools

import numpy as np
import pytest

from hvjit import dirty, entry, reset
from hvjit.asm import assemble
from hvjit.errors import HvjitError
from hvjit.system import Kvm

from .test_snapshot import assert_same_state

CODE = 0x1000
DATA = 0x40000
KERNEL_GS_BASE = 0xC0000102
SYSENTER_ESP = 0x175

# CPL3: new x87, SSE and MXCSR state and a page written, then power off.
USER_CHANGES = f"""
.code64
    mov ${DATA:#x}, %rdi
    incq (%rdi)
    mov $0x1234567890, %rax
    movq %rax, %xmm0
    pshufd $0, %xmm0, %xmm7
    fld1
    fldpi
    movl $0x1f00, 8(%rdi)
    ldmxcsr 8(%rdi)
    xor %eax, %eax
    outl %eax, $0xf4
"""

# CPL0 (KVM's emulator on PVM hosts: kept short): an MSR write and null data segments (a
# PVM host does not show CPL3 segment loads in KVM_GET_SREGS), then power off.
KERNEL_CHANGES = f"""
.code64
    mov ${KERNEL_GS_BASE:#x}, %ecx
    mov $0x5678, %eax
    mov $0x1, %edx
    wrmsr
    xor %eax, %eax
    mov %ax, %ds
    mov %ax, %es
    outl %eax, $0xf4
"""

# Each vCPU bumps its own counter page (rbx) and xmm1; the one with rsi set powers off once
# the counter at rsi (the other vCPU's) reached 1000.
SPIN = """
.code64
    mov %rbx, %rdi
1:  incq (%rdi)
    movq (%rdi), %xmm1
    test %rsi, %rsi
    jz 1b
    cmpq $1000, (%rsi)
    jb 1b
    xor %eax, %eax
    outl %eax, $0xf4
"""


@pytest.fixture(params=["ring", "bitmap"])
def tracking(request):
    """Each test with either of KVM's ways to report the guest's writes (hvjit.dirty): the
    dirty ring, where the host has one, and the dirty bitmap. The VM's ``dirty_ring``."""
    if request.param == "ring" and not dirty.ring_capability(Kvm.instance())[0]:
        pytest.skip("the host has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
    return None if request.param == "ring" else 0


@pytest.fixture
def session(session, tracking):
    """The session, its VMs made with the test's way of tracking writes."""
    create = session.create_vm
    session.create_vm = functools.partial(create, dirty_ring=tracking)
    yield session
    session.create_vm = create


def _vm(session, name, code, cpl, vcpus=1):
    vm = session.create_vm(name, memory=1 << 20, vcpus=vcpus)
    vm.memory.write(CODE, assemble(code, CODE))
    entry.setup_long_mode(vm.vcpu(0), CODE, cpl=cpl)
    return vm


def _finished_exit(vm, stats, privileged: bool) -> bool:
    """The vCPU's OUT exit was finished by a KVM_RUN, or (CPL3-only, on a host that finishes
    OUTs at the exit) needed none."""
    if not privileged and reset.out_exit_settled(vm):
        return (stats.completed_exits, stats.settled_exits) == (0, 1)
    return (stats.completed_exits, stats.settled_exits) == (1, 0)


def _fpu(vcpu) -> bytes:
    return vcpu.get_xsave()[:512].tobytes()  # x87, MXCSR and the XMM registers


@pytest.mark.parametrize("privileged", [True, False])
def test_reset_restores_the_fpu_a_cpl3_run_changed(session, privileged):
    vm = _vm(session, f"user{privileged}", USER_CHANGES, 3)
    v = vm.vcpu(0)
    snap = vm.snapshot()
    sregs, fpu = v.get_sregs().tobytes(), _fpu(v)
    for _ in range(3):
        assert vm.run(timeout=30).reason == "poweroff"
        assert _fpu(v) != fpu and vm.memory.read_u64(DATA) == 1  # the run changed them
        stats = vm.reset_to(snap, privileged=privileged)
        assert stats.pages >= 1 and not stats.full
        assert _finished_exit(vm, stats, privileged)
        assert v.get_sregs().tobytes() == sregs and _fpu(v) == fpu
        assert vm.memory.read_u64(DATA) == 0
        assert_same_state(snap, vm.snapshot())


def test_reset_with_unchanged_sregs_leaves_the_registers_for_the_next_run(session):
    # mov $1, %al; the second entry point (CODE + 2) skips it: rax tells where the run began.
    vm = _vm(session, "regsonly", f".code64\n mov $1, %al\n mov ${DATA:#x}, %rdi\n incq (%rdi)\n"
                                  " outl %eax, $0xf4\n", 3)
    v = vm.vcpu(0)
    v.set_registers(rax=0)
    snap = vm.snapshot()
    first = vm.run(timeout=30)
    assert first.code == 1
    for _ in range(3):  # straight into the next run: the registers travel with its KVM_RUN
        stats = vm.reset_to(snap, privileged=False)
        assert stats.sregs_restored == 0 and _finished_exit(vm, stats, False) and stats.pages >= 1
        again = vm.run(timeout=30)
        assert (again.code, again.rip) == (1, first.rip) and vm.memory.read_u64(DATA) == 1
    vm.reset_to(snap, privileged=False)
    assert v.get_register("rip") == CODE and vm.memory.read_u64(DATA) == 0  # a read sees them
    assert_same_state(snap, vm.snapshot())
    vm.reset_to(snap, privileged=False)
    v.set_registers(rip=CODE + 2)  # a write after the reset wins over what the reset left
    assert vm.run(timeout=30).code == 0


@pytest.mark.parametrize("privileged", [True, False])
def test_reset_restores_sregs_and_msrs_a_cpl0_run_and_the_host_changed(session, privileged):
    vm = _vm(session, f"kernel{privileged}", KERNEL_CHANGES, 0)
    v = vm.vcpu(0)
    snap = vm.snapshot()
    sregs, msrs = v.get_sregs().tobytes(), v.get_msrs([KERNEL_GS_BASE, SYSENTER_ESP])
    for _ in range(2):
        assert vm.run(timeout=60).reason == "poweroff"
        v.set_msr(SYSENTER_ESP, 0xABCD000)
        assert v.get_sregs().tobytes() != sregs
        assert v.get_msrs([KERNEL_GS_BASE, SYSENTER_ESP]) == {KERNEL_GS_BASE: 0x100005678, SYSENTER_ESP: 0xABCD000}
        stats = vm.reset_to(snap, privileged=privileged)
        assert _finished_exit(vm, stats, privileged)
        # Compared and set through a second KVM_RUN, or (settled) sent with the next one
        assert stats.sregs_restored == 1 or stats.settled_exits == 1
        assert v.get_sregs().tobytes() == sregs
        if privileged:
            assert v.get_msrs([KERNEL_GS_BASE, SYSENTER_ESP]) == msrs
            assert_same_state(snap, vm.snapshot())
        else:  # CPL3 state only: the MSRs stay as they are
            assert v.get_msr(SYSENTER_ESP) == 0xABCD000


def test_two_vcpus_snapshot_and_reset(session):
    vm = _vm(session, "two", SPIN, 3, vcpus=2)
    for i, v in enumerate(vm.vcpus):
        if i:
            entry.setup_long_mode(v, CODE, cpl=3)
        v.set_registers(rbx=DATA + i * 0x1000, rsi=0 if i else DATA + 0x1000)
    snap = vm.snapshot()
    assert snap.vcpus == 2
    for _ in range(3):
        result = vm.run(timeout=30)
        assert result.reason == "poweroff" and result.vcpu == 0
        assert vm.memory.read_u64(DATA) > 0 and vm.memory.read_u64(DATA + 0x1000) >= 1000
        stats = vm.reset_to(snap)
        assert stats.pages >= 2 and not stats.full
        assert [v.get_register("rip") for v in vm.vcpus] == [CODE, CODE]
        assert [v.get_register("rbx") for v in vm.vcpus] == [DATA, DATA + 0x1000]
        assert vm.memory.read_u64(DATA) == 0 and vm.memory.read_u64(DATA + 0x1000) == 0
        assert_same_state(snap, vm.snapshot())
    # A snapshot of another VM has no link into this one's tree: every page once, then fast.
    twin = _vm(session, "twin", SPIN, 3, vcpus=2)
    assert twin.reset_to(snap).full and not twin.reset_to(snap).full
    assert_same_state(snap, twin.snapshot(), names_differ=True)


def test_device_rows_the_guest_or_the_host_changed_come_back(session):
    # pc-testdev's scratch port (0xe0) is native: the guest changes its state row.
    vm = _vm(session, "devices", ".code64\n mov $0xe0, %dx\n mov $0x77, %eax\n outl %eax, %dx\n"
                                 " xor %eax, %eax\n outl %eax, $0xf4\n", 3)
    snap = vm.snapshot()
    before = vm.testdev.scratch
    assert vm.run(timeout=30).reason == "poweroff" and vm.testdev.scratch == 0x77
    vm.reset_to(snap, privileged=False)
    assert vm.testdev.scratch == before
    # The host writes a device buffer (no guest access): the reset still puts it back.
    saved = vm.testdev.iomem[:16].copy()
    vm.testdev.iomem[:16] = 0xAB
    vm.reset_to(snap, privileged=False)
    assert np.array_equal(vm.testdev.iomem[:16], saved)
    assert_same_state(snap, vm.snapshot())


def test_a_cumulative_log_is_cleared_and_still_catches_writes(session, tracking):
    # The guest writes DATA always, and DATA + 0x1000 when the host set the flag at FLAG.
    flag, other = DATA + 0x2000, DATA + 0x1000
    vm = _vm(session, "manual", f".code64\n mov ${DATA:#x}, %rdi\n incq (%rdi)\n cmpb $0, {flag:#x}\n"
                                f" je 1f\n incq {other:#x}\n1: xor %eax, %eax\n outl %eax, $0xf4\n", 3)
    snap = vm.snapshot()
    tracker = dirty.tracker(vm)
    assert (tracker.rings is not None) == (tracking is None)
    if not tracker.cumulative:
        pytest.skip("the host lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (the bitmap is read and cleared)")
    counts = []
    for i in range(dirty.CLEAR_EVERY + 2):
        writes_other = i in (0, dirty.CLEAR_EVERY + 1)
        vm.memory.write(flag, bytes([writes_other]))
        assert vm.run(timeout=30).reason == "poweroff"
        assert vm.memory.read_u64(other) == int(writes_other)
        counts.append(vm.reset_to(snap, privileged=False).pages)
        assert vm.memory.read_u64(DATA) == vm.memory.read_u64(other) == 0 and vm.memory.read(flag, 1) == b"\0"
    # Written once, the page stays in the log (no write fault each run) until the clear after
    # CLEAR_EVERY resets; written again after it, it is logged and put back again.
    n = dirty.CLEAR_EVERY
    assert counts[1:n] == [counts[0]] * (n - 1) and counts[n] < counts[0]
    assert counts[n + 1] > counts[n]
    assert_same_state(snap, vm.snapshot())


def test_reset_after_a_reinit_uses_the_new_vcpus(session):
    # reinit closes the VM and vCPU fds and opens new ones (often the same numbers): the
    # records made for the old vCPUs must not be used again.
    vm = _vm(session, "reinit", USER_CHANGES, 3)
    snap = vm.snapshot()
    assert vm.run(timeout=30).reason == "poweroff"
    vm.reset_to(snap)
    vm.reinit()
    stats = vm.reset_to(snap)
    assert stats.full  # the new VM's dirty log knows nothing of the snapshot
    assert_same_state(snap, vm.snapshot())
    assert vm.run(timeout=30).reason == "poweroff" and vm.memory.read_u64(DATA) == 1
    assert not vm.reset_to(snap).full and vm.memory.read_u64(DATA) == 0


def test_out_exit_settled_is_probed_and_matches_the_host(session):
    vm = session.create_vm("probe-host", memory=1 << 20)
    settled = reset.out_exit_settled(vm)
    assert vm.kvm.behaviour["out_exit_settled"] is settled
    # KVM's instruction emulator (PVM) finishes an OUT before it reports it; VMX and SVM
    # skip the instruction on the next KVM_RUN if RIP still points at it (complete_fast_pio_out).
    if vm.kvm.flavour in ("pvm", "vmx", "svm"):
        assert settled == (vm.kvm.flavour == "pvm")


def test_reset_to_the_out_a_run_stopped_at_runs_that_out_again(session):
    # The snapshot's RIP is the OUT the run stops at: a completion left pending would skip it.
    vm = _vm(session, "same-out", ".code64\n outb %al, $0x10\n xor %eax, %eax\n outl %eax, $0xf4\n", 3)
    snap = vm.snapshot()
    for privileged in (False, True, False):
        first = vm.run(timeout=30)
        assert (first.reason, first.port) == ("inout", 0x10)
        vm.reset_to(snap, privileged=privileged)
    assert vm.vcpu(0).get_register("rip") == CODE
    again = vm.run(timeout=30)
    assert (again.reason, again.port) == ("inout", 0x10)


def test_reset_after_an_in_exit_finishes_it_first(session):
    # KVM writes an IN's value and RIP when it finishes it: never left for the next KVM_RUN.
    vm = _vm(session, "in-exit", ".code64\n mov $7, %eax\n inb $0x13, %al\n outl %eax, $0xf4\n", 3)
    v = vm.vcpu(0)
    v.set_registers(rax=0x1234)
    snap = vm.snapshot()
    for _ in range(3):
        stopped = vm.run(timeout=30)
        assert (stopped.reason, stopped.port) == ("inout", 0x13)
        stats = vm.reset_to(snap, privileged=False)
        assert (stats.completed_exits, stats.settled_exits) == (1, 0)
        assert v.get_registers("rip", "rax") == {"rip": CODE, "rax": 0x1234}
        assert_same_state(snap, vm.snapshot())


def test_python_side_device_fields_come_back_compared_only_after_a_change(session, monkeypatch):
    vm = _vm(session, "pyfields", ".code64\n xor %eax, %eax\n outl %eax, $0xf4\n", 3)
    fw_cfg = vm.fw_cfg
    snap = vm.snapshot()
    files = dict(fw_cfg.files)
    compared = []
    original = type(fw_cfg).snapshot_state
    monkeypatch.setattr(type(fw_cfg), "snapshot_state", lambda self: compared.append(self) or original(self))
    for _ in range(3):
        assert vm.run(timeout=30).reason == "poweroff"
        vm.reset_to(snap, privileged=False)
    assert len(compared) == 1  # the first reset with this plan; nothing moved after that
    counted = vm.bus.state_version
    fw_cfg.add_file("opt/test/extra", b"not in the snapshot")
    assert vm.bus.state_version > counted  # the one number a repeated reset looks at
    assert vm.run(timeout=30).reason == "poweroff"
    vm.reset_to(snap, privileged=False)
    assert len(compared) == 2 and fw_cfg.files == files
    assert_same_state(snap, vm.snapshot())
    vm.reset_to(snap, privileged=False)
    assert len(compared) == 3  # that one is vm.snapshot() reading it: the reset did not compare


def test_a_probe_that_cannot_run_keeps_the_completing_kvm_run():
    class NoVmHost:  # a host where the probe VM cannot be made
        capabilities = {"SYNC_REGS": 7}
        behaviour: dict = {}

    class Refused:
        kvm = NoVmHost()

        def __init__(self, *args, **kwargs):
            raise HvjitError("KVM_CREATE_VM: no more VMs here")

    assert reset.out_exit_settled(object.__new__(Refused)) is False
    assert NoVmHost.behaviour == {"out_exit_settled": False}  # asked once, remembered


def test_repeated_resets_take_the_short_way_and_restore_what_the_long_one_does(session):
    from hvjit import snapshot

    vm = _vm(session, "short", USER_CHANGES, 3)
    snap = vm.snapshot()
    took = []
    for i in range(8):
        privileged = bool(i % 2)
        assert vm.run(timeout=30).reason == "poweroff"
        took.append(vm._reset_ready[privileged] is not None)
        vm.memory.write(DATA + 0x800, b"host")  # hvjit's own write: the C call takes it back too
        stats = vm.reset_to(snap, privileged=privileged)
        assert stats.pages >= 1 and not stats.full
        assert_same_state(snap, snapshot.capture(vm))  # capture: the tracker and its base stay
    # Each kind's first reset makes its short way (the first privileged one also learns which
    # MSRs KVM refuses, so only its second may make it); every later reset takes it.
    assert not took[0] and took[4:] == [True] * 4


def test_a_reset_through_the_tree_drops_both_short_ways(session):
    # The slot records are shared by both kinds of reset: one pointed at the pages between two
    # snapshots (bitmaps that live only during that reset) must end the other kind's short way.
    vm = _vm(session, "tree", USER_CHANGES, 3)
    root = vm.snapshot()
    for privileged in (True, False, True, False):
        assert vm.run(timeout=30).reason == "poweroff"
        vm.reset_to(root, privileged=privileged)
    assert all(ready is not None for ready in vm._reset_ready)
    assert vm.run(timeout=30).reason == "poweroff"
    vm.snapshot()  # a child of root, its DATA at 1: the tracker's base now
    vm.reset_to(root, privileged=False)
    assert vm._reset_ready == [None, None]
    assert vm.run(timeout=30).reason == "poweroff"
    vm.reset_to(root, privileged=True)
    assert vm.memory.read_u64(DATA) == 0
    assert_same_state(root, vm.snapshot())


def test_a_reset_while_a_vcpu_runs_is_refused_on_the_short_way_too(session):
    import threading

    flag = DATA + 0x1000
    vm = _vm(session, "busy", f".code64\n cmpb $0, {flag:#x}\n je 2f\n1: jmp 1b\n2: xor %eax, %eax\n"
                              " outl %eax, $0xf4\n", 3)
    snap = vm.snapshot()
    for _ in range(2):
        assert vm.run(timeout=30).reason == "poweroff"
        vm.reset_to(snap, privileged=False)
    assert vm._reset_ready[False] is not None
    vm.memory.write(flag, b"\1")  # now the guest spins
    results = []
    runner = threading.Thread(target=lambda: results.append(vm.run(timeout=30)))
    runner.start()
    try:
        v = vm.vcpu(0)
        for _ in range(1000):
            if v._control.thread is not None:
                break
            threading.Event().wait(0.001)
        with pytest.raises(HvjitError, match="is running"):
            vm.reset_to(snap, privileged=False)
    finally:
        vm.vcpu(0).stop()
        runner.join(10)
    assert not runner.is_alive() and results[0].reason != "poweroff"
    vm.reset_to(snap, privileged=False)  # stopped: allowed again, and the flag goes back
    assert vm.memory.read(flag, 1) == b"\0"
    assert vm.run(timeout=30).reason == "poweroff"


def _hammer(vm, snap, operation: str, privileged: bool, outcomes: list) -> None:
    """Reset (or snapshot) ``vm`` until it is destroyed, noting how each call ended."""
    from hvjit.errors import ObjectDestroyedError

    try:
        while True:
            if operation == "reset":
                vm.reset_to(snap, privileged=privileged)
            else:
                vm.snapshot()
            outcomes.append("done")
    except ObjectDestroyedError:
        outcomes.append("destroyed")
    except HvjitError as e:  # anything else is a failure the test shows
        outcomes.append(repr(e))


@pytest.mark.parametrize("operation", ["reset", "snapshot"])
def test_destroy_from_another_thread_never_meets_a_reset_half_way(session, operation):
    # A reset writes through raw pointers into each vCPU's kvm_run page and dirty ring; a
    # destroy unmaps them. Each call must either finish or raise ObjectDestroyedError.
    import threading
    import time

    for trial in range(12):
        vm = _vm(session, f"race{operation}{trial}", USER_CHANGES, 3, vcpus=2)
        snap = vm.snapshot()
        outcomes: list = []
        worker = threading.Thread(target=_hammer, args=(vm, snap, operation, bool(trial % 2), outcomes))
        worker.start()
        time.sleep(0.001 * (trial % 4))
        vm.destroy()
        worker.join(10)
        assert not worker.is_alive()
        assert outcomes[-1] == "destroyed" and set(outcomes) <= {"done", "destroyed"}, outcomes[-3:]
