"""The client of `hvjit serve` (:mod:`hvjit.serve`), and the wire format both sides speak.

``hvjit run --server PATH ...`` (or ``HVJIT_SERVER=PATH``) sends the run to a warm server
instead of importing numpy and Numba itself: this module imports only the standard library,
so the client costs about a bare interpreter's start.

One connection per run, on a Unix stream socket:

- client -> server: a 4-byte big-endian length and a JSON request (``argv``, ``cwd``,
  ``env``, ``umask``, ``process_start_ns``), sent with the client's stdin, stdout and stderr
  attached (SCM_RIGHTS);
- server -> client: JSON lines, ``{"pid": N}`` (the child running the command: the client
  forwards SIGINT and SIGTERM to it), then ``{"status": S}`` (its exit status) or
  ``{"signal": N}`` (it was killed by signal N).

The client keeps the connection open while the run lasts: when it closes (the client exited
or was killed), the server kills the child.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

# No typing import (~4 ms of a client's start): `X | None` annotations, never evaluated.
ENV = "HVJIT_SERVER"
_LENGTH_BYTES = 4  # big-endian
MAX_REQUEST = 1 << 20  # argv and environment: far more than any shell passes


def wants_server(argv: list[str]) -> bool:
    """Whether ``hvjit <argv>`` is a run to send to a server (``--server`` or $HVJIT_SERVER)."""
    return argv[:1] == ["run"] and bool(os.environ.get(ENV) or any(a == "--server" or a.startswith("--server=")
                                                                    for a in argv))


def run_if_served(argv: list[str]) -> tuple[int | None, list[str]]:
    """``hvjit <argv>`` through the server it names: (its exit status, argv). (None, argv
    without ``--server``) when it is to run in this process: no server named, or only
    $HVJIT_SERVER's and nobody listens there (said on stderr)."""
    if not wants_server(argv):
        return None, argv
    server, explicit, rest = split_server_option(argv[1:])
    if not server:
        return None, ["run", *rest]
    try:
        return run(server, ["run", *rest], process_start_ns()), argv
    except ServerUnreachable as e:
        if explicit:
            print(f"hvjit: error: {e}", file=sys.stderr)
            return 1, argv
        print(f"hvjit: {e} (${ENV}): running in this process", file=sys.stderr)
        return None, ["run", *rest]
    except OSError as e:
        print(f"hvjit: error: the server at {server}: {e}", file=sys.stderr)
        return 1, argv


def process_start_ns() -> int | None:
    """When this process started, on CLOCK_MONOTONIC (ns), from ``/proc/self/stat``: the
    kernel keeps it in clock ticks (USER_HZ, 10 ms here), so it is up to one tick early."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, starttime
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    # starttime counts from boot (CLOCK_BOOTTIME); move it onto CLOCK_MONOTONIC.
    offset = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    return ticks * 1_000_000_000 // hz - offset


class ServerUnreachable(OSError):
    """Nobody listens on the socket (or it is not there)."""


def default_socket_path() -> str:
    """Where `hvjit serve` listens unless told: ``$XDG_RUNTIME_DIR/hvjit/serve.sock`` (a
    per-user tmpfs), else beside hvjit's cache."""
    from ._cachedir import cache_base

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "hvjit", "serve.sock") if runtime else str(cache_base() / "serve.sock")


def split_server_option(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    """``hvjit run`` arguments -> (server socket, whether ``--server`` named it, argv without
    ``--server PATH``). ``--server`` wins over ``$HVJIT_SERVER``; after ``--`` nothing is an option."""
    rest: list[str] = []
    server = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "--server" and i + 1 < len(argv):
            server = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--server="):
            server = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    if server is not None:
        return server, True, rest
    return os.environ.get(ENV) or None, False, rest


def encode_request(request: dict) -> bytes:
    body = json.dumps(request).encode()
    return len(body).to_bytes(_LENGTH_BYTES, "big") + body


def read_request(conn: socket.socket) -> tuple[dict | None, list[int]]:
    """The request and the descriptors that came with it; (None, []) when the peer closed
    without sending one (a probe: is a server listening here?)."""
    data, fds, flags, _ = socket.recv_fds(conn, 65536, 3)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError("request: descriptors truncated")
    if not data:
        return None, fds
    while True:
        if len(data) >= _LENGTH_BYTES:
            size = int.from_bytes(data[:_LENGTH_BYTES], "big")
            if size > MAX_REQUEST:
                raise OSError(f"request of {size} bytes: too large")
            if len(data) >= _LENGTH_BYTES + size:
                return json.loads(data[_LENGTH_BYTES:_LENGTH_BYTES + size]), fds
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("request cut short")
        data += chunk


def send_message(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def run(path: str, argv: list[str], process_start_ns: int | None) -> int:
    """Run ``hvjit <argv>`` in the server at ``path`` with this process's stdio, cwd and
    environment; returns its exit status (or dies of the signal that killed it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise ServerUnreachable(f"no hvjit server at {path} ({e.strerror or e})") from None
    child: list[int] = []
    pending: list[int] = []

    def forward(signum, _frame):
        # Ctrl-C reaches only this process (the child is in its own session): pass it on, so
        # the run ends as a direct run would (status 130 for SIGINT).
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:
            pass  # it has just ended: its status is on the way

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        request = encode_request({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                                  "process_start_ns": process_start_ns})
        sent = socket.send_fds(sock, [request], [0, 1, 2])
        sock.sendall(request[sent:])
        with sock.makefile("rb") as reader:
            for line in reader:
                message = json.loads(line)
                if "pid" in message:
                    child.append(message["pid"])
                    for signum in pending:
                        forward(signum, None)
                elif "status" in message:
                    return int(message["status"])
                elif "signal" in message:
                    # Die as the child did, so our parent sees what a direct run would show.
                    signum = int(message["signal"])
                    if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those have no handler to reset
                        signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                    return 128 + signum
        print(f"hvjit: the server at {path} closed the connection before the run ended", file=sys.stderr)
        return 1
    finally:
        sock.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
