"""The exit-trace ring: a numpy array of fixed-size records and a head counter.

A writer (one vCPU's run loop) puts record ``head`` at ``head % len(ring)`` and then advances
``head``; a zero-length ring means tracing is off. ``head`` only grows, so a reader knows how
many records were written and how many the ring has already overwritten. Readers in other
threads copy the ring between two reads of ``head`` and keep only the records that no write
can have touched meanwhile (:func:`unroll`): no lock, and the writer never waits.

The writer stores the record before it advances ``head`` (a compiler barrier keeps that
order; x86 does not reorder stores), so every record below ``head`` is complete.
"""

from __future__ import annotations

import numpy as np

from hvjit._jit import kernel
from hvjit.kernels.gipclock import compiler_barrier

TRACE_DTYPE = np.dtype([
    ("tsc", "<i8"),  # TSC when KVM_RUN returned with the exit
    ("ns", "<i8"),  # the same moment in ns on the GIP's clock (filled when read; -1 unknown)
    ("handler_tsc", "<i8"),  # TSC ticks from KVM_RUN's return until the exit was handled; -1 unknown
    ("handler_ns", "<i8"),  # the same in ns (filled when read; -1 unknown)
    ("rip", "<u8"),  # where the exit happened (valid when rip_valid; see hvjit.trace)
    ("addr", "<u8"),  # port (port IO), guest-physical address (MMIO), MSR index (RDMSR/WRMSR)
    ("data", "<u8"),  # value written, or value read once the handler produced it
    ("exitcode", "<i4"),  # hvjit.abi.VmExitCode
    ("kvm_reason", "<u4"),  # KVM_EXIT_*
    ("count", "<u2"),  # repetitions of a string port access (1 otherwise)
    ("vcpu", "<u2"),
    ("size", "u1"),  # access size in bytes
    ("is_write", "u1"),
    ("native", "u1"),  # 1: handled in the Numba loop; 0: went to Python
    ("rip_valid", "u1"),
])
assert TRACE_DTYPE.itemsize == 72  # a record is written as a whole per exit

# The state array (int64) beside each ring.
T_HEAD = 0  # records written so far (the next goes to T_HEAD % len(ring))
T_VCPU = 1  # the vCPU index written into each record
T_FLAGS = 2  # TRACE_* options
N_TRACE_STATE = 4

TRACE_RIP = 1  # kvm_run's synced registers are valid: record rip


def empty_ring() -> np.ndarray:
    """A zero-length ring: tracing off."""
    return np.zeros(0, TRACE_DTYPE)


def new_state(vcpu: int = 0, flags: int = 0) -> np.ndarray:
    state = np.zeros(N_TRACE_STATE, np.int64)
    state[T_VCPU] = vcpu
    state[T_FLAGS] = flags
    return state


@kernel
def ring_slot(ring, state):
    """The index the next record goes to (the ring must not be empty)."""
    head = state[T_HEAD]
    if head < 0:  # only hvjit writes it, but a bad value must not index outside the ring
        head = 0
        state[T_HEAD] = 0
    return head % ring.shape[0]


@kernel
def ring_advance(state):
    """Publish the record just written at ``ring_slot``."""
    compiler_barrier()
    state[T_HEAD] += 1


@kernel
def ring_push(ring, state, record):
    """Copy one record (a 1-record array) into the ring; for tests and Python writers."""
    if ring.shape[0] == 0 or record.shape[0] < 1:
        return
    ring[ring_slot(ring, state)] = record[0]
    ring_advance(state)


def unroll(ring: np.ndarray, state: np.ndarray, since: int = 0) -> tuple[np.ndarray, int]:
    """The ring's records from number ``since`` on, oldest first, read safely while a writer
    runs, and how many of those were lost (overwritten, or being overwritten during the copy)."""
    n = ring.shape[0]
    if n == 0:
        return empty_ring(), 0
    before = int(state[T_HEAD])
    copy = ring.copy()
    after = int(state[T_HEAD])
    # Record i sits at i % n. Those below `before` were complete before the copy began;
    # those from `after - n` on were not overwritten before the copy ended.
    first = max(since, after - n)
    lost = max(0, first - since)
    if first >= before:
        return empty_ring(), lost
    start = first % n
    count = before - first
    out = np.concatenate([copy[start:], copy[:start]])[:count] if start else copy[:count]
    return out, lost
