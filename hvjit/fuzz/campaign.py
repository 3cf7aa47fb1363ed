"""The fuzzing loop: libFuzzer's next input, one execution in the VM, its coverage back.

:class:`Fuzzer` is one target with one engine; it runs in bounded slices (so a fleet worker
can report between them) and hands each crash to a callback. :func:`run_campaign` is the
local campaign behind ``hvjit fuzz``: crashes go to a :class:`~hvjit.fuzz.triage.CrashStore`
and a progress line to stderr.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .engine import LibFuzzerEngine
from .harness import Target
from .outcome import Outcome
from .triage import CrashStore

OUTCOME_SLOTS = 1024  # extra features: one per hashed (kind, rip) of how an execution ended
CMP_SITES = 256  # comparison sites told apart (site id modulo this)
CMP_SLOTS = CMP_SITES * 65  # per site: how many operand bits still differ, 0..64
DEFAULT_MAX_LEN = 4096

CrashCallback = Callable[[bytes, Outcome], None]


@dataclass
class Stats:
    execs: int = 0
    crashes: int = 0  # crashing executions (duplicates included)
    corpus: int = 0  # inputs that reached a feature no earlier input had
    features: int = 0  # distinct coverage features seen
    elapsed: float = 0.0

    @property
    def execs_per_s(self) -> float:
        return self.execs / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "execs_per_s": round(self.execs_per_s, 1)}


@dataclass(frozen=True)
class Budget:
    """When a campaign stops: whichever limit comes first (None: no such limit)."""

    max_execs: Optional[int] = None
    max_time: Optional[float] = None
    max_crashes: Optional[int] = None  # unique crashes


class Fuzzer:
    """One target and one libFuzzer engine, fuzzing in slices."""

    def __init__(self, target: Target, *, seed: int, corpus_dir, seed_dirs=(), dictionary=None,
                 max_len: Optional[int] = None, log_path=None, value_profile: bool = False):
        self.target = target
        layout = target.layout
        self._outcome_base = layout.features
        self._cmp_base = layout.features + OUTCOME_SLOTS
        self.max_len = min(max_len or DEFAULT_MAX_LEN, layout.max_input)
        self._seen = np.zeros(self._cmp_base + (CMP_SLOTS if layout.cmplog_entries else 0), bool)
        self.stats = Stats()
        self.engine = LibFuzzerEngine(
            features=self._seen.size, max_len=self.max_len, seed=seed, corpus_dir=corpus_dir,
            seed_dirs=seed_dirs, dictionary=dictionary, log_path=log_path,
            value_profile=bool(value_profile))

    def _cmp_features(self, cmps: np.ndarray) -> np.ndarray:
        """hvjit's value profile: (site, bits still differing) of each logged comparison, so
        an input that gets one bit closer to a compared constant counts as new coverage."""
        if not cmps.size:
            return np.zeros(0, np.uint32)
        size = cmps[:, 0] & np.uint64(0xFF)
        site = (cmps[:, 0] >> np.uint64(8)) % np.uint64(CMP_SITES)
        bits = np.minimum(size, np.uint64(8)) * np.uint64(8)
        mask = np.where(bits >= 64, np.uint64(0xFFFFFFFFFFFFFFFF),
                        (np.uint64(1) << np.minimum(bits, np.uint64(63))) - np.uint64(1))
        differ = np.ascontiguousarray((cmps[:, 1] ^ cmps[:, 2]) & mask)
        distance = np.unpackbits(differ.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        return (self._cmp_base + site * 65 + distance).astype(np.uint32)

    def _outcome_feature(self, outcome: Outcome) -> int:
        # crc32, not hash(): str hashes differ between processes, and runs must repeat.
        return self._outcome_base + zlib.crc32(f"{outcome.label}:{outcome.rip:x}".encode()) % OUTCOME_SLOTS

    def run(self, *, max_execs: Optional[int] = None, until: Optional[float] = None,
            on_crash: Optional[CrashCallback] = None, should_stop: Callable[[], bool] = lambda: False,
            tick: Optional[Callable[[], None]] = None) -> int:
        """Fuzz until ``max_execs`` more executions, the monotonic deadline ``until``, or
        ``should_stop()`` (asked after each crash and every 64 executions); returns executions."""
        target, engine, seen, stats = self.target, self.engine, self._seen, self.stats
        t0 = time.monotonic()
        before = stats.elapsed
        done = 0
        try:
            while max_execs is None or done < max_execs:
                if done % 64 == 0:
                    stats.elapsed = before + time.monotonic() - t0
                    if (until is not None and time.monotonic() >= until) or should_stop():
                        break
                    if tick is not None:
                        tick()
                data = engine.next_input()
                outcome = target.execute(data)
                cmps = target.comparisons()
                feats = np.concatenate([target.features(), self._cmp_features(cmps),
                                        np.array([self._outcome_feature(outcome)], np.uint32)])
                engine.report(feats, cmps)
                fresh = ~seen[feats]
                if fresh.any():
                    seen[feats] = True
                    stats.corpus += 1
                    stats.features += int(fresh.sum())
                done += 1
                stats.execs += 1
                if outcome.crashed:
                    stats.crashes += 1
                    if on_crash is not None:
                        on_crash(data, outcome)
                    if should_stop():
                        break
        finally:
            stats.elapsed = before + time.monotonic() - t0
        return done

    def covered(self, feature: int) -> bool:
        """Whether some input so far reached coverage feature ``feature``."""
        return bool(self._seen[feature])

    def close(self) -> None:
        self.engine.close()


class Progress:
    """One status line on stderr: updated in place on a terminal, a line every few seconds
    otherwise (logs)."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.25 if self.tty else 5.0
        self._last = 0.0
        self._shown = False

    def update(self, stats: Stats, unique: int, workers: int = 1, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        line = (f"hvjit fuzz: {stats.execs:,} execs  {stats.execs_per_s:,.0f} exec/s  crashes {unique} unique "
                f"({stats.crashes} total)  corpus {stats.corpus}  features {stats.features}  "
                f"{stats.elapsed:.1f} s" + (f"  workers {workers}" if workers > 1 else ""))
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()


def run_campaign(target: Target, out_dir, *, budget: Budget, seed: int = 0, seed_dirs=(), dictionary=None,
                 max_len: Optional[int] = None, progress: Optional[Progress] = None) -> dict:
    """Fuzz ``target`` locally; crashes are saved under ``out_dir/crashes`` as they happen.

    Returns the summary (stats and the crashes saved in this run).
    """
    out = Path(out_dir)
    store = CrashStore(out / "crashes")
    fuzzer = Fuzzer(target, seed=seed, corpus_dir=out / "corpus", seed_dirs=seed_dirs, dictionary=dictionary,
                    max_len=max_len, log_path=out / "libfuzzer.log")
    until = None if budget.max_time is None else time.monotonic() + budget.max_time
    show = progress or Progress(enabled=False)
    try:
        fuzzer.run(
            max_execs=budget.max_execs, until=until,
            on_crash=lambda data, outcome: _discard(store.save(data, outcome)),
            should_stop=lambda: budget.max_crashes is not None and len(store.saved) >= budget.max_crashes,
            tick=lambda: show.update(fuzzer.stats, store.unique))
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the campaign; what was found is saved and summarised
    finally:
        fuzzer.close()
        show.update(fuzzer.stats, store.unique, force=True)
        show.finish()
    return summary(fuzzer.stats, store, seed=seed, workers=1)


def _discard(_value) -> None:
    """A callback's result nobody needs (crash callbacks return None)."""


def summary(stats: Stats, store: CrashStore, **extra) -> dict:
    return {**stats.to_dict(), "unique_crashes": store.unique, "new_crashes": [c.to_dict() for c in store.saved],
            "crash_dir": str(store.directory), **extra}
