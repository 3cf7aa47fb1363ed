"""pc-testdev, as KVM's unit tests know it from QEMU.

Ports: 0xe0 a 32-bit scratch register, 0xe4 page flush (accepted, nothing to flush here),
0x2000+ IRQ lines (raising them needs the in-kernel irqchip: handed to Python), and a 64 KiB
MMIO scratch RAM at 0xff000000.
"""

from __future__ import annotations

import numpy as np

from .._jit import kernel
from . import kinds
from .bus import PortDevice

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_GPA = 0xFF000000
IOMEM_SIZE = kinds.BUFFER_BYTES

S_SCRATCH = 1


@kernel
def testdev_pio(state, offset, size, is_write, value):
    """Port access at ``offset`` from 0xe0 (0..7)."""
    if offset < 4:
        shift = 8 * offset
        mask = ((np.int64(1) << (8 * size)) - 1) if size < 8 else np.int64(-1)
        if is_write:
            old = state[S_SCRATCH]
            state[S_SCRATCH] = (old & ~(mask << shift)) | ((value & mask) << shift)
            state[S_SCRATCH] &= 0xFFFFFFFF
            return np.int64(0), kinds.ACT_CONTINUE
        return (state[S_SCRATCH] >> shift) & mask, kinds.ACT_CONTINUE
    return np.int64(0), kinds.ACT_CONTINUE  # 0xe4: flush page, nothing to do


@kernel
def testdev_mmio(buf, offset, size, is_write, data):
    """MMIO scratch RAM: ``data`` is the kvm_run mmio.data array (8 bytes)."""
    if offset < 0 or size > 8 or offset + size > buf.size:
        return kinds.ACT_PYTHON  # outside the scratch RAM: let Python report it
    for i in range(size):
        if is_write:
            buf[offset + i] = data[i]
        else:
            data[i] = buf[offset + i]
    return kinds.ACT_CONTINUE


class TestDev(PortDevice):
    """pc-testdev: the scratch and flush ports natively, the MMIO scratch RAM natively."""

    port_io = testdev_pio
    mmio_io = testdev_mmio
    port_count = 8
    __test__ = False  # not a pytest class

    def __init__(self, name: str = "pc-testdev", iomem_gpa: int = IOMEM_GPA):
        super().__init__(SCRATCH_PORT, name)
        self.iomem_gpa = iomem_gpa

    def _claim(self, bus, memory) -> None:
        super()._claim(bus, memory)
        bus.claim_mmio(self.slot, self.iomem_gpa, IOMEM_SIZE, memory)

    @property
    def scratch(self) -> int:
        return int(self.bus.state(self.slot)[S_SCRATCH])

    @property
    def iomem(self) -> np.ndarray:
        return self.bus.buffer(self.slot)
