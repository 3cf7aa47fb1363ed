"""`hvjit serve`: a warm fork server for `hvjit run` (Android's zygote, nailgun, emacsclient).

A whole `hvjit run` of a tiny guest costs ~0.5 s, nearly all of it importing numpy and Numba
and loading the cached kernels. The server pays that once: `hvjit serve` runs a tiny guest the
way `hvjit run` does (``cli.cmd_serve``), then stops hvjit's helper threads, checks that no
VM or vCPU descriptor is left (:func:`make_forkable`) and listens on a Unix socket (mode
0600). Each connection goes to a child forked ahead of it (the "spare", forked at the start
and whenever a run ends; a child forked then if there is none), which takes the client's
stdin/stdout/stderr (SCM_RIGHTS), argv, cwd, umask and environment, runs the command,
reports its status and exits; the server stays single-threaded, reaps its children and kills
a child whose client went away. The wire
format and the client are in :mod:`hvjit.serve_client`.

What a child cannot take from the client: whatever was read when the server imported hvjit
(``HVJIT_CACHE_DIR``, ``HVJIT_LIBHVT``, the interpreter and its options) is the server's.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from typing import Callable, NoReturn, Optional

from .errors import HvjitError
from .serve_client import read_request, send_message

REQUEST_TIMEOUT = 10.0  # a client sends its request as soon as it is connected
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
SPARE_NAME = b"hvjit-spare"  # a spare's /proc/PID/comm until it is handed a request

# argv and the client's process start (CLOCK_MONOTONIC ns) -> exit status
Command = Callable[[list[str], Optional[int]], int]


def make_forkable() -> None:
    """Stop hvjit's helper threads; fail unless the process is then single-threaded and holds
    no VM or vCPU descriptor: a forked child gets only the forking thread (a lock another
    thread held stays locked there), and KVM serves a VM only to the process that made it.
    ``/dev/kvm`` itself stays open, with what hvjit learnt of the host (``Kvm.instance()``:
    capabilities, CPUID, TSC, probed behaviour): it belongs to no process's memory."""
    from .session import stop_reaper
    from .watchdog import stop as stop_watchdog

    stop_reaper()
    stop_watchdog()
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        raise HvjitError(f"cannot serve: threads still running after the warm-up: {names}")
    kvm = [target for target in _open_fds().values() if target.startswith("anon_inode:kvm")]
    if kvm:
        raise HvjitError(f"cannot serve: KVM VM or vCPU descriptors still open after the warm-up: {kvm}")


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _set_name(name: bytes) -> None:
    """The process's name (/proc/PID/comm, what ps and top show)."""
    _libc().prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory's own descriptor, closed by now
    return fds


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket (nobody listening); refuse a live server's or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HvjitError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise HvjitError(f"a server already listens on {path}")


def _listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    _claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # created 0600: only this user may hand the server commands
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise HvjitError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(umask)
    sock.listen(64)
    return sock


class Server:
    def __init__(self, path: str, command: Command):
        self.path = path
        self.command = command
        self.listener = _listen(path)
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.children: dict[int, socket.socket] = {}  # pid -> its client's connection
        self._by_fd: dict[int, int] = {}
        # A child forked ahead of the next request, waiting for its connection on the other
        # end of `handoff`: the request does not wait for the fork (see _fork_spare).
        self.spare: Optional[tuple[int, socket.socket]] = None  # (pid, handoff)
        self._poll = select.poll()
        self.stopping: Optional[int] = None

    def serve(self, idle_timeout: Optional[float]) -> int:
        def stop(signum, _frame):
            self.stopping = signum

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake poll
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._poll.register(self.listener, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)
        self._fork_spare()
        print(f"hvjit: serving on {self.path} (pid {os.getpid()})", file=sys.stderr, flush=True)
        last = time.monotonic()
        try:
            while self.stopping is None:
                timeout_ms = None
                if idle_timeout is not None and not self.children:
                    left = last + idle_timeout - time.monotonic()
                    if left <= 0:
                        print(f"hvjit: no request for {idle_timeout:g} s: server exiting", file=sys.stderr)
                        return 0
                    timeout_ms = int(left * 1000) + 1
                for fd, _ in self._poll.poll(timeout_ms):
                    if fd == self.listener.fileno():
                        self._accept()
                        last = time.monotonic()
                    elif fd == self._wake_r.fileno():
                        self._drain_wakeups()
                    else:
                        self._client_gone(fd)
                if self._reap():
                    last = time.monotonic()
                    # The next request's child, now that a run ended: forking (~7 ms of this
                    # process's page tables) beside a starting run would compete with it.
                    if self.spare is None and self.stopping is None:
                        self._fork_spare()
            print(f"hvjit: {signal.Signals(self.stopping).name}: server exiting", file=sys.stderr)
            return 0
        finally:
            spare = [self.spare[0]] if self.spare else []
            for pid in [*self.children, *spare]:
                os.kill(pid, signal.SIGKILL)
            for pid in [*self.children, *spare]:
                _, status = os.waitpid(pid, 0)
                self._finish(pid, status)
            self.close()
            signal.set_wakeup_fd(-1)  # last: a second SIGTERM meanwhile must not cut the clean-up short
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(256):
                pass
        except BlockingIOError:
            pass

    def _fork_spare(self) -> None:
        """Fork the child for the next request now (at the start, and when a run ended):
        forking this process (its page tables) and the child's first steps take ~10 ms,
        which a request then does not wait for."""
        ours, theirs = socket.socketpair()
        pid = self._fork()
        if pid == 0:
            ours.close()
            self._spare(theirs)
        theirs.close()
        if pid < 0:
            ours.close()
            return
        self.spare = (pid, ours)

    def _fork(self) -> int:
        """os.fork(), or -1 (said on stderr) when the host refuses."""
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            return os.fork()
        except OSError as e:
            print(f"hvjit: cannot fork: {e}", file=sys.stderr)
            return -1

    def _hand_to_spare(self, conn: socket.socket) -> int:
        """The spare's pid, once it holds ``conn``; -1 when there is none (or it died)."""
        if self.spare is None:
            return -1
        pid, handoff = self.spare
        self.spare = None
        try:
            socket.send_fds(handoff, [b"c"], [conn.fileno()])
        except OSError:
            os.kill(pid, signal.SIGKILL)  # gone or going: _reap collects it
            return -1
        finally:
            handoff.close()
        return pid

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        pid = self._hand_to_spare(conn)
        if pid < 0:
            pid = self._fork()
            if pid == 0:
                self._child(conn)
            if pid < 0:
                conn.close()
                return
        self.children[pid] = conn
        self._by_fd[conn.fileno()] = pid
        # Only the client's hang-up, not its data: the child reads the request.
        self._poll.register(conn, select.POLLRDHUP)

    def _client_gone(self, fd: int) -> None:
        """The client closed its end (exited, was killed): no one waits for the run."""
        self._poll.unregister(fd)
        pid = self._by_fd.pop(fd)
        os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's

    def _reap(self) -> bool:
        """Collect the children that ended; whether a run was among them."""
        ran = False
        while self.children or self.spare:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            ran |= self._finish(pid, status)
        return ran

    def _finish(self, pid: int, status: int) -> bool:
        if self.spare is not None and pid == self.spare[0]:
            # Died before any request (its next would likely die too): no new spare until a
            # run ends; requests meanwhile get a child forked for them.
            self.spare[1].close()
            self.spare = None
            return False
        conn = self.children.pop(pid, None)
        if conn is None:  # a spare that died as it was handed a connection
            return False
        if self._by_fd.pop(conn.fileno(), None) is not None:
            self._poll.unregister(conn)
        if os.WIFSIGNALED(status):
            # The child could not say it; the client dies of the same signal.
            try:
                conn.send(b'{"signal": %d}\n' % os.WTERMSIG(status), socket.MSG_DONTWAIT)
            except OSError:
                pass
        conn.close()
        return True

    def close(self) -> None:
        """Close the socket and remove its file (unless a successor's replaced it)."""
        self.listener.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:  # not a successor's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._wake_r.close()
        self._wake_w.close()

    # ---- in the child ---------------------------------------------------------------------

    def _spare(self, handoff: socket.socket) -> NoReturn:
        """A child forked ahead: leave the server's world, then wait for a connection."""
        try:
            if self._detach():
                _set_name(SPARE_NAME)
                _, fds, _, _ = socket.recv_fds(handoff, 1, 1)
                if fds:  # else the server closed its end: it is going
                    handoff.close()
                    _set_name(b"hvjit-run")
                    self._child(socket.socket(fileno=fds[0]), detached=True)
        except BaseException:  # noqa: BLE001 - a spare has no client to tell
            pass
        os._exit(0)

    def _child(self, conn: socket.socket, detached: bool = False) -> NoReturn:
        status: Optional[int] = 1
        try:
            status = self._run_request(conn) if detached or self._detach() else None
        except KeyboardInterrupt:
            status = 130
        except BaseException:  # noqa: BLE001 - reported to the client's stderr, never to the server
            traceback.print_exc()
            status = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            if status is not None:
                try:
                    send_message(conn, {"status": status & 0xFF})
                except OSError:
                    pass
            os._exit((status or 0) & 0xFF)

    def _detach(self) -> bool:
        """In a new child: none of the server's world. Its own session (no terminal's
        signals, the client forwards them), the default signal handlers, none of the
        server's sockets; dies with the server. False if the server is gone already."""
        server = os.getppid()
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        spare = [self.spare[1]] if self.spare else []
        for sock in (self.listener, self._wake_r, self._wake_w, *self.children.values(), *spare):
            sock.close()
        # Die with the server (SIGKILL'd, say): no VM outlives both server and client.
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        return os.getppid() == server

    def _run_request(self, conn: socket.socket) -> Optional[int]:
        conn.settimeout(REQUEST_TIMEOUT)
        request, fds = read_request(conn)
        if request is None:
            return None  # a probe (is a server listening?) sends nothing
        conn.settimeout(None)
        if len(fds) != 3:
            raise OSError(f"request came with {len(fds)} descriptors, not stdin, stdout and stderr")
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # received ones are >= 3: serve() keeps 0-2 open
            os.close(fd)
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())  # as the client's would be
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        send_message(conn, {"pid": os.getpid()})
        try:
            return self.command(request["argv"], request["process_start_ns"])
        except SystemExit as e:  # argparse: a usage error, --help
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=sys.stderr)
            return 1


def serve(path: str, *, idle_timeout: Optional[float], warm_up: Callable[[], None], command: Command) -> int:
    """Serve ``command`` on the Unix socket ``path`` until SIGTERM/SIGINT (or ``idle_timeout``
    seconds without a request). ``warm_up`` imports and loads what the command needs; it runs
    once the socket is claimed (a live server there is refused before that work), and clients
    that connect meanwhile wait in the backlog."""
    for fd in (0, 1, 2):  # kept open, so descriptors a child receives never land on 0-2
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    server = Server(path, command)
    try:
        warm_up()
        make_forkable()
    except BaseException:
        server.close()
        raise
    return server.serve(idle_timeout)
