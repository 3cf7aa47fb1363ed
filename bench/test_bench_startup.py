"""Start-up costs: VM creation to first exit, and import + first run with a cold and a warm
Numba cache (each in a fresh process, so nothing is shared with the pytest process)."""

import os
import subprocess
import sys
import tempfile
import time

from hvjit import entry
from hvjit.asm import assemble

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
