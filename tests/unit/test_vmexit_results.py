"""The vmexit benchmark's host side without KVM: the guest's result lines, arguments, the
QEMU command line and the table."""

import pytest

from hvjit.benchmarks import vmexit

GOOD = (
    "some firmware banner\n"
    "vmexit cpuid 100 800000 35000 50\r\n"
    "vmexit hypercall unavailable the hypercall instruction did not complete within 0.25 s\n"
    "vmexit self-ipi error interrupts expected 113 received 112\n"
    "vmexit done\n"
)


def test_parse_output_reads_ok_unavailable_and_error_lines():
    r = vmexit.parse_output(GOOD)
    assert list(r) == ["cpuid", "hypercall", "self-ipi"]
    assert r["cpuid"] == vmexit.TestResult("cpuid", "ok", 100, 800000, 35000, 50)
    assert r["cpuid"].cycles_per_iter == 8000 and r["cpuid"].best_cycles_per_iter == 700
    assert r["hypercall"].status == "unavailable" and r["hypercall"].reason.startswith("the hypercall")
    assert r["self-ipi"].status == "error" and "expected 113" in r["self-ipi"].reason


@pytest.mark.parametrize("text, match", [
    ("vmexit cpuid 100 800000 35000 50\n", "before 'vmexit done'"),
    ("", "no output"),
    ("vmexit fault 13 0000000000100456 0000000000000008\nvmexit done\n", "exception"),
    ("vmexit frob unknown\nvmexit done\n", "frob"),
    ("vmexit cpuid 100 800000\nvmexit done\n", "malformed"),
    ("vmexit cpuid 0 800000 0 0\nvmexit done\n", "malformed"),
    ("vmexit cpuid 100 800000 900000 50\nvmexit done\n", "malformed"),  # best batch above the total
    ("vmexit cpuid 10 800 80 50\nvmexit done\n", "malformed"),  # batch longer than the run
])
def test_parse_output_rejects_what_a_healthy_guest_never_prints(text, match):
    with pytest.raises(vmexit.GuestOutputError, match=match):
        vmexit.parse_output(text)


def test_guest_arguments():
    assert vmexit.guest_arguments(["cpuid", "hlt"], 500) == "n=500 run=cpuid,hlt"
    with pytest.raises(vmexit.BenchArgumentError, match="nosuch"):
        vmexit.guest_arguments(["nosuch"], 5)
    for bad in (0, -1, 2.5):
        with pytest.raises(vmexit.BenchArgumentError):
            vmexit.guest_arguments(["cpuid"], bad)


def test_qemu_command_gives_the_guest_what_hvjit_gives_it(tmp_path):
    cmd = vmexit.qemu_command("/usr/bin/qemu-system-x86_64", tmp_path / "vmexit.elf", "n=5 run=cpuid")
    line = " ".join(cmd)
    for part in ("-accel kvm", "-device pc-testdev", "-device isa-debug-exit,iobase=0xf4,iosize=4",
                 "-serial stdio", "-no-reboot", "-smp 1", f"-m {vmexit.GUEST_MEMORY >> 20}M"):
        assert part in line
    assert cmd[cmd.index("-kernel") + 1] == str(tmp_path / "vmexit.elf")
    assert cmd[-2:] == ["-append", "n=5 run=cpuid"]


def _doc(qemu_available: bool) -> dict:
    ok = {"status": "ok", "cycles_per_iter": 22100.0, "best_cycles_per_iter": 21000.0, "samples": [22100.0]}
    peer = dict(ok, cycles_per_iter=24000.0, best_cycles_per_iter=22000.0) if qemu_available else \
        {"status": "not installed", "reason": "qemu-system-x86_64 is not installed"}
    return {
        "host": {"flavour": "svm", "cpu": "AMD EPYC", "tsc_khz": 2445000},
        "qemu": {"available": qemu_available, "binary": None, "version": "QEMU emulator version 7.2.22",
                 "reason": None if qemu_available else "qemu-system-x86_64 is not installed"},
        "iterations": 1000, "rounds": 5,
        "tests": {
            "pio-read": {"handled_by": "user space", "hvjit": ok, "qemu": peer,
                         "ratio": 0.921 if qemu_available else None,
                         "paired_ratio": 0.934 if qemu_available else None,
                         "best_ratio": 0.955 if qemu_available else None, "note": None},
            "hypercall": {"handled_by": "kvm", "hvjit": {"status": "unavailable", "reason": "did not complete"},
                          "qemu": {"status": "unavailable", "reason": "did not complete"} if qemu_available else peer,
                          "ratio": None, "best_ratio": None, "note": "a host fact"},
        },
    }


def test_format_table_with_and_without_qemu():
    table = vmexit.format_table(_doc(True))
    row = next(line for line in table.splitlines() if line.startswith("pio-read"))
    assert "22,100" in row and "24,000" in row and "0.921" in row and "0.934" in row and "0.955" in row
    assert "hypercall (QEMU): unavailable: did not complete" in table and "note: a host fact" in table
    table = vmexit.format_table(_doc(False))
    row = next(line for line in table.splitlines() if line.startswith("pio-read"))
    assert "22,100" in row and "not installed" in row
    assert "QEMU: qemu-system-x86_64 is not installed" in table
