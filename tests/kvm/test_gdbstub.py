"""hvjit's GDB stub under the real debugger (Debian's gdb in batch mode) and under a raw
Remote Serial Protocol client: breakpoints by symbol, registers, disassembly, stepping,
backtraces, hardware breakpoints and watchpoints where the host has them, Ctrl-C, vCPUs as
threads, 64-bit, 32-bit and real mode, the command line, and hostile packets.

Every gdb and every socket read is bounded by a timeout; a stub that hangs fails the test."""

import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from hvjit import decode_buffer, entry, loaders, vcpu_debug
from hvjit.abi import VmExitCode
from hvjit.asm import assemble
from hvjit.errors import GuestFault
from hvjit.gdb_protocol import PACKET_SIZE, checksum, frame
from hvjit.gdbstub import GdbStub, GdbStubError
from hvjit.vcpu_debug import host_support

from .guests import load

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (.ci/apt-packages)")
needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="GNU as/ld (binutils) not installed")

STOP_BOUND = 0.1  # seconds from Ctrl-C to the stop reply
GDB_TIMEOUT = 90
COMPILE_BOUND = 300  # a cold run-loop and page-walk compile comes before listening

GUEST = """
.globl _start, add_two, finish, counter
.text
_start:
    xor %ebx, %ebx
again:
    call add_two
    cmp $6, %ebx
    jne again
    call finish
add_two:
    add $2, %ebx
    mov %ebx, counter
    ret
finish:
    mov %ebx, %eax
    outl %eax, $0xf4
    hlt
.data
counter: .long 0
"""


def _elf(tmp_path, bits: int = 64):
    src, obj, out = tmp_path / f"g{bits}.s", tmp_path / f"g{bits}.o", tmp_path / f"g{bits}.elf"
    src.write_text(GUEST)
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64" if bits == 64 else "elf_i386", "-Ttext=0x200000", "-e", "_start",
                    "-o", str(out), str(obj)], check=True)
    return out


def _guest_vm(session, name, elf, *, mode="long", cpl=3):
    vm = session.create_vm(name, memory=8 << 20)
    loaders.load(vm, elf.read_bytes(), format="elf", mode=mode, cpl=cpl)
    return vm


@contextmanager
def serving(vm, **options):
    """``vm.serve_gdb`` on a free loopback port in a thread; yields (port, outcome box)."""
    ready, box = threading.Event(), {}

    def listening(address):
        box["port"] = address[1]
        ready.set()

    def target():
        try:
            box["outcome"] = vm.serve_gdb(0, on_listening=listening, **options)
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["error"] = e
            ready.set()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    assert ready.wait(COMPILE_BOUND), "the stub did not start listening"
    assert "error" not in box, box.get("error")
    try:
        yield box["port"], box
    finally:
        t.join(30)
        assert not t.is_alive(), "serve_gdb did not return"


def gdb(port, elf, *commands, timeout=GDB_TIMEOUT) -> str:
    args = ["gdb", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    p = subprocess.run(args + [str(elf)], capture_output=True, text=True, timeout=timeout)
    return p.stdout + p.stderr


def _registers(out: str, name: str) -> list[int]:
    return [int(v, 16) for v in re.findall(rf"^{name}\s+0x([0-9a-f]+)\s", out, re.M)]


def _next_instruction(vm, address: int, bits: int) -> int:
    """The address after the instruction at ``address`` (identity-mapped), from hvjit's decoder."""
    records = decode_buffer(vm.memory.read(address, 16), bits, address)
    return int(records[1]["address"])


class Rsp:
    """A minimal Remote Serial Protocol client with acks, for raw and hostile packets."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # acks go out at once, as gdb's do
        self.buf = b""

    def close(self):
        self.sock.close()

    def _byte(self, deadline: float) -> int:
        while not self.buf:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = self.sock.recv(4096)
            assert chunk, "the stub closed the connection"
            self.buf += chunk
        c, self.buf = self.buf[0], self.buf[1:]
        return c

    def read_ack(self, timeout=10.0) -> bytes:
        return bytes([self._byte(time.monotonic() + timeout)])

    def read_packet(self, timeout=10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while self._byte(deadline) != ord("$"):
            pass
        payload = bytearray()
        while (c := self._byte(deadline)) != ord("#"):
            payload.append(c)
        given = int(bytes([self._byte(deadline), self._byte(deadline)]), 16)
        assert given == checksum(bytes(payload)), f"bad checksum from the stub on {bytes(payload)[:40]!r}"
        self.sock.sendall(b"+")
        return bytes(payload)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))
        assert self.read_ack() == b"+"

    def ask(self, payload: bytes, timeout=10.0) -> bytes:
        self.send(payload)
        return self.read_packet(timeout)

    def quiet(self, wait=0.2) -> bool:
        """Nothing arrives within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1)
        except socket.timeout:
            return True
        self.buf += data
        return False


def _reg(rsp: Rsp, number: int) -> int:
    return int.from_bytes(bytes.fromhex(rsp.ask(b"p%x" % number).decode()), "little")


# ---- the real gdb ----------------------------------------------------------------------------


@needs_gdb
@needs_binutils
def test_gdb_breaks_on_a_symbol_disassembles_steps_and_backtraces(session, tmp_path):
    elf = _elf(tmp_path)
    vm = _guest_vm(session, "gdb64", elf)
    add_two = vm.symbols.lookup("add_two")
    after_add = _next_instruction(vm, add_two, 64)
    after_call = _next_instruction(vm, vm.symbols.lookup("again"), 64)
    with serving(vm) as (port, box):
        out = gdb(port, elf, "break add_two", "continue", "info registers rip", "x/4i $pc", "stepi",
                  "info registers rip", "bt", "kill")
    assert f"Breakpoint 1, 0x{add_two:016x} in add_two ()" in out, out
    assert _registers(out, "rip") == [add_two, after_add], out
    # The real instructions, not the int3 the stub patched in.
    assert re.search(rf"=> 0x{add_two:x} <add_two>:\s+add\s+\$0x2,%ebx", out), out
    assert re.search(r"<add_two\+3>:\s+mov\s+%ebx,0x", out) and "int3" not in out, out
    assert re.search(rf"^#0\s+0x0*{after_add:x} in add_two \(\)", out, re.M), out
    assert re.search(rf"^#1\s+0x0*{after_call:x} in again \(\)", out, re.M), out  # the return address
    assert "[Inferior 1 (Remote target) killed]" in out, out
    assert box["outcome"].reason == "killed"
    # The VM is intact: no breakpoint left behind, and it runs on from where gdb left it.
    assert vm.breakpoints == {}
    assert vm.vcpu(0).get_register("rip") == after_add
    assert vm.run(timeout=10).code == 6


@needs_gdb
@needs_binutils
def test_gdb_reads_general_segment_and_vector_registers_and_writes_them(session, tmp_path):
    elf = _elf(tmp_path)
    vm = _guest_vm(session, "gdbregs", elf)
    cs = vm.vcpu(0).get_register("cs")
    with serving(vm) as (port, box):
        out = gdb(port, elf, "break finish", "continue", "info registers rbx", "p $cs", "p/x $fs_base",
                  "p/x $cr0", "p/x $efer", "p $mxcsr", "p $xmm0.uint128", "p/x $fctrl",
                  "set var $rbx = 40", "detach")
    assert _registers(out, "rbx") == [6], out
    assert re.search(rf"^\$1 = {cs}$", out, re.M) and cs & 3 == 3, out  # the CPL3 code selector
    assert re.search(r"^\$3 = 0x8\w+$", out, re.M), out  # CR0.PG set
    assert re.search(r"^\$4 = 0x5\w\w$", out, re.M), out  # EFER.LME and LMA
    assert re.search(r"^\$5 = \[ IM DM ZM OM UM PM \]$", out, re.M), out  # MXCSR 0x1f80 after reset
    assert re.search(r"^\$7 = 0x37f$", out, re.M), out
    assert box["outcome"].reason == "detached"
    assert vm.run(timeout=10).code == 40  # the register gdb wrote reached the guest


@needs_gdb
@needs_binutils
def test_gdb_hardware_breakpoint_where_the_host_has_them(session, tmp_path):
    elf = _elf(tmp_path)
    vm = _guest_vm(session, "gdbhw0", elf, cpl=0)  # PVM delivers them at CPL0 only (host_support)
    if host_support(vm.kvm)["hw_breakpoints"].startswith("no"):
        pytest.skip("this host's KVM delivers no hardware breakpoints")
    add_two = vm.symbols.lookup("add_two")
    with serving(vm) as (port, box):
        out = gdb(port, elf, "hbreak add_two", "continue", "info registers rip", "continue",
                  "info registers rbx", "delete", "continue")
    assert re.search(rf"Breakpoint 1, 0x0*{add_two:x} in add_two \(\)", out), out
    assert _registers(out, "rip") == [add_two], out
    assert _registers(out, "rbx") == [2], out  # the second hit, one pass later
    assert "exited with code 06" in out, out
    assert box["outcome"].reason == "exited" and box["outcome"].exit.code == 6


@needs_gdb
@needs_binutils
def test_gdb_watchpoints_hardware_where_the_host_has_them_else_by_stepping(session, tmp_path):
    elf = _elf(tmp_path)
    hardware = not host_support(session.create_vm("probe", memory=2 << 20).kvm)["watchpoints"].startswith("no")
    vm = _guest_vm(session, "gdbwatch", elf, cpl=0 if hardware else 3)
    watch = ["watch *(int *)&counter", "continue", "continue", "delete", "continue"]
    with serving(vm) as (port, box):
        if hardware:
            out = gdb(port, elf, *watch)
            assert "Hardware watchpoint 1: *(int *)&counter" in out, out
        else:
            # Refused (E reply), so gdb says so; its software watchpoints step the guest instead.
            out = gdb(port, elf, "watch *(int *)&counter", "continue", "delete",
                      "set can-use-hw-watchpoints 0", *watch)
            assert "Could not insert hardware watchpoint 1" in out, out
            assert "Watchpoint 2: *(int *)&counter" in out, out
    assert re.search(r"Old value = 0\s+New value = 2", out), out
    assert re.search(r"Old value = 2\s+New value = 4", out), out
    assert "exited with code 06" in out, out
    assert box["outcome"].reason == "exited"


def test_host_support_tells_the_truth_about_watchpoints(session):
    """The stub refuses watchpoints by ``host_support``: a CPL0 write must fire one exactly
    where it says they work."""
    vm = session.create_vm("wprobe", memory=2 << 20)
    load(vm, ".code64\n movl $5, 0x1800\n mov $3, %eax\n outl %eax, $0xf4\n", "long", 0)
    # Installed below add_watchpoint's refusal, to see what the host really delivers.
    v = vm.vcpu(0)
    v._debug.hw[0] = vcpu_debug.HwSlot(0x1800, "w", 4)
    v._debug.dirty = True
    ex = vm.run(timeout=10)
    says = host_support(vm.kvm)["watchpoints"]
    assert (ex.exitcode == VmExitCode.DB) == (not says.startswith("no")), (str(ex), says)


@needs_binutils
def test_hardware_points_are_refused_where_the_host_cannot_deliver_them(session, tmp_path):
    elf = _elf(tmp_path)
    vm = _guest_vm(session, "gdbhw3", elf, cpl=3)
    support = host_support(vm.kvm)
    add_two, counter = vm.symbols.lookup("add_two"), vm.symbols.lookup("counter")
    with serving(vm) as (port, box):
        rsp = Rsp(port)
        bp = rsp.ask(b"Z1,%x,1" % add_two)
        wp = rsp.ask(b"Z2,%x,4" % counter)
        assert rsp.ask(b"Z3,%x,4" % counter) == b"E5f"  # x86 cannot watch reads alone
        assert rsp.ask(b"D") == b"OK"
        rsp.close()
    assert bp == (b"OK" if support["hw_breakpoints"] == "yes" else b"E5f")
    assert wp == (b"OK" if support["watchpoints"] == "yes" else b"E5f")
    assert all(not v._debug.hw for v in vm.vcpus)  # nothing left in the debug registers


@needs_gdb
@needs_binutils
def test_gdb_on_a_32bit_protected_mode_guest(session, tmp_path):
    elf = _elf(tmp_path, 32)
    vm = _guest_vm(session, "gdb32", elf, mode="protected", cpl=3)
    add_two = vm.symbols.lookup("add_two")
    after_add = _next_instruction(vm, add_two, 32)
    with serving(vm) as (port, box):
        out = gdb(port, elf, "show architecture", "break add_two", "continue", "info registers eip",
                  "x/2i $pc", "stepi", "info registers eip", "info registers ebx", "kill")
    assert "i386" in out and "x86-64" not in out, out
    assert f"Breakpoint 1, 0x{add_two:08x} in add_two ()" in out, out
    assert _registers(out, "eip") == [add_two, after_add], out
    assert re.search(rf"=> 0x{add_two:x} <add_two>:\s+add\s+\$0x2,%ebx", out), out
    assert _registers(out, "ebx") == [2], out
    assert box["outcome"].reason == "killed"


@needs_gdb
@needs_binutils
@pytest.mark.parametrize("how", ["detach", "exit"])
def test_cli_waits_for_gdb_before_the_first_instruction(tmp_path, how):
    elf = _elf(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "hvjit", "run", "--format", "elf", "--mode", "long",
                             "--cpl", "3", "--gdb", "127.0.0.1:0", str(elf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(COMPILE_BOUND + GDB_TIMEOUT, proc.kill)  # a hung stub fails the test, never the suite
    watchdog.start()
    try:
        lines = [proc.stderr.readline()]
        while not re.search(r"waiting for gdb", lines[-1]) and lines[-1] and len(lines) < 50:
            lines.append(proc.stderr.readline())
        match = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+)", lines[-1])
        assert match, "".join(lines)
        port = int(match.group(1))
        if how == "detach":
            out = gdb(port, elf, "info registers rip", "break finish", "continue", "info registers rbx", "detach")
            assert _registers(out, "rip") == [0x200000], out  # nothing ran before gdb came
            assert _registers(out, "rbx") == [6] and "in finish ()" in out, out
        else:
            out = gdb(port, elf, "continue")
            assert "exited with code 06" in out, out
        assert proc.wait(timeout=60) == 6  # the guest's own exit code, after detach or at exit
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


# ---- the protocol, raw ------------------------------------------------------------------------

SPIN = """
.code64
1:  cmpl $0, 0x1100
    je 1b
    mov $9, %eax
    outl %eax, $0xf4
2:  jmp 2b
"""
SECOND_LOOP = 0x1011  # the "2:" loop, for a second vCPU
FLAG = 0x1100


def _spinning_vm(session, name, vcpus=1):
    vm = session.create_vm(name, memory=2 << 20, vcpus=vcpus)
    vm.memory.write(0x1000, assemble(SPIN, 0x1000))
    for v in vm.vcpus:
        entry.setup_long_mode(v, 0x1000, cpl=3)
    return vm


def _interrupt(rsp: Rsp) -> tuple[bytes, float]:
    assert rsp.quiet(0.3), "the guest stopped by itself"
    t0 = time.monotonic()
    rsp.sock.sendall(b"\x03")
    reply = rsp.read_packet()
    return reply, time.monotonic() - t0


def test_ctrl_c_stops_a_spinning_guest_quickly_and_it_continues(session):
    vm = _spinning_vm(session, "ctrlc")
    with serving(vm) as (port, box):
        rsp = Rsp(port)
        assert b"PacketSize=" in rsp.ask(b"qSupported:swbreak+;hwbreak+")
        assert rsp.ask(b"?") == b"T05thread:01;"
        for _ in range(3):
            rsp.send(b"vCont;c")
            reply, took = _interrupt(rsp)
            assert reply == b"T02thread:01;"
            assert took < STOP_BOUND, f"Ctrl-C took {took * 1e3:.0f} ms"
            assert 0x1000 <= _reg(rsp, 16) < 0x1010  # rip inside the loop, readable while stopped
        assert rsp.ask(b"M%x,4:01000000" % FLAG) == b"OK"  # let the guest leave its loop
        assert rsp.ask(b"m%x,4" % FLAG) == b"01000000"
        rsp.send(b"vCont;c")
        assert rsp.read_packet() == b"W09"
        rsp.close()
    assert box["outcome"].reason == "exited" and box["outcome"].exit.code == 9


def test_vcpus_are_threads(session):
    vm = _spinning_vm(session, "threads", vcpus=2)
    assert decode_buffer(vm.memory.read(SECOND_LOOP, 2), 64, SECOND_LOOP)[0]["length"] == 2  # jmp 2b
    vm.vcpus[1].set_registers(rip=SECOND_LOOP)  # its own loop, to tell them apart
    with serving(vm) as (port, box):
        rsp = Rsp(port)
        assert rsp.ask(b"qfThreadInfo") == b"m1,2"
        assert rsp.ask(b"qsThreadInfo") == b"l"
        assert rsp.ask(b"T2") == b"OK" and rsp.ask(b"T3") == b"E03"
        assert rsp.ask(b"Hg2") == b"OK" and _reg(rsp, 16) == SECOND_LOOP
        assert b"vCPU 1" in bytes.fromhex(rsp.ask(b"qThreadExtraInfo,2").decode())
        assert rsp.ask(b"Hg1") == b"OK" and _reg(rsp, 16) == 0x1000
        assert rsp.ask(b"Hg5") == b"E03"
        rsp.send(b"vCont;c")  # both vCPUs spin; Ctrl-C stops them all
        reply, took = _interrupt(rsp)
        assert re.fullmatch(rb"T02thread:0[12];", reply) and took < STOP_BOUND, (reply, took)
        assert all(s == "stopped" for s in vm.state.values())
        assert rsp.ask(b"Hg1") == b"OK"
        rip0 = _reg(rsp, 16)
        rsp.send(b"vCont;s:2;c")  # a step moves vCPU 1 only (jmp 2b: back to itself)
        assert rsp.read_packet() == b"T05thread:02;"
        assert rsp.ask(b"Hg1") == b"OK" and _reg(rsp, 16) == rip0
        assert rsp.ask(b"Hg2") == b"OK" and _reg(rsp, 16) == SECOND_LOOP
        assert rsp.ask(b"D") == b"OK"
        rsp.close()
    assert box["outcome"].reason == "detached"


def test_real_mode_registers_steps_and_memory(session):
    vm = session.create_vm("real", memory=2 << 20)
    source = ".code16\n mov $0x1234, %ax\n inc %ax\n mov %ax, %bx\n mov $7, %eax\n outl %eax, $0xf4\n"
    code = assemble(source, 0x1000)
    load(vm, source, "real")
    with serving(vm) as (port, box):
        rsp = Rsp(port)
        xml = rsp.ask(b"qXfer:features:read:target.xml:0,3fff")
        assert b"<architecture>i386</architecture>" in xml and xml.startswith(b"l")
        assert _reg(rsp, 8) & 0xFFFF == 0x1000  # eip
        assert bytes.fromhex(rsp.ask(b"m1000,%x" % len(code)).decode()) == code
        for expected in (0x1003, 0x1004):
            assert rsp.ask(b"s") == b"T05thread:01;"
            assert _reg(rsp, 8) & 0xFFFF == expected
        assert _reg(rsp, 0) & 0xFFFF == 0x1235  # eax after the inc
        rsp.send(b"c")
        assert rsp.read_packet() == b"W07"
        rsp.close()


def test_a_vanished_debugger_leaves_the_vm_stopped_and_clean(session, tmp_path):
    vm = _spinning_vm(session, "vanish")
    with serving(vm) as (port, box):
        half = Rsp(port)  # a packet that never ends, then gone
        half.sock.sendall(b"$m1000,4")
        half.close()
        running = Rsp(port)  # a breakpoint, the guest running, then gone
        assert running.ask(b"Z0,1000,1") == b"OK"
        assert running.ask(b"Z0,1008,1") == b"OK"
        running.send(b"vCont;c")
        assert running.read_packet() == b"T05swbreak:;thread:01;"
        running.send(b"vCont;c")
        running.close()
        deadline = time.monotonic() + 5
        while vm.breakpoints and time.monotonic() < deadline:
            time.sleep(0.02)
        assert vm.breakpoints == {}  # the stub's breakpoints went with its debugger
        assert all(s == "stopped" for s in vm.state.values())
        last = Rsp(port)  # the stub still serves
        assert last.ask(b"M%x,4:01000000" % FLAG) == b"OK"
        assert last.ask(b"D") == b"OK"
        last.close()
    assert box["outcome"].reason == "detached"
    assert vm.run(timeout=10).code == 9


def test_memory_as_a_debugger_sees_it_supervisor_and_read_only_pages_too(session):
    vm = session.create_vm("protect", memory=2 << 20)
    state = load(vm, SPIN, "long", 3)
    pde = state.sysarea + entry.PD_OFF  # the 2 MiB page holding the code
    vm.memory.write_u64(pde, vm.memory.read_u64(pde) & ~0x6)  # supervisor-only, read-only
    with pytest.raises(GuestFault):
        vm.vcpu(0).read_virtual(FLAG, 4)  # the guest at CPL3 could not read it
    with serving(vm) as (port, box):
        rsp = Rsp(port)
        assert rsp.ask(b"m%x,4" % FLAG) == b"00000000"
        assert rsp.ask(b"M%x,4:2a000000" % FLAG) == b"OK"
        assert rsp.ask(b"m%x,4" % (1 << 40)) == b"E0e"  # not mapped at all
        assert rsp.ask(b"mffffffffffff0000,10") == b"E0e"  # the top of the address space: unmapped
        assert rsp.ask(b"D") == b"OK"
        rsp.close()
    assert vm.memory.read(FLAG, 4) == b"\x2a\0\0\0"
    assert vm.memory.read_u64(pde) & 0x60 == 0  # neither accessed nor dirty set by the debugger


@pytest.mark.parametrize("cpl", [3, 0])
def test_continuing_from_a_breakpoint_on_a_one_byte_instruction(session, cpl):
    """What gdb's step-over relies on: the step over a breakpoint's own one-byte instruction
    is a step (on PVM both arrive as a shutdown, told apart by the int3 byte before RIP)."""
    vm = session.create_vm(f"onebyte{cpl}", memory=2 << 20)
    load(vm, ".code64\n xor %ebx, %ebx\n1: nop\n inc %ebx\n cmp $3, %ebx\n jne 1b\n"
             " mov %ebx, %eax\n outl %eax, $0xf4\n", "long", cpl)
    v = vm.vcpu(0)
    v.add_breakpoint(0x1002)  # the nop
    hits = []
    for _ in range(5):
        ex = vm.run(timeout=10)
        if ex.exitcode != VmExitCode.BPT:
            break
        hits.append(v.get_register("rbx"))
    assert hits == [0, 1, 2] and ex.code == 3, (hits, str(ex))


def _hostile_packets(rng: random.Random) -> list[bytes]:
    """Payloads that must each get one reply and change nothing the guest depends on."""
    fixed = [
        b"m0,ffffffffffffffff", b"m" + b"1" * 100 + b",4", b"mffffffffffffffff,10", b"m10", b"m,", b"m1000,0",
        b"p" + b"f" * 9, b"pffff", b"P0=zz", b"P999=00", b"Gxyz", b"G" + b"0" * 5000, b"g",
        b"Z0,ffffffffffff0000,1", b"Z9,0,0", b"Z0,zz,1", b"Z2,1001,3", b"Z2,1000,16", b"z0,1234,1", b"z1,0,1",
        b"qXfer:features:read:other.xml:0,10", b"qXfer:features:read:target.xml:ffffffff,ffffffff",
        b"qXfer:features:read:target.xml:0", b"qXfer:features:read:", b"Hgzz", b"H", b"Hx1", b"Hg99", b"T0",
        b"T", b"vCont;x", b"vCont;s:99", b"vCont;t", b"vCont;C", b"vCont;c:zz", b"vFile:open:", b"vMustReplyEmpty",
        b"M0,4:zz", b"Mffffffffffffffff,10:00", b"M1000,2:00", b"Mdead00000000,1:00", b"X0,2:}", b"Xdead00000000,1:a",
        b"qThreadExtraInfo,ff", b"qThreadExtraInfo", b"qC", b"qAttached", b"qOffsets", b"qRcmd,6865", b"!",
        b"QNonStop:1", b"qSupported:" + b"x" * 3000, b"C", b"Cxx", b"S", b"Sxx;1", b"c zz", b"s1,2",
    ]
    letters = b"?gpmqQHTZzvbBdiItrA!x#"
    randoms = []
    for _ in range(300):
        body = bytes(rng.choice(b"0123456789abcdef,:;=xzq-}$#*") for _ in range(rng.randint(0, 40)))
        payload = bytes([rng.choice(letters)]) + body
        if b"#" in payload or b"$" in payload:  # framing bytes end or restart a packet
            payload = payload.replace(b"#", b"").replace(b"$", b"")
        randoms.append(payload)
    return fixed + randoms


def test_hostile_packets_get_the_protocols_answers_and_the_vm_survives(session, tmp_path):
    vm = _spinning_vm(session, "hostile")
    rng = random.Random(11)
    before = vm.memory.view(0, 0x200000).tobytes()  # all of RAM as the CPU sees it
    with serving(vm) as (port, box):
        rsp = Rsp(port)
        for payload in _hostile_packets(rng):
            rsp.send(payload)  # acknowledged with '+' ...
            reply = rsp.read_packet()  # ... and answered (an error, empty, or data)
            if payload[:1] in b"cCsS" and reply[:1] != b"E":
                pytest.fail(f"{payload!r} resumed the guest: {reply!r}")
        # Wrong checksums are refused with '-' and nothing else.
        for _ in range(20):
            body = bytes(rng.choice(b"?gm0123,") for _ in range(rng.randint(1, 10)))
            rsp.sock.sendall(b"$" + body + b"#%02x" % ((checksum(body) + 1) & 0xFF))
            assert rsp.read_ack() == b"-"
        rsp.sock.sendall(b"$m10#zz")
        assert rsp.read_ack() == b"-"
        # Longer than PacketSize: read to its end, refused with an error.
        rsp.send(b"X0," + b"a" * (PACKET_SIZE + 100))
        assert rsp.read_packet() == b"E16"
        # Noise between packets, an interrupt while stopped, a packet restarted by '$': ignored.
        rsp.sock.sendall(b"garbage\x03\x03 \n$m10$?#3f")
        assert rsp.read_ack() == b"+" and rsp.read_packet() == b"T05thread:01;"
        assert rsp.quiet()
        # No-ack mode, then an abrupt end in the middle of a packet.
        assert rsp.ask(b"QStartNoAckMode") == b"OK"
        rsp.sock.sendall(frame(b"?"))
        assert rsp.read_packet() == b"T05thread:01;"
        rsp.sock.sendall(b"$m1000,10")
        rsp.close()
        last = Rsp(port)  # served once the hostile connection is cleaned up
        assert last.ask(b"?") == b"T05thread:01;"
        assert vm.breakpoints == {} and vm.memory.view(0, 0x200000).tobytes() == before
        vm.memory.write(FLAG, b"\x01\x00\x00\x00")
        assert last.ask(b"D") == b"OK"
        last.close()
    assert vm.run(timeout=10).code == 9  # the guest runs to completion afterwards


def test_only_loopback_addresses(session):
    vm = session.create_vm("loopback", memory=2 << 20)
    with pytest.raises(GdbStubError):
        GdbStub(vm, "0.0.0.0", 0)
    with GdbStub(vm, "localhost", 0) as stub:
        assert stub.address[0] in ("127.0.0.1", "::1")
