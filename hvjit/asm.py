"""Assemble small guests with the system's GNU as (binutils) into flat binaries.

Used by the demo, the tests and users' quick experiments: ``assemble(src, origin=0x1000)``
returns the bytes to load at ``origin``. Sources use AT&T syntax and pick their own
``.code16``/``.code32``/``.code64``; ``.intel_syntax noprefix`` works too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ._cachedir import cache_base
from .errors import HvjitError


class AssemblerError(HvjitError):
    """GNU as or ld is missing, or rejected the source."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssemblerError(f"{name!r} not found: install binutils (Debian: apt-get install binutils)")
    return path


def _cache_dir() -> Path:
    return cache_base() / "asm"


def assemble(source: str, origin: int = 0) -> bytes:
    """Assemble ``source`` as a flat binary linked at ``origin``; cached by content."""
    key = hashlib.sha256(f"{origin:#x}\n{source}".encode()).hexdigest()[:24]
    cached = _cache_dir() / f"{key}.bin"
    if cached.exists():
        return cached.read_bytes()
    as_, ld, objcopy = _tool("as"), _tool("ld"), _tool("objcopy")
    with tempfile.TemporaryDirectory(prefix="hvjit-asm-") as tmp:
        t = Path(tmp)
        (t / "g.S").write_text(source)
        steps = [
            [as_, "--64", "-o", str(t / "g.o"), str(t / "g.S")],
            [ld, "-m", "elf_x86_64", "-Ttext", hex(origin), "-e", hex(origin), "--no-warn-rwx-segments",
             "-o", str(t / "g.elf"), str(t / "g.o")],
            [objcopy, "-O", "binary", "-j", ".text", str(t / "g.elf"), str(t / "g.bin")],
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode and "--no-warn-rwx-segments" in cmd:
                cmd = [c for c in cmd if c != "--no-warn-rwx-segments"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise AssemblerError(f"{Path(cmd[0]).name} failed:\n{proc.stderr.strip()}")
        data = (t / "g.bin").read_bytes()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmpfile = cached.with_suffix(f".{os.getpid()}.tmp")
        tmpfile.write_bytes(data)
        tmpfile.replace(cached)
    except OSError:
        pass  # a read-only cache only costs time
    return data
