"""Booting Debian's stock kernel: hvjit beside QEMU, same kernel, same command line, same run.

Both boot the kernel's vmlinux through its PVH entry (QEMU's microvm machine does the same),
so the comparison is VMM against VMM. Reported for each: seconds from the start of the boot
to each milestone of ``hvjit.boot_progress`` up to the kernel's int3 self-test (on a host
whose KVM emulates ring 0, QEMU dies there), and hvjit's over QEMU's. For hvjit also where
the time went: KVM's own counters (exits, instructions its emulator ran), the exits handled
natively and in Python, and the string instructions hvjit finished for KVM's emulator — the
difference before the banner (Linux's ``clear_bss`` is an 18 MB ``rep stosb``).

    python -m pytest bench/test_bench_linux_boot.py --benchmark-enable -s

HVJIT_BOOT_BENCH_TIMEOUT bounds each boot (default 600 s); HVJIT_BOOT_BENCH_ROUNDS
alternates the two VMMs (default 1).
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from hvjit import loaders
from hvjit.boot_progress import BootWatch
from hvjit.loaders.bzimage import extract_vmlinux
from hvjit.loaders.linux import EMULATED_RING0_ARGS
from hvjit.run_loop import C_ESCALATED, C_EXITS, C_NATIVE
from tests.e2e.debian import debian_kernel

CMDLINE = "console=ttyS0 earlyprintk=serial " + EMULATED_RING0_ARGS
LAST = "int3 self-test"
MILESTONES = ("banner", "e820", LAST)
TIMEOUT = float(os.environ.get("HVJIT_BOOT_BENCH_TIMEOUT", "600"))
ROUNDS = int(os.environ.get("HVJIT_BOOT_BENCH_ROUNDS", "1"))


@pytest.fixture(scope="module")
def vmlinux():
    data = extract_vmlinux(debian_kernel().read_bytes())
    with tempfile.NamedTemporaryFile(prefix="vmlinux-", delete=False) as f:
        f.write(data)
    yield f.name, data
    os.unlink(f.name)


def boot_hvjit(session, data) -> dict:
    """Create, load and run to the last milestone (then stop); times from before creation."""
    watch = BootWatch()
    vm = session.create_vm("boot-bench", memory=256 << 20, irqchip=True)

    def sink(chunk):
        watch.feed(chunk)
        if LAST in watch.reached:
            vm.vcpu(0).stop()

    vm.console_sink = sink
    loaders.load(vm, data, cmdline=CMDLINE)
    t_load = time.monotonic() - watch.t0
    result = vm.run(timeout=TIMEOUT)
    v = vm.vcpu(0)
    kvm = v.kvm_stats()
    where = {"load_s": round(t_load, 3), "exits": int(v.counters[C_EXITS]),
             "native": int(v.counters[C_NATIVE]), "to_python": int(v.counters[C_ESCALATED]),
             "kvm_insn_emulation": kvm.get("insn_emulation"), "kvm_exits": kvm.get("exits"),
             "hvjit_emulated": sum(v.emulation_counts.values())}
    if vm.rep_string_stats is not None:
        where["rep_string_mib"] = round(vm.rep_string_stats.bytes / 2**20, 1)
        where["rep_string_instructions"] = vm.rep_string_stats.finished
    vm.destroy()
    end = "stopped" if LAST in watch.reached and result.reason == "bogus" else result.reason  # bogus: our stop
    return {"milestones": dict(watch.reached), "end": end, "where": where}


def boot_qemu(path) -> dict:
    cmd = ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm", "-m", "256M", "-kernel", path,
           "-append", CMDLINE, "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"]
    watch = BootWatch()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    tail = b""
    failed = False
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        watch.feed(chunk)
        tail = (tail + chunk)[-4000:]
        # QEMU pauses the VM on a KVM internal error and waits for its monitor: stop it there.
        failed = failed or b"internal error" in tail.lower()
        if LAST in watch.reached or failed:
            proc.kill()
    proc.wait()
    timer.cancel()
    end = time.monotonic() - watch.t0
    text = tail.decode("latin-1")
    how = ("stopped" if LAST in watch.reached else "KVM internal error" if failed else "timeout" if end >= TIMEOUT
           else f"exit {proc.returncode}")
    lines = [line for line in text.splitlines() if line.strip()]
    last_lines = [line for line in lines if "error" in line.lower() or "failure" in line.lower()][-3:] or lines[-3:]
    return {"milestones": dict(watch.reached), "end": how, "last_lines": last_lines}


def _num(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="the reference VMM (Debian's qemu-system-x86) is not installed")
def test_boot_milestones_hvjit_vs_qemu(benchmark, kvm_session, vmlinux):
    path, data = vmlinux
    runs = {"qemu": [], "hvjit": []}
    for _ in range(ROUNDS):  # alternating, QEMU first
        runs["qemu"].append(boot_qemu(path))
        runs["hvjit"].append(boot_hvjit(kvm_session, data))
    info: dict = {"cmdline": CMDLINE, "rounds": ROUNDS}
    lines = [f"{'milestone':<16}{'hvjit s':>10}{'QEMU s':>10}{'hvjit/QEMU':>12}"]
    for m in MILESTONES:
        h = [r["milestones"][m] for r in runs["hvjit"] if m in r["milestones"]]
        q = [r["milestones"][m] for r in runs["qemu"] if m in r["milestones"]]
        hb, qb = (min(h) if h else None), (min(q) if q else None)
        info[f"hvjit_{m}_s"], info[f"qemu_{m}_s"] = hb, qb
        ratio = round(hb / qb, 3) if hb and qb else None
        info[f"{m}_hvjit_over_qemu"] = ratio
        lines.append(f"{m:<16}{_num(hb):>10}{_num(qb):>10}{_num(ratio, 3):>12}")
    info["hvjit_end"] = [r["end"] for r in runs["hvjit"]]
    info["qemu_end"] = [r["end"] for r in runs["qemu"]]
    info["qemu_last_lines"] = runs["qemu"][-1]["last_lines"]
    info["hvjit_where"] = runs["hvjit"][-1]["where"]
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(lines))
    print(f"ends: hvjit {info['hvjit_end']}, QEMU {info['qemu_end']}")
    print("QEMU's last lines: " + " | ".join(info["qemu_last_lines"]))
    print(f"hvjit, where the time went: {info['hvjit_where']}")
    benchmark.pedantic(lambda: None, rounds=1)
