"""hvjit.fleet on a local 2-worker Ray cluster: both workers fuzz from a shipped snapshot,
crashes merge into one directory, a worker killed mid-campaign loses no crash it reported,
and a benchmark runs on both workers at once."""

import json
import threading

import pytest

from hvjit import fleet, loaders
from hvjit.fuzz import example
from hvjit.fuzz.campaign import Budget
from hvjit.fuzz.harness import Target

pytest.importorskip("atheris", reason="the fuzz extra (atheris) is not installed")
ray = pytest.importorskip("ray", reason="the fleet extra (Ray) is not installed")

pytestmark = pytest.mark.slow  # a Ray cluster takes several seconds to start


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module, started and stopped by hvjit.fleet.cluster itself."""
    with fleet.cluster(2) as r:
        assert r.cluster_resources().get("CPU") == 2
        yield r
    assert not ray.is_initialized()


@pytest.fixture
def target(session):
    vm = session.create_vm("fleet-parser", memory=example.MEMORY)
    loaders.load(vm, example.image(), format="flat", gpa=example.LOAD_GPA, mode="long", cpl=3)
    return Target.at_ready(vm)


@pytest.fixture
def seeds(tmp_path):
    d = tmp_path / "seeds"
    d.mkdir()
    (d / "crash").write_bytes(example.CRASHING_INPUT)  # every worker crashes on its first inputs
    (d / "benign").write_bytes(b"HVJTS\x01xE")
    return d


def test_both_workers_fuzz_the_shipped_snapshot_and_crashes_merge(cluster, target, seeds, tmp_path):
    out = tmp_path / "out"
    summary = fleet.fuzz(target, out, workers=2, budget=Budget(max_execs=3000), seed=5, exec_timeout=0.5,
                         seed_dirs=[seeds], slice_seconds=0.5)
    per_worker = summary["per_worker"]
    assert set(per_worker) == {"0", "1"} and summary["lost_workers"] == {}
    assert all(w["execs"] > 0 and w["crashes"] >= 1 for w in per_worker.values())  # both ran the seed crash
    assert summary["execs"] == sum(w["execs"] for w in per_worker.values()) >= 3000
    files = sorted((out / "crashes").glob("*.bin"))
    labels = [json.loads(f.with_suffix(".json").read_text())["label"] for f in files]
    assert labels.count("exception-de") == 1  # reported by both, saved once
    assert summary["unique_crashes"] == len(files)


def test_a_killed_worker_loses_no_reported_crash_and_the_campaign_ends(cluster, target, seeds, tmp_path):
    out = tmp_path / "out"
    reported_by_0: list = []
    killer: list = []

    def kill_worker_0_after_its_crash(campaign, result):
        if result["index"] == 0 and result["crashes"] and not reported_by_0:
            reported_by_0.extend((o["label"], o["rip"]) for _, o in result["crashes"])
            # Kill it a moment later, inside the slice the driver is about to hand it.
            killer.append(threading.Timer(0.2, campaign.kill, (0,)))
            killer[0].start()

    summary = fleet.fuzz(target, out, workers=2, budget=Budget(max_execs=4000, max_time=120), seed=9,
                         exec_timeout=0.5, seed_dirs=[seeds], slice_seconds=0.5,
                         after_slice=kill_worker_0_after_its_crash)
    killer[0].join()
    assert reported_by_0, "worker 0 never reported a crash"
    assert "0" in summary["lost_workers"] and "1" not in summary["lost_workers"]
    saved = {(m["label"], m["rip"]) for m in (json.loads(p.read_text()) for p in (out / "crashes").glob("*.json"))}
    assert set(reported_by_0) <= saved
    assert summary["per_worker"]["1"]["execs"] > summary["per_worker"]["0"]["execs"]  # worker 1 went on
    assert summary["execs"] >= 4000 or summary["elapsed"] >= 120


def test_the_exit_benchmark_runs_on_both_workers(cluster):
    results = fleet.bench("exits", {"exits": 2000, "rounds": 1, "kinds": ["pio"]}, workers=2)
    assert len(results) == 2 and len({r["worker"]["pid"] for r in results}) == 2
    for r in results:
        pio = r["exits"]["pio"]
        assert pio["c_ns"] > 0 and pio["numba_ns"] > 0 and pio["python_ns"] > 0
    with pytest.raises(fleet.FleetError, match="exits"):
        fleet.bench("decode", {}, workers=2)
