"""The mutation engine: libFuzzer (Google's, through the ``atheris`` package) in a child process.

libFuzzer picks and mutates inputs (bit flips, byte insertion and erasure, splicing corpus
entries, dictionary words, operands from logged comparisons), keeps the ones that reach new
coverage features in a corpus directory, and schedules them (entropic power schedule).
hvjit runs each input in the VM and answers with the coverage features and comparisons the
guest produced (see :mod:`hvjit.fuzz._libfuzzer_child` for the wire format). libFuzzer takes
over the process it runs in, hence the child; one pipe round trip per input costs far less
than a VM reset.
"""

from __future__ import annotations

import importlib.util
import os
import select
import struct
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import HvjitError

CHILD = Path(__file__).with_name("_libfuzzer_child.py")
INSTALL_HINT = "pip install 'hvjit[fuzz]'  (the atheris package: libFuzzer's mutator)"
REPLY_TIMEOUT = 60.0  # seconds to wait for libFuzzer's next input before declaring it hung


class EngineError(HvjitError):
    """The mutation engine is missing, failed to start, or died."""


def available() -> bool:
    return importlib.util.find_spec("atheris") is not None


class LibFuzzerEngine:
    """``next_input()`` gives the input to run; ``report(features, comparisons)`` answers it."""

    def __init__(self, *, features: int, max_len: int, seed: int, corpus_dir, seed_dirs: Sequence = (),
                 dictionary: Optional[str] = None, log_path=None, value_profile: bool = False):
        if not available():
            raise EngineError(f"fuzzing needs libFuzzer's mutator: {INSTALL_HINT}")
        if max_len < 1:
            raise EngineError(f"max_len must be at least 1, got {max_len}")
        Path(corpus_dir).mkdir(parents=True, exist_ok=True)
        self.features = features
        # libFuzzer never sees a crash (hvjit triages them): no limits, signals or artifacts of its own.
        flags = [f"-seed={seed}", f"-max_len={max_len}", "-timeout=0", "-rss_limit_mb=0", "-malloc_limit_mb=0",
                 "-reload=0", "-print_final_stats=0", "-close_fd_mask=1", "-handle_int=0", "-handle_term=0",
                 f"-artifact_prefix={Path(corpus_dir).resolve().parent / 'libfuzzer-'}",
                 f"-use_value_profile={int(value_profile)}"]
        if dictionary:
            flags.append(f"-dict={dictionary}")
        # libFuzzer writes new corpus entries into the first directory and only reads the others.
        dirs = [str(corpus_dir), *(str(d) for d in seed_dirs)]
        from_child, child_out = os.pipe()
        child_in, to_child = os.pipe()
        log = open(log_path, "ab") if log_path else None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(child_in), str(child_out), str(features), *flags, *dirs],
                pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log if log is not None else subprocess.DEVNULL, close_fds=True,
                start_new_session=True)  # a terminal's Ctrl-C reaches hvjit, which ends the child
        finally:
            os.close(child_in)
            os.close(child_out)
            if log is not None:
                log.close()
        self._log_path = log_path
        self._in, self._out = from_child, to_child
        self._waiting = False  # an input was handed out and not yet reported

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            ready, _, _ = select.select([self._in], [], [], REPLY_TIMEOUT)
            if not ready:
                raise EngineError(f"libFuzzer sent nothing for {REPLY_TIMEOUT:.0f} s{self._log_tail()}")
            chunk = os.read(self._in, n - len(out))
            if not chunk:
                code = self._proc.wait(timeout=5)
                raise EngineError(f"libFuzzer exited (status {code}){self._log_tail()}")
            out += chunk
        return bytes(out)

    def _log_tail(self) -> str:
        if not self._log_path or not os.path.exists(self._log_path):
            return ""
        tail = Path(self._log_path).read_bytes()[-800:].decode("latin-1")
        return f"; its log ends:\n{tail}"

    def next_input(self) -> bytes:
        if self._waiting:
            raise EngineError("report() the previous input's result before asking for the next")
        (n,) = struct.unpack("<I", self._read(4))
        data = self._read(n) if n else b""
        self._waiting = True
        return data

    def report(self, features: np.ndarray, comparisons: np.ndarray) -> None:
        """The last input's features (uint32 ids) and comparisons ((n, 3) uint64 rows of
        size | site << 8, a, b)."""
        if not self._waiting:
            raise EngineError("report() without an input from next_input()")
        feats = np.ascontiguousarray(features, dtype="<u4")
        cmps = np.ascontiguousarray(comparisons, dtype="<u8")
        msg = struct.pack("<II", feats.size, cmps.shape[0]) + feats.tobytes() + cmps.tobytes()
        view = memoryview(msg)
        while view:
            view = view[os.write(self._out, view):]
        self._waiting = False

    def close(self) -> None:
        """End the child: closing its pipe lets it exit; a hung one is killed."""
        for fd in (self._out, self._in):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> "LibFuzzerEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
