"""Starting and stopping a real `hvjit serve` process, for the tests and the start-up bench.
Every wait is bounded and fails when the bound passes."""

import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

START_TIMEOUT = 300.0  # a server's warm-up, on a shared host with a cold kernel cache at worst


def start_server(path: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "hvjit", "serve", "--socket", str(path), *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT
    seen = b""
    while b"serving on" not in seen:
        if not select.select([proc.stderr], [], [], max(deadline - time.monotonic(), 0))[0]:
            proc.kill()
            pytest.fail(f"hvjit serve: not serving within {START_TIMEOUT} s: {seen!r}")
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"hvjit serve exited with {proc.wait()}: {seen!r}")
        seen += line
    return proc


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("hvjit serve did not exit within 30 s of SIGTERM")
    finally:
        proc.stderr.close()
