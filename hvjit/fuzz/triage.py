"""Crash triage: deduplicate by (kind, rip) and save each new crash's input at once.

A crash is saved as ``<label>-<rip hex>-<sha256 prefix>.bin`` (the input) beside a ``.json``
with its outcome; both are written to a temporary name and renamed, so a killed process
never leaves a half-written crash. Crashes already in the directory (an earlier run) count
as known: a campaign can be resumed into the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .outcome import Outcome

_NAME = re.compile(r"^(?P<label>[a-z0-9-]+?)-(?P<rip>[0-9a-f]+)-(?P<hash>[0-9a-f]{12})\.bin$")


@dataclass(frozen=True)
class SavedCrash:
    path: Path
    outcome: Outcome
    size: int

    def to_dict(self) -> dict:
        return {"file": str(self.path), "size": self.size, **self.outcome.to_dict()}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CrashStore:
    """The ``crashes/`` directory of a campaign (thread-safe: fleet results arrive anywhere)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._keys: set[tuple[str, int]] = set()
        self.saved: list[SavedCrash] = []
        for p in sorted(self.directory.glob("*.bin")):
            m = _NAME.match(p.name)
            if m:
                self._keys.add((m["label"], int(m["rip"], 16)))
        self.known_before = len(self._keys)

    @property
    def unique(self) -> int:
        """Distinct (kind, rip) crashes in the directory, including earlier runs'."""
        return len(self._keys)

    def is_known(self, outcome: Outcome) -> bool:
        return outcome.key in self._keys

    def save(self, data: bytes, outcome: Outcome, **extra) -> Optional[SavedCrash]:
        """Save a crash unless one with the same (kind, rip) is known; returns what was saved."""
        if not outcome.crashed:
            raise ValueError("not a crash")
        with self._lock:
            if outcome.key in self._keys:
                return None
            digest = hashlib.sha256(data).hexdigest()[:12]
            path = self.directory / f"{outcome.label}-{outcome.rip:x}-{digest}.bin"
            _atomic_write(path, data)
            meta = {**outcome.to_dict(), "size": len(data), **extra}
            _atomic_write(path.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
            self._keys.add(outcome.key)
            crash = SavedCrash(path, outcome, len(data))
            self.saved.append(crash)
            return crash
