"""`hvjit trace show|plot` on a trace file written without KVM: the summary's numbers, the
three PNGs, and the hint when matplotlib is missing."""

import sys

import numpy as np
import pytest

from hvjit import cli, trace, trace_plot
from hvjit.abi import KvmExit, VmExitCode
from hvjit.kernels.tracering import TRACE_DTYPE

KHZ = 1_000_000  # 1 GHz: a tick is a nanosecond


def _records():
    """10 native port writes at one site, 2 Python MMIO reads at another, then a suspend."""
    r = np.zeros(13, TRACE_DTYPE)
    r["tsc"] = np.arange(13) * 10_000
    r["ns"] = r["tsc"]
    r["handler_tsc"] = r["handler_ns"] = 500
    r["rip_valid"] = 1
    r[:10]["exitcode"], r[:10]["kvm_reason"], r[:10]["addr"], r[:10]["is_write"] = VmExitCode.INOUT, KvmExit.IO, 0x3F8, 1
    r[:10]["rip"], r[:10]["native"], r[:10]["size"] = 0x200037, 1, 1
    r[10:12]["exitcode"], r[10:12]["kvm_reason"], r[10:12]["addr"] = VmExitCode.INST_EMUL, KvmExit.MMIO, 0xFF000000
    r[10:12]["rip"], r[10:12]["handler_tsc"], r[10:12]["handler_ns"], r[10:12]["size"] = 0x200057, 40_000, 40_000, 4
    r[12]["exitcode"], r[12]["rip"], r[12]["native"] = VmExitCode.SUSPENDED, 0x200061, 1
    return r


def _file(tmp_path):
    meta = {"vm": "synthetic", "tsc_khz": KHZ, "dropped": 0, "symbols": {str(0x200037): "print_line+0xb"}}
    return trace.save(tmp_path / "t.npy", _records(), meta)


def test_show_prints_counts_times_and_symbolized_sites(tmp_path, capsys):
    assert cli.main(["trace", "show", str(_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "13 exits on 1 vCPU over 0.120 ms" in out
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines() if line.startswith(("port", "mmio"))}
    assert lines["port out"].split()[2:5] == ["10", "100.0%", "0.50"]
    assert lines["mmio read"].split()[2:5] == ["2", "0.0%", "40.00"]
    assert "print_line+0xb (0x200037)" in out and "0x200057" in out
    assert "0x3f8 (10)" in out


def test_plot_writes_three_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    path = _file(tmp_path)
    assert cli.main(["trace", "plot", str(path), "-o", str(tmp_path / "png")]) == 0
    for what in ("latency", "timeline", "sites"):
        png = tmp_path / "png" / f"t-{what}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_round_trips_stop_at_each_vcpus_last_exit_and_at_a_suspend():
    r = _records()
    r["vcpu"][1::2] = 1
    trips = trace_plot.round_trips(r)
    assert trips[0] == 20_000 and trips[1] == 20_000  # to the same vCPU's next exit
    assert trips[11] == -1 and trips[12] == -1  # vCPU 1's last; the suspend


def test_without_matplotlib_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert cli.main(["trace", "plot", str(_file(tmp_path))]) == 1
    assert "pip install 'hvjit[plot]'" in capsys.readouterr().err


def test_a_file_that_is_no_trace_is_refused(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.arange(3))
    assert cli.main(["trace", "show", str(tmp_path / "x.npy")]) == 1
    assert "not an hvjit trace" in capsys.readouterr().err
