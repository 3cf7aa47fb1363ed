"""Exit micro-benchmarks against QEMU: ``hvjit bench vmexit``.

The classic exit micro-benchmarks (the lineage of kvm-unit-tests' ``x86/vmexit.c``) as one
small multiboot v1 guest of hvjit's own, ``guests/vmexit.S``, assembled and linked with GNU
as/ld (binutils) into the cache directory on first use. The *identical* ELF boots under hvjit
and, where ``qemu-system-x86_64`` is installed, under QEMU, in the same run: rounds alternate
between the two VMMs (hvjit first in even rounds, QEMU first in odd ones, so drift on a shared
host hits both alike). The guest times its loops with ``rdtsc`` in batches of up to 50
iterations and prints ``vmexit NAME ITERATIONS CYCLES BEST BATCH`` on COM1. Reported, in guest
TSC cycles per iteration: the median over the rounds of each run's average, and the *best*,
the fastest batch in any round. On a busy host the median carries other processes' time
(preemption, a sibling thread's load); the best batch is the exit's own cost, which the
ratio of bests compares. Ratios are hvjit/QEMU: below 1, hvjit is faster.

Tests (each: set-up, a warm-up of n/8+1 iterations, n timed iterations; long mode, CPL0):

============  =======================================================  ====================
test          one iteration                                            handled by
============  =======================================================  ====================
cpuid         ``cpuid`` leaf 0                                         KVM
hypercall     ``vmcall`` (Intel) / ``vmmcall`` (AMD), nr 0 (ENOSYS)    KVM [1]_
cr8-read      ``mov %cr8, %rax``                                       KVM (in-kernel LAPIC)
cr8-write     ``mov %rax, %cr8``                                       KVM (in-kernel LAPIC)
pio-read      ``inl $0xe0``: pc-testdev's scratch register             user space
pio-write     ``outl $0xe0``                                           user space
mmio-read     32-bit load from pc-testdev's MMIO scratch, 0xff000000   user space
mmio-write    32-bit store to it                                       user space
hlt           arm the LAPIC one-shot timer (count 1), ``sti; hlt``,    KVM (in-kernel LAPIC)
              woken by the timer interrupt, EOI
self-ipi      xAPIC self-IPI (ICR shorthand "self"), ``sti``, wait     KVM (in-kernel LAPIC)
              until the handler ran, EOI
============  =======================================================  ====================

.. [1] Neither VMM enables KVM_CAP_EXIT_HYPERCALL, so KVM answers the hypercall itself.

Fairness: the user-space lines use a device both VMMs emulate the same way in user space,
pc-testdev (QEMU ``-device pc-testdev``; hvjit attaches its own to every VM): a 32-bit scratch
port at 0xe0 and 64 KiB of scratch MMIO at 0xff000000, every access a KVM_EXIT_IO/MMIO. hvjit
dispatches them in its Numba run loop; QEMU in its generic memory-region path. Both VMMs get
the in-kernel irqchip and the same guest RAM (64 MiB). Where a test cannot run (no xAPIC, a
hypercall that never completes, an interrupt that never arrives) the guest says so and the
line reads "unavailable" with the reason: no number is made up. The hypercall is probed once
under a 0.25 s LAPIC-timer watchdog first, because a KVM that emulates ring 0 rewrites the
instruction and re-executes it forever.

QEMU runs as (see :func:`qemu_command`)::

    qemu-system-x86_64 -machine microvm -accel kvm -cpu max,-arch-capabilities -smp 1 -m 64M
        -nodefaults -no-user-config -display none -serial stdio -no-reboot
        -device isa-debug-exit,iobase=0xf4,iosize=4 -device pc-testdev
        -kernel vmexit.elf -append "n=N run=TESTS"

microvm because it boots the multiboot image without a BIOS POST (the exit path measured is
QEMU's generic one on ``pc`` too); ``-arch-capabilities`` because some hosts refuse QEMU's
write of MSR 0x10a. ``HVJIT_QEMU`` names another QEMU binary.

``hvjit bench vmexit --json`` prints (stable: harnesses rely on it)::

    {
      "benchmark": "vmexit",
      "unit": "guest TSC cycles per iteration",
      "host": {"flavour", "cpu", "cpu_vendor", "tsc_khz", "api_version"},
      "guest": {"image": path, "sha256": hex, "cmdline": "n=N run=..."},
      "iterations": N, "rounds": R,
      "qemu": {"available": bool, "binary": path|null, "version": str|null,
               "command": [argv]|null, "reason": str|null,   # why it is not available
               "error": str|null},                          # why its runs failed
      "tests": {
        NAME: {
          "handled_by": "kvm" | "user space",
          "what": one-line description,
          "hvjit": RESULT, "qemu": RESULT,
          "ratio": hvjit/qemu of the medians, or null,
          "paired_ratio": median over rounds of that round's hvjit/qemu, or null,
          "best_ratio": hvjit/qemu of the bests, or null,
          "note": str|null        # host facts that explain a line (e.g. PVM)
        }, ...
      }
    }

    RESULT = {"status": "ok", "cycles_per_iter": median over rounds,
              "best_cycles_per_iter": fastest batch, "samples": [cycles/iter per round]}
           | {"status": "unavailable" | "error" | "not installed" | "not run", "reason": str}
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from .._cachedir import cache_base
from ..asm import AssemblerError
from ..errors import HvjitError

# name -> (handled by, what one iteration does); the guest's table has the same order.
TESTS: dict[str, tuple[str, str]] = {
    "cpuid": ("kvm", "cpuid leaf 0"),
    "hypercall": ("kvm", "vmcall/vmmcall nr 0 (the vendor's instruction)"),
    "cr8-read": ("kvm", "mov %cr8, %rax (TPR of the in-kernel LAPIC)"),
    "cr8-write": ("kvm", "mov %rax, %cr8"),
    "pio-read": ("user space", "inl from pc-testdev's scratch port 0xe0"),
    "pio-write": ("user space", "outl to pc-testdev's scratch port 0xe0"),
    "mmio-read": ("user space", "32-bit load from pc-testdev's MMIO scratch at 0xff000000"),
    "mmio-write": ("user space", "32-bit store to pc-testdev's MMIO scratch at 0xff000000"),
    "hlt": ("kvm", "LAPIC one-shot timer (count 1), sti; hlt; woken by its interrupt"),
    "self-ipi": ("kvm", "xAPIC self-IPI, sti, wait for its handler"),
}
IMAGE_NAME = "vmexit.elf"
GUEST_MEMORY = 64 << 20
DEFAULT_ITERATIONS = 1000
DEFAULT_ROUNDS = 7
QEMU_BINARY = "qemu-system-x86_64"
QEMU_MACHINE = "microvm"
QEMU_CPU = "max,-arch-capabilities"
# isa-debug-exit: the guest writes 0; QEMU exits with (value << 1) | 1.
QEMU_SUCCESS_STATUS = 1
# A whole run's bound: start-up plus a generous per-iteration allowance (a self-IPI takes
# ~1-2 ms on PVM).
RUN_TIMEOUT_BASE_S = 60.0
RUN_TIMEOUT_PER_ITERATION_S = 0.01


class VmexitBenchError(HvjitError):
    """The vmexit benchmark could not produce its figures."""


class GuestOutputError(VmexitBenchError):
    """The guest's COM1 output is malformed or ends before ``vmexit done``."""


class GuestRunError(VmexitBenchError):
    """A VMM did not run the guest to its clean exit (status, timeout, fault)."""


class BenchArgumentError(VmexitBenchError, ValueError):
    """An unknown test, or iterations/rounds that are not positive."""


# ---- the guest ---------------------------------------------------------------------------------

def _guest_files() -> tuple[bytes, bytes]:
    base = resources.files("hvjit.benchmarks").joinpath("guests")
    return base.joinpath("vmexit.S").read_bytes(), base.joinpath("vmexit.ld").read_bytes()


def _cache_dir() -> Path:
    return cache_base() / "guests"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssemblerError(f"{name!r} not found: install binutils (Debian: apt-get install binutils)")
    return path


def build_guest(cache_dir: Optional[Path] = None) -> Path:
    """The guest ELF (multiboot v1, ELF32 at 1 MiB), built once per source version."""
    source, script = _guest_files()
    key = hashlib.sha256(source + b"\0" + script).hexdigest()[:20]
    target = (cache_dir or _cache_dir()) / f"vmexit-{key}.elf"
    if target.exists():
        return target
    as_, ld = _tool("as"), _tool("ld")
    with tempfile.TemporaryDirectory(prefix="hvjit-vmexit-") as tmp:
        t = Path(tmp)
        (t / "vmexit.S").write_bytes(source)
        (t / "vmexit.ld").write_bytes(script)
        link = [ld, "-m", "elf_i386", "-T", str(t / "vmexit.ld"), "-z", "max-page-size=0x1000",
                "--no-warn-rwx-segments", "-o", str(t / IMAGE_NAME), str(t / "vmexit.o")]
        for cmd in ([as_, "--32", "-o", str(t / "vmexit.o"), str(t / "vmexit.S")], link):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode and "--no-warn-rwx-segments" in cmd:  # binutils < 2.39
                cmd = [c for c in cmd if c != "--no-warn-rwx-segments"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise AssemblerError(f"{Path(cmd[0]).name} failed on the vmexit guest:\n{proc.stderr.strip()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(t / IMAGE_NAME, partial)
        partial.replace(target)  # atomic: a concurrent run never sees half a file
    return target


def guest_arguments(tests, iterations: int) -> str:
    """The guest's arguments; VMMs put the image name in front (QEMU and GRUB do)."""
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        raise BenchArgumentError(f"unknown vmexit test(s) {', '.join(unknown)}; known: {', '.join(TESTS)}")
    if not isinstance(iterations, int) or iterations < 1:
        raise BenchArgumentError(f"iterations must be a positive integer, not {iterations!r}")
    return f"n={iterations} run={','.join(tests)}"


@dataclasses.dataclass(frozen=True)
class TestResult:
    """One guest line: ``ok`` with iterations, total cycles and the fastest batch's cycles,
    or ``unavailable``/``error`` with a reason."""

    name: str
    status: str
    iterations: int = 0
    cycles: int = 0
    best_batch_cycles: int = 0
    batch: int = 0
    reason: str = ""

    __test__ = False  # not a pytest class

    @property
    def cycles_per_iter(self) -> float:
        return self.cycles / self.iterations

    @property
    def best_cycles_per_iter(self) -> float:
        return self.best_batch_cycles / self.batch


def parse_output(text: str) -> dict[str, TestResult]:
    """The guest's ``vmexit ...`` lines, by test name; raises :class:`GuestOutputError` on a
    fault, an unknown test, a malformed line or a missing ``vmexit done``."""
    results: dict[str, TestResult] = {}
    done = False
    for line in text.replace("\r", "").splitlines():
        if not line.startswith("vmexit "):
            continue  # a firmware's or VMM's own output
        words = line.split()
        if words[1:] == ["done"]:
            done = True
            continue
        if len(words) >= 2 and words[1] == "fault":
            raise GuestOutputError(f"the guest took an exception: {line!r}")
        if len(words) == 3 and words[2] == "unknown":
            raise GuestOutputError(f"the guest does not know test {words[1]!r}")
        if len(words) >= 4 and words[2] in ("unavailable", "error"):
            results[words[1]] = TestResult(words[1], words[2], reason=" ".join(words[3:]))
        elif len(words) == 6 and all(w.isdigit() for w in words[2:]) and int(words[2]) > 0 \
                and 0 < int(words[5]) <= int(words[2]) and int(words[4]) <= int(words[3]):
            n, total, best, batch = map(int, words[2:])
            results[words[1]] = TestResult(words[1], "ok", n, total, best, batch)
        else:
            raise GuestOutputError(f"malformed guest line {line!r}")
    if not done:
        tail = text[-400:] if text else "(no output)"
        raise GuestOutputError(f"the guest stopped before 'vmexit done'; its output ends with:\n{tail}")
    return results


def run_timeout(tests, iterations: int) -> float:
    return RUN_TIMEOUT_BASE_S + RUN_TIMEOUT_PER_ITERATION_S * iterations * len(tests)


# ---- hvjit -------------------------------------------------------------------------------------

_vm_serial = itertools.count(1)  # VM names are unique within a session


@dataclasses.dataclass(frozen=True)
class GuestRun:
    """One boot of the guest: its COM1 output and, under hvjit, vCPU 0's exit counters."""

    vmm: str
    output: str
    exit_counts: Optional[dict] = None


def boot_hvjit(session, image: Path, arguments: str, *, timeout: float) -> GuestRun:
    """Boot the guest under hvjit (multiboot loader, in-kernel irqchip) with ``arguments``
    after the image name, as QEMU passes them."""
    from .. import loaders
    from ..abi import SuspendHow, VmExitCode

    cmdline = f"{IMAGE_NAME} {arguments}"
    vm = session.create_vm(f"vmexit-{next(_vm_serial)}", memory=GUEST_MEMORY, irqchip=True)
    try:
        loaders.load(vm, image.read_bytes(), format="multiboot", cmdline=cmdline)
        result = vm.run(timeout=timeout)
        console = vm.console.decode("latin-1")
    finally:
        vm.destroy()
    ex = result.exit
    if not (ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.POWEROFF and ex.code == 0):
        raise GuestRunError(f"hvjit: the guest ended with {result} (timeout {timeout:.0f} s); "
                            f"output:\n{console[-400:]}")
    return GuestRun("hvjit", console, result.vcpu_stats[0] if result.vcpu_stats else None)


def run_hvjit(session, image: Path, tests, iterations: int, *, timeout: Optional[float] = None) -> GuestRun:
    """Run ``tests`` under hvjit, ``iterations`` each."""
    timeout = run_timeout(tests, iterations) if timeout is None else timeout
    return boot_hvjit(session, image, guest_arguments(tests, iterations), timeout=timeout)


# ---- QEMU --------------------------------------------------------------------------------------

def find_qemu() -> Optional[str]:
    """The QEMU binary: ``$HVJIT_QEMU`` or ``qemu-system-x86_64`` on PATH; None if absent."""
    explicit = os.environ.get("HVJIT_QEMU")
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    return shutil.which(QEMU_BINARY)


def qemu_missing_reason() -> str:
    explicit = os.environ.get("HVJIT_QEMU")
    if explicit:
        return f"HVJIT_QEMU={explicit} is not an executable"
    return f"{QEMU_BINARY} is not installed"


def qemu_version(qemu: str) -> Optional[str]:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out else None


def qemu_command(qemu: str, image: Path, arguments: str) -> list[str]:
    """QEMU with what hvjit gives the guest: KVM, one vCPU, the in-kernel irqchip (microvm's
    default with KVM), COM1, isa-debug-exit at 0xf4 and pc-testdev."""
    return [qemu, "-machine", QEMU_MACHINE, "-accel", "kvm", "-cpu", QEMU_CPU, "-smp", "1",
            "-m", f"{GUEST_MEMORY >> 20}M", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-device", "pc-testdev",
            "-kernel", str(image), "-append", arguments]


def boot_qemu(qemu: str, image: Path, arguments: str, *, timeout: float) -> GuestRun:
    """Boot the same guest under QEMU (see :func:`qemu_command`)."""
    cmd = qemu_command(qemu, image, arguments)
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("latin-1")
        raise GuestRunError(f"QEMU: no clean exit within {timeout:.0f} s; output:\n{out[-400:]}") from None
    out = proc.stdout.decode("latin-1")
    if proc.returncode != QEMU_SUCCESS_STATUS:
        raise GuestRunError(f"QEMU exited with status {proc.returncode} (the guest's clean exit is "
                            f"{QEMU_SUCCESS_STATUS}): {proc.stderr.decode('latin-1').strip()[-400:]}\n"
                            f"output:\n{out[-400:]}")
    return GuestRun("qemu", out)


def run_qemu(qemu: str, image: Path, tests, iterations: int, *, timeout: Optional[float] = None) -> GuestRun:
    """Run ``tests`` under QEMU, ``iterations`` each."""
    timeout = run_timeout(tests, iterations) if timeout is None else timeout
    return boot_qemu(qemu, image, guest_arguments(tests, iterations), timeout=timeout)


# ---- the comparison ----------------------------------------------------------------------------

def host_info() -> dict:
    from ..system import Kvm, cpu_model, cpu_vendor, probe_tsc_khz

    kvm = Kvm.instance()
    return {"flavour": kvm.flavour, "cpu": cpu_model(), "cpu_vendor": cpu_vendor(),
            "tsc_khz": probe_tsc_khz(kvm), "api_version": kvm.api_version}


def _results_of(run: GuestRun, tests) -> dict[str, TestResult]:
    results = parse_output(run.output)
    missing = [t for t in tests if t not in results]
    if missing:
        raise GuestOutputError(f"{run.vmm}: the guest printed no line for {', '.join(missing)}")
    return results


def _summary(results: list[TestResult]) -> dict:
    """One VMM's figure for one test over the rounds."""
    bad = [r for r in results if r.status != "ok"]
    if bad:  # a test that cannot run does not run in any round
        return {"status": bad[0].status, "reason": bad[0].reason}
    samples = [r.cycles_per_iter for r in results]
    return {"status": "ok", "cycles_per_iter": round(statistics.median(samples), 1),
            "best_cycles_per_iter": round(min(r.best_cycles_per_iter for r in results), 1),
            "samples": [round(s, 1) for s in samples]}


def _note(name: str, flavour: str, hvjit: dict, qemu: dict) -> Optional[str]:
    """Host facts that explain a line."""
    if flavour != "pvm":
        return None
    if name == "hypercall" and "unavailable" in (hvjit["status"], qemu["status"]):
        return ("PVM emulates ring 0 in KVM's x86 emulator, which rewrites vmcall/vmmcall to the "
                "host's form and re-executes it without ever completing the hypercall")
    if name == "self-ipi":
        return ("on PVM a self-IPI is taken ~1 ms after it is sent, under both VMMs alike: the line "
                "measures that delay")
    return ("on PVM guest code at CPL0 is emulated by KVM (~1 us/instruction): each iteration "
            "includes its loop instructions")


def measure(session=None, *, tests=tuple(TESTS), iterations: int = DEFAULT_ITERATIONS,
            rounds: int = DEFAULT_ROUNDS, qemu: Optional[str] = "auto", progress=None) -> dict:
    """Run the guest under hvjit and QEMU, alternating, ``rounds`` times; the JSON document.

    ``qemu``: a binary, ``"auto"`` (:func:`find_qemu`) or None (hvjit only). ``progress``:
    called with a line of text after each run (the CLI prints them on stderr).
    """
    tests = tuple(tests)
    arguments = guest_arguments(tests, iterations)
    if not isinstance(rounds, int) or rounds < 1:
        raise BenchArgumentError(f"rounds must be a positive integer, not {rounds!r}")
    image = build_guest()
    qemu_path = find_qemu() if qemu == "auto" else qemu
    missing = qemu_missing_reason() if qemu == "auto" else "not requested"
    qemu_doc = {"available": qemu_path is not None, "binary": qemu_path, "version": None, "command": None,
                "reason": None if qemu_path else missing, "error": None}
    if qemu_path:
        qemu_doc["version"] = qemu_version(qemu_path)
        qemu_doc["command"] = qemu_command(qemu_path, image, arguments)

    own_session = session is None
    if own_session:
        from .. import Session

        session = Session()
    samples: dict[str, list[dict[str, TestResult]]] = {"hvjit": [], "qemu": []}
    try:
        runners = {"hvjit": lambda: run_hvjit(session, image, tests, iterations)}
        if qemu_path:
            runners["qemu"] = lambda: run_qemu(qemu_path, image, tests, iterations)
        for r in range(rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for vmm in order:
                if vmm == "qemu" and qemu_doc["error"]:
                    continue
                t0 = time.perf_counter()
                try:
                    samples[vmm].append(_results_of(runners[vmm](), tests))
                except VmexitBenchError as e:
                    if vmm != "qemu":
                        raise
                    qemu_doc["error"] = str(e)  # the peer failed: hvjit's column still stands
                if progress:
                    progress(f"round {r + 1}/{rounds}: {vmm} {time.perf_counter() - t0:.1f} s")
    finally:
        if own_session:
            session.close()

    host = host_info()
    doc_tests = {}
    for name in tests:
        handled_by, what = TESTS[name]
        hv = _summary([s[name] for s in samples["hvjit"]])
        if not qemu_path:
            qm = {"status": "not installed" if qemu == "auto" else "not run", "reason": qemu_doc["reason"]}
        elif qemu_doc["error"]:
            qm = {"status": "error", "reason": qemu_doc["error"]}
        else:
            qm = _summary([s[name] for s in samples["qemu"]])
        both = hv["status"] == qm["status"] == "ok"
        doc_tests[name] = {
            "handled_by": handled_by, "what": what, "hvjit": hv, "qemu": qm,
            "ratio": round(hv["cycles_per_iter"] / qm["cycles_per_iter"], 3) if both else None,
            # Each round's two runs are neighbours in time: their ratio is steadier on a host
            # whose speed drifts between rounds than the ratio of the two medians.
            "paired_ratio": round(statistics.median(h / q for h, q in zip(hv["samples"], qm["samples"])), 3)
            if both else None,
            "best_ratio": round(hv["best_cycles_per_iter"] / qm["best_cycles_per_iter"], 3) if both else None,
            "note": _note(name, host["flavour"], hv, qm),
        }
    return {
        "benchmark": "vmexit", "unit": "guest TSC cycles per iteration", "host": host,
        "guest": {"image": str(image), "sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
                  "cmdline": arguments},
        "iterations": iterations, "rounds": rounds, "qemu": qemu_doc, "tests": doc_tests,
    }


def _cell(result: dict, key: str = "cycles_per_iter") -> str:
    return f"{result[key]:,.0f}" if result["status"] == "ok" else result["status"]


def _ratio(value: Optional[float]) -> str:
    return f"{value:.3f}" if value is not None else "-"


def format_table(doc: dict) -> str:
    """The human-readable table: per test, hvjit's and QEMU's cycles per iteration (median of
    the rounds, and the fastest batch) and the ratios hvjit/QEMU."""
    h, q = doc["host"], doc["qemu"]
    lines = [f"host: {h['flavour']} KVM on {h['cpu']}, TSC {h['tsc_khz']} kHz",
             f"QEMU: {q['version'] or q['binary']}" if q["available"] else f"QEMU: {q['reason']}",
             f"guest TSC cycles per iteration: median of {doc['rounds']} alternating rounds of "
             f"{doc['iterations']} iterations; best: the fastest batch of up to 50 in any round",
             "",
             "paired: the median of each round's hvjit/QEMU (the two runs of a round are neighbours in time)",
             "",
             f"{'':11} {'---------------- median ----------------':>49}  {'----------- best -----------':>40}",
             f"{'test':11} {'hvjit':>12} {'QEMU':>14} {'hvjit/QEMU':>12} {'paired':>8}  {'hvjit':>12} {'QEMU':>14} "
             f"{'hvjit/QEMU':>12}  exit handled by"]
    reasons = []
    for name, t in doc["tests"].items():
        hv, qm = t["hvjit"], t["qemu"]
        lines.append(f"{name:11} {_cell(hv):>12} {_cell(qm):>14} {_ratio(t['ratio']):>12} "
                     f"{_ratio(t.get('paired_ratio')):>8}  "
                     f"{_cell(hv, 'best_cycles_per_iter'):>12} {_cell(qm, 'best_cycles_per_iter'):>14} "
                     f"{_ratio(t['best_ratio']):>12}  {t['handled_by']}")
        for label, r in (("hvjit", hv), ("QEMU", qm)):
            if r["status"] not in ("ok", "not installed", "not run"):
                reasons.append(f"  {name} ({label}): {r['status']}: {r['reason']}")
    notes = sorted({t["note"] for t in doc["tests"].values() if t["note"]})
    if reasons or notes:
        lines.append("")
        lines.extend(reasons)
        lines.extend(f"  note: {n}" for n in notes)
    return "\n".join(lines)


def cli_main(args) -> int:
    """``hvjit bench vmexit [--json] [--iterations N] [--rounds R]``."""
    import json
    import sys

    iterations = args.iterations if args.iterations is not None else DEFAULT_ITERATIONS
    doc = measure(iterations=iterations, rounds=args.rounds if args.rounds is not None else DEFAULT_ROUNDS,
                  progress=lambda line: print(f"hvjit: vmexit {line}", file=sys.stderr))
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(doc))
    return 0
