"""Numba-compiled kernels: x86 decode, emulation, guest page walks and the VM-exit run loop.

All but the run loop are pure: they take numpy arrays and never touch KVM, so they work on
any machine and on memory dumps.
"""
