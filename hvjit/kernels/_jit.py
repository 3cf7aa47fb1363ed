"""The one decorator every hvjit kernel uses.

Every kernel is compiled with ``cache=True`` (cold JIT of a decoder-sized kernel costs
seconds, a warm cache load a fraction of that) and ``nogil=True`` (one Python thread per
vCPU runs truly in parallel).

Numba keys its cache on the caller's source file only, so a changed helper in another
module could leave a stale cached caller. hvjit therefore keeps its kernels' cache in a
directory named after a hash of *all* kernel and device sources: any edit anywhere gives a
fresh directory, and stale code can never run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba.core import caching

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Directories whose modules hold jitted code; their sources together key the cache.
_KERNEL_DIRS = ("kernels", "devices")


def _sources_digest() -> str:
    h = hashlib.sha256()
    for sub in _KERNEL_DIRS:
        for path in sorted((_PACKAGE_DIR / sub).rglob("*.py")):
            h.update(str(path.relative_to(_PACKAGE_DIR)).encode())
            h.update(path.read_bytes())
    h.update(numba.__version__.encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    base = os.environ.get("HVJIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hvjit"
    )
    return Path(base) / f"numba-{_sources_digest()}"


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


def kernel(*args, **options):
    """``numba.njit`` with hvjit's fixed settings (cache and nogil on).

    Usable bare (``@kernel``) or with extra njit options (``@kernel(inline="always")``).
    """
    options.setdefault("cache", True)
    options.setdefault("nogil", True)
    if args and callable(args[0]) and len(args) == 1 and not options.keys() - {"cache", "nogil"}:
        return numba.njit(**options)(args[0])
    return numba.njit(*args, **options)
