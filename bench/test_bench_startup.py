"""Start-up costs: VM creation to first exit, import + first run with a cold and a warm Numba
cache (each in a fresh process, so nothing is shared with the pytest process), and the whole
`hvjit run` of a tiny multiboot guest beside QEMU booting the identical image.

    python -m pytest bench/test_bench_startup.py --benchmark-enable -s

The side-by-side test (:func:`test_hvjit_run_vs_qemu_startup`) spawns, in alternating rounds
(``HVJIT_BENCH_STARTUP_ROUNDS``, default 10), with a warm kernel cache:

- ``hvjit run IMAGE`` (``python -m hvjit``, and the installed ``hvjit`` script beside
  ``sys.executable`` where there is one: an editable install's import finder costs extra),
- ``hvjit run IMAGE --json``, whose ``startup`` record gives the first KVM_RUN (CLOCK_MONOTONIC
  read in C just before the ioctl) and the peak RSS the process saw itself,
- ``hvjit run --server SOCKET IMAGE`` (and with ``--json``) through one warm ``hvjit serve``
  started before the rounds, untimed (``hvjit_server``: the client's peak RSS by GNU time,
  the forked child's as it reports it, ``child_max_rss_kib``, and the server's own RSS),
- ``hvjit-client run --server SOCKET IMAGE`` (and with ``--json``): the same request from the
  C client (client/hvjit_client.c), where it is installed beside ``sys.executable``,
- QEMU on the same ELF: ``qemu-system-x86_64 -machine microvm -accel kvm -cpu
  max,-arch-capabilities -smp 1 -m 16M -nodefaults -no-user-config -display none -serial stdio
  -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel tiny.elf`` (microvm boots a
  multiboot ELF without firmware, as `hvjit bench vmexit` runs it),

and records medians of: spawn -> the first byte of the guest's serial output on the pipe (the
milestone both VMMs reach the same way: the guest's first ``out`` to COM1, handled, written to
stdout), spawn -> exit (whole process), peak RSS (GNU time's ``%M``), hvjit's spawn ->
first KVM_RUN, QEMU's (``qemu_stamped``: the same QEMU run with bench/first_kvm_run_shim.c
preloaded, which reads the clock at the first KVM_RUN ioctl as hvjit's C side does; built with
the host's C compiler) and, where ``strace`` is installed, QEMU's (and hvjit's) spawn -> first
KVM_RUN ioctl as ``strace -f -ttt -e trace=ioctl`` sees it (strace slows both: a separate figure).
Ratios hvjit/QEMU are reported, never asserted. The floor figures (``python -c pass``,
``import numpy``, ``import numba``) are measured in the same rounds.
"""

import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hvjit import entry
from hvjit.asm import assemble
from hvjit.benchmarks import vmexit
from tests.kvm.serving import start_server, stop_server

FIRST_EXIT_GUEST = ".code64\n outb %al, $0x99\n"

SCRIPT = """
import time
t0 = time.perf_counter()
import hvjit
from hvjit import entry
s = hvjit.Session()
vm = s.create_vm("cold", memory=2 << 20)
vm.memory.write(0x1000, bytes.fromhex("b8000000 00e7f4".replace(" ", "")))  # mov eax,0; out 0xf4,eax
entry.setup_long_mode(vm.vcpu(0), 0x1000, cpl=3)
t1 = time.perf_counter()
ex = vm.run(timeout=60)
t2 = time.perf_counter()
assert ex.code == 0, ex
print(t1 - t0, t2 - t1)
"""


def test_vm_creation_to_first_exit(benchmark, kvm_session):
    code = assemble(FIRST_EXIT_GUEST, 0x1000)
    reference = []

    def create_and_run():
        t0 = time.perf_counter()
        vm = kvm_session.create_vm("first-exit", memory=2 << 20)
        vm.memory.write(0x1000, code)
        entry.setup_long_mode(vm.vcpu(0), 0x1000, cpl=3)
        ex = vm.run(timeout=10)
        vm.destroy()
        reference.append(time.perf_counter() - t0)
        assert ex.port == 0x99

    benchmark.pedantic(create_and_run, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["median_ms"] = round(1e3 * sorted(reference)[len(reference) // 2], 3)


def _fresh_process(cache_dir):
    env = dict(os.environ, HVJIT_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, check=True).stdout.split()
    return time.perf_counter() - t0, float(out[0]), float(out[1])


def test_import_and_first_run_cold_vs_warm(benchmark, kvm_session):
    with tempfile.TemporaryDirectory() as cache:
        cold_total, cold_setup, cold_run = _fresh_process(cache)
        warm = [_fresh_process(cache) for _ in range(3)]
    warm_total = sorted(w[0] for w in warm)[1]
    warm_run = sorted(w[2] for w in warm)[1]
    benchmark.extra_info.update({
        "cold_process_s": round(cold_total, 3), "cold_first_run_s": round(cold_run, 3),
        "warm_process_s": round(warm_total, 3), "warm_first_run_s": round(warm_run, 3),
        "cold_over_warm": round(cold_total / warm_total, 2),
    })
    print(f"\ncold cache: process {cold_total:.2f} s (first run {cold_run:.2f} s); "
          f"warm cache: process {warm_total:.2f} s (first run {warm_run:.2f} s)")
    benchmark.pedantic(lambda: None, rounds=1)


# ---- hvjit run vs QEMU: process start to first KVM_RUN / first serial byte / exit ---------

ROUNDS = int(os.environ.get("HVJIT_BENCH_STARTUP_ROUNDS", "10"))

# Multiboot v1 (ELF32 at 1 MiB): "hi\n" on COM1, then code 0 to the debug-exit port.
TINY_GUEST = """
        .set MB_MAGIC, 0x1BADB002
        .section .text
        .code32
        .align 4
        .long MB_MAGIC, 0, -MB_MAGIC
        .globl _start
_start: mov $msg, %esi
        mov $0x3f8, %dx
1:      lodsb
        test %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      xor %eax, %eax
        outl %eax, $0xf4
3:      hlt
        jmp 3b
msg:    .asciz "hi\\n"
"""


def build_tiny_guest(directory: Path) -> Path:
    source, obj, elf = directory / "tiny.S", directory / "tiny.o", directory / "tiny.elf"
    source.write_text(TINY_GUEST)
    subprocess.run(["as", "--32", "-o", str(obj), str(source)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-z", "max-page-size=0x1000", "-o", str(elf),
                    str(obj)], check=True, capture_output=True)
    return elf


def qemu_tiny_command(qemu: str, image: Path) -> list[str]:
    return [qemu, "-machine", vmexit.QEMU_MACHINE, "-accel", "kvm", "-cpu", vmexit.QEMU_CPU, "-smp", "1",
            "-m", "16M", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(image)]


GNU_TIME = "/usr/bin/time"


SHIM_SOURCE = Path(__file__).with_name("first_kvm_run_shim.c")


def build_shim(directory: Path) -> Path | None:
    """bench/first_kvm_run_shim.c as a preload library (None without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = directory / "first_kvm_run_shim.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(SHIM_SOURCE), "-ldl"], check=True,
                   capture_output=True, timeout=120)
    return out


def spawn_stamped(cmd: list[str], shim: Path, stamp: Path) -> dict:
    """:func:`spawn_timed` with the shim preloaded: adds ``first_kvm_run_s`` from the spawn."""
    stamp.unlink(missing_ok=True)
    r = spawn_timed(cmd, env={"LD_PRELOAD": str(shim), "FIRST_KVM_RUN_FILE": str(stamp)})
    r["first_kvm_run_s"] = (int(stamp.read_text()) - r["spawn_ns"]) / 1e9 if stamp.exists() else None
    return r


def spawn_timed(cmd: list[str], timeout: float = 120.0, env: dict | None = None) -> dict:
    """Spawn ``cmd``; seconds from just before the spawn to the first byte on its stdout and
    to its exit, its peak RSS, status and output.

    The peak RSS comes from GNU time (``%M``), which forks the command from its own small
    process: a child exec'd straight from pytest would report pytest's peak too (Linux keeps
    the larger ``maxrss`` across exec). Without GNU time it is left out (None)."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **(env or {})}
    rss_file = None
    if os.access(GNU_TIME, os.X_OK):
        fd, rss_file = tempfile.mkstemp(prefix="hvjit-rss-")
        os.close(fd)
        cmd = [GNU_TIME, "-f", "%M", "-o", rss_file, *cmd]
    t0 = time.monotonic_ns()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env)
    out = bytearray()
    first = None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            proc.kill()
            raise TimeoutError(f"{cmd[0]}: no exit within {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if first is None:
            first = time.monotonic_ns()
        out += chunk
    proc.wait()
    t_exit = time.monotonic_ns()
    proc.stdout.close()
    max_rss = None
    if rss_file is not None:
        with open(rss_file) as f:
            words = f.read().split()
        os.unlink(rss_file)
        max_rss = int(words[-1]) if words and words[-1].isdigit() else None
    return {"spawn_ns": t0, "first_output_s": (first - t0) / 1e9 if first else None,
            "wall_s": (t_exit - t0) / 1e9, "max_rss_kib": max_rss, "status": proc.returncode,
            "output": bytes(out)}


def strace_first_kvm_run(cmd: list[str], trace_file: Path) -> float | None:
    """Seconds from spawn to the first KVM_RUN ioctl as strace timestamps it (strace's own
    start-up and per-ioctl stops are included: compare only with the same figure)."""
    t0 = time.time()
    subprocess.run(["strace", "-f", "-ttt", "-e", "trace=ioctl", "-e", "signal=none", "-o", str(trace_file), *cmd],
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    for line in trace_file.read_text().splitlines():
        if "KVM_RUN" in line:
            words = line.split()
            stamp = words[1] if words[0].isdigit() else words[0]
            return float(stamp) - t0
    return None


def _rss_kib(pid: int) -> dict:
    """A live process's resident set now and at its peak (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "max_rss_kib": int(fields["VmHWM"].split()[0])}


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="GNU as/ld (binutils) not installed")
def test_hvjit_run_vs_qemu_startup(benchmark, kvm_session, tmp_path):
    image = build_tiny_guest(tmp_path)
    hvjit_cmd = [sys.executable, "-m", "hvjit", "run", str(image)]
    script = Path(sys.executable).with_name("hvjit")
    server_socket = tmp_path / "serve.sock"
    server_cmd = [sys.executable, "-m", "hvjit", "run", "--server", str(server_socket), str(image)]
    client = Path(sys.executable).with_name("hvjit-client")  # client/hvjit_client.c
    client_cmd = [str(client), "run", "--server", str(server_socket), str(image)]
    runners = {"hvjit": hvjit_cmd, "hvjit_server": server_cmd}
    if client.exists():
        runners["hvjit_client"] = client_cmd
    if script.exists() and os.environ.get("PYTHONPATH") is None:  # the installed entry point runs this code
        runners["hvjit_script"] = [str(script), "run", str(image)]
    qemu = vmexit.find_qemu()
    if qemu:
        runners["qemu"] = qemu_tiny_command(qemu, image)
    floors = {"python_pass": [sys.executable, "-c", "pass"], "import_numpy": [sys.executable, "-c", "import numpy"],
              "import_numba": [sys.executable, "-c", "import numba"]}
    # Warm the kernel cache (and the parsed C declarations) once, untimed; then one server.
    warm = spawn_timed(hvjit_cmd + ["--json"])
    assert warm["status"] == 0, warm
    server = start_server(server_socket, "--idle-timeout", "3600")
    json_runners = {"hvjit_json": hvjit_cmd + ["--json"], "hvjit_server_json": server_cmd + ["--json"]}
    if client.exists():
        json_runners["hvjit_client_json"] = client_cmd + ["--json"]
    shim = build_shim(tmp_path) if qemu else None
    stamped = {"qemu_stamped": runners["qemu"]} if shim else {}  # QEMU with its first KVM_RUN stamped
    samples: dict[str, list[dict]] = {k: [] for k in [*runners, *json_runners, *stamped, *floors]}
    try:
        for _ in range(ROUNDS):
            for name, cmd in [*runners.items(), *json_runners.items(), *stamped.items(), *floors.items()]:
                r = spawn_stamped(cmd, shim, tmp_path / "stamp") if name in stamped else spawn_timed(cmd)
                if name in json_runners:
                    startup = json.loads(r["output"])["startup"]
                    r["first_kvm_run_s"] = (startup["first_kvm_run_ns"] - r["spawn_ns"]) / 1e9
                    if name in ("hvjit_server_json", "hvjit_client_json"):
                        assert startup["server"] is True, startup
                        r["child_max_rss_kib"] = startup["child_max_rss_kib"]
                    else:
                        r["self_max_rss_kib"] = startup["max_rss_kib"]
                elif name in runners or name in stamped:
                    assert r["output"].replace(b"\r", b"") == b"hi\n", (name, r)
                    assert r["status"] == (vmexit.QEMU_SUCCESS_STATUS if name.startswith("qemu") else 0), (name, r)
                if name.startswith(("hvjit_server", "hvjit_client")):
                    r["client_max_rss_kib"] = r.pop("max_rss_kib")  # GNU time sees only the client
                samples[name].append(r)
        server_rss = _rss_kib(server.pid)
    finally:
        stop_server(server)
    info: dict = {"rounds": ROUNDS, "qemu": qemu and vmexit.qemu_version(qemu),
                  "qemu_command": runners.get("qemu"), "milestone": "first byte of guest COM1 output on stdout"}
    for name, rs in samples.items():
        info[name] = {key: _median(r.get(key) for r in rs)
                      for key in ("first_output_s", "first_kvm_run_s", "wall_s", "max_rss_kib", "self_max_rss_kib",
                                  "client_max_rss_kib", "child_max_rss_kib")
                      if any(r.get(key) is not None for r in rs)}
    info["hvjit_server"]["server_kib"] = server_rss  # the warm server itself, after the rounds
    if shutil.which("strace"):
        for name in [n for n in ("hvjit", "qemu") if n in runners]:
            stamps = [strace_first_kvm_run(runners[name], tmp_path / f"{name}.strace") for _ in range(max(ROUNDS // 3, 1))]
            info[name]["first_kvm_run_strace_s"] = _median(stamps)
    hv, sv = info["hvjit"], info["hvjit_server"]
    info["ratios_hvjit_server_over_hvjit"] = {
        "first_output": _ratio(sv["first_output_s"], hv["first_output_s"]),
        "wall": _ratio(sv["wall_s"], hv["wall_s"]),
        "first_kvm_run": _ratio(info["hvjit_server_json"]["first_kvm_run_s"], info["hvjit_json"]["first_kvm_run_s"]),
    }
    if "qemu" in info:
        q = info["qemu"]
        info["ratios_hvjit_over_qemu"] = {
            "first_output": _ratio(hv["first_output_s"], q["first_output_s"]),
            "wall": _ratio(hv["wall_s"], q["wall_s"]),
            "max_rss": _ratio(hv["max_rss_kib"], q["max_rss_kib"]),
            "first_kvm_run_strace": _ratio(hv.get("first_kvm_run_strace_s"), q.get("first_kvm_run_strace_s")),
        }
        for name in ("hvjit_server", "hvjit_client"):  # a client of the warm server
            if name in info:
                c = info[name]
                info[f"ratios_{name}_over_qemu"] = {
                    "first_output": _ratio(c["first_output_s"], q["first_output_s"]),
                    "wall": _ratio(c["wall_s"], q["wall_s"]),
                    "client_max_rss": _ratio(c["client_max_rss_kib"], q["max_rss_kib"]),
                }
        qemu_kvm_run = info.get("qemu_stamped", {}).get("first_kvm_run_s")  # the shim's stamp
        info["ratios_first_kvm_run_over_qemu"] = {
            name: _ratio(info[f"{name}_json"]["first_kvm_run_s"], qemu_kvm_run)
            for name in ("hvjit", "hvjit_server", "hvjit_client") if f"{name}_json" in info}
    benchmark.extra_info.update(info)
    print("\n" + json.dumps({k: v for k, v in info.items() if k != "qemu_command"}, indent=1))
    benchmark.pedantic(lambda: None, rounds=1)
