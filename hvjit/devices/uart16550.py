"""A 16550A UART (COM1 at 0x3f8 by default): transmitted bytes go to a ring buffer.

The register file lives in the device's state row so the Numba run loop handles every access;
Python only drains the transmit ring (and feeds the receive FIFO for interactive input).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .._jit import kernel
from . import kinds
from .bus import PortDevice

# Register offsets from the base port.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
IIR_NO_INT = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IER_RDA = 0x01
IER_THRE = 0x02
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

# State words (0 is kinds.STATE_EXIT_CODE, unused here).
S_IER = 1
S_LCR = 2
S_MCR = 3
S_SCR = 4
S_DLL = 5
S_DLM = 6
S_FCR = 7
S_THRE_PENDING = 8  # a THRE interrupt is pending until IIR is read or THR written
S_TX_HEAD = 9  # bytes ever written to the transmit ring (the ring index is head % size)
S_TX_TAIL = 10  # bytes Python has drained
S_RX_HEAD = 11
S_RX_TAIL = 12
S_RX_FIFO = 16  # receive FIFO: words 16..16+RX_FIFO_SIZE
RX_FIFO_SIZE = 32

PORT_COUNT = 8
# Return to Python to drain once the transmit ring is this full.
TX_DRAIN_THRESHOLD = kinds.BUFFER_BYTES * 3 // 4


@kernel
def uart_io(state, buf, offset, is_write, value):
    """One byte-wide register access. Returns (value read, action)."""
    result = _uart_access(state, buf, offset, is_write, value)
    _update_irq_level(state)
    return result


@kernel
def _update_irq_level(state):
    """The INTR output: a pending enabled interrupt, gated by OUT2 as PCs wire it."""
    rx = (state[S_IER] & IER_RDA) != 0 and state[S_RX_HEAD] != state[S_RX_TAIL]
    tx = (state[S_IER] & IER_THRE) != 0 and state[S_THRE_PENDING] != 0
    out2 = (state[S_MCR] & MCR_OUT2) != 0
    state[kinds.STATE_IRQ_LEVEL] = 1 if (rx or tx) and out2 else 0


@kernel
def _uart_access(state, buf, offset, is_write, value):
    dlab = (state[S_LCR] & LCR_DLAB) != 0
    act = kinds.ACT_CONTINUE
    value = value & 0xFF
    if is_write:
        if offset == RBR_THR_DLL:
            if dlab:
                state[S_DLL] = value
            elif state[S_MCR] & MCR_LOOP:
                _rx_push(state, value)
            else:
                head = state[S_TX_HEAD]
                buf[head % buf.size] = value
                state[S_TX_HEAD] = head + 1
                state[S_THRE_PENDING] = 1
                # Hand each finished line to Python at once, so the console streams.
                if value == 0x0A or head + 1 - state[S_TX_TAIL] >= TX_DRAIN_THRESHOLD:
                    act = kinds.ACT_DRAIN
        elif offset == IER_DLM:
            if dlab:
                state[S_DLM] = value
            else:
                state[S_IER] = value & 0x0F
                state[S_THRE_PENDING] = 1
        elif offset == IIR_FCR:
            state[S_FCR] = value
            if value & 0x02:  # clear receive FIFO
                state[S_RX_TAIL] = state[S_RX_HEAD]
        elif offset == LCR:
            state[S_LCR] = value
        elif offset == MCR:
            state[S_MCR] = value & 0x1F
        elif offset == SCR:
            state[S_SCR] = value
        return np.int64(0), act
    if offset == RBR_THR_DLL:
        if dlab:
            return state[S_DLL], act
        return _rx_pop(state), act
    if offset == IER_DLM:
        return (state[S_DLM] if dlab else state[S_IER]), act
    if offset == IIR_FCR:
        fifo = np.int64(0xC0) if state[S_FCR] & 1 else np.int64(0)
        if (state[S_IER] & IER_RDA) and state[S_RX_HEAD] != state[S_RX_TAIL]:
            return fifo | IIR_RDA, act
        if (state[S_IER] & IER_THRE) and state[S_THRE_PENDING]:
            state[S_THRE_PENDING] = 0
            return fifo | IIR_THRE, act
        return fifo | IIR_NO_INT, act
    if offset == LCR:
        return state[S_LCR], act
    if offset == MCR:
        return state[S_MCR], act
    if offset == LSR:
        lsr = np.int64(LSR_THRE | LSR_TEMT)  # transmission is instantaneous
        if state[S_RX_HEAD] != state[S_RX_TAIL]:
            lsr |= LSR_DR
        return lsr, act
    if offset == MSR:
        if state[S_MCR] & MCR_LOOP:
            m = state[S_MCR]
            return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4), act
        return np.int64(0xB0), act  # CTS, DSR, DCD: a cable is attached
    if offset == SCR:
        return state[S_SCR], act
    return np.int64(0xFF), act


@kernel
def _rx_push(state, value):
    head = state[S_RX_HEAD]
    if head - state[S_RX_TAIL] < RX_FIFO_SIZE:
        state[S_RX_FIFO + head % RX_FIFO_SIZE] = value
        state[S_RX_HEAD] = head + 1


@kernel
def _rx_pop(state):
    tail = state[S_RX_TAIL]
    if tail == state[S_RX_HEAD]:
        return np.int64(0)
    value = state[S_RX_FIFO + tail % RX_FIFO_SIZE]
    state[S_RX_TAIL] = tail + 1
    return value


class Uart16550(PortDevice):
    """COM-port configuration; the registers live on the bus, handled natively."""

    port_io = uart_io
    port_count = PORT_COUNT

    def __init__(self, port: int = 0x3F8, name: str = "com1", irq: int = 4):
        super().__init__(port, name)
        self.irq = irq

    def attach(self, bus, memory=None) -> None:
        super().attach(bus, memory)
        bus.state(self.slot)[kinds.STATE_IRQ_GSI] = self.irq

    def pending(self) -> int:
        state = self.bus.state(self.slot)
        return int(state[S_TX_HEAD] - state[S_TX_TAIL])

    def drain(self) -> bytes:
        """The bytes the guest transmitted since the last drain."""
        state = self.bus.state(self.slot)
        buf = self.bus.buffer(self.slot)
        head, tail = int(state[S_TX_HEAD]), int(state[S_TX_TAIL])
        if head - tail > buf.size:  # overrun cannot happen (the loop drains at 3/4) but be safe
            tail = head - buf.size
        idx = np.arange(tail, head) % buf.size
        state[S_TX_TAIL] = head
        return buf[idx].tobytes()

    def feed(self, data: bytes) -> int:
        """Queue input for the guest's receive FIFO; returns how many bytes fitted."""
        state = self.bus.state(self.slot)
        n = 0
        for b in data:
            before = state[S_RX_HEAD]
            _rx_push(state, np.int64(b))
            if state[S_RX_HEAD] == before:
                break
            n += 1
        _update_irq_level(state)
        return n

    def buffer_changes(self, saved: np.ndarray) -> list[tuple[int, int]]:
        """Only the transmit ring between the saved and the current head was written."""
        size = kinds.BUFFER_BYTES
        start, end = int(saved[S_TX_HEAD]), int(self.bus.state(self.slot)[S_TX_HEAD])
        if end < start or end - start >= size:  # the ring went round, or the head moved back
            return [(0, size)]
        a, b = start % size, end % size
        return [(a, b)] if a <= b else [(a, size), (0, b)]

    def irq_change(self) -> "Optional[int]":
        """The level to tell the irqchip if it changed outside a guest access, else None."""
        state = self.bus.state(self.slot)
        level = int(state[kinds.STATE_IRQ_LEVEL])
        if level == state[kinds.STATE_IRQ_REPORTED]:
            return None
        state[kinds.STATE_IRQ_REPORTED] = level
        return level
