"""Reading the global info page (GIP) from kernels: TSC ticks to nanoseconds.

The GIP (see :mod:`hvjit.gip`) is a one-record array of ``GIP_DTYPE``. Its writer follows a
seqlock: ``transaction_id`` is odd while an update is in progress, so a reader copies the
fields it needs and retries unless ``transaction_id`` was the same even value before and
after. Compiler barriers keep LLVM from merging or moving those loads (x86 keeps loads in
order in hardware).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from hvjit._jit import kernel

# "HGIP" little-endian; a page with any other magic (0 once unmapped) is not valid.
GIP_MAGIC = 0x50494748
GIP_MAX_CPUS = 256


def compiler_barrier() -> None:
    """Stop the compiler from moving memory accesses across this point (no-op in Python)."""


@intrinsic
def _asm_memory_clobber(typingctx):
    def codegen(context, builder, signature, args):
        builder.asm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", [], side_effect=True)
        return context.get_dummy_value()

    return types.void(), codegen


@overload(compiler_barrier)
def _compiler_barrier_jitted():
    def impl():
        _asm_memory_clobber()

    return impl


@kernel
def ticks_to_ns(ticks, tsc_khz):
    """``ticks * 1e6 / tsc_khz`` in exact int64 arithmetic, floored, for any sign of ticks."""
    whole_ms = ticks // tsc_khz
    rest = ticks - whole_ms * tsc_khz
    return whole_ms * 1_000_000 + (rest * 1_000_000) // tsc_khz


@kernel
def gip_nanotime(gip, tsc):
    """Nanoseconds (CLOCK_MONOTONIC_RAW's timeline) at TSC value ``tsc``; -1 if invalid.

    ``gip`` is the one-record GIP array (a session's mapped view or the master page);
    ``tsc`` a TSC value read on the reference CPU, or corrected with :func:`gip_tsc_delta`
    when the GIP's mode is asynchronous. Returns -1 for an unmapped or uninitialised page.
    """
    if gip.shape[0] < 1:
        return np.int64(-1)
    record = gip[0]
    while True:
        sequence = record["transaction_id"]
        compiler_barrier()
        if record["magic"] != GIP_MAGIC:
            return np.int64(-1)
        tsc_khz = record["tsc_khz"]
        anchor_tsc = record["anchor_tsc"]
        anchor_ns = record["anchor_ns"]
        compiler_barrier()
        if (sequence & 1) == 0 and record["transaction_id"] == sequence:
            break
    if tsc_khz <= 0:
        return np.int64(-1)
    return anchor_ns + ticks_to_ns(np.int64(tsc) - anchor_tsc, tsc_khz)


@kernel
def gip_tsc_delta(gip, cpu):
    """The TSC of host CPU ``cpu`` minus the reference CPU's (0 if unknown or out of range).

    Subtract it from a TSC read on ``cpu`` before :func:`gip_nanotime`.
    """
    if gip.shape[0] < 1 or cpu < 0 or cpu >= GIP_MAX_CPUS:
        return np.int64(0)
    record = gip[0]
    while True:
        sequence = record["transaction_id"]
        compiler_barrier()
        measured = record["cpu_measured"][cpu]
        delta = record["tsc_deltas"][cpu]
        compiler_barrier()
        if (sequence & 1) == 0 and record["transaction_id"] == sequence:
            break
    return delta if measured else np.int64(0)
