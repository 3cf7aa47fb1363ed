"""Snapshots: a guest restored in a fresh process goes on exactly; every field round-trips;
damaged files raise SnapshotError and leave nothing behind; resets through a snapshot tree."""

import json
import os
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from hvjit import entry
from hvjit.asm import assemble
from hvjit.emulation.xstate import XStateLayout
from hvjit.errors import SnapshotError
from hvjit.snapshot import Snapshot
from hvjit.system import Kvm
from hvjit.vm import Vm

CODE = 0x1000
COUNTER = 0x2000
STOP_PORT = 0x500
ITERATIONS = 200

# A CPL3 loop: bump a counter in memory, add it into xmm0 (FPU state must survive), print a
# hex digit of the sum on COM1; at iteration {stop} write STOP_PORT; power off with the sum.
GUEST = """
.code64
    lea counter(%rip), %rdi
1:  incq (%rdi)
    mov (%rdi), %rax
    movq %rax, %xmm1
    paddq %xmm1, %xmm0
    movq %xmm0, %rax
    and $15, %eax
    lea hex(%rip), %rsi
    movb (%rsi,%rax), %al
    mov $0x3f8, %dx
    outb %al, %dx
    cmpq ${stop}, (%rdi)
    jne 2f
    mov ${port}, %dx
    outb %al, %dx
2:  cmpq ${iterations}, (%rdi)
    jne 1b
    movq %xmm0, %rax
    and $0x7f, %eax
    outl %eax, $0xf4
hex: .ascii "0123456789abcdef"
.align 4096
counter: .quad 0
"""

# Fields whose values move with time between two reads: kvmclock, the TSC MSR, the PIT's
# load time and the LAPIC timer's current count.
TIME_MSRS = {0x10}


def make_vm(session, name="snap", stop=57, irqchip=False):
    vm = session.create_vm(name, memory=1 << 20, irqchip=irqchip)
    vm.memory.write(CODE, assemble(GUEST.format(stop=stop, port=STOP_PORT, iterations=ITERATIONS), CODE))
    entry.setup_long_mode(vm.vcpu(0), CODE, cpl=3)
    vm.add_port_handler(STOP_PORT, lambda *a: vm.vcpu(0).kick(), name="stop")
    return vm


X87_INIT_FCW = 0x037F


def _xsave_in_use(area: np.ndarray) -> np.ndarray:
    """A standard-format XSAVE image with every component its XSTATE_BV bit leaves out set
    to its initial value, and then the bits of those in their initial value cleared: a
    processor may report a component in use that holds its initial value (XINUSE may be 1;
    here a KVM_RUN between two reads sometimes set the SSE bit), and the guest sees the same
    registers either way."""
    out = area.copy()
    layout = XStateLayout(Kvm.instance().supported_cpuid())
    bv = int.from_bytes(out[512:520].tobytes(), "little")
    parts = {0: [(0, 2), (2, 4), (4, 24), (32, 160)], 1: [(160, 416)]}  # x87 (not MXCSR), XMM
    parts.update({i: [(offset, offset + size)] for i, (size, offset, _) in layout.components.items()
                  if offset + size <= len(out)})
    initial = np.zeros(len(out), np.uint8)
    initial[0:2] = np.frombuffer(X87_INIT_FCW.to_bytes(2, "little"), np.uint8)
    for i, ranges in parts.items():
        if not bv >> i & 1:
            for start, end in ranges:
                out[start:end] = initial[start:end]
        if all((out[start:end] == initial[start:end]).all() for start, end in ranges):
            bv &= ~(1 << i)
    out[512:520] = np.frombuffer(bv.to_bytes(8, "little"), np.uint8)
    return out


def assert_same_state(a: Snapshot, b: Snapshot, *, names_differ=False):
    diffs = set(a.differences(b))
    if names_differ:
        diffs.discard("vm")
        assert {k: v for k, v in a.manifest["vm"].items() if k != "name"} == \
            {k: v for k, v in b.manifest["vm"].items() if k != "name"}
    diffs.discard("vm.clock")
    for key in [d for d in diffs if d.endswith(".msrs")]:
        x, y = a.arrays[key], b.arrays[key]
        assert np.array_equal(x["index"], y["index"])
        changed = {int(i) for i, p, q in zip(x["index"], x["data"], y["data"]) if p != q}
        assert changed <= TIME_MSRS, [hex(i) for i in changed]
        diffs.discard(key)
    for key in [d for d in diffs if d == "vm.pit2"]:
        x, y = a.arrays[key].copy(), b.arrays[key].copy()
        x["channels"]["count_load_time"] = y["channels"]["count_load_time"] = 0
        assert x.tobytes() == y.tobytes()
        diffs.discard(key)
    for key in [d for d in diffs if d.endswith(".xsave")]:
        x, y = (_xsave_in_use(a.arrays[key]), _xsave_in_use(b.arrays[key]))
        assert x.tobytes() == y.tobytes()
        diffs.discard(key)
    for key in [d for d in diffs if d.endswith(".lapic")]:
        x, y = a.arrays[key]["regs"][0].copy(), b.arrays[key]["regs"][0].copy()
        x[0x390:0x394] = y[0x390:0x394] = 0  # TMCCT: computed when read
        assert x.tobytes() == y.tobytes()
        diffs.discard(key)
    assert not diffs, sorted(diffs)


def test_restored_in_a_fresh_process_goes_on_exactly(session, tmp_path):
    whole = make_vm(session, "whole", stop=ITERATIONS + 1).run(timeout=30)
    assert whole.reason == "poweroff"

    vm = make_vm(session)
    stopped = vm.run(timeout=30)
    assert stopped.reason == "bogus" and len(vm.console) == 57
    path = tmp_path / "guest.hvs"
    vm.snapshot(path)
    vm.destroy()

    script = (
        "import json, sys\n"
        "from hvjit import Session\n"
        "from hvjit.vm import Vm\n"
        "with Session() as s:\n"
        "    vm = Vm.restore(s, sys.argv[1])\n"
        "    r = vm.run(timeout=30)\n"
        "    print(json.dumps({'reason': r.reason, 'code': r.code, 'console': r.console.decode()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"reason": "poweroff", "code": whole.code, "console": whole.console.decode()}
    assert len(got["console"]) == ITERATIONS


@pytest.mark.parametrize("irqchip", [False, True])
def test_every_field_round_trips(session, tmp_path, irqchip):
    vm = make_vm(session, irqchip=irqchip)
    assert vm.run(timeout=30).reason == "bogus"
    first = vm.snapshot(tmp_path / "a.hvs")
    assert {"vcpu0.regs", "vcpu0.sregs", "vcpu0.msrs", "vcpu0.mp_state", "vcpu0.cpuid", "vm.clock"} <= set(first.arrays)
    if irqchip:
        assert {"vcpu0.lapic", "vm.irqchip", "vm.pit2"} <= set(first.arrays)
    loaded = Snapshot.load(tmp_path / "a.hvs")
    assert not first.differences(loaded)  # the file holds exactly what was taken
    again = Vm.restore(session, loaded, name="again").snapshot()
    assert_same_state(first, again, names_differ=True)


def test_damaged_files_raise_snapshot_error_and_leave_no_vm(session, tmp_path):
    vm = make_vm(session)
    vm.run(timeout=30)
    good = tmp_path / "good.hvs"
    original = vm.snapshot(good)
    vm.destroy()
    data = good.read_bytes()
    rng = random.Random(10)
    outcomes = {"error": 0, "exact": 0}
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(300):
        bad = bytearray(data)
        kind = rng.choice(["flip", "truncate", "zero-run"])
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            bad = bad[: rng.randrange(len(bad))]
        else:
            start = rng.randrange(len(bad))
            bad[start:start + rng.randint(1, 64)] = bytes(min(64, len(bad) - start))[: len(bad[start:start + 64])]
        path = tmp_path / f"bad{i}.hvs"
        path.write_bytes(bytes(bad))
        try:
            restored = Vm.restore(session, path, name=f"r{i}")
        except SnapshotError:
            outcomes["error"] += 1
        else:
            assert_same_state(original, restored.snapshot(), names_differ=True)
            restored.destroy()
            outcomes["exact"] += 1
        path.unlink()
        assert session.vms == ()  # a failed restore destroyed its VM
    assert outcomes["error"] > 200, outcomes
    assert len(os.listdir("/proc/self/fd")) == fds


def test_wrong_version_and_foreign_files_are_refused(session, tmp_path):
    vm = make_vm(session)
    path = tmp_path / "s.hvs"
    vm.snapshot(path)
    newer = tmp_path / "newer.hvs"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            if item.filename == "manifest.json":
                doc = json.loads(body)
                doc["version"] = 99
                body = json.dumps(doc).encode()
            dst.writestr(item, body)
    with pytest.raises(SnapshotError, match="version 99"):
        Vm.restore(session, newer, name="newer")
    (tmp_path / "text.hvs").write_text("not a snapshot")
    with pytest.raises(SnapshotError):
        Vm.restore(session, tmp_path / "text.hvs", name="text")
    with pytest.raises(SnapshotError):
        Vm.restore(session, tmp_path / "missing.hvs", name="missing")
    assert [v.name for v in session.vms] == ["snap"]


def test_snapshot_of_a_running_vm_is_refused_and_of_a_paused_one_taken(session):
    import threading
    import time

    vm = session.create_vm("spinsnap", memory=2 << 20)
    vm.memory.write(0x1000, assemble(".code64\n1: jmp 1b\n", 0x1000))
    entry.setup_long_mode(vm.vcpu(0), 0x1000, cpl=3)
    vm.vcpu(0).warm_up()
    runner = threading.Thread(target=lambda: vm.run(timeout=30), daemon=True)
    runner.start()
    deadline = time.monotonic() + 5
    while vm.vcpu(0).state.value != "running" and time.monotonic() < deadline:
        time.sleep(0.002)
    with pytest.raises(Exception, match="running"):
        vm.snapshot()
    vm.pause()
    snap = vm.snapshot()  # parked outside KVM_RUN: allowed
    assert snap is not None
    vm.destroy()
    runner.join(5)
    assert not runner.is_alive()


def test_reset_goes_back_through_a_tree_of_snapshots(session):
    vm = make_vm(session)
    root = vm.snapshot()  # before the first instruction
    assert vm.run(timeout=30).reason == "bogus"
    middle = vm.snapshot()  # a child of root
    end = vm.run(timeout=30)
    assert end.reason == "poweroff"
    final_console = vm.console

    stats = vm.reset_to(middle)
    assert not stats.full and stats.pages >= 1
    assert_same_state(middle, vm.snapshot())
    again = vm.run(timeout=30)
    assert (again.reason, again.code, vm.console) == ("poweroff", end.code, final_console)

    vm.reset_to(root)  # an ancestor, from a descendant of middle
    assert vm.console == b""
    assert vm.run(timeout=30).reason == "bogus" and vm.console == middle.console
    vm.reset_to(root)
    mid_again = vm.snapshot()  # a snapshot taken from a reset state: a second child of root
    vm.run(timeout=30)
    vm.reset_to(middle)  # a cousin: pages differ along both branches
    assert_same_state(middle, vm.snapshot())
    vm.reset_to(mid_again)
    assert vm.run(timeout=30).reason == "bogus"
    assert vm.run(timeout=30).code == end.code and vm.console == final_console


def test_reset_undoes_hvjit_own_writes_and_user_only_resets(session):
    vm = make_vm(session)
    snap = vm.snapshot()
    vm.memory.write(0x8000, b"host write")
    vm.memory.view(0x9000, 4)[:] = 7
    vm.memory.write_u64(COUNTER, 100)  # the guest would start past its stop point
    stats = vm.reset_to(snap, privileged=False)
    assert stats.pages >= 3
    assert vm.memory.read(0x8000, 10) == bytes(10) and vm.memory.read(0x9000, 4) == bytes(4)
    assert vm.memory.read_u64(COUNTER) == 0
    assert vm.run(timeout=30).reason == "bogus" and len(vm.console) == 57
    vm.reset_to(snap, privileged=False)
    assert vm.vcpu(0).get_register("rip") == CODE and vm.memory.read_u64(COUNTER) == 0


def test_reset_to_a_snapshot_of_another_layout_is_refused(session):
    small = make_vm(session, "small")
    other = session.create_vm("other", memory=2 << 20)
    with pytest.raises(SnapshotError, match="memory"):
        other.reset_to(small.snapshot())


def test_cli_snapshot_at_and_restore(tmp_path):
    iterations = 20000
    image = tmp_path / "guest.bin"
    image.write_bytes(assemble(GUEST.format(stop=iterations + 1, port=STOP_PORT, iterations=iterations), CODE))
    saved = tmp_path / "cli.hvs"

    def hvjit(*args):
        return subprocess.run([sys.executable, "-m", "hvjit", "run", *args, "--timeout", "60"],
                              capture_output=True, timeout=300)

    flat = [str(image), "--mode", "long", "--cpl", "3", "--gpa", hex(CODE), "--memory", "1M"]
    whole = hvjit(*flat)
    first = hvjit(*flat, "--snapshot-at", "5000", str(saved))
    assert first.returncode == whole.returncode and first.stdout == whole.stdout, first.stderr
    assert b"snapshot saved" in first.stderr and saved.exists()
    rest = hvjit("--restore", str(saved))
    assert rest.returncode == whole.returncode, rest.stderr
    assert 0 < len(rest.stdout) < iterations - 4000 and whole.stdout.endswith(rest.stdout)
