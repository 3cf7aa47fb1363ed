"""A GDB remote stub for a VM: ``vm.serve_gdb(port)`` and ``hvjit run --gdb [HOST:]PORT``.

One debugger at a time talks the Remote Serial Protocol (framing in :mod:`hvjit.gdb_protocol`,
registers in :mod:`hvjit.gdb_registers`) over TCP; each vCPU is a GDB thread (vCPU *n* is
thread *n* + 1). GDB runs in all-stop mode: while it waits for a stop, the guest runs on a
background thread and the only thing read from the socket is the interrupt byte (Ctrl-C),
which stops every vCPU within a poll interval and reports SIGINT.

What a stop reply says: ``T05`` with ``swbreak``/``hwbreak``/``watch``/``awatch`` for a
breakpoint, watchpoint or single step, ``T02`` after an interrupt, ``T0e`` when the run
timeout (if any) expired, ``T04``/``T0b`` for an emulation failure or triple fault (registers
stay readable), and ``W`` with the exit code when the guest powers off. Other exits stop with
``T05`` after an ``O`` packet that names them.

Memory is read and written by guest-virtual address through the selected vCPU's page tables
as a debugger sees it (like ptrace): any present page, supervisor-only or read-only, without
setting accessed/dirty bits; the stub's int3 patches stay hidden.

Deviations a user should know: a step (``vCont;s:N;c``) steps only vCPU N (the others stay
stopped, as with ``set scheduler-locking step``); addresses are linear (no segment:offset,
as with other x86 stubs), and the register layout is chosen when the debugger connects: x86-64
once long mode is active, i386 before. Read watchpoints (``Z3``) are refused (x86 watches
writes or all accesses, not reads alone), and so are hardware breakpoints and watchpoints a
host cannot deliver (see :func:`hvjit.vcpu_debug.host_support`).

Hostile input gets the protocol's answers and never reaches the VM unchecked: a bad checksum
a ``-``, an oversized packet (more than ``PacketSize``) an error, an unknown command the empty
reply; numbers, lengths and thread ids are bounded, and a debugger that vanishes (EOF, a
stalled packet, a send that cannot complete) ends its connection only: the guest is stopped,
the stub's breakpoints are removed and the VM stays usable.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import helper_threads
from .abi import SuspendHow, VmExitCode
from .emulation.guest import GuestAccessError, cpu_mode, paging_registers
from .errors import GuestFault, HvjitError, UnsupportedError
from .exits import VmExit
from .gdb_protocol import (
    E_BUSY,
    E_FAULT,
    E_INVALID,
    E_NO_SPACE,
    E_NO_THREAD,
    E_UNSUPPORTED,
    PACKET_SIZE,
    Event,
    GdbProtocolError,
    Packet,
    PacketReader,
    escape_binary,
    frame,
    from_hex,
    parse_int,
    parse_thread,
    split_address_length,
    to_hex,
    unescape_binary,
)
from .gdb_registers import RegisterFile, Target, target_for
from .kernels import pagewalk
from .vcpu_debug import DebugError, host_support
from .vcpu_lifecycle import VcpuBusyError

_log = logging.getLogger(__name__)

POLL = 0.02  # seconds between looks at the socket while the guest runs: the Ctrl-C latency
IDLE_POLL = 0.2  # while stopped (to notice close())
PACKET_TIMEOUT = 10.0  # a packet begun but unfinished this long is dropped
SEND_TIMEOUT = 10.0  # a reply the debugger does not take within this ends the connection
STOP_WAIT = 5.0  # how long ending a connection waits for the guest to stop
MAX_RETRANSMIT = 3  # answers to '-' per reply, so a client that only NAKs cannot loop us
MAX_MEMORY = (PACKET_SIZE - 8) // 2  # bytes per 'm' reply (hex doubles them)
MAX_MESSAGE = 512  # characters of an 'O' console message
PAGE = 0x1000
RFLAGS_AC = 1 << 18  # lets a supervisor access reach user pages under SMAP
SIGINT, SIGILL, SIGTRAP, SIGABRT, SIGSEGV, SIGALRM = 2, 4, 5, 6, 11, 14
# Z/z types: 0 software breakpoint, 1 hardware breakpoint, 2 write, 3 read, 4 access watchpoint.
_WATCH_KINDS = {2: "w", 4: "rw"}
_WATCH_NAMES = {2: "watch", 4: "awatch"}


class GdbStubError(HvjitError, ValueError):
    """The stub cannot start as asked (an address that is not loopback, a bad HOST:PORT)."""


@dataclass(frozen=True)
class GdbOutcome:
    """How serving ended: 'detached', 'killed', 'exited' (the guest powered off: ``exit``)
    or 'closed' (``close()``, or no debugger within the accept timeout)."""

    reason: str
    exit: Optional[VmExit] = None


def parse_listen_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (``[::1]:PORT`` for IPv6) → (host, port); the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise GdbStubError(f"not [HOST:]PORT: {text!r}") from None
    if not 0 <= number <= 0xFFFF:
        raise GdbStubError(f"port {number} is outside 0-65535")
    return host or "127.0.0.1", number


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class GdbStub:
    """Listens on ``host:port`` (port 0: any free port, see :attr:`address`) for one GDB at a
    time. ``arch``: "auto", "x86-64" or "i386" (see :func:`hvjit.gdb_registers.target_for`);
    ``run_timeout``: seconds each continue may run before it stops with SIGALRM (None: until
    a stop or Ctrl-C). Only loopback addresses unless ``allow_remote`` (the debugger can read
    and write all of the guest)."""

    def __init__(self, vm, host: str = "127.0.0.1", port: int = 0, *, arch: str = "auto",
                 run_timeout: Optional[float] = None, allow_remote: bool = False):
        vm._check()
        if not allow_remote and not _is_loopback(host):
            raise GdbStubError(f"the GDB stub listens on loopback addresses only, not {host!r} "
                               "(allow_remote=True to override)")
        self.vm = vm
        self.arch = arch
        self.run_timeout = run_timeout
        self._closing = threading.Event()
        self._warm_up()  # before listening: a debugger that connects gets answers at once
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=1)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop serving (from any thread): a connected debugger is let go, the guest stopped."""
        self._closing.set()

    def __enter__(self) -> "GdbStub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._listener.close()

    def serve(self, *, accept_timeout: Optional[float] = None,
              on_listening: Optional[Callable[[tuple[str, int]], None]] = None) -> GdbOutcome:
        """Serve debuggers one after another until one detaches or kills, or the guest exits.
        A debugger that disconnects without either leaves the VM stopped and the next one
        is awaited (``accept_timeout`` seconds at most, then 'closed')."""
        if on_listening is not None:
            on_listening(self.address)
        while not self._closing.is_set():
            conn = self._accept(accept_timeout)
            if conn is None:
                break
            outcome = _Connection(self, conn).serve()
            if outcome is not None:
                return outcome
        return GdbOutcome("closed")

    def _warm_up(self) -> None:
        """Compile the run loop and the page walk before the debugger comes: GDB gives up
        on a reply after 2 s, and a cold compile takes longer."""
        vcpu = self.vm.vcpus[0]
        vcpu.warm_up()
        try:
            read_guest(vcpu, int(vcpu.get_regs()["rip"]), 1)
        except (GuestFault, GuestAccessError, HvjitError):
            pass  # no code mapped there yet: the kernels are compiled all the same

    def _accept(self, timeout: Optional[float]) -> Optional[socket.socket]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closing.is_set():
            wait = IDLE_POLL if deadline is None else min(IDLE_POLL, deadline - time.monotonic())
            if wait <= 0:
                return None
            ready, _, _ = select.select([self._listener], [], [], wait)
            if ready:
                conn, peer = self._listener.accept()
                _log.info("gdb connected from %s", peer)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                return conn
        return None


def _debugger_pieces(vcpu, gla: int, length: int) -> tuple[tuple[int, int], ...]:
    """The guest-physical pieces of ``[gla, gla + length)`` as a debugger sees them: every
    present page, user or supervisor, read-only or not, and no accessed/dirty bit set
    (GuestFault where a page is not present)."""
    registers, mem = paging_registers(vcpu)
    registers.update(cpl=0, rflags=registers["rflags"] | RFLAGS_AC, set_ad=False)
    setup = pagewalk.copy_setup(mem, gla, length, access=pagewalk.Access.READ, **registers)
    if setup.fault is not None:
        raise GuestFault(setup.fault)
    for gpa, size in setup.chunks:
        if not vcpu.vm.memory.is_mapped(gpa, size):
            raise GuestAccessError(f"guest-linear {gla:#x} maps to {gpa:#x}, which is not RAM")
    return setup.chunks


def read_guest(vcpu, gla: int, length: int) -> bytes:
    """Guest-virtual memory as the guest wrote it (software breakpoints hidden)."""
    memory = vcpu.vm.memory
    return b"".join(memory.read(gpa, size) for gpa, size in _debugger_pieces(vcpu, gla, length))


def write_guest(vcpu, gla: int, data: bytes) -> None:
    """Write guest-virtual memory, read-only pages included; nothing is written if any page
    is missing. Software breakpoints stay in place over the new bytes."""
    at = 0
    for gpa, size in _debugger_pieces(vcpu, gla, len(data)):
        vcpu.vm.memory.write(gpa, data[at:at + size])
        at += size


def stop_reply(ex: VmExit, thread: int, interrupted: bool, breakpoints, hw_points) -> tuple[bytes, str]:
    """GDB's stop reply for an exit of vCPU ``thread`` (1-based), and a message for the user
    ('' for none). ``breakpoints``: the VM's software breakpoints by address; ``hw_points``:
    the stub's hardware points as (Z type, address, length) keys."""
    code, tail = ex.exitcode, b"thread:%02x;" % thread
    if code == VmExitCode.BPT:
        if ex.rip in breakpoints:
            return b"T%02xswbreak:;" % SIGTRAP + tail, ""
        if any(t == 1 and a == ex.rip for t, a, _ in hw_points):
            return b"T%02xhwbreak:;" % SIGTRAP + tail, ""
        return b"T%02x" % SIGTRAP + tail, ""  # the guest's own int3
    if code == VmExitCode.DB:
        addr = ex.info[1] if len(ex.info) > 1 else 0
        kinds = [t for t, a, _ in hw_points if a == addr and t in _WATCH_NAMES]
        if kinds:
            return b"T%02x%s:%x;" % (SIGTRAP, _WATCH_NAMES[kinds[0]].encode(), addr) + tail, ""
        return b"T%02x" % SIGTRAP + tail, ""
    if code == VmExitCode.MTRAP:
        return b"T%02x" % SIGTRAP + tail, ""
    if code == VmExitCode.BOGUS:
        return b"T%02x" % SIGINT + tail, "" if interrupted else f"hvjit: {ex}"
    if code == VmExitCode.TIMEOUT:
        return b"T%02x" % SIGALRM + tail, f"hvjit: the run timeout expired ({ex})"
    if code == VmExitCode.SUSPENDED:
        if ex.how == SuspendHow.POWEROFF:
            return b"W%02x" % (ex.code & 0xFF), ""
        if ex.how == SuspendHow.TRIPLEFAULT:
            return b"T%02x" % SIGSEGV + tail, f"hvjit: {ex}"
        return b"W00", f"hvjit: {ex}"
    if code == VmExitCode.EMULATION_FAILURE:
        return b"T%02x" % SIGILL + tail, f"hvjit: {ex.report or ex}"
    return b"T%02x" % SIGTRAP + tail, f"hvjit: {ex}"


class _Disconnected(Exception):
    """The debugger went away (EOF, a reset, a reply it would not take)."""


class _Runner:
    """The guest running on a background thread while GDB waits for a stop."""

    def __init__(self, vm, vcpus: list, step: bool, timeout: Optional[float]):
        self.vm, self.vcpus, self.step, self.timeout = vm, vcpus, step, timeout
        self.done = threading.Event()
        self.interrupted = False
        self.index = vcpus[0].index
        self.exit: Optional[VmExit] = None
        self.error: Optional[BaseException] = None
        self._thread = helper_threads.start(self._main, f"{vm.name}-gdb-run")

    def _main(self) -> None:
        try:
            if self.step:
                self.exit = self.vcpus[0].step(1, timeout=self.timeout)
            elif len(self.vcpus) == 1:
                self.exit = self.vcpus[0].run(timeout=self.timeout)
            else:
                result = self.vm.run(timeout=self.timeout)
                self.exit, self.index = result.exit, result.vcpu
        except BaseException as e:  # noqa: BLE001 - reported to the debugger as a stop
            self.error = e
        finally:
            self.done.set()

    def interrupt(self) -> None:
        self.interrupted = True
        self.kick()

    def kick(self) -> None:
        """Stop every vCPU's current run; repeated until done, since a stop reaches only a
        run that has registered (one starting a moment later would miss it)."""
        for v in self.vm.vcpus:
            if not v.destroyed:
                v.stop()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.done.wait(POLL):
            if time.monotonic() >= deadline:
                return False
            self.kick()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return True


class _Connection:
    """One debugger's connection: its packets, its breakpoints, the guest's runs."""

    def __init__(self, stub: GdbStub, sock: socket.socket):
        self.stub, self.vm, self.sock = stub, stub.vm, sock
        self.reader = PacketReader(PACKET_SIZE)
        self.ack = True  # until QStartNoAckMode
        self.last_sent = b""
        self.retransmits = 0
        self.packet_started: Optional[float] = None
        self.g_thread = 1  # the vCPU for registers and memory (GDB's Hg), 1-based
        self.c_thread = -1  # the vCPU legacy c/s resume (Hc)
        self.stop = b"T%02xthread:01;" % SIGTRAP  # nothing ran yet: stopped before the first instruction
        self.runner: Optional[_Runner] = None
        self.outcome: Optional[GdbOutcome] = None
        self.sw: dict[int, int] = {}  # our software breakpoints: address -> insertions
        self.hw: dict[tuple[int, int, int], tuple[dict[int, int], int]] = {}  # (type, addr, len) -> ({vcpu: slot}, insertions)
        self._target: Optional[Target] = None

    # ---- the connection's loop -----------------------------------------------------------

    def serve(self) -> Optional[GdbOutcome]:
        """The outcome, or None when the debugger went away without detaching or killing."""
        try:
            while self.outcome is None:
                if self.stub._closing.is_set():
                    self.outcome = GdbOutcome("closed")
                    break
                data = self._recv(POLL if self.runner is not None or self.reader.in_packet else IDLE_POLL)
                if data:
                    for item in self.reader.feed(data):
                        self._on(item)
                        if self.outcome is not None:
                            break
                self._tick()
            return self.outcome
        except (_Disconnected, OSError) as e:
            _log.info("gdb disconnected: %s", e or type(e).__name__)
            return None
        finally:
            self._end()

    def _recv(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return b""
        data = self.sock.recv(4096)
        if not data:
            raise _Disconnected("end of stream")
        return data

    def _tick(self) -> None:
        runner = self.runner
        if runner is not None:
            if runner.done.is_set():
                self.runner = None
                self._report(runner)
            elif runner.interrupted:
                runner.kick()
        if not self.reader.in_packet:
            self.packet_started = None
        elif self.packet_started is None:
            self.packet_started = time.monotonic()
        elif time.monotonic() - self.packet_started > PACKET_TIMEOUT:
            _log.info("gdb: dropping a packet that stalled for %.0f s", PACKET_TIMEOUT)
            self.reader.reset()
            self.packet_started = None

    def _send(self, raw: bytes) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        try:
            self.sock.sendall(raw)
        except (socket.timeout, OSError) as e:
            raise _Disconnected(f"send failed: {e}") from None
        finally:
            self.sock.settimeout(None)

    def _reply(self, payload: bytes) -> None:
        framed = frame(payload)
        self.last_sent, self.retransmits = framed, 0
        self._send(framed)

    def _on(self, item) -> None:
        if item is Event.ACK:
            self.retransmits = 0
        elif item is Event.NAK:
            if self.ack and self.last_sent and self.retransmits < MAX_RETRANSMIT:
                self.retransmits += 1
                self._send(self.last_sent)
        elif item is Event.INTERRUPT:
            if self.runner is not None:
                self.runner.interrupt()
        elif item is Event.BAD_CHECKSUM:
            if self.ack:
                self._send(b"-")
        elif item is Event.TOO_LONG:
            if self.ack:
                self._send(b"+")
            if self.runner is None:
                self._reply(E_INVALID)
        elif isinstance(item, Packet):
            if self.ack:
                self._send(b"+")
            if self.runner is not None:
                _log.info("gdb: ignoring a packet while the guest runs (all-stop): %r", item.payload[:32])
                return
            reply = self._dispatch(item.payload)
            if reply is not None:
                self._reply(reply)

    def _end(self) -> None:
        """Leave the VM as the debugger found it: stopped, without the stub's breakpoints."""
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.interrupt()
            if not runner.join(STOP_WAIT):
                _log.warning("gdb: the guest did not stop within %.0f s; breakpoints stay", STOP_WAIT)
                self.sock.close()
                return
        for addr in list(self.sw):
            self._forget_breakpoint(addr)
        for key in list(self.hw):
            self._forget_hw(key)
        self.sock.close()

    # ---- commands ------------------------------------------------------------------------

    def _dispatch(self, payload: bytes) -> Optional[bytes]:
        """The reply to one packet (None: no reply, e.g. the guest was resumed)."""
        if not payload:
            return b""
        try:
            handler = _COMMANDS.get(payload[:1])
            return b"" if handler is None else handler(self, payload[1:])
        except GdbProtocolError:
            return E_INVALID
        except (GuestFault, GuestAccessError):
            return E_FAULT
        except VcpuBusyError:
            return E_BUSY
        except UnsupportedError:
            return E_UNSUPPORTED
        except DebugError:
            return E_INVALID
        except Exception:  # noqa: BLE001 - a bug must not take the VM's debugger session down
            _log.exception("gdb: internal error on packet %r", payload[:64])
            return E_INVALID

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = target_for(self.vm.vcpus[0], self.stub.arch)
        return self._target

    def _vcpu(self, thread: int):
        if thread <= 0:
            return self.vm.vcpus[0]
        if thread > len(self.vm.vcpus):
            raise GdbProtocolError(f"no thread {thread}")
        return self.vm.vcpus[thread - 1]

    def _thread_ok(self, thread: int) -> bool:
        return thread in (-1, 0) or 1 <= thread <= len(self.vm.vcpus)

    def cmd_status(self, _args: bytes) -> bytes:
        return self.stop

    def cmd_read_registers(self, _args: bytes) -> bytes:
        return RegisterFile(self._vcpu(self.g_thread), self.target).to_hex()

    def cmd_write_registers(self, args: bytes) -> bytes:
        vcpu = self._vcpu(self.g_thread)
        regs = RegisterFile(vcpu, self.target)
        regs.from_hex(args)
        regs.commit(vcpu)
        return b"OK"

    def cmd_read_register(self, args: bytes) -> bytes:
        index = parse_int(args, 16)
        regs = RegisterFile(self._vcpu(self.g_thread), self.target)
        if index >= len(regs):
            return E_INVALID
        raw = regs.read(index)
        return b"xx" * (self.target.registers[index].bits // 8) if raw is None else to_hex(raw)

    def cmd_write_register(self, args: bytes) -> bytes:
        number, sep, value = args.partition(b"=")
        if not sep:
            raise GdbProtocolError("P needs n=value")
        index = parse_int(number, 16)
        vcpu = self._vcpu(self.g_thread)
        regs = RegisterFile(vcpu, self.target)
        if index >= len(regs):
            return E_INVALID
        regs.write(index, from_hex(value))
        regs.commit(vcpu)
        return b"OK"

    def cmd_read_memory(self, args: bytes) -> bytes:
        addr, length = split_address_length(args)
        length = min(length, MAX_MEMORY, (1 << 64) - addr)
        if length == 0:
            return b""
        vcpu = self._vcpu(self.g_thread)
        try:
            return to_hex(read_guest(vcpu, addr, length))
        except (GuestFault, GuestAccessError):
            pass
        # A range that runs into an unmapped page: the readable part, as the protocol allows.
        out, at = b"", addr
        while len(out) < length:
            n = min(length - len(out), PAGE - at % PAGE)
            try:
                out += read_guest(vcpu, at, n)
            except (GuestFault, GuestAccessError):
                break
            at += n
        return to_hex(out) if out else E_FAULT

    def _write_memory(self, args: bytes, binary: bool) -> bytes:
        span, sep, data = args.partition(b":")
        if not sep:
            raise GdbProtocolError("memory write needs addr,length:data")
        addr, length = split_address_length(span)
        data = unescape_binary(data) if binary else from_hex(data)
        if len(data) != length or addr + length > 1 << 64:
            raise GdbProtocolError(f"memory write of {length} bytes carries {len(data)}")
        if length:
            write_guest(self._vcpu(self.g_thread), addr, data)
        return b"OK"

    def cmd_write_memory(self, args: bytes) -> bytes:
        return self._write_memory(args, binary=False)

    def cmd_write_binary(self, args: bytes) -> bytes:
        return self._write_memory(args, binary=True)

    def cmd_set_thread(self, args: bytes) -> bytes:
        op, thread = args[:1], parse_thread(args[1:])
        if not self._thread_ok(thread):
            return E_NO_THREAD
        if op == b"g":
            self.g_thread = thread if thread > 0 else 1
        elif op == b"c":
            self.c_thread = thread
        else:
            return E_INVALID
        return b"OK"

    def cmd_thread_alive(self, args: bytes) -> bytes:
        thread = parse_thread(args)
        return b"OK" if 1 <= thread <= len(self.vm.vcpus) else E_NO_THREAD

    def cmd_detach(self, _args: bytes) -> bytes:
        self.outcome = GdbOutcome("detached")
        return b"OK"

    def cmd_kill(self, _args: bytes) -> None:
        self.outcome = GdbOutcome("killed")  # 'k' has no reply
        return None

    # ---- resuming ------------------------------------------------------------------------

    def _resume(self, args: bytes, step: bool, with_signal: bool) -> Optional[bytes]:
        """c/s [addr] and C/S sig[;addr] (a VM has no signals to deliver: sig is ignored)."""
        if with_signal:
            sig, _, args = args.partition(b";")
            parse_int(sig, 8)
        thread = self.c_thread if self.c_thread > 0 else self.g_thread
        vcpu = self._vcpu(thread)
        if args:
            vcpu.set_registers(rip=parse_int(args))
        self._start(step, [vcpu] if step else list(self.vm.vcpus))
        return None

    def _start(self, step: bool, vcpus: list) -> None:
        self.runner = _Runner(self.vm, vcpus, step, None if step else self.stub.run_timeout)

    def cmd_continue(self, args: bytes) -> Optional[bytes]:
        return self._resume(args, step=False, with_signal=False)

    def cmd_step(self, args: bytes) -> Optional[bytes]:
        return self._resume(args, step=True, with_signal=False)

    def cmd_continue_signal(self, args: bytes) -> Optional[bytes]:
        return self._resume(args, step=False, with_signal=True)

    def cmd_step_signal(self, args: bytes) -> Optional[bytes]:
        return self._resume(args, step=True, with_signal=True)

    def _vcont(self, actions: bytes) -> Optional[bytes]:
        """``vCont;ACTION[:THREAD]...``: each vCPU takes the first action that names it."""
        every = [v.index + 1 for v in self.vm.vcpus]
        chosen: dict[int, bytes] = {}
        for action in actions.split(b";"):
            op, sep, thread_text = action.partition(b":")
            kind = op[:1]
            if kind not in (b"c", b"C", b"s", b"S", b"t") or (len(op) > 1 and kind in (b"c", b"s", b"t")):
                raise GdbProtocolError(f"vCont action {op[:8]!r}")
            if kind in (b"C", b"S"):
                parse_int(op[1:], 8)  # the signal, required, then ignored
            thread = parse_thread(thread_text) if sep else -1
            if not self._thread_ok(thread):
                return E_NO_THREAD
            for t in every if thread in (-1, 0) else [thread]:
                chosen.setdefault(t, kind.lower())
        steps = [t for t in every if chosen.get(t) == b"s"]
        running = [t for t in every if chosen.get(t) == b"c"]
        if steps:
            self._start(True, [self._vcpu(steps[0])])
        elif running:
            vcpus = [self._vcpu(running[0])] if len(running) == 1 else list(self.vm.vcpus)
            self._start(False, vcpus)
        else:
            return E_INVALID  # only "stop" actions: meaningless in all-stop mode
        return None

    def _report(self, runner: _Runner) -> None:
        """The stop reply for a finished run (preceded by an 'O' message where it helps)."""
        thread = runner.index + 1
        self.g_thread = thread
        message = ""
        ex = runner.exit
        if runner.error is not None or ex is None:
            message = f"hvjit: the run failed: {runner.error}"
            reply = b"T%02xthread:%02x;" % (SIGABRT, thread)
        else:
            reply, message = stop_reply(ex, thread, runner.interrupted, self.vm.breakpoints, self.hw)
        if message:
            text = (message[:MAX_MESSAGE] + "\n").encode("utf-8", "replace")
            self._reply(b"O" + to_hex(text))
        if reply.startswith(b"W"):
            self.outcome = GdbOutcome("exited", ex)
        self.stop = reply
        self._reply(reply)

    # ---- breakpoints and watchpoints -----------------------------------------------------

    def _point(self, args: bytes, insert: bool) -> bytes:
        kind_text, _, rest = args.partition(b",")
        kind = parse_int(kind_text, 8)
        addr_text, _, length_text = rest.partition(b",")
        addr = parse_int(addr_text)
        length = parse_int(length_text.partition(b";")[0], 16)
        if kind == 0:
            return self._software(addr, insert)
        if kind == 3 or kind > 4:
            return E_UNSUPPORTED  # x86 watches writes or all accesses, never reads alone
        return self._hardware(kind, addr, length if kind != 1 else 1, insert)

    def _software(self, addr: int, insert: bool) -> bytes:
        vcpu = self._vcpu(self.g_thread)
        if not insert:
            if addr in self.sw:
                self.sw[addr] -= 1
                if not self.sw[addr]:
                    self._forget_breakpoint(addr)
            return b"OK"
        if addr in self.sw:
            self.sw[addr] += 1
        elif addr in self.vm.breakpoints:
            pass  # the library user's own breakpoint: leave it to them
        else:
            try:
                vcpu.add_breakpoint(addr)
            except DebugError:
                return E_FAULT  # not mapped, not RAM
            self.sw[addr] = 1
        return b"OK"

    def _forget_breakpoint(self, addr: int) -> None:
        self.sw.pop(addr, None)
        try:
            self.vm.vcpus[0].remove_breakpoint(addr)
        except (DebugError, HvjitError) as e:
            _log.warning("gdb: could not remove the breakpoint at %#x: %s", addr, e)

    def _hardware(self, kind: int, addr: int, length: int, insert: bool) -> bytes:
        key = (kind, addr, length)
        if not insert:
            if key in self.hw:
                held, count = self.hw[key]
                if count > 1:
                    self.hw[key] = (held, count - 1)
                else:
                    self._forget_hw(key)
            return b"OK"
        if key in self.hw:
            held, count = self.hw[key]
            self.hw[key] = (held, count + 1)
            return b"OK"
        support = host_support(self.vm.kvm)["hw_breakpoints" if kind == 1 else "watchpoints"]
        if support.startswith("no"):
            return E_UNSUPPORTED
        if support != "yes" and any(int(v.get_sregs()["cs"]["dpl"]) != 0 for v in self.vm.vcpus):
            return E_UNSUPPORTED  # this host delivers them at CPL0 only
        slots: dict[int, int] = {}
        try:
            for v in self.vm.vcpus:  # GDB's hardware points hold for every thread
                slots[v.index] = (v.add_hw_breakpoint(addr) if kind == 1
                                  else v.add_watchpoint(addr, length, _WATCH_KINDS[kind]))
        except DebugError as e:
            for index, slot in slots.items():
                self.vm.vcpus[index].remove_hw(slot)
            return E_NO_SPACE if "in use" in str(e) else E_INVALID
        self.hw[key] = (slots, 1)
        return b"OK"

    def _forget_hw(self, key: tuple[int, int, int]) -> None:
        slots, _ = self.hw.pop(key)
        for index, slot in slots.items():
            try:
                self.vm.vcpus[index].remove_hw(slot)
            except HvjitError as e:
                _log.warning("gdb: could not free debug register %d of vcpu %d: %s", slot, index, e)

    def cmd_insert(self, args: bytes) -> bytes:
        return self._point(args, True)

    def cmd_remove(self, args: bytes) -> bytes:
        return self._point(args, False)

    # ---- queries -------------------------------------------------------------------------

    def cmd_query(self, args: bytes) -> Optional[bytes]:
        name = args.split(b":", 1)[0].split(b",", 1)[0]
        if name == b"Supported":
            return (b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+" % PACKET_SIZE)
        if args.startswith(b"Xfer:features:read:"):
            return self._features(args[len(b"Xfer:features:read:"):])
        if name == b"fThreadInfo":
            return b"m" + b",".join(b"%x" % (v.index + 1) for v in self.vm.vcpus)
        if name == b"sThreadInfo":
            return b"l"
        if name == b"C":
            return b"QC%x" % self.g_thread
        if name == b"Attached":
            return b"1"  # a VM that existed before the debugger: quitting detaches
        if name == b"Symbol":
            return b"OK"
        if name == b"ThreadExtraInfo":
            vcpu = self._vcpu(parse_thread(args.split(b",", 1)[1] if b"," in args else b""))
            mode, _ = cpu_mode(vcpu.get_sregs())
            return to_hex(f"vCPU {vcpu.index}, {mode}, {vcpu.state.value}".encode())
        return b""

    def _features(self, args: bytes) -> bytes:
        annex, sep, span = args.rpartition(b":")
        if not sep or annex != b"target.xml":
            return b"E00"  # the protocol's "no such annex"
        offset, length = split_address_length(span)
        xml = self.target.xml()
        if offset > len(xml):
            return E_INVALID
        # Escaping may double a byte: take what is sure to fit the packet.
        chunk = xml[offset:offset + min(length, (PACKET_SIZE - 2) // 2)]
        more = offset + len(chunk) < len(xml)
        return (b"m" if more else b"l") + escape_binary(chunk)

    def cmd_set(self, args: bytes) -> Optional[bytes]:
        if args == b"StartNoAckMode":
            self._reply(b"OK")  # the debugger acknowledges this reply in the old mode
            self.ack = False
            return None
        return b""

    def cmd_v(self, args: bytes) -> Optional[bytes]:
        if args == b"Cont?":
            return b"vCont;c;C;s;S;t"
        if args.startswith(b"Cont;"):
            return self._vcont(args[len(b"Cont;"):])
        if args.startswith(b"Kill"):
            self.outcome = GdbOutcome("killed")
            return b"OK"
        return b""  # vMustReplyEmpty and everything else we do not do


_COMMANDS: dict[bytes, Callable[[_Connection, bytes], Optional[bytes]]] = {
    b"?": _Connection.cmd_status,
    b"g": _Connection.cmd_read_registers,
    b"G": _Connection.cmd_write_registers,
    b"p": _Connection.cmd_read_register,
    b"P": _Connection.cmd_write_register,
    b"m": _Connection.cmd_read_memory,
    b"M": _Connection.cmd_write_memory,
    b"X": _Connection.cmd_write_binary,
    b"H": _Connection.cmd_set_thread,
    b"T": _Connection.cmd_thread_alive,
    b"c": _Connection.cmd_continue,
    b"s": _Connection.cmd_step,
    b"C": _Connection.cmd_continue_signal,
    b"S": _Connection.cmd_step_signal,
    b"D": _Connection.cmd_detach,
    b"k": _Connection.cmd_kill,
    b"Z": _Connection.cmd_insert,
    b"z": _Connection.cmd_remove,
    b"q": _Connection.cmd_query,
    b"Q": _Connection.cmd_set,
    b"v": _Connection.cmd_v,
}
