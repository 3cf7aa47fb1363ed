"""The exit-trace ring without KVM: pushing, wrapping, unrolling, and what a reader keeps when
a writer advances the head during its copy."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hvjit.kernels import tracering
from hvjit.kernels.tracering import T_HEAD, TRACE_DTYPE, ring_push, unroll


def _push(ring, state, values):
    rec = np.zeros(1, TRACE_DTYPE)
    for v in values:
        rec[0]["data"] = v
        rec[0]["tsc"] = 1000 + v
        ring_push(ring, state, rec)


def test_records_come_back_in_order_until_the_ring_is_full():
    ring, state = np.zeros(8, TRACE_DTYPE), tracering.new_state()
    _push(ring, state, range(5))
    out, lost = unroll(ring, state)
    assert list(out["data"]) == [0, 1, 2, 3, 4] and lost == 0


@pytest.mark.parametrize("n, size", [(8, 8), (9, 8), (21, 8), (100, 7), (3, 1)])
def test_a_wrapped_ring_keeps_the_newest_in_order(n, size):
    ring, state = np.zeros(size, TRACE_DTYPE), tracering.new_state()
    _push(ring, state, range(n))
    out, lost = unroll(ring, state)
    assert list(out["data"]) == list(range(max(0, n - size), n))
    assert lost == max(0, n - size) and int(state[T_HEAD]) == n


def test_an_empty_ring_is_off():
    ring, state = tracering.empty_ring(), tracering.new_state()
    _push(ring, state, range(3))  # ignored, and no index outside the zero-length ring
    out, lost = unroll(ring, state)
    assert out.size == 0 and lost == 0 and int(state[T_HEAD]) == 0


def test_a_negative_head_is_repaired_not_used_as_an_index():
    ring, state = np.zeros(4, TRACE_DTYPE), tracering.new_state()
    state[T_HEAD] = -5
    _push(ring, state, [7])
    assert int(state[T_HEAD]) == 1 and int(ring[0]["data"]) == 7


class _MovingHead:
    """A state whose head reads `before` first and `after` next: a writer ran during the copy."""

    def __init__(self, before, after):
        self.reads = [before, after]

    def __getitem__(self, i):
        assert i == T_HEAD
        return self.reads.pop(0)


@pytest.mark.parametrize("before, after, size, kept", [
    (10, 10, 8, range(2, 10)),  # no writer
    (10, 12, 8, range(4, 10)),  # slots of records 2, 3 may have been rewritten: dropped
    (10, 18, 8, range(10, 10)),  # the writer lapped the copy: nothing is safe
    (5, 7, 8, range(0, 5)),  # not full yet: all complete records survive
])
def test_unroll_keeps_only_records_no_write_can_have_touched(before, after, size, kept):
    ring = np.zeros(size, TRACE_DTYPE)
    for i in range(max(before, after)):  # slot contents as the writer leaves them
        ring[i % size]["data"] = i
    out, lost = unroll(ring, _MovingHead(before, after))
    assert list(out["data"]) == list(kept)
    assert lost == max(0, after - size)


def test_ring_kernels_under_numba_boundscheck(tmp_path):
    """The same tests with NUMBA_BOUNDSCHECK=1: any index outside a ring raises."""
    if os.environ.get("NUMBA_BOUNDSCHECK") == "1":
        pytest.skip("already bounds-checked")
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", HVJIT_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "not boundscheck"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and " passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]


@pytest.mark.parametrize("n, size, since, kept, lost", [
    (10, 16, 7, [7, 8, 9], 0),  # cleared at 7: only what came after
    (10, 4, 3, [6, 7, 8, 9], 3),  # 3, 4, 5 came after the clear but were overwritten
    (10, 4, 10, [], 0),  # cleared at the head: nothing yet
])
def test_records_since_a_clear(n, size, since, kept, lost):
    ring, state = np.zeros(size, TRACE_DTYPE), tracering.new_state()
    _push(ring, state, range(n))
    out, got_lost = unroll(ring, state, since)
    assert list(out["data"]) == kept and got_lost == lost
