"""`hvjit serve` and `hvjit run --server`, as a user runs them: real processes, tiny CPL3
guests. Every wait is bounded and fails when the bound passes."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvjit.asm import assemble

from .guests import hello_source
from .serving import start_server, stop_server

RUN_TIMEOUT = 60.0
GONE_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "s.sock"
    proc = start_server(path)
    yield proc, path
    stop_server(proc)


def hvjit(*args, env=None, timeout=RUN_TIMEOUT):
    return subprocess.run([sys.executable, "-m", "hvjit", *args], capture_output=True, timeout=timeout,
                          env=env if env is not None else {k: v for k, v in os.environ.items() if k != "HVJIT_SERVER"})


# The hvjit-client executable (client/hvjit_client.c), installed beside the interpreter.
C_CLIENT = Path(sys.executable).with_name("hvjit-client")


def front(name: str) -> list[str]:
    """The command that sends `hvjit run` to a server: the Python one or hvjit-client."""
    if name == "c":
        assert C_CLIENT.exists(), f"{C_CLIENT} not installed (pip install -e . builds it)"
        return [str(C_CLIENT)]
    return [sys.executable, "-m", "hvjit"]


def client(path: Path, *args, via: str = "python", **popen):
    return subprocess.Popen([*front(via), "run", "--server", str(path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def hello(tmp_path: Path, text: str, code: int) -> Path:
    image = tmp_path / f"hello-{code}.bin"
    image.write_bytes(assemble(hello_source("long", text, code), 0x1000))
    return image


def spin(tmp_path: Path) -> Path:
    image = tmp_path / "spin.bin"
    # mov $0x3f8, %dx; mov $'R', %al; out %al, %dx; jmp . -- one byte says it runs, then it
    # never leaves the guest (CPL3)
    image.write_bytes(bytes.fromhex("66baf803" "b052" "ee" "ebfe"))
    return image


def children(server_pid: int, *, spare: bool = False) -> set[int]:
    """The server's children: those serving a request (or, with ``spare``, also the one
    forked ahead for the next request)."""
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
        pids = {int(p) for p in f.read().split()}
    return pids if spare else {pid for pid in pids if _name(pid) != "hvjit-spare"}


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""  # gone


def running_child(server_pid: int, client: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> int:
    """The server's child serving ``client`` (a :func:`spin` guest), once the guest runs: its
    vCPU exists and its first byte reached the client's stdout."""
    deadline = time.monotonic() + timeout
    child = None
    while child is None and time.monotonic() < deadline:
        assert client.poll() is None, client.communicate()
        for pid in children(server_pid):
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:
                continue
            if any("kvm-vcpu" in link for link in links):
                child = pid
        time.sleep(0.02)
    if child is None:
        pytest.fail(f"no child of the server ran a vCPU within {timeout} s")
    ready, _, _ = select.select([client.stdout], [], [], max(deadline - time.monotonic(), 0))
    if not ready:
        pytest.fail(f"the guest printed nothing within {timeout} s")
    assert client.stdout.read(1) == b"R"
    return child


def gone(pid: int, timeout: float = GONE_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.02)
    return False


def quiet(server_pid: int, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while children(server_pid):
        if time.monotonic() > deadline:
            pytest.fail(f"the server still has children after {timeout} s")
        time.sleep(0.02)


def settled(server_pid: int) -> int:
    """How many descriptors the server holds once it is idle again: no run, and its spare
    forked (the spare's socket may not get the number the last one had)."""
    quiet(server_pid)
    spare(server_pid)
    return len(os.listdir(f"/proc/{server_pid}/fd"))


def test_output_and_status_equal_a_direct_run(server, tmp_path):
    _, path = server
    image = hello(tmp_path, "same either way\\n", 23)
    direct = hvjit("run", str(image), "--cpl", "3")
    served = hvjit("run", "--server", str(path), str(image), "--cpl", "3")
    assert direct.stdout == b"same either way\n", direct.stderr
    assert (served.stdout, served.returncode) == (direct.stdout, direct.returncode) == (direct.stdout, 23), served.stderr
    assert b"poweroff" in served.stderr and b"code 23" in served.stderr


def test_the_client_imports_no_numpy_numba_or_vm(server, tmp_path):
    _, path = server
    image = hello(tmp_path, "light\\n", 0)
    probe = ("import json, sys\n"
             "from hvjit import cli\n"
             f"status = cli.main(['run', '--server', {str(path)!r}, {str(image)!r}, '--cpl', '3'])\n"
             "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
             "sys.exit(status)\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 0 and p.stdout == b"light\n", p.stderr
    modules = json.loads(p.stderr.splitlines()[-1])
    heavy = [m for m in modules if m.split(".")[0] in ("numpy", "numba", "llvmlite", "cffi", "elftools")
             or m in ("hvjit.vm", "hvjit.session", "hvjit.system", "hvjit._trampoline", "hvjit.serve")]
    assert heavy == []
    assert "hvjit.serve_client" in modules


def test_json_through_the_server_counts_from_the_client_start(server, tmp_path):
    proc, path = server
    image = hello(tmp_path, "up", 0)
    spawned = time.monotonic_ns()
    p = hvjit("run", "--server", str(path), str(image), "--cpl", "3", "--json")
    returned = time.monotonic_ns()
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)["startup"]
    assert st["server"] is True
    assert "max_rss_kib" not in st and 10_000 < st["child_max_rss_kib"] < 4 << 20
    # The client's start (one 10 ms clock tick of resolution), not the server's nor the child's.
    assert spawned - 20_000_000 < st["process_start_ns"] < st["first_kvm_run_ns"] < returned
    assert 0 < st["first_kvm_run_s"] <= st["wall_s"] < (returned - spawned) / 1e9 + 0.02


@pytest.mark.parametrize("via", ["python", "c"])
def test_sigint_to_the_client_ends_the_run_like_a_direct_one(server, tmp_path, via):
    proc, path = server
    c = client(path, str(spin(tmp_path)), "--cpl", "3", "--timeout", "120", via=via)
    child = running_child(proc.pid, c)
    c.send_signal(signal.SIGINT)
    out, err = c.communicate(timeout=GONE_TIMEOUT)
    assert c.returncode == 130, err
    assert b"interrupted" in err
    assert gone(child), f"child {child} still there"


@pytest.mark.parametrize("via", ["python", "c"])
def test_a_killed_client_takes_its_child_along(server, tmp_path, via):
    proc, path = server
    c = client(path, str(spin(tmp_path)), "--cpl", "3", "--timeout", "120", via=via)
    child = running_child(proc.pid, c)
    c.kill()
    c.communicate(timeout=GONE_TIMEOUT)
    assert gone(child), f"child {child} of a SIGKILLed client still there"


def spare(server_pid: int, timeout: float = RUN_TIMEOUT) -> int:
    """The child the server forked ahead for the next request, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spares = children(server_pid, spare=True) - children(server_pid)
        if spares:
            assert len(spares) == 1, spares
            return spares.pop()
        time.sleep(0.02)
    pytest.fail(f"no spare child within {timeout} s")


def test_the_child_forked_ahead_serves_the_next_request(server, tmp_path):
    proc, path = server
    quiet(proc.pid)
    ahead = spare(proc.pid)
    c = client(path, str(spin(tmp_path)), "--cpl", "3", "--timeout", "120")
    assert running_child(proc.pid, c) == ahead  # the spare took it (and left its name)
    c.kill()
    c.communicate(timeout=GONE_TIMEOUT)
    assert gone(ahead)
    assert spare(proc.pid) != ahead  # the next one, forked when that run ended


def test_a_dead_spare_costs_a_request_nothing(server, tmp_path):
    proc, path = server
    quiet(proc.pid)
    os.kill(spare(proc.pid), signal.SIGKILL)
    p = hvjit("run", "--server", str(path), str(hello(tmp_path, "fork\\n", 4)), "--cpl", "3")
    assert (p.stdout, p.returncode) == (b"fork\n", 4), p.stderr  # forked for it instead
    quiet(proc.pid)
    spare(proc.pid)  # and a spare again once that run ended


def test_two_clients_at_once(server, tmp_path):
    _, path = server
    slow = client(path, str(spin(tmp_path)), "--cpl", "3", "--timeout", "4")  # ends by its watchdog
    fast = client(path, str(hello(tmp_path, "second\\n", 7)), "--cpl", "3")
    out, err = fast.communicate(timeout=RUN_TIMEOUT)
    assert (out, fast.returncode) == (b"second\n", 7), err
    assert slow.poll() is None, "the slow run should still be going: the two ran at once"
    _, err = slow.communicate(timeout=RUN_TIMEOUT)
    assert slow.returncode == 124 and b"TIMEOUT" in err, err


def test_the_server_leaks_no_descriptors_across_requests(server, tmp_path):
    proc, path = server
    image = hello(tmp_path, "fd\\n", 0)
    assert hvjit("run", "--server", str(path), str(image), "--cpl", "3").returncode == 0
    before = settled(proc.pid)
    for _ in range(3):
        assert hvjit("run", "--server", str(path), str(image), "--cpl", "3").returncode == 0
    interrupted = client(path, str(spin(tmp_path)), "--cpl", "3", "--timeout", "120")
    running_child(proc.pid, interrupted)
    interrupted.kill()
    interrupted.communicate(timeout=GONE_TIMEOUT)
    assert settled(proc.pid) == before


@pytest.mark.parametrize("garbage", [
    b"",  # connect and hang up (what a probe does)
    b"\x00\x00\x00\x05{not json",  # a request that is not JSON
    b"\xff\xff\xff\xff",  # a length far over the limit
    b"\x00\x00\x10\x00{}",  # cut short: the rest never comes
])
def test_a_malformed_request_ends_only_its_child(server, tmp_path, garbage):
    proc, path = server
    before = settled(proc.pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(garbage)
    # Served after the malformed one (the backlog is first come, first served).
    ok = hvjit("run", "--server", str(path), str(hello(tmp_path, "still\\n", 0)), "--cpl", "3")
    assert (ok.stdout, ok.returncode) == (b"still\n", 0), ok.stderr
    assert proc.poll() is None, "the server died of a malformed request"
    deadline = time.monotonic() + GONE_TIMEOUT  # the last connection closes just after its child goes
    while settled(proc.pid) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert settled(proc.pid) == before


def test_a_second_server_on_a_live_socket_is_refused(server):
    _, path = server
    p = hvjit("serve", "--socket", str(path), timeout=RUN_TIMEOUT)
    assert p.returncode == 1
    assert b"already listens" in p.stderr
    assert path.is_socket()
    assert hvjit("run", "--server", str(path), "--help").returncode == 0  # the first one still serves


def test_stale_socket_replaced_and_sigterm_cleans_up(tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens
    proc = start_server(path)
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        c = client(path, str(spin(tmp_path)), "--cpl", "3", "--timeout", "120")
        child = running_child(proc.pid, c)
        proc.send_signal(signal.SIGTERM)
        c.communicate(timeout=GONE_TIMEOUT)
        assert c.returncode == -signal.SIGKILL  # the child was killed; its client dies alike
        assert gone(child)
        assert proc.wait(timeout=GONE_TIMEOUT) == 0
    finally:
        stop_server(proc)
    assert not path.exists()


def test_idle_timeout_ends_the_server(tmp_path):
    path = tmp_path / "idle.sock"
    proc = start_server(path, "--idle-timeout", "1")
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        stop_server(proc)
    assert not path.exists()


def test_unreachable_server_named_by_option_is_an_error(tmp_path):
    image = hello(tmp_path, "never\\n", 0)
    p = hvjit("run", "--server", str(tmp_path / "nobody.sock"), str(image), "--cpl", "3")
    assert p.returncode == 1 and p.stdout == b""
    assert b"no hvjit server at" in p.stderr


def test_unreachable_server_from_the_environment_runs_in_process(tmp_path):
    image = hello(tmp_path, "here\\n", 3)
    env = dict(os.environ, HVJIT_SERVER=str(tmp_path / "nobody.sock"))
    p = hvjit("run", str(image), "--cpl", "3", env=env)
    assert (p.stdout, p.returncode) == (b"here\n", 3), p.stderr
    notes = [line for line in p.stderr.splitlines() if b"server" in line]
    assert len(notes) == 1 and b"running in this process" in notes[0]


def test_server_from_the_environment(server, tmp_path):
    _, path = server
    image = hello(tmp_path, "env", 0)
    p = hvjit("run", str(image), "--cpl", "3", "--json", env=dict(os.environ, HVJIT_SERVER=str(path)))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["startup"]["server"] is True


# ---- hvjit-client (C) --------------------------------------------------------------------------

def test_c_client_output_status_and_start_equal_the_python_ones(server, tmp_path):
    _, path = server
    image = hello(tmp_path, "from c\\n", 23)
    spawned = time.monotonic_ns()
    p = subprocess.run([*front("c"), "run", f"--server={path}", str(image), "--cpl", "3", "--json"],
                       capture_output=True, timeout=RUN_TIMEOUT)
    returned = time.monotonic_ns()
    assert p.returncode == 23, p.stderr
    doc = json.loads(p.stdout)
    assert doc["console"] == "from c\n" and doc["startup"]["server"] is True
    st = doc["startup"]
    # The C client reads CLOCK_MONOTONIC itself: no clock tick of slack.
    assert spawned < st["process_start_ns"] < st["first_kvm_run_ns"] < returned
    plain = subprocess.run([*front("c"), "run", "--server", str(path), str(image), "--cpl", "3"],
                           capture_output=True, timeout=RUN_TIMEOUT)
    direct = hvjit("run", str(image), "--cpl", "3")
    assert (plain.stdout, plain.returncode) == (direct.stdout, direct.returncode) == (b"from c\n", 23)


def test_c_client_carries_names_that_are_not_utf8_or_need_escapes(server, tmp_path):
    _, path = server
    odd = os.fsencode(tmp_path) + b"/d\xffir \"q\\\tx"
    os.mkdir(odd)
    image = hello(tmp_path, "odd\\n", 5)
    name = b"caf\xe9\n.bin"
    with open(odd + b"/" + name, "wb") as f:
        f.write(image.read_bytes())
    p = subprocess.run([*front("c"), "run", "--server", str(path), os.fsdecode(name), "--cpl", "3"],
                       capture_output=True, timeout=RUN_TIMEOUT, cwd=odd)
    assert (p.stdout, p.returncode) == (b"odd\n", 5), p.stderr


def test_c_client_unreachable_server_named_is_an_error_else_hvjit_runs_it(tmp_path):
    image = hello(tmp_path, "here\\n", 3)
    nobody = str(tmp_path / "nobody.sock")
    named = subprocess.run([*front("c"), "run", "--server", nobody, str(image), "--cpl", "3"],
                           capture_output=True, timeout=RUN_TIMEOUT)
    assert named.returncode == 1 and named.stdout == b"" and b"no hvjit server at" in named.stderr
    # From the environment: `hvjit` (found on PATH) runs it in its own process.
    env = dict(os.environ, HVJIT_SERVER=nobody,
               PATH=os.pathsep.join([str(C_CLIENT.parent), os.environ.get("PATH", "")]))
    fallback = subprocess.run([*front("c"), "run", str(image), "--cpl", "3"], capture_output=True,
                              timeout=RUN_TIMEOUT, env=env)
    assert (fallback.stdout, fallback.returncode) == (b"here\n", 3), fallback.stderr
    assert b"running in this process" in fallback.stderr
    usage = subprocess.run([*front("c"), "info"], capture_output=True, timeout=RUN_TIMEOUT)
    assert usage.returncode == 2 and b"usage: hvjit-client run" in usage.stderr


@pytest.mark.parametrize("via", ["python", "c"])
def test_a_killed_server_ends_its_runs_and_their_clients(tmp_path, via):
    path = tmp_path / "doomed.sock"
    proc = start_server(path)
    try:
        c = client(path, str(spin(tmp_path)), "--cpl", "3", "--timeout", "120", via=via)
        child = running_child(proc.pid, c)
        proc.kill()
        proc.wait(timeout=GONE_TIMEOUT)
        _, err = c.communicate(timeout=GONE_TIMEOUT)  # no hang: the connection closes
        assert c.returncode == 1 and b"closed the connection before the run ended" in err, err
        assert gone(child), f"child {child} outlived its server"
    finally:
        stop_server(proc)
