"""Booting Debian's stock kernel: hvjit beside QEMU, same kernel, same command line, same run.

Both boot the kernel's vmlinux through its PVH entry (QEMU's microvm machine does the same),
so the comparison is VMM against VMM. Reported: seconds from start to the kernel's banner and
to the end of the run (a stop, or the time bound), and hvjit's figures over QEMU's.

    python -m pytest bench/test_bench_linux_boot.py --benchmark-enable -s

HVJIT_BOOT_BENCH_TIMEOUT bounds each boot (default 300 s).
"""

import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from hvjit import loaders
from hvjit.loaders.bzimage import extract_vmlinux
from tests.e2e.debian import debian_kernel

CMDLINE = "console=ttyS0 earlyprintk=serial"
BANNER = "Linux version"
TIMEOUT = float(os.environ.get("HVJIT_BOOT_BENCH_TIMEOUT", "300"))


@pytest.fixture(scope="module")
def vmlinux():
    data = extract_vmlinux(debian_kernel().read_bytes())
    with tempfile.NamedTemporaryFile(prefix="vmlinux-", delete=False) as f:
        f.write(data)
    yield f.name, data
    os.unlink(f.name)


def boot_hvjit(session, data):
    t0 = time.monotonic()
    banner = []
    vm = session.create_vm("boot-bench", memory=256 << 20, irqchip=True)
    seen = bytearray()

    def sink(chunk):
        seen.extend(chunk)
        if not banner and BANNER.encode() in seen:
            banner.append(time.monotonic() - t0)

    vm.console_sink = sink
    loaders.load(vm, data, cmdline=CMDLINE)
    result = vm.run(timeout=TIMEOUT)
    end = time.monotonic() - t0
    vm.destroy()
    return (banner[0] if banner else None), end, result.reason


def boot_qemu(path):
    cmd = ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm", "-m", "256M", "-kernel", path,
           "-append", CMDLINE, "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"]
    t0 = time.monotonic()
    banner = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    tail = []
    for line in proc.stdout:
        text = line.decode("latin-1")
        tail = (tail + [text])[-5:]
        if not banner and BANNER in text:
            banner.append(time.monotonic() - t0)
    proc.wait()
    timer.cancel()
    end = time.monotonic() - t0
    how = "timeout" if end >= TIMEOUT else ("internal error" if any("internal error" in t for t in tail) else f"exit {proc.returncode}")
    return (banner[0] if banner else None), end, how


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="the reference VMM (Debian's qemu-system-x86) is not installed")
def test_boot_to_banner_hvjit_vs_qemu(benchmark, kvm_session, vmlinux):
    path, data = vmlinux
    q_banner, q_end, q_how = boot_qemu(path)
    h_banner, h_end, h_how = boot_hvjit(kvm_session, data)
    info = {"hvjit_banner_s": h_banner, "hvjit_end_s": round(h_end, 2), "hvjit_end": h_how,
            "qemu_banner_s": q_banner, "qemu_end_s": round(q_end, 2), "qemu_end": q_how}
    if h_banner and q_banner:
        info["banner_hvjit_over_qemu"] = round(h_banner / q_banner, 3)
    benchmark.extra_info.update(info)
    print(f"\nhvjit: banner {h_banner:.1f} s, end {h_end:.1f} s ({h_how}); "
          f"QEMU: banner {q_banner:.1f} s, end {q_end:.1f} s ({q_how})")
    benchmark.pedantic(lambda: None, rounds=1)
