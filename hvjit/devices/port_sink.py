"""A port sink (e.g. 0x80, the POST/delay port): writes are dropped, reads return all ones."""

from __future__ import annotations

import numpy as np

from .._jit import kernel
from . import kinds
from .bus import PortDevice

POST_PORT = 0x80


@kernel
def port_sink_io(state, offset, size, is_write, value):
    if is_write:
        state[1] = value  # last value written, for tests and the curious
        return np.int64(0), kinds.ACT_CONTINUE
    return ((np.int64(1) << (8 * size)) - 1) if size < 8 else np.int64(-1), kinds.ACT_CONTINUE


class PortSink(PortDevice):
    """Claims ports whose writes a guest only uses as delays or POST codes."""

    port_io = port_sink_io

    def __init__(self, port: int = POST_PORT, count: int = 1, name: str = "post"):
        super().__init__(port, name)
        self.port_count = count
