"""The cost of the call path itself: the trampoline's NOP (VirtualBox's fast-ioctl NOP) from
Numba, next to the same call from Python through cffi (see bench/test_bench_callpath.py)."""

from __future__ import annotations

from hvjit._jit import kernel

from .. import _trampoline

hvt_sys_nop = _trampoline.external("hvt_sys_nop")
hvt_sys_nop_ioctl = _trampoline.external("hvt_sys_nop_ioctl")


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
