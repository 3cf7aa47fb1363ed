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

import functools
import hashlib
import os
import pickle
from pathlib import Path

import numba
import numpy as np
from llvmlite import binding as ll
from llvmlite import ir
from numba.core import caching, cgutils, types
from numba.core.compiler_lock import global_compiler_lock
from numba.core.runtime import _nrt_python as _nrt
from numba.core.runtime import nrtdynmod, rtsys
from numba.extending import intrinsic

from ._cachedir import cache_base

_PACKAGE_DIR = Path(__file__).resolve().parent


def sources_digest(root: Path = _PACKAGE_DIR) -> str:
    """A hash of every Python source below ``root`` (and of Numba's version)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    h.update(numba.__version__.encode())
    return h.hexdigest()[:16]


def _stat_signature(root: Path) -> str:
    """A hash of every source's path, size and modification time: what :func:`sources_digest`
    reads, without reading it (a start-up costs a ``stat`` per file, not a hash of them)."""
    h = hashlib.sha256(numba.__version__.encode())
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                st = os.stat(os.path.join(top, name))
                h.update(f"{top}/{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()[:32]


def cached_sources_digest(base: Path, root: Path = _PACKAGE_DIR) -> str:
    """:func:`sources_digest`, remembered under ``base/digests`` by the sources' stat signature
    (paths, sizes, mtimes, inodes): any edit of a source changes its mtime, so the digest is
    recomputed then, and read back from a 16-byte file otherwise."""
    memo = base / "digests" / _stat_signature(root)
    try:
        digest = memo.read_text()
        if len(digest) == 16:
            return digest
    except OSError:
        pass
    digest = sources_digest(root)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache directory: hash every time
    return digest


def _cache_root() -> Path:
    base = cache_base()
    return base / f"numba-{cached_sources_digest(base)}"


CACHE_DIR = _cache_root()
_CACHE_DIR_RESOLVED = CACHE_DIR.resolve()


@functools.lru_cache(maxsize=None)
def _kernel_cache_path(py_file: str) -> str | None:
    """Where the kernels of ``py_file`` are cached: under CACHE_DIR by their place in the
    package, or beside a module generated under CACHE_DIR (the run loops); None for others."""
    path = Path(py_file).resolve()
    try:
        return str(CACHE_DIR / path.relative_to(_PACKAGE_DIR).parent)
    except ValueError:
        pass
    try:
        path.relative_to(_CACHE_DIR_RESOLVED)
    except ValueError:
        return None
    return str(path.parent / "__pycache__")


_ensured_paths: set[str] = set()


class _HvjitCacheLocator(caching.UserProvidedCacheLocator):
    """Puts hvjit's own kernels (and only those) under CACHE_DIR."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = _kernel_cache_path(py_file)

    @classmethod
    def from_function(cls, py_func, py_file):
        if _kernel_cache_path(py_file) is None:
            return None
        # Skip the in-tree/user-wide locators' mtime logic: the directory name is the stamp.
        return super(caching.UserProvidedCacheLocator, cls).from_function(py_func, py_file)

    def ensure_cache_path(self):
        # Numba creates the directory and test-writes a file in it for every kernel; once a
        # directory per process is enough (a start-up defines ~80 kernels in a dozen files).
        if self._cache_path not in _ensured_paths:
            super().ensure_cache_path()
            _ensured_paths.add(self._cache_path)


if _HvjitCacheLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, _HvjitCacheLocator)


# Loading a cached kernel, Numba first refreshes the CPU target: it imports and installs every
# typing and lowering registry (numba.np.*, numba.cpython.*, ...), ~0.2-0.3 s and ~40 MiB the
# first time in a process, though rebuilding a cached library needs none of it: only the code
# generator and the symbols the object code links against. Those are the Python C API, Numba's
# helper library (registered when the target context is made), libhvt (loaded globally) and
# Numba's runtime (NRT, registered by ``rtsys.initialize``, which the refresh would have
# called; tests/unit/test_jit_cache.py checks every cached object needs nothing else). A
# compilation still refreshes the target itself (numba.core.compiler), so for hvjit's kernels
# the cache load initialises only the runtime; other caches load as Numba does.
_numba_load_overload = caching.Cache.load_overload


def _load_overload(self, sig, target_context):
    if not isinstance(getattr(self._impl, "locator", None), _HvjitCacheLocator):
        return _numba_load_overload(self, sig, target_context)
    _initialize_runtime(target_context)
    with self._guard_against_spurious_io_errors():
        return self._load_overload(sig, target_context)


def _initialize_runtime(target_context) -> None:
    """``rtsys.initialize``, with the NRT's own LLVM helpers (refcounting, the destructor
    call) loaded as object code from the kernel cache instead of compiled: compiling them is
    the costliest part of a warm start-up after the imports (~20 ms, ~20 MiB of LLVM's
    optimiser). The same steps as Numba's: the C helpers' symbols first, then the library;
    anything unexpected falls back to Numba's own initialisation."""
    if rtsys._init:
        return
    with global_compiler_lock:
        if rtsys._init:
            return
        try:
            codegen = target_context.codegen()
            key = hashlib.sha256(repr(codegen.magic_tuple()).encode()).hexdigest()[:16]
            path = CACHE_DIR / f"nrt-{key}.pickle"
            if numba.config.NRT_STATS:
                _nrt.memsys_enable_stats()
            for py_name, address in _nrt.c_helpers.items():
                ll.add_symbol(py_name if py_name.startswith("_") else "NRT_" + py_name, address)
            try:
                library = codegen.unserialize_library(pickle.loads(path.read_bytes()))
            except (OSError, EOFError, pickle.UnpicklingError, ValueError):
                module, library = nrtdynmod.create_nrt_module(target_context)
                library.enable_object_caching()
                library.add_ir_module(module)
                library.finalize()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(pickle.dumps(library.serialize_using_object_code()))
                os.replace(tmp, path)
            rtsys._library = library
            rtsys._init = True
        except Exception:  # noqa: BLE001 - Numba's way is always right, only slower
            rtsys.initialize(target_context)


if getattr(caching.Cache.load_overload, "__module__", None) != __name__:
    caching.Cache.load_overload = _load_overload


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
