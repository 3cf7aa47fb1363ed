"""The CLI's pure parts: argument parsing and the benchmark commands that need no KVM."""

import argparse
import json
import subprocess
import sys

import pytest

from hvjit.cli import build_parser, parse_size
from hvjit.serve_client import split_server_option


@pytest.mark.parametrize("text,value", [("16M", 16 << 20), ("1G", 1 << 30), ("4k", 4096),
                                        ("0x100000", 0x100000), ("256MiB", 256 << 20), ("4096", 4096)])
def test_sizes(text, value):
    assert parse_size(text) == value


def test_bad_size():
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_run_options_parse():
    args = build_parser().parse_args(["run", "--kernel", "vmlinuz", "--append", "console=ttyS0",
                                      "--cpus", "2", "--memory", "512M", "--format", "linux"])
    assert (args.kernel, args.append, args.cpus, args.memory, args.format) == (
        "vmlinuz", "console=ttyS0", 2, 512 << 20, "linux")


@pytest.mark.parametrize("argv,env,expected", [
    (["img", "--server", "/s", "--cpl", "3"], None, ("/s", True, ["img", "--cpl", "3"])),
    (["--server=/s", "img"], "/e", ("/s", True, ["img"])),
    (["img", "--cpl", "3"], "/e", ("/e", False, ["img", "--cpl", "3"])),
    (["img"], None, (None, False, ["img"])),
    (["img", "--", "--server", "/s"], None, (None, False, ["img", "--", "--server", "/s"])),
    (["img", "--server"], None, (None, False, ["img", "--server"])),  # argparse says what is missing
])
def test_server_option_is_taken_out_before_parsing(monkeypatch, argv, env, expected):
    if env is None:
        monkeypatch.delenv("HVJIT_SERVER", raising=False)
    else:
        monkeypatch.setenv("HVJIT_SERVER", env)
    assert split_server_option(argv) == expected


def test_run_through_an_unreachable_server_fails_clearly(tmp_path, capsys, monkeypatch):
    from hvjit import cli

    monkeypatch.delenv("HVJIT_SERVER", raising=False)
    assert cli.main(["run", "--server", str(tmp_path / "nobody.sock"), "img"]) == 1
    assert "no hvjit server at" in capsys.readouterr().err


def _bench(what):
    p = subprocess.run([sys.executable, "-m", "hvjit", "bench", what, "--json", "--seconds", "0.2"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_bench_pagewalk_json_schema():
    r = _bench("pagewalk")
    assert {"level4_per_s", "level5_per_s", "naive_per_s"} <= set(r)
    assert r["level4_per_s"] > r["naive_per_s"] > 0


def test_bench_decode_json_schema():
    pytest.importorskip("iced_x86", reason="the decode benchmark's reference is iced-x86")
    r = _bench("decode")
    assert {"corpus_bytes", "instructions", "hvjit_mb_s", "iced_mb_s", "hvjit_over_iced"} <= set(r)
    assert r["hvjit_over_iced"] == pytest.approx(r["hvjit_mb_s"] / r["iced_mb_s"], rel=1e-6)
    assert {"hvjit_compact_mb_s", "hvjit_length_mb_s", "hvjit_kernel_compact_mb_s", "hvjit_kernel_length_mb_s",
            "compact_over_iced", "length_over_iced"} <= set(r)
    assert r["compact_over_iced"] == pytest.approx(r["hvjit_compact_mb_s"] / r["iced_mb_s"], rel=1e-6)
