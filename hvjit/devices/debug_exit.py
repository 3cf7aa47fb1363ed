"""The debug-exit port (isa-debug-exit convention, port 0xf4): a write stops the VM.

The guest's value is its exit code: the run ends SUSPENDED/POWEROFF with ``code`` = value.
(QEMU turns the same write into process status ``(value << 1) | 1``; hvjit reports both.)
"""

from __future__ import annotations

import numpy as np

from .._jit import kernel
from . import kinds
from .bus import PortDevice

DEFAULT_PORT = 0xF4
PORT_COUNT = 4


@kernel
def debug_exit_io(state, offset, size, is_write, value):
    if is_write:
        mask = (np.int64(1) << (8 * size)) - 1 if size < 8 else np.int64(-1)
        state[kinds.STATE_EXIT_CODE] = value & mask
        return np.int64(0), kinds.ACT_POWEROFF
    return np.int64(0), kinds.ACT_CONTINUE


class DebugExit(PortDevice):
    """isa-debug-exit: a guest write ends the run with that value as its exit code."""

    port_io = debug_exit_io
    port_count = PORT_COUNT

    def __init__(self, port: int = DEFAULT_PORT, name: str = "debug-exit"):
        super().__init__(port, name)
