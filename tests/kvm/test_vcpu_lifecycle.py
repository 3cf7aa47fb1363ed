"""The vCPU lifecycle under careless callers: pause, resume, stop, suspend and destroy from
other threads, Ctrl-C, a dropped session — with several vCPUs spinning in the guest.

Liveness bounds (a stop takes effect within 100 ms) are correctness properties here; a run
that does not end fails the test through a bounded join, never by hanging the suite."""

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import hvjit
from hvjit import entry
from hvjit.abi import SuspendHow, VmExitCode
from hvjit.asm import assemble
from hvjit.errors import ObjectDestroyedError
from hvjit.vcpu_lifecycle import VcpuBusyError, VcpuState

STOP_BOUND = 0.1  # seconds: pause/destroy/SIGINT must take effect within this
CODE = 0x1000
SPIN = ".code64\n1: jmp 1b\n"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _spinning_vm(session, name, vcpus=4):
    vm = session.create_vm(name, memory=2 << 20, vcpus=vcpus)
    vm.memory.write(CODE, assemble(SPIN, CODE))
    for v in vm.vcpus:
        entry.setup_long_mode(v, CODE, cpl=3)
    return vm


def _run_in_thread(vm, **kw):
    box = {}

    def target():
        try:
            box["result"] = vm.run(**kw)
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait_state(vm, state, bound=5.0):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if all(s == state for s in vm.state.values()):
            return True
        time.sleep(0.002)
    return False


def test_pause_resume_and_destroy_of_four_spinning_vcpus_are_prompt(session):
    vm = _spinning_vm(session, "pause4")
    vm.vcpu(0).warm_up()
    t, box = _run_in_thread(vm, timeout=60)
    assert _wait_state(vm, "running")
    t0 = time.monotonic()
    vm.pause()
    assert time.monotonic() - t0 < STOP_BOUND
    assert set(vm.state.values()) == {"paused"}
    # Paused: the state can be read from this thread (it would block while running).
    rips = [v.get_register("rip") for v in vm.vcpus]
    assert all(CODE <= r < CODE + 16 for r in rips)
    vm.resume()
    assert _wait_state(vm, "running")
    assert t.is_alive()  # pausing did not end the run
    t0 = time.monotonic()
    vm.destroy()
    assert time.monotonic() - t0 < STOP_BOUND
    t.join(5)
    assert not t.is_alive()
    assert "error" not in box, box.get("error")
    assert box["result"].exitcode == VmExitCode.BOGUS


def test_state_access_while_running_elsewhere_is_refused_not_blocked(session):
    vm = _spinning_vm(session, "busy", vcpus=1)
    v = vm.vcpu(0)
    v.warm_up()
    t, box = _run_in_thread(vm, timeout=60)
    assert _wait_state(vm, "running")
    with pytest.raises(VcpuBusyError):
        v.get_regs()
    v.pause()
    assert v.state == VcpuState.PAUSED
    regs = v.get_regs()
    v.set_regs(regs)  # allowed while parked
    v.resume()
    assert v.stop() is True
    t.join(5)
    assert not t.is_alive() and box["result"].exitcode == VmExitCode.BOGUS
    assert v.state == VcpuState.STOPPED
    assert v.stop() is False  # nothing to stop: and the next run is not affected
    load_exit(vm, 7)
    assert vm.run(timeout=10).code == 7


def load_exit(vm, code):
    vm.memory.write(0x3000, assemble(f".code64\n mov ${code}, %eax\n outl %eax, $0xf4\n", 0x3000))
    for v in vm.vcpus:
        entry.setup_long_mode(v, 0x3000, cpl=3)


def test_a_stop_is_never_lost_when_one_vcpu_exits_at_once(session):
    """vCPU 0 powers off immediately, vCPU 1 spins: the run ends every time, promptly."""
    vm = session.create_vm("nolost", memory=2 << 20, vcpus=2)
    vm.memory.write(CODE, assemble(SPIN, CODE))
    vm.memory.write(0x3000, assemble(".code64\n mov $3, %eax\n outl %eax, $0xf4\n", 0x3000))
    vm.vcpu(0).warm_up()
    for i in range(40):
        entry.setup_long_mode(vm.vcpu(0), 0x3000, cpl=3)
        entry.setup_long_mode(vm.vcpu(1), CODE, cpl=3)
        t, box = _run_in_thread(vm)  # no timeout: a lost stop would hang
        t.join(5)
        assert not t.is_alive(), f"round {i}: the spinning vCPU was never stopped"
        assert box["result"].code == 3 and box["result"].vcpu == 0


def test_suspend_is_host_side_and_sticks_until_reinit(session):
    vm = _spinning_vm(session, "suspend", vcpus=2)
    vm.vcpu(0).warm_up()
    t, box = _run_in_thread(vm, timeout=60)
    assert _wait_state(vm, "running")
    vm.suspend(SuspendHow.HALT)
    t.join(5)
    assert not t.is_alive()
    assert box["result"].exitcode == VmExitCode.SUSPENDED and box["result"].how == SuspendHow.HALT
    assert vm.run(timeout=5).how == SuspendHow.HALT  # still suspended
    vm.reinit()
    load_exit(vm, 9)
    assert vm.run(timeout=10).code == 9


def test_destroy_from_a_python_handler_on_the_vcpu_thread(session):
    vm = session.create_vm("selfdestroy", memory=2 << 20)
    fds = _fds()
    vm.add_port_handler(0x500, lambda port, size, is_write, value: vm.destroy())
    vm.memory.write(CODE, assemble(".code64\n mov $0x500, %dx\n1: outb %al, %dx\n jmp 1b\n", CODE))
    entry.setup_long_mode(vm.vcpu(0), CODE, cpl=3)
    result = vm.run(timeout=10)
    assert result.exitcode == VmExitCode.BOGUS
    assert vm.destroyed and vm.fd == -1  # released once the run left
    assert _fds() < fds
    with pytest.raises(ObjectDestroyedError):
        vm.run()


def test_a_vm_keeps_its_session_alive():
    vm = hvjit.Session().create_vm("orphan", memory=2 << 20)
    gc.collect()
    time.sleep(0.05)
    assert not vm.destroyed
    load_exit(vm, 4)
    assert vm.run(timeout=10).code == 4
    vm.session.close()
    assert vm.destroyed


def test_random_interleavings_end_cleanly(session):
    """Thousands of random run/stop/pause/resume/destroy calls over 4 vCPUs from two
    threads: no crash, no hang, no leaked fd or mapping."""
    rng = random.Random(1234)
    warm = _spinning_vm(session, "warm", vcpus=1)
    warm.vcpu(0).warm_up()
    warm.destroy()
    fds = _fds()
    deadline = time.monotonic() + 25
    ops = 0
    round_ = 0
    while time.monotonic() < deadline and ops < 3000:
        vm = _spinning_vm(session, f"rnd{round_}")
        round_ += 1
        t, box = _run_in_thread(vm, timeout=30)
        for _ in range(rng.randrange(5, 40)):
            op = rng.choice(["pause", "resume", "stop", "vpause", "vresume", "state", "sleep"])
            v = rng.choice(vm.vcpus)
            try:
                if op == "pause":
                    vm.pause()
                elif op == "resume":
                    vm.resume()
                elif op == "stop":
                    v.stop()
                elif op == "vpause":
                    v.pause()
                elif op == "vresume":
                    v.resume()
                elif op == "state":
                    assert set(vm.state.values()) <= {"running", "paused", "stopped"}
                else:
                    time.sleep(rng.random() * 0.002)
            except ObjectDestroyedError:
                break
            ops += 1
            if not t.is_alive() and rng.random() < 0.5:
                vm.resume()
                t, box = _run_in_thread(vm, timeout=30)
        killer = threading.Thread(target=vm.destroy) if rng.random() < 0.5 else None
        if killer:
            killer.start()
            killer.join(5)
            assert not killer.is_alive()
        else:
            vm.destroy()
        t.join(5)
        assert not t.is_alive(), "a run outlived its VM"
        assert "error" not in box or isinstance(box["error"], ObjectDestroyedError), box.get("error")
    assert ops > 200
    gc.collect()
    assert _fds() <= fds


SIGINT_GUEST = r"""
import sys
from hvjit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_every_vcpu_and_exits_130(tmp_path):
    image = tmp_path / "spin.bin"
    # "R\n": the console streams whole lines.
    image.write_bytes(assemble(".code64\n mov $0x3f8, %dx\n mov $'R', %al\n outb %al, %dx\n"
                               " mov $10, %al\n outb %al, %dx\n1: jmp 1b\n", 0x1000))
    cmd = [sys.executable, "-c", SIGINT_GUEST, "run", str(image), "--format", "flat", "--gpa", "0x1000",
           "--mode", "long", "--cpl", "3", "--cpus", "2", "--timeout", "60"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"R\n"  # the guest runs
        time.sleep(0.2)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        rc = p.wait(10)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode()
    assert rc == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert elapsed < 2.0  # a generous bound for process exit; the stop itself is checked above


def test_a_restricted_session_drives_only_its_own_vms(session):
    from hvjit.errors import AccessDeniedError

    theirs = _spinning_vm(session, "theirs", vcpus=1)
    load_exit(theirs, 2)
    with hvjit.Session(restricted=True) as mine:
        own = mine.create_vm("own", memory=2 << 20)
        load_exit(own, 6)
        assert own.run(timeout=10).code == 6  # its own VM: everything allowed
        for call in (theirs.run, theirs.pause, theirs.resume, theirs.vcpu(0).step,
                     lambda: theirs.vcpu(0).get_register("rip"), lambda: theirs.vcpu(0).add_breakpoint(0x3000),
                     lambda: theirs.add_device("port-sink")):
            with pytest.raises(AccessDeniedError):
                call()
    assert theirs.run(timeout=10).code == 2  # untouched, and usable by its owner


@pytest.mark.parametrize("vcpus", [1, 4])
def test_destroy_while_a_tick_hook_runs_is_a_stop_not_an_error(session, vcpus):
    # A tick hook (hvjit's string accelerator is one) runs in Python between two KVM_RUNs; a
    # destroy from another thread then must end the run as a stop does, not raise from it.
    vm = _spinning_vm(session, f"tick-destroy{vcpus}", vcpus=vcpus)
    in_hook = threading.Event()

    def hook(vcpu):
        in_hook.set()
        deadline = time.monotonic() + 5
        while not vcpu.destroyed and time.monotonic() < deadline:
            time.sleep(0.001)
        vcpu.get_regs()  # the vCPU is gone by now: ObjectDestroyedError inside the run

    for v in vm.vcpus:
        v.tick_hooks.append(hook)
        v.tick_period = 0.005
    vm.vcpu(0).warm_up()
    t, box = _run_in_thread(vm, timeout=60)
    assert in_hook.wait(5)
    vm.destroy()
    t.join(5)
    assert not t.is_alive()
    assert "error" not in box, box.get("error")
    assert box["result"].exitcode == VmExitCode.BOGUS


def test_ctrl_c_taken_by_another_thread_still_stops_a_multi_vcpu_run(session):
    # Linux may hand a process's SIGINT to any thread that does not block it; Python raises
    # KeyboardInterrupt in the main thread once that thread runs Python code again. A caller
    # joining its vCPU threads must look at its signals while it waits.
    vm = _spinning_vm(session, "sigint-elsewhere", vcpus=2)
    vm.vcpu(0).warm_up()
    sent = []

    def interrupt_from_here():
        time.sleep(0.3)
        sent.append(time.monotonic())
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # this thread takes it

    other = threading.Thread(target=interrupt_from_here)  # the caller's own: SIGINT not blocked
    other.start()
    with pytest.raises(KeyboardInterrupt):
        vm.run(timeout=20)
    stopped = time.monotonic()
    other.join()
    assert stopped - sent[0] < 0.5  # not the 20 s watchdog
    assert all(v.state == "stopped" for v in vm.vcpus) and vm.run(timeout=0.2).reason == "timeout"
