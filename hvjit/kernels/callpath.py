"""The cost of the call path itself: the trampoline's NOP (VirtualBox's fast-ioctl NOP) from
Numba, next to the same call from Python through cffi (see bench/test_bench_callpath.py)."""

from __future__ import annotations

from numba import types

from .. import _trampoline  # noqa: F401  (loads libhvt.so globally before any kernel runs)
from ._jit import kernel

hvt_sys_nop = types.ExternalFunction("hvt_sys_nop", types.int32())
hvt_sys_nop_ioctl = types.ExternalFunction("hvt_sys_nop_ioctl", types.int32(types.int32))


@kernel
def nop_calls(n):
    """Call the NOP ``n`` times; returns the sum of results (0) so nothing is optimised away."""
    total = 0
    for _ in range(n):
        total += hvt_sys_nop()
    return total


@kernel
def nop_ioctls(kvm_fd, n):
    """``n`` trivial ioctls (KVM_CHECK_EXTENSION) on /dev/kvm: a syscall round trip each."""
    total = 0
    for _ in range(n):
        total += hvt_sys_nop_ioctl(kvm_fd)
    return total
