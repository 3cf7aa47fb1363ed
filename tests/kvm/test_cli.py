"""The hvjit command, run as a user would: as a subprocess on flat images."""

import json
import subprocess
import sys
import time

import pytest

from hvjit.asm import assemble

from .guests import hello_source


def hvjit(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hvjit", *args], capture_output=True, timeout=timeout)


def test_info_json_reports_flavour_and_caps():
    p = hvjit("info", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["available"] is True
    assert info["api_version"] == 12
    assert info["flavour"] in ("pvm", "vmx", "svm", "unknown")
    assert "USER_MEMORY" in info["capabilities"]
    assert info["cpu_vendor"]
    assert info["behaviour"]["out_exit_settled"] in (True, False)  # a probe guest ran
    tracking = info["dirty_tracking"]
    ring = info["capabilities"].get("DIRTY_LOG_RING") or info["capabilities"].get("DIRTY_LOG_RING_ACQ_REL") or 0
    assert tracking["ring_max_entries"] == ring // 16 and (tracking["ring_entries"] > 0) == (ring > 0)
    human = hvjit("info")
    assert b"flavour" in human.stdout and b"OUT exits:" in human.stdout and human.returncode == 0
    assert (b"dirty pages:  dirty ring of" if ring else b"dirty pages:  KVM's bitmap") in human.stdout


@pytest.mark.parametrize("mode,cpl,gpa", [
    ("real", 0, 0x7C00), ("protected", 0, 0x100000), ("protected", 3, 0x2000),
    ("long", 0, 0x100000), ("long", 3, 0x1000),
])
def test_run_flat_image_streams_serial_and_exits_with_guest_code(tmp_path, mode, cpl, gpa):
    image = tmp_path / "guest.bin"
    image.write_bytes(assemble(hello_source(mode, f"cli {mode} {cpl}\\n", 17 + cpl), gpa))
    p = hvjit("run", str(image), "--mode", mode, "--cpl", str(cpl), "--gpa", hex(gpa), "--memory", "4M",
              "--timeout", "20")
    assert p.stdout == f"cli {mode} {cpl}\n".encode(), p.stderr
    assert p.returncode == 17 + cpl, p.stderr


def test_run_json_prints_exit_record_and_counters(tmp_path):
    image = tmp_path / "guest.bin"
    image.write_bytes(assemble(hello_source("long", "json", 9), 0x1000))
    p = hvjit("run", str(image), "--cpl", "3", "--json")
    assert p.returncode == 9
    out = json.loads(p.stdout)
    assert out["exit"]["exitcode"] == "SUSPENDED" and out["exit"]["how"] == "POWEROFF"
    assert out["exit"]["code"] == 9 and out["console"] == "json"
    assert out["counters"]["pio"] == 5 and out["counters"]["native"] == 5


def test_run_json_reports_startup_first_kvm_run_and_rss(tmp_path):
    image = tmp_path / "guest.bin"
    image.write_bytes(assemble(hello_source("long", "up", 0), 0x1000))
    spawned = time.monotonic_ns()
    p = hvjit("run", str(image), "--cpl", "3", "--json")
    returned = time.monotonic_ns()
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)["startup"]
    # The first KVM_RUN happened inside the process's lifetime, on the same clock as ours.
    assert spawned < st["first_kvm_run_ns"] < returned
    assert st["process_start_ns"] is not None and st["process_start_ns"] <= st["first_kvm_run_ns"]
    assert 0 < st["first_kvm_run_s"] <= st["wall_s"] < (returned - spawned) / 1e9 + 0.02  # one 10 ms tick of slack
    assert 10_000 < st["max_rss_kib"] < 4 << 20  # KiB: more than the interpreter, less than 4 GiB


def test_run_reports_timeout_and_triple_fault(tmp_path):
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")  # jmp .
    p = hvjit("run", str(spin), "--cpl", "3", "--timeout", "0.5")
    assert p.returncode == 124 and b"TIMEOUT" in p.stderr
    tf = tmp_path / "tf.bin"
    tf.write_bytes(b"\xfa")  # cli at CPL3 with no IDT
    p = hvjit("run", str(tf), "--cpl", "3")
    assert p.returncode == 125 and b"triplefault" in p.stderr


def test_run_refuses_bad_input_clearly(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(2 << 20))
    p = hvjit("run", str(big), "--memory", "1M")
    assert p.returncode == 1 and b"error: flat image [0x1000-0x201000)" in p.stderr
    p = hvjit("run", str(tmp_path / "missing.bin"))
    assert p.returncode == 1 and b"No such file" in p.stderr
    p = hvjit("run", str(big), "--memory", "lots")
    assert p.returncode == 2 and b"not a size" in p.stderr


def test_bench_exits_json_schema():
    p = hvjit("bench", "exits", "--json", "--exits", "300", "--rounds", "1", timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"flavour", "cpu", "tsc_khz"} <= set(r["host"])
    assert set(r["exits"]) == {"pio", "mmio", "hlt"}
    for kind in r["exits"].values():
        assert {"c_ns", "numba_ns", "python_ns", "numba_over_c", "python_over_c", "samples"} <= set(kind)
        assert kind["c_ns"] > 0 and kind["numba_ns"] > 0
        assert kind["numba_over_c"] == pytest.approx(kind["numba_ns"] / kind["c_ns"], rel=1e-3)


def test_demo_runs():
    p = hvjit("demo")
    assert p.returncode == 0, p.stderr
    assert b"guest> Hello from a hvjit guest!" in p.stdout and b"demo: OK" in p.stdout


def test_run_device_attaches_more_devices(tmp_path):
    """--device pci-testdev puts a second one at 00:03.0 (the default one is at 00:02.0)."""
    image = tmp_path / "pci.bin"
    image.write_bytes(assemble("""
.code64
    mov $0x80001800, %eax           # 00:03.0, register 0
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    inl %dx, %eax
    cmp $0x00051b36, %eax
    sete %al
    movzbl %al, %eax
    outl %eax, $0xf4
""", 0x1000))
    assert hvjit("run", str(image), "--cpl", "3").returncode == 0
    p = hvjit("run", str(image), "--cpl", "3", "--device", "pci-testdev")
    assert p.returncode == 1, p.stderr
    p = hvjit("run", str(image), "--device", "no-such-device")
    assert p.returncode == 1 and b"no device named 'no-such-device'" in p.stderr
