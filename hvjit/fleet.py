"""Fleets on Ray: a fuzzing campaign or a benchmark on N workers (``pip install 'hvjit[fleet]'``).

Each worker is a Ray actor (or task) with one CPU that owns its own :class:`~hvjit.Session`
and VMs. A campaign ships the target's snapshot file (bytes) and its harness layout to every
worker, which restores the VM and fuzzes with its own seed in short slices. A slice ends
after ``slice_seconds`` or at the worker's first new crash, and returns its crashes and
cumulative stats; the driver writes each crash to its crash directory as soon as the slice
arrives, so a worker that dies loses only the slice it was in. Results merge on the driver:
crashes deduplicated by (kind, rip) in one directory, stats summed over workers.

Without ``address`` a local Ray cluster with ``workers`` CPUs is started for the run and shut
down after it; with one, an existing cluster is used (its nodes need hvjit and /dev/kvm).
Inside a process that already called ``ray.init`` that connection is used as it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import HvjitError
from .fuzz.campaign import Budget, Fuzzer, Progress, Stats, summary
from .fuzz.harness import Layout, Target
from .fuzz.outcome import Outcome
from .fuzz.triage import CrashStore

INSTALL_HINT = "pip install 'hvjit[fleet]'"
SLICE_SECONDS = 1.0
MAX_SEED_BYTES = 64 << 20  # seed corpus shipped to workers
BENCHES = ("exits",)


class FleetError(HvjitError):
    """Ray is missing, or the fleet could not do its work (every worker failed)."""


def require_ray():
    """The ``ray`` module, or a FleetError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise FleetError(f"fleets need Ray ({e}): {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def cluster(workers: int, address: Optional[str] = None) -> Iterator[Any]:
    """Connect to Ray for the duration: an existing connection, ``address``, or a local
    cluster of ``workers`` CPUs started here (and shut down on leaving)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


# ---- fuzzing ------------------------------------------------------------------------------


class FuzzWorker:
    """One worker of a campaign (a Ray actor: see :func:`_actor_class`)."""

    def __init__(self, index: int, snapshot: bytes, layout: dict, *, seed: int, exec_timeout: float,
                 max_len: Optional[int], dictionary: Optional[bytes], seeds: list):
        from . import Session
        from .vm import Vm

        self.index = index
        self.dir = Path(tempfile.mkdtemp(prefix=f"hvjit-fleet-{index}-"))
        (self.dir / "target.snapshot").write_bytes(snapshot)
        seed_dir = self.dir / "seeds"
        seed_dir.mkdir()
        for k, data in enumerate(seeds):
            (seed_dir / f"seed-{k}").write_bytes(data)
        dict_path = None
        if dictionary is not None:
            dict_path = self.dir / "dictionary"
            dict_path.write_bytes(dictionary)
        self.session = Session()
        vm = Vm.restore(self.session, self.dir / "target.snapshot", name=f"fuzz-worker-{index}")
        self.target = Target(vm, vm.snapshot(), Layout.from_dict(layout), timeout=exec_timeout)
        self.fuzzer = Fuzzer(self.target, seed=seed, corpus_dir=self.dir / "corpus", seed_dirs=[seed_dir],
                             dictionary=str(dict_path) if dict_path else None, max_len=max_len,
                             log_path=self.dir / "libfuzzer.log")
        self.reported: set = set()  # crash keys this worker already sent

    def info(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "host": socket.gethostname(), "dir": str(self.dir)}

    def run_slice(self, max_execs: Optional[int], seconds: float) -> dict:
        crashes: list = []

        def on_crash(data: bytes, outcome: Outcome) -> None:
            if outcome.key not in self.reported:
                self.reported.add(outcome.key)
                crashes.append((data, outcome.to_dict()))

        self.fuzzer.run(max_execs=max_execs, until=time.monotonic() + seconds, on_crash=on_crash,
                        should_stop=lambda: bool(crashes))  # a new crash goes back at once
        return {"index": self.index, "stats": self.fuzzer.stats.to_dict(), "crashes": crashes}

    def close(self) -> None:
        self.fuzzer.close()
        self.session.close()
        shutil.rmtree(self.dir, ignore_errors=True)  # everything worth keeping went to the driver


def _actor_class(ray):
    return ray.remote(num_cpus=1, max_restarts=0)(FuzzWorker)


def _read_seeds(dirs) -> list:
    seeds, total = [], 0
    for d in dirs:
        for p in sorted(Path(d).iterdir()):
            if p.is_file():
                data = p.read_bytes()
                total += len(data)
                if total > MAX_SEED_BYTES:
                    raise FleetError(f"seed corpus larger than {MAX_SEED_BYTES >> 20} MiB: too much to ship")
                seeds.append(data)
    return seeds


class FleetCampaign:
    """A campaign on Ray workers: :meth:`run` until the budget is spent or every worker is gone."""

    def __init__(self, ray, target: Target, out_dir, *, workers: int, seed: int, exec_timeout: float,
                 max_len: Optional[int] = None, dictionary: Optional[str] = None, seed_dirs=(),
                 slice_seconds: float = SLICE_SECONDS):
        self.ray = ray
        self.out = Path(out_dir)
        self.store = CrashStore(self.out / "crashes")
        self.seed = seed
        self.slice_seconds = slice_seconds
        with tempfile.TemporaryDirectory(prefix="hvjit-fleet-") as tmp:
            path = Path(tmp) / "target.snapshot"
            target.snapshot.save(path)
            snapshot = ray.put(path.read_bytes())
        dict_bytes = Path(dictionary).read_bytes() if dictionary else None
        seeds = _read_seeds(seed_dirs)
        actor = _actor_class(ray)
        # Worker k gets seed + k: libFuzzer runs differ, the whole campaign still repeats.
        self.actors = [actor.remote(k, snapshot, target.layout.to_dict(), seed=seed + k, exec_timeout=exec_timeout,
                                    max_len=max_len, dictionary=dict_bytes, seeds=seeds) for k in range(workers)]
        self.stats: dict[int, dict] = {}
        self.dead: dict[int, str] = {}  # worker -> why it stopped

    def kill(self, index: int) -> None:
        """Kill one worker now (what a lost node does; used by the tests)."""
        self.ray.kill(self.actors[index], no_restart=True)

    def total(self) -> Stats:
        t = Stats()
        for s in self.stats.values():
            t.execs += s["execs"]
            t.crashes += s["crashes"]
            t.corpus += s["corpus"]
            t.features = max(t.features, s["features"])
        return t

    def run(self, budget: Budget, *, progress: Optional[Progress] = None,
            after_slice: Optional[Callable[["FleetCampaign", dict], None]] = None) -> dict:
        ray = self.ray
        show = progress or Progress(enabled=False)
        t0 = time.monotonic()
        deadline = None if budget.max_time is None else t0 + budget.max_time

        def finished() -> bool:
            total = self.total()
            return ((budget.max_execs is not None and total.execs >= budget.max_execs)
                    or (deadline is not None and time.monotonic() >= deadline)
                    or (budget.max_crashes is not None and len(self.store.saved) >= budget.max_crashes))

        def submit(k: int):
            alive = max(1, len(self.actors) - len(self.dead))
            share = None
            if budget.max_execs is not None:
                share = max(1, (budget.max_execs - self.total().execs + alive - 1) // alive)
            seconds = self.slice_seconds if deadline is None else max(0.01, min(self.slice_seconds,
                                                                                deadline - time.monotonic()))
            return self.actors[k].run_slice.remote(share, seconds)

        pending = {submit(k): k for k in range(len(self.actors))}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                for ref in done:
                    k = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a dead or failed worker: the others go on
                        self.dead[k] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        continue
                    self.stats[k] = result["stats"]
                    for data, outcome in result["crashes"]:
                        self.store.save(data, Outcome.from_dict(outcome), worker=k)
                    if after_slice is not None:
                        after_slice(self, result)
                    if not finished() and k not in self.dead:
                        pending[submit(k)] = k
                total = self.total()
                total.elapsed = time.monotonic() - t0
                show.update(total, self.store.unique, workers=len(self.actors) - len(self.dead))
        except KeyboardInterrupt:
            pass  # Ctrl-C ends the campaign; everything reported so far is saved
        finally:
            self._shutdown(pending)
        total = self.total()
        total.elapsed = time.monotonic() - t0
        show.update(total, self.store.unique, workers=len(self.actors) - len(self.dead), force=True)
        show.finish()
        if not self.stats and self.dead:
            raise FleetError(f"every worker failed; the first: {next(iter(self.dead.values()))}")
        return summary(total, self.store, seed=self.seed, workers=len(self.actors),
                       per_worker={str(k): v for k, v in sorted(self.stats.items())},
                       lost_workers={str(k): why for k, why in sorted(self.dead.items())})

    def _shutdown(self, pending: dict) -> None:
        ray = self.ray
        for k, actor in enumerate(self.actors):
            if k in self.dead:
                continue
            try:
                ray.get(actor.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a worker that cannot close cleanly is killed below
                pass
            ray.kill(actor, no_restart=True)


def fuzz(target: Target, out_dir, *, workers: int, budget: Budget, seed: int, exec_timeout: float,
         address: Optional[str] = None, max_len: Optional[int] = None, dictionary: Optional[str] = None,
         seed_dirs=(), progress: Optional[Progress] = None, slice_seconds: float = SLICE_SECONDS,
         after_slice=None) -> dict:
    """Fuzz ``target`` (a local :class:`Target` at READY) on ``workers`` Ray workers."""
    with cluster(workers, address) as ray:
        campaign = FleetCampaign(ray, target, out_dir, workers=workers, seed=seed, exec_timeout=exec_timeout,
                                 max_len=max_len, dictionary=dictionary, seed_dirs=seed_dirs,
                                 slice_seconds=slice_seconds)
        return campaign.run(budget, progress=progress, after_slice=after_slice)


# ---- benchmarks ---------------------------------------------------------------------------


def _bench_exits(params: dict) -> dict:
    from . import Session
    from .benchmarks import exits as exitbench

    with Session() as s:
        result = exitbench.run_all(s, exits=params["exits"], rounds=params["rounds"], kinds=tuple(params["kinds"]))
    result["worker"] = {"pid": os.getpid(), "host": socket.gethostname()}
    return result


def bench(name: str, params: dict, *, workers: int, address: Optional[str] = None) -> list:
    """Run benchmark ``name`` on ``workers`` workers at once; one result per worker."""
    if name not in BENCHES:
        raise FleetError(f"bench {name!r} does not run on a fleet; these do: {', '.join(BENCHES)}")
    with cluster(workers, address) as ray:
        task = ray.remote(num_cpus=1)(_bench_exits)
        return ray.get([task.remote(params) for _ in range(workers)])
