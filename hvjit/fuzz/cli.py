"""``hvjit fuzz GUEST`` and ``hvjit run GUEST --input FILE``: the command line of hvjit.fuzz.

Both load the guest the same way (the options ``hvjit run`` has for flat and ELF images), run
it to READY and snapshot it there; ``fuzz`` then runs a campaign, ``run --input`` one input.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

from ..errors import HvjitError

DEFAULT_OUT = "fuzz-out"
DEFAULT_EXEC_TIMEOUT = 0.5
FLEET_HINT = "pip install 'hvjit[fleet]'  (Ray)"


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse


def add_parser(sub, *, parse_size, parse_int) -> argparse.ArgumentParser:
    """The ``fuzz`` subcommand (``hvjit.cli`` passes its size and integer parsers)."""
    _size, _int = parse_size, parse_int
    p = sub.add_parser("fuzz", help="fuzz a guest that follows the harness convention (docs/fuzzing.md)")
    p.add_argument("image", help="the guest image (flat binary or ELF)")
    p.add_argument("--format", choices=["auto", "flat", "elf", "multiboot"], default="auto")
    p.add_argument("--gpa", type=_int, default=0x1000, help="load address of a flat binary (default 0x1000)")
    p.add_argument("--entry", type=_int, default=None, help="entry point (default: the image's)")
    p.add_argument("--mode", choices=["protected", "long"], default=None, help="entry mode (default long)")
    p.add_argument("--cpl", type=int, choices=[0, 3], default=3,
                   help="privilege level of a flat or ELF guest (default 3: runs natively even where ring 0 is emulated)")
    p.add_argument("--memory", type=_size, default=16 << 20, help="guest RAM (default 16M)")
    p.add_argument("-o", "--out", default=DEFAULT_OUT, help=f"output directory: crashes/, corpus/ (default {DEFAULT_OUT})")
    p.add_argument("--corpus", action="append", default=[], metavar="DIR", help="seed inputs (read only; repeatable)")
    p.add_argument("--dict", default=None, metavar="FILE", help="a libFuzzer/AFL dictionary of tokens")
    p.add_argument("--seed", type=_positive(int), default=None, help="mutation seed (default: random, printed)")
    p.add_argument("--max-execs", type=_positive(int), default=None, help="stop after this many executions")
    p.add_argument("--max-time", type=_positive(float), default=None, help="stop after this many seconds")
    p.add_argument("--max-crashes", type=_positive(int), default=None, help="stop after this many new unique crashes")
    p.add_argument("--max-len", type=_positive(int), default=None, help="longest input (default 4096, at most the buffer)")
    p.add_argument("--exec-timeout", type=_positive(float), default=DEFAULT_EXEC_TIMEOUT,
                   help=f"seconds before one execution counts as a hang (default {DEFAULT_EXEC_TIMEOUT})")
    p.add_argument("--workers", type=_positive(int), default=None, help="fuzz on N Ray workers (hvjit[fleet])")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one for the run)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=cmd_fuzz)
    return p


def load_target(session, args, exec_timeout: float, name: str = "fuzz-target"):
    """Create a VM, load ``args.image`` as ``hvjit run`` would, run it to READY."""
    from .. import loaders
    from .harness import Target

    data = loaders.read_image(args.image)
    fmt = loaders.detect_format(data) if args.format == "auto" else args.format
    if fmt not in ("flat", "elf", "multiboot"):
        raise HvjitError(f"a {fmt} image cannot be fuzzed here: give a flat binary, an ELF or a multiboot kernel")
    vm = session.create_vm(name, memory=args.memory, irqchip=fmt == "multiboot")
    simple = fmt in ("flat", "elf")
    mode = (args.mode or "long") if fmt == "flat" else (args.mode if simple else None)
    loaders.load(vm, data, format=fmt, gpa=args.gpa if fmt == "flat" else None, entry=args.entry,
                 mode=mode, cpl=args.cpl if simple else 0, name=args.image)
    return Target.at_ready(vm, timeout=exec_timeout)


def reproduce_command(args, exec_timeout: float, path: str = "FILE") -> str:
    """The ``hvjit run --input`` line that loads the guest as this campaign did."""
    parts = ["hvjit", "run", args.image, "--memory", str(args.memory), "--timeout", str(exec_timeout)]
    if args.format != "auto":
        parts += ["--format", args.format]
    if args.format in ("auto", "flat"):
        parts += ["--gpa", hex(args.gpa)]
    if args.entry is not None:
        parts += ["--entry", hex(args.entry)]
    if args.mode is not None:
        parts += ["--mode", args.mode]
    parts += ["--cpl", str(args.cpl), "--input", path]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_fuzz(args) -> int:
    from .engine import INSTALL_HINT, available

    if not available():
        print(f"hvjit fuzz: libFuzzer's mutator is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    seed = args.seed or random.SystemRandom().randrange(1, 1 << 31)
    if args.workers:
        try:
            from ..fleet import require_ray

            require_ray()
        except HvjitError as e:
            print(f"hvjit fuzz --workers: {e}", file=sys.stderr)
            return 2
    summary = _fuzz(args, seed)
    summary["reproduce"] = reproduce_command(args, args.exec_timeout)
    for crash in summary["new_crashes"]:
        crash["reproduce"] = reproduce_command(args, args.exec_timeout, crash["file"])
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 1 if summary["new_crashes"] else 0


def _fuzz(args, seed: int) -> dict:
    from .. import Session
    from .campaign import Budget, Progress, run_campaign

    budget = Budget(max_execs=args.max_execs, max_time=args.max_time, max_crashes=args.max_crashes)
    progress = Progress(enabled=not args.quiet)
    with Session() as s:
        target = load_target(s, args, args.exec_timeout)
        if not args.workers:
            return run_campaign(target, args.out, budget=budget, seed=seed, seed_dirs=args.corpus,
                                dictionary=args.dict, max_len=args.max_len, progress=progress)
        from .. import fleet

        return fleet.fuzz(target, args.out, workers=args.workers, address=args.address, budget=budget, seed=seed,
                          exec_timeout=args.exec_timeout, max_len=args.max_len, dictionary=args.dict,
                          seed_dirs=args.corpus, progress=progress)


def _print_summary(summary: dict) -> None:
    err = sys.stderr
    print(f"hvjit fuzz: {summary['execs']:,} executions in {summary['elapsed']:.1f} s "
          f"({summary['execs_per_s']:,.0f}/s), seed {summary['seed']}; {summary['unique_crashes']} unique "
          f"crash(es) in {summary['crash_dir']}", file=err)
    for c in summary["new_crashes"]:
        print(f"  new: {c['label']} at rip={c['rip']:#x}: {c['file']}", file=err)
    if summary["new_crashes"]:
        print(f"  reproduce: {summary['new_crashes'][0]['reproduce']}", file=err)
    for k, why in summary.get("lost_workers", {}).items():
        print(f"  worker {k} was lost: {why}", file=err)


def cmd_replay(args) -> int:
    """``hvjit run GUEST --input FILE``: one input through the harness; exit with its class."""
    from .. import Session
    from .outcome import STATUS

    data = Path(args.input).read_bytes()
    args.mode = args.mode if args.mode_given else None
    with Session() as s:
        target = load_target(s, args, args.timeout, name=args.name)
        outcome = target.execute(data)
        console = target.vm.console
    status = STATUS[outcome.kind]
    if args.json:
        json.dump({"input": args.input, "size": len(data), "outcome": outcome.to_dict(), "status": status,
                   "console": console.decode("latin-1")}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.buffer.write(console)
        sys.stdout.flush()
        print(f"hvjit: input {args.input} ({len(data)} bytes): {outcome.describe()}", file=sys.stderr)
    return status


def cmd_bench_fleet(args) -> int:
    """``hvjit bench exits --workers N``: the benchmark on N Ray workers at once, per worker."""
    try:
        from .. import fleet
        from ..benchmarks.exits import DEFAULT_ROUNDS

        results = fleet.bench(args.what, {"exits": args.exits, "rounds": args.rounds or DEFAULT_ROUNDS,
                                          "kinds": [k.strip() for k in args.kinds.split(",")]},
                              workers=args.workers, address=args.address)
    except HvjitError as e:
        print(f"hvjit bench --workers: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump({"workers": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for k, result in enumerate(results):
        w = result["worker"]
        print(f"worker {k} (pid {w['pid']} on {w['host']}):")
        for kind, r in result["exits"].items():
            print(f"  {kind:6} C {r['c_ns']:9.1f} ns  Numba {r['numba_ns']:9.1f} ns  Python {r['python_ns']:9.1f} ns  "
                  f"Numba/C {r['numba_over_c']:.3f}  Python/C {r['python_over_c']:.3f}")
    return 0
