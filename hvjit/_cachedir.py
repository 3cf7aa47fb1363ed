"""Where hvjit keeps what it builds once and reuses: ``$HVJIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/hvjit`` (``~/.cache/hvjit``).

Below it: the Numba kernels (``numba-<digest of the sources>/``, :mod:`hvjit._jit`), the
parsed C declarations of the trampoline (``cffi/``, :mod:`hvjit._trampoline`), assembled
guests (``asm/``, ``guests/``). Bottom layer: imports nothing, so finding the directory costs
no Numba import.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_base() -> Path:
    """The cache root (not created here)."""
    return Path(os.environ.get("HVJIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hvjit"))
