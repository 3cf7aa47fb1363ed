"""The ``hvjit`` command: a thin front over the public API.

    hvjit info [--json]                 KVM availability, flavour, caps, TSC, CPU
    hvjit run IMAGE [options]           run a flat binary; serial output to stdout
              [--snapshot-at WHEN FILE]  save the VM's state at WHEN (2.5s, or a count of exits)
    hvjit run --restore FILE            go on from a saved state
    hvjit run IMAGE --gdb [HOST:]PORT   the same under GDB (target remote), from the first instruction
    hvjit run IMAGE --input FILE        one input through the fuzzing harness; exits with its class
    hvjit run --server PATH ...         the same run, in a warm `hvjit serve` (also: HVJIT_SERVER=PATH)
    hvjit serve [--socket PATH]         a warm fork server for `hvjit run` (docs/architecture.md)
    hvjit fuzz IMAGE [--workers N]      fuzz a guest (docs/fuzzing.md); on Ray with --workers
    hvjit demo                          a greeting guest, its output and exit figures
    hvjit bench exits|decode|pagewalk   benchmarks with ratios against references (--json)
    hvjit bench vmexit                  exit micro-benchmark guests under hvjit and QEMU
    hvjit bench exits --workers N       the exit benchmark on N Ray workers at once
    hvjit msr-probe [--range A-B]       guest-visible (and host, where possible) MSRs
    hvjit trace show|plot FILE          an exit trace (hvjit run --trace FILE): table or PNGs
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
from pathlib import Path
from typing import Optional

from . import helper_threads
from .errors import HvjitError, KvmUnavailableError

# Exit statuses of `hvjit run` that are not the guest's own debug-exit code.
STATUS_TIMEOUT = 124
STATUS_TRIPLE_FAULT = 125
STATUS_EMULATION_FAILURE = 126
STATUS_OTHER_EXIT = 127
STATUS_KILLED = 137  # 128 + SIGKILL: the debugger killed the guest


def parse_size(text: str) -> int:
    """'16M', '2G', '0x100000', '4096' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(t, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 16M, 1G, 0x100000)") from None


def parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _print_json(obj) -> None:
    import json

    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# ---- info -------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from .dirty import host_tracking
    from .system import Kvm, cpu_model, cpu_vendor, detect_flavour
    from .vcpu_debug import host_support

    try:
        kvm = Kvm.instance()
        info = kvm.info()
        info["debug"] = host_support(kvm)
        info["behaviour"] = _probed_behaviour()
        info["dirty_tracking"] = host_tracking(kvm)
    except KvmUnavailableError as e:
        info = {"available": False, "reason": str(e), "flavour": detect_flavour(),
                "cpu_vendor": cpu_vendor(), "cpu_model": cpu_model()}
    if args.json:
        _print_json(info)
        return 0 if info["available"] else 1
    if not info["available"]:
        print(f"KVM: unavailable: {info['reason']}")
        return 1
    flavour = {"pvm": "PVM (software virtualization: CPL0 code is emulated)",
               "vmx": "hardware VMX (Intel)", "svm": "hardware SVM (AMD)"}.get(info["flavour"], info["flavour"])
    print(f"KVM:          {info['device']}, API version {info['api_version']}")
    print(f"flavour:      {flavour}")
    print(f"CPU:          {info['cpu_model']} ({info['cpu_vendor']})")
    print(f"TSC:          {info['tsc_khz']} kHz" if info["tsc_khz"] else "TSC:          (not reported)")
    print(f"MSRs:         {info['msr_index_count']} saved by KVM, {info['feature_msr_count']} feature MSRs; "
          f"host /dev/cpu/N/msr {'present' if info['host_msr_device'] else 'absent'}")
    controls = ", ".join(f"{k} {({True: 'yes', False: 'no'}).get(v, v)}" for k, v in info["vcpu_controls"].items())
    print(f"vCPU control: {controls}")
    print("debugging:    " + "; ".join(f"{k} {v}" for k, v in info["debug"].items()))
    print("OUT exits:    " + ("finished at the exit (a CPL3-only reset needs no completing KVM_RUN)"
                              if info["behaviour"]["out_exit_settled"] else
                              "finished on the next KVM_RUN (a reset completes them first)"))
    tracking = info["dirty_tracking"]
    bitmap = "KVM's bitmap" + (", manually protected" if tracking["manual_protect"] else ", cleared as read")
    print("dirty pages:  " + (f"dirty ring of {tracking['ring_entries']} entries a vCPU (up to "
                              f"{tracking['ring_max_entries']}; {bitmap} with dirty_ring=0)"
                              if tracking["ring_entries"] else f"{bitmap} (no dirty ring on this host)"))
    caps = ", ".join(f"{k}" + (f"={v}" if v != 1 else "") for k, v in sorted(info["capabilities"].items()))
    print(f"capabilities: {caps}")
    return 0


def _probed_behaviour() -> dict[str, bool]:
    """What only a probe guest shows (hvjit.reset.out_exit_settled)."""
    from .reset import host_settles_out_exits
    from .system import Kvm
    from .vm import Vm

    kvm = Kvm.instance()
    host_settles_out_exits(kvm, Vm)
    return dict(kvm.behaviour)


# ---- run --------------------------------------------------------------------------------------

def _exit_status(exit_) -> int:
    from .abi import SuspendHow, VmExitCode

    if exit_.exitcode == VmExitCode.SUSPENDED:
        if exit_.how == SuspendHow.POWEROFF:
            return exit_.code & 0xFF
        if exit_.how == SuspendHow.TRIPLEFAULT:
            return STATUS_TRIPLE_FAULT
        return 0
    if exit_.exitcode == VmExitCode.TIMEOUT:
        return STATUS_TIMEOUT
    if exit_.exitcode == VmExitCode.EMULATION_FAILURE:
        return STATUS_EMULATION_FAILURE
    return STATUS_OTHER_EXIT


def _image_and_format(args) -> tuple[bytes, str, list[str]]:
    """The image to load, its format, and notes for the user (e.g. a bzImage unpacked)."""
    from . import loaders
    from .loaders.bzimage import extract_vmlinux
    from .system import Kvm

    path = args.kernel or args.image
    if path is None:
        raise HvjitError("nothing to run: give an IMAGE or --kernel")
    data = loaders.read_image(path)
    fmt = loaders.detect_format(data) if args.format == "auto" else args.format
    notes = []
    if fmt == "linux" and data[:4] != b"\x7fELF" and Kvm.instance().flavour == "pvm" and not args.no_extract:
        # Ring 0 is emulated here: decompressing in the guest would take many minutes.
        data = extract_vmlinux(data, max_size=args.memory)  # a kernel bigger than RAM cannot boot
        notes.append("PVM host: booting the bzImage's vmlinux through its PVH entry (--no-extract to keep it)")
    return data, fmt, notes


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def run_image(args, out=sys.stdout) -> int:
    from . import Session, loaders
    from .vm import Vm

    data, fmt, notes = _image_and_format(args) if not args.restore else (b"", "snapshot", [])
    real_guest = fmt in ("multiboot", "linux")
    irqchip = args.irqchip or real_guest or args.cpus > 1
    s = Session()
    # A served child leaves its session to the process's end: it exits as soon as the client
    # has the status, and the kernel then releases the VM (~15 ms the client need not wait).
    with s.acting() if _served else s:
        if args.restore:
            vm = Vm.restore(s, args.restore, name=args.name)
            info = f"restored from {args.restore}"
        else:
            vm = s.create_vm(args.name, memory=args.memory, vcpus=args.cpus, irqchip=irqchip)
            for name in args.device or ():
                vm.add_device(name)
            if args.timer_slack:
                vm.set_timer_slack(args.timer_slack / 1000)
            info = loaders.load(
                vm, data, format=fmt, cmdline=args.append or "", initrd=args.initrd,
                modules=args.module or (), name=args.kernel or args.image,  # argv[0], as QEMU's -kernel
                gpa=args.gpa if fmt == "flat" else None, entry=args.entry,
                mode=None if real_guest else (args.mode if fmt == "flat" or args.mode_given else None),
                cpl=0 if real_guest else args.cpl,
            )
        if not args.json:
            for note in notes:
                print(f"hvjit: {note}", file=sys.stderr)
            if args.verbose:
                print(f"hvjit: {info}", file=sys.stderr)
            sink = out.buffer if hasattr(out, "buffer") else None
            vm.console_sink = (lambda b: (sink.write(b), sink.flush())) if sink else (
                lambda b: (out.write(b.decode("latin-1")), out.flush()))
        watch = _watch_boot(vm, args, fmt)
        if args.gdb:
            outcome = _serve_gdb(vm, args.gdb)
            if outcome.reason == "killed":
                print("hvjit: killed by the debugger", file=sys.stderr)
                return STATUS_KILLED
            if outcome.reason == "exited":
                print(f"hvjit: {outcome.exit} (under the debugger)", file=sys.stderr)
                return _exit_status(outcome.exit)
            # Detached: the guest runs on as without a debugger.
        stdin_feeder = _feed_stdin(vm) if args.interactive else None
        if args.trace:
            vm.trace.enable(args.trace_size)
        progress = _show_progress(vm, watch, args, fmt)
        startup_done()
        try:
            if args.snapshot_at:
                result = _run_with_snapshot(vm, args)
            else:
                result = vm.run(timeout=args.timeout)
        except KeyboardInterrupt:
            # vm.run stopped and joined every vCPU before letting Ctrl-C through.
            counters = [v.stats() for v in vm.vcpus]
            if args.json:
                _print_json({"reason": "interrupted", "status": EXIT_INTERRUPTED, "format": fmt,
                             "counters": counters[0] if args.cpus == 1 else counters,
                             "console": vm.console.decode("latin-1")})
            else:
                print(f"\nhvjit: interrupted; counters: {counters}", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            if progress is not None:
                progress.set()
            if stdin_feeder is not None:
                stdin_feeder.set()
            if args.trace:
                _save_trace(vm, args.trace)
        status = _exit_status(result.exit)
        if args.json:
            doc = result.to_dict()
            doc.update(status=status, format=fmt, counters=result.vcpu_stats[0] if args.cpus == 1 else result.vcpu_stats,
                       startup=startup_figures())
            if watch is not None:
                doc["milestones"] = {name: round(t, 3) for name, t in watch.reached.items()}
            _print_json(doc)
        else:
            print(f"hvjit: {result}", file=sys.stderr)
            if result.exit.report is not None:
                print(f"hvjit: {result.exit.report}", file=sys.stderr)
    return status


def _watch_boot(vm, args, fmt):
    """Milestones of a Linux boot (or the user's --marker), seen on the console."""
    if fmt != "linux" and not args.marker:
        return None
    from .boot_progress import LINUX_MILESTONES, BootWatch

    watch = BootWatch(LINUX_MILESTONES if fmt == "linux" else (), marker=(args.marker or "").encode() or None)
    inner = vm.console_sink

    def sink(chunk: bytes) -> None:
        watch.feed(chunk)
        if inner is not None:
            inner(chunk)

    vm.console_sink = sink
    return watch


def _show_progress(vm, watch, args, fmt):
    """A progress line on stderr every --progress-every seconds (auto: Linux on a terminal)."""
    import threading

    wanted = args.progress == "on" or (args.progress == "auto" and fmt == "linux" and sys.stderr.isatty())
    if not wanted or watch is None:
        return None
    stop = threading.Event()
    tty = sys.stderr.isatty()

    def report():
        while not stop.wait(args.progress_every):
            line = watch.line(vm)
            print(f"\r\x1b[K{line}" if tty else f"hvjit: {line}", end="" if tty else "\n",
                  file=sys.stderr, flush=True)

    helper_threads.start(report, "hvjit-progress")
    return stop


def startup_figures() -> dict:
    """Start-up and footprint of this process, for ``hvjit run --json``'s ``startup``:

    - ``first_kvm_run_ns``: CLOCK_MONOTONIC taken in C just before the process's first KVM_RUN
      ioctl (``hvt_vcpu_run``); compare it with a clock read before the process was spawned
      (bench/test_bench_startup.py does) for the exact time to the first KVM_RUN.
    - ``process_start_ns``: the process's start on the same clock (``/proc/self/stat``,
      resolution one clock tick, 10 ms); ``first_kvm_run_s`` and ``wall_s`` count from it
      (``wall_s``: to this report, just before the VM is torn down and the process exits).
    - ``max_rss_kib``: peak resident set size so far (``getrusage``'s ``ru_maxrss``).

    Run through `hvjit serve` (``"server": true``), the process is the server's forked child:
    ``process_start_ns`` is the client's start (the user's process, where the run began), and
    the peak RSS is the child's, ``child_max_rss_kib``: it counts the pages the child shares
    with the server (the imported modules), and the client's own RSS is not in it.
    """
    import resource

    from . import _trampoline as _t

    now = time.monotonic_ns()
    first = int(_t.lib.hvt_vcpu_first_run_ns()) or None
    from .serve_client import process_start_ns

    start = _served_client_start_ns if _served else process_start_ns()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "first_kvm_run_ns": first,
        "process_start_ns": start,
        "first_kvm_run_s": round((first - start) / 1e9, 4) if first and start else None,
        "wall_s": round((now - start) / 1e9, 4) if start else None,
        **({"server": True, "child_max_rss_kib": rss} if _served else {"max_rss_kib": rss}),
    }


def _save_trace(vm, path) -> None:
    saved = vm.trace.save(path)
    dropped = vm.trace.dropped()
    print(f"hvjit: trace of {len(vm.trace)} exits saved to {saved}"
          + (f" ({dropped} older ones overwritten: --trace-size)" if dropped else ""), file=sys.stderr)


def _run_with_snapshot(vm, args):
    """Run to the --snapshot-at point (seconds "2.5s", or at least N exits), save, go on."""
    import threading

    from .abi import VmExitCode
    from .run_loop import C_EXITS

    when, path = args.snapshot_at
    t0 = time.monotonic()
    if when.endswith("s"):
        first = vm.run(timeout=min(float(when[:-1]), args.timeout))
        stopped = first.exitcode == VmExitCode.TIMEOUT
    else:
        # Exits are counted by the vCPUs' run loops; a watcher stops the VM once the count is
        # reached (a few exits late: it looks every millisecond).
        exits, done = int(when), threading.Event()

        def watch():
            while not done.wait(0.001):
                if sum(int(v.counters[C_EXITS]) for v in vm.vcpus) >= exits:
                    for v in vm.vcpus:
                        v.kick()
                    return

        watcher = helper_threads.start(watch, "hvjit-snapshot-at")
        try:
            first = vm.run(timeout=args.timeout)
        finally:
            done.set()
            watcher.join()
        stopped = first.exitcode == VmExitCode.BOGUS
    if not stopped:
        return first  # the guest finished before the snapshot point
    vm.snapshot(path)
    print(f"hvjit: snapshot saved to {path}", file=sys.stderr)
    return vm.run(timeout=max(args.timeout - (time.monotonic() - t0), 0.001))
def _serve_gdb(vm, where: str):
    """Wait for GDB before the first instruction; the debugger is the watchdog meanwhile."""
    from .gdbstub import GdbStub, parse_listen_address

    host, port = parse_listen_address(where)
    with GdbStub(vm, host, port) as stub:
        host, port = stub.address
        print(f"hvjit: waiting for gdb on {host}:{port} (target remote {host}:{port})", file=sys.stderr, flush=True)
        return stub.serve()


def _feed_stdin(vm):
    """Forward the user's stdin to the guest's COM1 receiver (interactive use)."""
    import threading

    stop = threading.Event()

    def pump():
        fd = sys.stdin.fileno()
        while not stop.is_set():
            try:
                chunk = os.read(fd, 64)
            except OSError:
                return
            if not chunk:
                return
            vm.send_console_input(chunk.replace(b"\n", b"\r"))

    helper_threads.start(pump, "hvjit-stdin")
    return stop


def cmd_run(args) -> int:
    args.mode_given = args.mode is not None
    args.mode = args.mode or "long"
    if args.memory is None:
        args.memory = 256 << 20 if (args.format == "linux" or args.kernel) else 16 << 20
    if args.input:
        from .fuzz.cli import cmd_replay

        return cmd_replay(args)
    return run_image(args)


# ---- serve -------------------------------------------------------------------------------------

# In a `hvjit serve` child: the run started in the client, at this CLOCK_MONOTONIC time.
_served = False
_served_client_start_ns: Optional[int] = None

# Long mode, CPL3 (native even where ring 0 is emulated): one byte to COM1, then power off.
# mov dx,0x3f8; mov al,'.'; out dx,al; mov eax,0; out 0xf4,eax
WARM_GUEST = bytes.fromhex("66baf803" "b02e" "ee" "b800000000" "e7f4")


def run_for_client(argv: list[str], client_start_ns: Optional[int]) -> int:
    """A `hvjit serve` child runs the client's command here."""
    global _served, _served_client_start_ns
    _served, _served_client_start_ns = True, client_start_ns
    return run_command(argv)


def _warm_up_run() -> None:
    """Run a tiny guest as `hvjit run IMAGE --json` does, output discarded: the modules and
    Numba kernels a run needs are then loaded before the server forks."""
    import contextlib
    import io
    import tempfile

    from .firmware import acpi, mptable  # noqa: F401 - what a multiboot or Linux child writes
    from .loaders import bzimage, elf, flat, linux, multiboot  # noqa: F401 - every format's, for the children

    with tempfile.TemporaryDirectory(prefix="hvjit-serve-") as tmp:
        image = Path(tmp) / "warm.bin"
        image.write_bytes(WARM_GUEST)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = cmd_run(build_parser().parse_args(["run", str(image), "--cpl", "3", "--json"]))
    if status != 0:
        raise HvjitError(f"warm-up run failed (status {status}): {out.getvalue()[-500:]}")


def cmd_serve(args) -> int:
    from .serve import serve
    from .serve_client import default_socket_path

    return serve(args.socket or default_socket_path(), idle_timeout=args.idle_timeout, warm_up=_warm_up_run,
                 command=run_for_client)


# ---- demo -------------------------------------------------------------------------------------

DEMO_SOURCE = r"""
.code64
    # Runs at CPL3 in long mode: natively even where KVM emulates ring 0.
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx           # each byte: one port-IO exit, handled by the Numba UART
    jmp 1b
2:  mov $0, %eax
    outl %eax, $0xf4        # debug-exit port: power off with code 0
msg: .asciz "Hello from a hvjit guest! (long mode, CPL3, printing through a 16550 UART)\n"
"""


def cmd_demo(args) -> int:
    from . import Session, entry
    from .asm import assemble
    from .system import Kvm

    kvm = Kvm.instance()
    print(f"hvjit demo on {kvm.flavour} KVM (API {kvm.api_version})")
    code = assemble(DEMO_SOURCE, 0x1000)
    with Session() as s:
        t0 = time.perf_counter()
        vm = s.create_vm("demo", memory=2 << 20)
        vm.memory.write(0x1000, code)
        vm.console_sink = lambda b: (sys.stdout.write("guest> " + b.decode("latin-1")) if b else None)
        vcpu = vm.vcpu(0)
        entry.setup_long_mode(vcpu, 0x1000, cpl=3)
        t1 = time.perf_counter()
        jit = vcpu.warm_up()
        t2 = time.perf_counter()
        exit_ = vcpu.run(timeout=30)
        t3 = time.perf_counter()
        stats = vcpu.stats()
        print(f"exit:     {exit_}")
        print(f"exits:    {stats['exits']} ({stats['pio']} port IO), {stats['native']} handled in the "
              f"Numba loop, {stats['escalated']} in Python")
        print(f"timing:   VM set-up {1e3 * (t1 - t0):.1f} ms, run loop JIT/cache load {1e3 * jit:.1f} ms, "
              f"guest run {1e3 * (t3 - t2):.2f} ms ({1e6 * (t3 - t2) / max(stats['exits'], 1):.1f} us/exit)")
        ok = exit_.code == 0 and b"Hello" in vm.console
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


# ---- bench ------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    if args.workers:
        from .fuzz.cli import cmd_bench_fleet

        return cmd_bench_fleet(args)
    if args.what == "vmexit":
        from .benchmarks.vmexit import cli_main

        return cli_main(args)
    if args.what == "exits":
        from . import Session
        from .benchmarks import exits as exitbench

        kinds = tuple(k.strip() for k in args.kinds.split(","))
        traced = args.trace_overhead or args.plot is not None
        traces: dict = {}
        with Session() as s:
            result = exitbench.run_all(s, exits=args.exits, rounds=args.rounds or exitbench.DEFAULT_ROUNDS, kinds=kinds, trace=traced,
                                       traces=traces)
        if args.json:
            _print_json(result)
        else:
            _print_exit_bench(result, traced)
        if args.plot is not None:
            from .trace_plot import plot_bench

            for path in plot_bench(traces, args.plot):
                print(f"hvjit: wrote {path}", file=sys.stderr)
        return 0
    if args.what == "decode":
        from .benchmarks.decode import bench_decode

        result = bench_decode(None, args.seconds)
    else:
        from .benchmarks.pagewalk import bench_pagewalk

        result = bench_pagewalk(args.seconds)
    if args.json:
        _print_json(result)
    else:
        for k, v in result.items():
            print(f"{k:26} {v:,.2f}" if isinstance(v, float) else f"{k:26} {v}")
    return 0


def _print_exit_bench(result: dict, traced: bool) -> None:
    h = result["host"]
    print(f"host: {h['flavour']} KVM on {h['cpu']}, TSC {h['tsc_khz']} kHz")
    print(f"{'exit':6} {'C ns':>10} {'Numba ns':>10} {'Python ns':>10} {'Numba/C':>8} {'Python/C':>9}")
    for kind, r in result["exits"].items():
        print(f"{kind:6} {r['c_ns']:10.1f} {r['numba_ns']:10.1f} {r['python_ns']:10.1f} "
              f"{r['numba_over_c']:8.3f} {r['python_over_c']:9.3f}")
    if traced:
        print("tracing: the run-loop kernel alone; ratio to the loop compiled without tracing "
              "(wall time / the vCPU thread's CPU time)")
        print(f"{'exit':6} {'untraced ns':>17} {'off':>15} {'on':>15} {'on, no rip':>15} {'record ns':>10}")
        for kind, r in result["exits"].items():
            cells = [f"{r['untraced_ns']:7.0f} / {r['untraced_cpu_ns']:7.0f}"]
            cells += [f"{r[n + '_over_untraced']:6.3f} / {r[n + '_cpu_over_untraced']:5.3f}"
                      for n in ("trace_off", "trace_on", "trace_on_norip")]
            print(f"{kind:6} " + " ".join(cells) + f" {r['trace_record_ns']:10.1f}")


# ---- trace ------------------------------------------------------------------------------------

def cmd_trace(args) -> int:
    from . import trace, trace_plot

    records, meta = trace.load(args.file)
    if args.action == "show":
        print(trace_plot.summary(records, meta, args.top))
        return 0
    path = Path(args.file)
    outdir = Path(args.output) if args.output else path.parent
    for png in trace_plot.plot_trace(records, meta, outdir, path.name.split(".")[0]):
        print(f"hvjit: wrote {png}", file=sys.stderr)
    return 0


# ---- msr-probe --------------------------------------------------------------------------------

def cmd_msr_probe(args) -> int:
    from .msr import probe_main

    return probe_main(args)


@functools.cache  # built once (~7 ms): a `hvjit serve` child gets the server's
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvjit", description="A hypervisor library for Python: KVM + Numba.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="KVM availability, flavour, capabilities, TSC, CPU")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    run = sub.add_parser("run", help="run a guest: flat binary, ELF, multiboot kernel or Linux")
    run.add_argument("image", nargs="?", help="the guest image (or use --kernel)")
    run.add_argument("--kernel", help="kernel image (same as IMAGE)")
    run.add_argument("--format", choices=["auto", "flat", "elf", "multiboot", "linux"], default="auto")
    run.add_argument("--append", default="", help="kernel command line (multiboot, Linux)")
    run.add_argument("--initrd", help="initial ramdisk (Linux); for a multiboot kernel, modules as QEMU "
                     "takes them: 'FILE [ARGS][,FILE [ARGS]...]' (kvm-unit-tests: the environment file)")
    run.add_argument("--module", action="append", help="multiboot module (repeatable)")
    run.add_argument("--gpa", type=parse_int, default=0x1000, help="load address of a flat binary (default 0x1000)")
    run.add_argument("--entry", type=parse_int, default=None, help="entry point (default: the image's)")
    run.add_argument("--mode", choices=["real", "protected", "long"], default=None,
                     help="entry mode of a flat binary or plain ELF (default long)")
    run.add_argument("--cpl", type=int, choices=[0, 3], default=0)
    run.add_argument("--cpus", type=int, default=1)
    run.add_argument("--memory", type=parse_size, default=None, help="guest RAM (default 16M; 256M for Linux)")
    run.add_argument("--irqchip", action="store_true", help="in-kernel PIC/IOAPIC/LAPIC/PIT (on for multiboot, Linux, SMP)")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds before the watchdog stops the guest")
    run.add_argument("--interactive", action="store_true", help="feed stdin to the guest's COM1")
    run.add_argument("--no-extract", action="store_true",
                     help="boot a bzImage as is, even where ring 0 is emulated (PVM)")
    run.add_argument("--device", action="append", metavar="NAME",
                     help="attach a device by name (repeatable; pc-testdev, pci-testdev and the PC "
                     "platform devices are there already)")
    run.add_argument("--snapshot-at", nargs=2, metavar=("WHEN", "FILE"),
                     help="save the VM to FILE at WHEN: seconds ('2.5s') or a count of exits ('5000')")
    run.add_argument("--restore", metavar="FILE", help="go on from a snapshot FILE instead of loading an image")
    run.add_argument("--gdb", metavar="[HOST:]PORT", default=None,
                     help="wait for GDB (target remote HOST:PORT, loopback only) before the first "
                     "instruction; --timeout applies only after the debugger detaches")
    run.add_argument("--trace", metavar="FILE", help="record every exit into FILE (.npy; .parquet with pyarrow)")
    run.add_argument("--trace-size", type=int, default=1 << 16, metavar="N",
                     help="exits kept per vCPU (a ring: the newest N; default 65536)")
    run.add_argument("--name", default="guest")
    run.add_argument("--input", metavar="FILE", help="run FILE through the fuzzing harness (docs/fuzzing.md); "
                     "--timeout is then per input")
    run.add_argument("-v", "--verbose", action="store_true", help="print what was loaded where")
    run.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                     help="a progress line on stderr: latest boot milestone, exits, emulation counters "
                          "(auto: Linux kernels on a terminal)")
    run.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS")
    run.add_argument("--timer-slack", type=float, default=0.0, metavar="MS",
                     help="defer the guest's TSC-deadline timers to at least MS ahead: fewer ticks "
                          "where KVM emulates ring 0 (see hvjit.timer_slack)")
    run.add_argument("--marker", default=None,
                     help="a console string that counts as the last milestone (e.g. a shell script's output)")
    run.add_argument("--json", action="store_true", help="print the exit record, counters and console as JSON")
    # Taken out of argv by main() before parsing (the client imports nothing heavy); listed for --help.
    run.add_argument("--server", metavar="PATH", help="run in the warm `hvjit serve` listening on PATH "
                     "(default: $HVJIT_SERVER if set; unreachable: an error, or with only $HVJIT_SERVER, "
                     "a note and an in-process run)")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="a warm fork server for `hvjit run --server` (start-up without imports)")
    serve.add_argument("--socket", metavar="PATH", default=None,
                       help="the Unix socket (default $XDG_RUNTIME_DIR/hvjit/serve.sock, else in the cache dir)")
    serve.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                       help="exit after SECONDS without a request (default: serve until SIGTERM/SIGINT)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run a greeting guest and show its exit figures")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks, each against a reference in the same run")
    bench.add_argument("what", choices=["exits", "decode", "pagewalk", "vmexit"])
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--exits", type=int, default=20000, help="exits per sample (bench exits)")
    bench.add_argument("--rounds", type=int, default=None, help="alternating rounds (bench exits: 5, vmexit: 7)")
    bench.add_argument("--iterations", type=int, default=None, help="timed iterations per test (vmexit: 1000)")
    bench.add_argument("--kinds", default="pio,mmio,hlt", help="exit kinds (bench exits)")
    bench.add_argument("--seconds", type=float, default=2.0, help="time per measurement (decode, pagewalk)")
    bench.add_argument("--workers", type=int, default=None, help="run on N Ray workers at once (hvjit[fleet])")
    bench.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    bench.add_argument("--trace-overhead", action="store_true",
                       help="bench exits: also time the loop tracing off/on against one without tracing code")
    bench.add_argument("--plot", metavar="DIR", default=None,
                       help="bench exits: trace the runs and write PNGs (latency, timeline, sites) into DIR")
    bench.set_defaults(func=cmd_bench)

    tr = sub.add_parser("trace", help="look at an exit trace saved by `hvjit run --trace FILE`")
    tr.add_argument("action", choices=["show", "plot"], help="show: a summary table; plot: PNGs")
    tr.add_argument("file")
    tr.add_argument("-o", "--output", default=None, help="plot: directory for the PNGs (default: beside FILE)")
    tr.add_argument("--top", type=int, default=15, help="how many exit sites to list")
    tr.set_defaults(func=cmd_trace)

    from .fuzz.cli import add_parser as add_fuzz_parser

    add_fuzz_parser(sub, parse_size=parse_size, parse_int=parse_int)

    msr = sub.add_parser("msr-probe", help="probe MSRs as a guest (and the host) sees them")
    msr.add_argument("--range", default=None, help="index range A-B (hex), default: KVM's MSR lists")
    msr.add_argument("--json", action="store_true")
    msr.add_argument("--host", action="store_true", help="also probe host MSRs via /dev/cpu/N/msr")
    msr.set_defaults(func=cmd_msr_probe)
    return p


def startup_done() -> None:
    """Start-up is over: move what it allocated (mostly the imported modules' objects) out of
    the cyclic collector's way and turn the collector back on (see :func:`main`)."""
    gc.freeze()
    gc.enable()


def main(argv: Optional[list[str]] = None) -> int:
    """``hvjit <argv>``: a run for a warm server goes there (``hvjit.__main__.main``, the
    command's entry point, decides that before this module is imported), the rest here."""
    from .serve_client import run_if_served

    status, argv = run_if_served(sys.argv[1:] if argv is None else list(argv))
    return run_command(argv) if status is None else status


def run_command(argv: list[str]) -> int:
    """The command in this process."""
    # Imports allocate ~10^6 objects and free few: cyclic collections during start-up are pure
    # cost, and so is the collection of all of them when the interpreter exits. The collector
    # is off until the guest is about to run (`run`) or the command starts its work (others),
    # and everything left at the end is frozen rather than collected (open resources are
    # released by their owners' `with` blocks and atexit hooks, which still run).
    gc.disable()
    args = build_parser().parse_args(argv)
    if args.func is not cmd_run:
        startup_done()
    try:
        return args.func(args)
    except KvmUnavailableError as e:
        print(f"hvjit: KVM unavailable: {e}", file=sys.stderr)
        return 1
    except (HvjitError, OSError) as e:
        print(f"hvjit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        startup_done()


if __name__ == "__main__":
    sys.exit(main())
