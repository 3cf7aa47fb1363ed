"""The call into the trampoline: from Numba (~ns) versus from Python through cffi, and a
trivial ioctl on /dev/kvm from both. Ratios go to ``extra_info``."""

import time

from hvjit import _trampoline as _t
from hvjit.benchmarks.callpath import nop_calls, nop_ioctls

N = 1_000_000


def _ns_per_call(fn, n):
    t0 = time.perf_counter_ns()
    fn(n)
    return (time.perf_counter_ns() - t0) / n


def _python_nops(n):
    nop = _t.lib.hvt_sys_nop
    for _ in range(n):
        nop()


def test_nop_call_numba_vs_cffi(benchmark):
    nop_calls(10)  # compile or load
    numba_ns = min(_ns_per_call(nop_calls, N) for _ in range(5))
    cffi_ns = min(_ns_per_call(_python_nops, N // 10) for _ in range(5))
    benchmark.extra_info.update(numba_ns=round(numba_ns, 2), cffi_ns=round(cffi_ns, 1),
                                cffi_over_numba=round(cffi_ns / numba_ns, 1))
    print(f"\nNOP call: Numba {numba_ns:.2f} ns, cffi {cffi_ns:.1f} ns ({cffi_ns / numba_ns:.0f}x)")
    benchmark(nop_calls, N)


def test_trivial_ioctl_numba_vs_cffi(benchmark, kvm_session):
    from hvjit.system import Kvm

    fd = Kvm.instance().fd
    nop_ioctls(fd, 10)
    numba_ns = min(_ns_per_call(lambda n: nop_ioctls(fd, n), 100_000) for _ in range(5))

    def python_ioctls(n):
        call = _t.lib.hvt_sys_nop_ioctl
        for _ in range(n):
            call(fd)

    cffi_ns = min(_ns_per_call(python_ioctls, 100_000) for _ in range(5))
    benchmark.extra_info.update(numba_ns=round(numba_ns, 1), cffi_ns=round(cffi_ns, 1),
                                cffi_over_numba=round(cffi_ns / numba_ns, 2))
    print(f"\nioctl: Numba {numba_ns:.0f} ns, cffi {cffi_ns:.0f} ns ({cffi_ns / numba_ns:.2f}x)")
    benchmark(nop_ioctls, fd, 100_000)
