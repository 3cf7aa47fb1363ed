"""Fuzzing without KVM: how exits are classified, crash files and their deduplication, and
what the commands say when an optional extra (atheris, Ray) is missing."""

import builtins
import json

import pytest

from hvjit import cli
from hvjit.abi import SuspendHow, VmExitCode
from hvjit.exits import VmExit
from hvjit.fuzz import engine
from hvjit.fuzz.harness import ABORT, DONE, EXCEPTION, HARNESS_PORT, Layout, classify
from hvjit.fuzz.outcome import STATUS, Outcome
from hvjit.fuzz.triage import CrashStore

LAYOUT = Layout(input_gpa=0x10000, input_capacity=0x1008, crash_idt=True)


class FakeVcpu:
    """What classify reads for an exception report: the registers the crash IDT set."""

    def get_registers(self):
        return {"rsi": 0x1234, "rdi": 0x6}

    def get_sregs(self):
        return {"cr2": 0xDEAD000}


def _exit(exitcode, **kw):
    return VmExit(exitcode=exitcode, rip=kw.pop("rip", 0x1000), kvm_reason=0, **kw)


def _harness(value):
    return _exit(VmExitCode.INOUT, port=HARNESS_PORT, bytes=4, data=value)


@pytest.mark.parametrize("ex,kind", [
    (_harness(DONE), "ok"),
    (_harness(ABORT), "abort"),
    (_exit(VmExitCode.SUSPENDED, how=SuspendHow.POWEROFF, code=3), "ok"),
    (_exit(VmExitCode.SUSPENDED, how=SuspendHow.TRIPLEFAULT), "triplefault"),
    (_exit(VmExitCode.TIMEOUT), "timeout"),
    (_exit(VmExitCode.EMULATION_FAILURE), "emulation"),
    (_exit(VmExitCode.INST_EMUL, gpa=0x40000000), "mmio"),
    (_exit(VmExitCode.INOUT, port=0x80, bytes=1), "other"),
    (_harness(9), "other"),
])
def test_exits_are_classified(ex, kind):
    assert classify(FakeVcpu(), ex, LAYOUT).kind == kind


def test_an_exception_report_carries_vector_rip_error_code_and_cr2():
    o = classify(FakeVcpu(), _harness(EXCEPTION | 14 << 8), LAYOUT)
    assert (o.kind, o.vector, o.rip, o.error_code) == ("exception", 14, 0x1234, 6)
    assert o.label == "exception-pf" and "0xdead000" in o.detail
    assert o.status == STATUS["exception"] and o.describe().startswith("exception #PF")
    # Without hvjit's IDT the same port value is not an exception report.
    assert classify(FakeVcpu(), _harness(EXCEPTION), Layout(0x10000, 0x1008)).kind == "other"


def test_crashes_are_saved_once_per_kind_and_rip_and_known_on_resume(tmp_path):
    store = CrashStore(tmp_path / "crashes")
    de = Outcome("exception", 0x1242, vector=0)
    first = store.save(b"HVJTD\x01\x00\x00\x00", de, worker=1)
    assert first is not None and first.path.name.startswith("exception-de-1242-")
    assert store.save(b"HVJTD\x02\x00\x00\x00", de) is None  # same (kind, rip): a duplicate
    assert store.save(b"x", Outcome("timeout", 0x1242)) is not None  # another kind at that rip is new
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["label"] == "exception-de" and meta["worker"] == 1 and meta["size"] == 9
    assert not list((tmp_path / "crashes").glob("*.tmp"))
    again = CrashStore(tmp_path / "crashes")
    assert again.unique == 2 and again.known_before == 2 and again.is_known(de)
    with pytest.raises(ValueError):
        again.save(b"", Outcome("ok", 0))


def test_fuzz_without_atheris_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engine, "available", lambda: False)
    assert cli.main(["fuzz", str(tmp_path / "guest.bin")]) == 2
    assert "pip install 'hvjit[fuzz]'" in capsys.readouterr().err


def _without_ray(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_fleet_commands_without_ray_say_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engine, "available", lambda: True)
    _without_ray(monkeypatch)
    assert cli.main(["fuzz", str(tmp_path / "guest.bin"), "--workers", "2"]) == 2
    assert "pip install 'hvjit[fleet]'" in capsys.readouterr().err
    assert cli.main(["bench", "exits", "--workers", "2"]) == 2
    assert "pip install 'hvjit[fleet]'" in capsys.readouterr().err
