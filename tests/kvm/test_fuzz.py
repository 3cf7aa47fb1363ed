"""Fuzzing: the harness convention, crash classification on real exits, the libFuzzer engine,
and `hvjit fuzz` finding the planted bug in hvjit.fuzz.example and `hvjit run --input`
reproducing it."""

import json
import shlex
import subprocess
import sys

import pytest

from hvjit import loaders
from hvjit.asm import assemble
from hvjit.fuzz import example
from hvjit.fuzz.campaign import Fuzzer
from hvjit.fuzz.harness import HarnessError, Target

pytest.importorskip("atheris", reason="the fuzz extra (atheris) is not installed")

# Behaviours chosen by the input's first byte; READY passes only the input buffer.
BEHAVIOURS = """
.code{bits}
    mov $0x10000, %edi
    mov $0x108, %esi
    mov $1, %eax
    mov $0x6f0, %dx
    outl %eax, %dx              # READY
    movzbl 0x10008, %eax
    cmp $'A', %al
    je abort
    cmp $'L', %al
    je loop
    cmp $'U', %al
    je undefined
    cmp $'P', %al
    je pagefault
    cmp $'M', %al
    je mmio
    cmp $'X', %al
    je debugexit
    mov $2, %eax                # DONE
    mov $0x6f0, %dx
    outl %eax, %dx
abort:
    mov $3, %eax
    mov $0x6f0, %dx
    outl %eax, %dx
loop:
    jmp loop
undefined:
    ud2
pagefault:
    {pagefault}
mmio:
    movl $1, 0x40000000         # guest-physical 1 GiB: no RAM there
debugexit:
    mov $0, %eax
    outl %eax, $0xf4
"""


def _target(session, bits=64, mode="long", timeout=0.3):
    pf = "movabs $0x123456789000, %rax\n    movl $1, (%rax)" if bits == 64 else "ud2"
    vm = session.create_vm("behaviours", memory=4 << 20)
    loaders.load(vm, assemble(BEHAVIOURS.format(bits=bits, pagefault=pf), 0x1000), format="flat",
                 gpa=0x1000, mode=mode, cpl=3)
    return Target.at_ready(vm, timeout=timeout)


def test_every_kind_of_ending_is_classified_and_the_vm_recovers(session):
    t = _target(session)
    assert t.layout.crash_idt and not t.layout.privileged and t.layout.max_input == 0x100
    cases = {b"": ("ok", None), b"X": ("ok", None), b"A": ("abort", None), b"L": ("timeout", None),
             b"U": ("exception", 6), b"P": ("exception", 14), b"M": ("mmio", None)}
    for _ in range(2):  # every kind twice: each reset must undo the previous ending
        for data, (kind, vector) in cases.items():
            o = t.execute(data)
            assert o.kind == kind, (data, o)
            if vector is not None:
                assert o.vector == vector, o
    pf = t.execute(b"P")
    assert pf.label == "exception-pf" and "0x123456789000" in pf.detail and pf.error_code & 2  # a write
    ud = t.execute(b"U")
    assert bytes(t.vm.memory.read(ud.rip, 2)) == b"\x0f\x0b"  # the rip is the faulting ud2 itself
    assert t.execute(b"Z").kind == "ok"


def test_a_guest_without_room_for_the_crash_idt_triple_faults(session):
    t = _target(session, bits=32, mode="protected")
    assert not t.layout.crash_idt
    assert t.execute(b"U").kind == "triplefault"
    assert t.execute(b"").kind == "ok"  # and the next input runs from the snapshot again


def test_a_guest_that_never_reports_ready_is_refused(session):
    vm = session.create_vm("noready", memory=2 << 20)
    loaders.load(vm, assemble(".code64\n mov $0, %eax\n outl %eax, $0xf4\n", 0x1000), format="flat",
                 gpa=0x1000, mode="long", cpl=3)
    with pytest.raises(HarnessError, match="READY"):
        Target.at_ready(vm)


def _example_target(session):
    vm = session.create_vm("parser", memory=example.MEMORY)
    loaders.load(vm, example.image(), format="flat", gpa=example.LOAD_GPA, mode="long", cpl=3)
    return Target.at_ready(vm)


def test_the_example_parser_reports_coverage_and_comparisons(session):
    t = _example_target(session)
    assert t.layout.coverage_size == example.COVERAGE_SIZE and t.layout.cmplog_entries == example.CMPLOG_ENTRIES
    assert t.execute(b"nope").kind == "ok"
    shallow = set(t.features().tolist())
    assert t.comparisons()[:, 1:].tolist() == [[int.from_bytes(b"nope", "little"), example.MAGIC]]
    assert t.execute(b"HVJTS\x02ab").kind == "ok"
    deeper = set(t.features().tolist())
    assert deeper - shallow  # the magic opened new blocks
    crash = t.execute(example.CRASHING_INPUT)
    assert crash.label == "exception-de"
    assert bytes(t.vm.memory.read(crash.rip, 2)) == b"\xf7\xf1"  # div %ecx


def test_libfuzzer_finds_the_magic_through_the_comparison_log(session, tmp_path):
    """Coverage alone cannot lead to a 32-bit compare; the logged operands do, quickly."""
    t = _example_target(session)
    fuzzer = Fuzzer(t, seed=7, corpus_dir=tmp_path / "corpus", log_path=tmp_path / "libfuzzer.log")
    magic_feature = 3 * 8  # the block after the magic check, hit once
    try:
        for _ in range(40):
            fuzzer.run(max_execs=100)
            if fuzzer.covered(magic_feature):
                break
    finally:
        fuzzer.close()
    assert fuzzer.covered(magic_feature), f"no input passed the magic in {fuzzer.stats.execs} executions"
    assert fuzzer.stats.execs <= 4000
    assert any((tmp_path / "corpus").iterdir())  # libFuzzer kept the inputs that got further


def hvjit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hvjit", *args], capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_hvjit_fuzz_finds_the_planted_bug_and_run_input_reproduces_it(tmp_path):
    image = tmp_path / "parser.bin"
    image.write_bytes(example.image())
    out = tmp_path / "out"
    p = hvjit("fuzz", str(image), "--memory", "2M", "--seed", "1", "--max-execs", "30000", "--max-crashes", "1",
              "--json", "-o", str(out))
    assert p.returncode == 1, p.stderr[-2000:]  # 1: a new crash was saved (as libFuzzer reports it)
    summary = json.loads(p.stdout)
    assert summary["seed"] == 1 and summary["execs"] <= 30000
    [crash] = summary["new_crashes"]
    assert crash["label"] == "exception-de"
    saved = out / "crashes" / crash["file"].rsplit("/", 1)[1]
    assert saved.read_bytes()[:4] == b"HVJT" and json.loads(saved.with_suffix(".json").read_text())["vector"] == 0
    assert b"exec/s" in p.stderr  # the progress line
    replay = hvjit(*shlex.split(crash["reproduce"])[1:], "--json")
    assert replay.returncode == 120, replay.stderr  # 120: an exception
    outcome = json.loads(replay.stdout)["outcome"]
    assert (outcome["label"], outcome["rip"]) == (crash["label"], crash["rip"])
    benign = tmp_path / "benign.bin"
    benign.write_bytes(b"HVJTD\x06\x00\x03\x00E")
    ok = hvjit("run", str(image), "--memory", "2M", "--cpl", "3", "--input", str(benign))
    assert ok.returncode == 0 and b"ok at rip" in ok.stderr
