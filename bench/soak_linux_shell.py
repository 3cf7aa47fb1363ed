"""Soak: Debian's stock kernel to a busybox shell, hvjit beside QEMU, same kernel, same
command line, same initramfs, in one run.

    python bench/soak_linux_shell.py [--timeout 3600] [--no-qemu] [--json soak.json]

The initramfs's /init (tests/e2e/debian.py) prints a marker the shell computes and powers
off. Reported for each VMM: seconds from process start to each milestone (banner, e820, the
int3 self-test passed, initcalls done, /init, the shell marker) and how the run ended.
hvjit runs as a user would run it — ``hvjit run --kernel ... --initrd ...`` as a process,
with its progress line on stderr. QEMU boots the same vmlinux through its PVH entry
(microvm), as hvjit does on a host whose KVM emulates ring 0. On such a host (PVM) QEMU dies
at the kernel's int3 self-test: its later milestones stay empty.

Long: tens of minutes on a PVM host (ring 0 runs in KVM's emulator). Bounded by --timeout
per VMM; a timeout is reported as such, never as reaching the shell.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hvjit.boot_progress import LINUX_MILESTONES, BootWatch  # noqa: E402
from hvjit.loaders.bzimage import extract_vmlinux  # noqa: E402
from hvjit.loaders.linux import EMULATED_RING0_ARGS  # noqa: E402
from tests.e2e.debian import SHELL_MARKER, debian_kernel, shell_initramfs  # noqa: E402

# Boot-time work that is cheap on hardware and costs minutes in KVM's ring-0 emulator
# (docs/linux-on-pvm.md says why each is there); the same line goes to both VMMs.
CMDLINE = "console=ttyS0 earlyprintk=serial " + EMULATED_RING0_ARGS
MILESTONES = [name for name, _ in LINUX_MILESTONES] + ["marker"]


def boot_hvjit(kernel: Path, initrd: Path, cmdline: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "hvjit", "run", "--kernel", str(kernel), "--initrd", str(initrd),
           "--append", cmdline, "--memory", "256M", "--timeout", str(timeout), "--json",
           "--marker", SHELL_MARKER, "--progress", "on", "--progress-every", "30"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, timeout=timeout + 300)
    wall = time.monotonic() - t0
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return {"end": f"no JSON (status {proc.returncode})", "wall_s": round(wall, 1), "milestones": {}}
    return {"end": doc.get("reason"), "status": proc.returncode, "wall_s": round(wall, 1),
            "milestones": doc.get("milestones", {}), "console_tail": doc.get("console", "")[-1500:]}


def boot_qemu(vmlinux: Path, initrd: Path, cmdline: str, timeout: float) -> dict:
    cmd = ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm", "-m", "256M", "-kernel", str(vmlinux),
           "-initrd", str(initrd), "-append", cmdline, "-nographic", "-no-reboot", "-nodefaults",
           "-serial", "stdio"]
    watch = BootWatch(marker=SHELL_MARKER.encode())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    tail = b""
    failed = False
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
        watch.feed(chunk)
        tail = (tail + chunk)[-1500:]
        if not failed and b"internal error" in tail.lower():  # QEMU pauses the VM, waits for its monitor
            failed = True
            proc.kill()
    proc.wait()
    timer.cancel()
    wall = time.monotonic() - watch.t0
    text = tail.decode("latin-1")
    end = "KVM internal error" if failed else "timeout" if wall >= timeout else f"exit {proc.returncode}"
    return {"end": end, "status": proc.returncode, "wall_s": round(wall, 1),
            "milestones": {k: round(v, 2) for k, v in watch.reached.items()}, "console_tail": text}


def table(results: dict) -> str:
    names = list(results)
    rows = [f"{'milestone':<16}" + "".join(f"{n:>12}" for n in names)]
    for m in MILESTONES:
        cells = [results[n]["milestones"].get(m) for n in names]
        rows.append(f"{m:<16}" + "".join(f"{c:>11.1f}s" if c is not None else f"{'-':>12}" for c in cells))
    rows.append(f"{'end':<16}" + "".join(f"{str(results[n]['end'])[:11]:>12}" for n in names))
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per VMM (default 3600)")
    ap.add_argument("--no-qemu", action="store_true", help="hvjit only")
    ap.add_argument("--append", default=CMDLINE, help="kernel command line for both VMMs")
    ap.add_argument("--json", metavar="FILE", help="write the results here too")
    args = ap.parse_args(argv)
    kernel = debian_kernel()
    with tempfile.TemporaryDirectory(prefix="hvjit-soak-") as tmp:
        vmlinux, initrd = Path(tmp, "vmlinux"), Path(tmp, "initrd.cpio")
        vmlinux.write_bytes(extract_vmlinux(kernel.read_bytes()))
        initrd.write_bytes(shell_initramfs())
        results = {}
        if not args.no_qemu and shutil.which("qemu-system-x86_64"):
            print("QEMU (microvm, PVH entry) ...", file=sys.stderr, flush=True)
            results["QEMU"] = boot_qemu(vmlinux, initrd, args.append, args.timeout)
        print("hvjit ...", file=sys.stderr, flush=True)
        results["hvjit"] = boot_hvjit(kernel, initrd, args.append, args.timeout)
    print(f"kernel {kernel.name}, command line: {args.append}")
    print(table(results))
    reached = "marker" in results["hvjit"]["milestones"]
    if not reached:
        print(f"\nhvjit did not reach the shell marker; console tail:\n{results['hvjit'].get('console_tail', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cmdline": args.append, "kernel": kernel.name,
                                               "results": results}, indent=2))
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
