"""The one decorator every hvjit kernel uses.

Every kernel is compiled with ``cache=True`` (cold JIT of a decoder-sized kernel costs
seconds, a warm cache load a fraction of that) and ``nogil=True`` (one Python thread per
vCPU runs truly in parallel).

Numba keys its cache on the caller's source file only, so a changed helper in another
module could leave a stale cached caller. hvjit therefore keeps its kernels' cache in a
directory named after a hash of *all* of the package's sources: any edit anywhere gives a
fresh directory, and stale code can never run. That needs one of Numba's private hooks (the
cache locator list), as does naming record types stably across processes (below), so
``pyproject.toml`` pins the Numba versions they were checked with and
``tests/unit/test_jit_cache.py`` checks the keying.

This module is the bottom layer: it imports nothing of hvjit's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba.core import caching, cgutils, types
from numba.extending import intrinsic

_PACKAGE_DIR = Path(__file__).resolve().parent


def sources_digest(root: Path = _PACKAGE_DIR) -> str:
    """A hash of every Python source below ``root`` (and of Numba's version)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    h.update(numba.__version__.encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    base = os.environ.get("HVJIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hvjit"
    )
    return Path(base) / f"numba-{sources_digest()}"


CACHE_DIR = _cache_root()


class _HvjitCacheLocator(caching.UserProvidedCacheLocator):
    """Puts hvjit's own kernels (and only those) under CACHE_DIR."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        rel = Path(py_file).resolve().relative_to(_PACKAGE_DIR)
        self._cache_path = str(CACHE_DIR / rel.parent)

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            Path(py_file).resolve().relative_to(_PACKAGE_DIR)
        except ValueError:
            return None
        # Skip the in-tree/user-wide locators' mtime logic: the directory name is the stamp.
        return super(caching.UserProvidedCacheLocator, cls).from_function(py_func, py_file)


if _HvjitCacheLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, _HvjitCacheLocator)


# Numba names a record type in symbols by a per-process counter, so two cached
# specializations of one kernel for different record dtypes, compiled in different processes,
# can get the same symbol names; loaded into one process, one then runs the other's code
# (e.g. writing 72-byte decode records into an 8-byte array). A digest of the layout (fields,
# offsets, size) names each dtype the same everywhere. Checked by tests/unit/test_decode.py.
def _record_mangling_args(record):
    return type(record).__name__, (int.from_bytes(hashlib.sha256(record.name.encode()).digest()[:6], "little"),)


types.Record.mangling_args = property(_record_mangling_args)


def kernel(*args, **options):
    """``numba.njit`` with hvjit's fixed settings (cache and nogil on).

    Usable bare (``@kernel``) or with extra njit options (``@kernel(inline="always")``).
    """
    options.setdefault("cache", True)
    options.setdefault("nogil", True)
    if args and callable(args[0]) and len(args) == 1 and not options.keys() - {"cache", "nogil"}:
        return numba.njit(**options)(args[0])
    return numba.njit(*args, **options)


@intrinsic
def _read_cycle_counter(typingctx):
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.uint64(), codegen


@kernel
def rdtsc():
    """The CPU's time-stamp counter (``rdtsc`` on x86), callable from any kernel."""
    return np.int64(_read_cycle_counter())


def _cas_codegen(width: int):
    def codegen(context, builder, signature, args):
        array, offset, expected, desired = args
        data = context.make_array(signature.args[0])(context, builder, array).data
        pointer = builder.bitcast(builder.gep(data, [offset]), ir.IntType(width).as_pointer())
        pair = builder.cmpxchg(pointer, expected, desired, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return codegen


@intrinsic
def atomic_cas64(typingctx, array, offset, expected, desired):
    """Atomic compare-and-swap of the 8 bytes at byte ``offset`` of a uint8 ``array`` (which
    the caller has checked to be in bounds and 8-aligned in memory): ``desired`` is stored if
    they hold ``expected``. Returns what they held (``== expected``: swapped). x86's ``lock
    cmpxchg``: what the CPU uses for accessed/dirty bits while other CPUs run."""
    return types.uint64(array, types.uint64, types.uint64, types.uint64), _cas_codegen(64)


@intrinsic
def atomic_cas32(typingctx, array, offset, expected, desired):
    """:func:`atomic_cas64` on 4 bytes (4-aligned)."""
    return types.uint32(array, types.uint64, types.uint32, types.uint32), _cas_codegen(32)
