"""The i8042 keyboard controller at 0x60 (data) / 0x64 (status, command), plus port 0x61.

Enough of the controller for firmware and kernels to probe it and to reset the machine:

- status (0x64 read): OBF (bit 0) when the output queue holds a byte, SYS (bit 2) from the
  command byte, CMD (bit 3) when the last write went to 0x64, keyboard unlocked (bit 4),
  AUX (bit 5) when the next byte comes from the mouse port; IBF is never set;
- controller commands (0x64 write): 0x20 read / 0x60 write the command byte; 0xa7/0xa8
  disable/enable the mouse port, 0xa9 test it (-> 0x00), 0xaa self-test (-> 0x55),
  0xab keyboard interface test (-> 0x00), 0xad/0xae disable/enable the keyboard,
  0xc0 read input port, 0xd0/0xd1 read/write the output port (a write with bit 0 clear
  resets), 0xd2/0xd3 write the keyboard/mouse output buffer, 0xd4 write to the mouse (no
  mouse: swallowed), 0xdd/0xdf A20 (ignored), 0xf0-0xff pulse output lines: bit 0 clear
  pulses the reset line -> ``ACT_RESET`` (0xfe is the classic reboot);
- keyboard commands (0x60 write): 0xff reset (-> 0xfa 0xaa), 0xf2 identify (-> 0xfa 0xab
  0x83), 0xee echo, 0xed/0xf3/0xf0 take a data byte (0xf0 0 reports scan set 2), others ack;
- port 0x61 (system control port B): bits 0-3 stored; bit 4 (refresh) and bit 5 (PIT
  channel 2 output) toggle at every read, so delay loops polling them terminate. (KVM's
  in-kernel PIT, when created, claims 0x61 itself and these reads never leave KVM.)

No interrupts are raised (the in-kernel irqchip's IRQ 1 is not driven): guests poll status.
"""

from __future__ import annotations

import numpy as np

from .._jit import kernel
from . import kinds
from .bus import PortDevice

DATA_PORT = 0x60
PORT_B = 0x61
STATUS_PORT = 0x64
OFF_DATA = 0
OFF_PORT_B = 1
OFF_STATUS = 4

STAT_OBF = 0x01
STAT_SYS = 0x04
STAT_CMD = 0x08
STAT_UNLOCKED = 0x10
STAT_AUX = 0x20

CMDBYTE_KBD_INT = 0x01
CMDBYTE_SYS = 0x04
CMDBYTE_KBD_DISABLED = 0x10
CMDBYTE_AUX_DISABLED = 0x20
CMDBYTE_XLATE = 0x40
CMDBYTE_DEFAULT = CMDBYTE_XLATE | CMDBYTE_SYS | CMDBYTE_KBD_INT  # 0x45, as firmware leaves it

OUTPORT_RESET = 0x01  # active low: clear it to reset
OUTPORT_DEFAULT = 0xCF  # reset line high, A20 on (QEMU's default)

# State words (0 is kinds.STATE_EXIT_CODE).
S_CMDBYTE = 1
S_OUTPORT = 2
S_PENDING = 3  # controller command waiting for its data byte on 0x60 (0: none)
S_KBD_PENDING = 4  # keyboard command waiting for its data byte (0: none)
S_LAST_CMD = 5  # 1 when the last write went to 0x64
S_PORT_B = 6
S_PORT_B_TOGGLE = 7
S_Q_HEAD = 8  # output queue: bytes ever queued
S_Q_TAIL = 9  # bytes read
S_LAST_OUT = 10  # the last byte read from 0x60 (an empty queue reads it again)
S_RESETS = 11  # reset pulses seen
S_QUEUE = 16  # words 16..16+QUEUE_SIZE: byte | 0x100 when from the mouse port
QUEUE_SIZE = 16

AUX_FLAG = 0x100


@kernel
def _queue(state, byte, aux):
    head = state[S_Q_HEAD]
    if head - state[S_Q_TAIL] >= QUEUE_SIZE:
        return  # full: dropped, as a real controller's single buffer would overrun
    state[S_QUEUE + head % QUEUE_SIZE] = (byte & 0xFF) | (AUX_FLAG if aux else 0)
    state[S_Q_HEAD] = head + 1


@kernel
def _status(state):
    st = np.int64(STAT_UNLOCKED)
    if state[S_CMDBYTE] & CMDBYTE_SYS:
        st |= STAT_SYS
    if state[S_LAST_CMD]:
        st |= STAT_CMD
    tail = state[S_Q_TAIL]
    if tail != state[S_Q_HEAD]:
        st |= STAT_OBF
        if state[S_QUEUE + tail % QUEUE_SIZE] & AUX_FLAG:
            st |= STAT_AUX
    return st


@kernel
def _read_data(state):
    tail = state[S_Q_TAIL]
    if tail != state[S_Q_HEAD]:
        state[S_LAST_OUT] = state[S_QUEUE + tail % QUEUE_SIZE] & 0xFF
        state[S_Q_TAIL] = tail + 1
    return state[S_LAST_OUT]


@kernel
def _reset_pulse(state):
    state[S_RESETS] += 1
    return kinds.ACT_RESET


@kernel
def _command(state, cmd):
    """A controller command written to 0x64. Returns an action."""
    state[S_PENDING] = 0
    if cmd == 0x20:
        _queue(state, state[S_CMDBYTE], False)
    elif cmd == 0x60 or cmd == 0xD1 or cmd == 0xD2 or cmd == 0xD3 or cmd == 0xD4:
        state[S_PENDING] = cmd
    elif cmd == 0xA7:
        state[S_CMDBYTE] |= CMDBYTE_AUX_DISABLED
    elif cmd == 0xA8:
        state[S_CMDBYTE] &= ~CMDBYTE_AUX_DISABLED
    elif cmd == 0xA9 or cmd == 0xAB:
        _queue(state, np.int64(0x00), False)
    elif cmd == 0xAA:
        state[S_CMDBYTE] |= CMDBYTE_SYS
        _queue(state, np.int64(0x55), False)
    elif cmd == 0xAD:
        state[S_CMDBYTE] |= CMDBYTE_KBD_DISABLED
    elif cmd == 0xAE:
        state[S_CMDBYTE] &= ~CMDBYTE_KBD_DISABLED
    elif cmd == 0xC0:
        _queue(state, np.int64(0x00), False)
    elif cmd == 0xD0:
        _queue(state, state[S_OUTPORT], False)
    elif cmd >= 0xF0 and (cmd & OUTPORT_RESET) == 0:
        return _reset_pulse(state)
    return kinds.ACT_CONTINUE


@kernel
def _keyboard(state, byte):
    """A byte written to 0x60 with no controller command pending: a keyboard command."""
    pending = state[S_KBD_PENDING]
    if pending:
        state[S_KBD_PENDING] = 0
        _queue(state, np.int64(0xFA), False)
        if pending == 0xF0 and byte == 0:
            _queue(state, np.int64(0x41 if state[S_CMDBYTE] & CMDBYTE_XLATE else 0x02), False)
        return
    if byte == 0xEE:
        _queue(state, np.int64(0xEE), False)
        return
    if byte == 0xFE:  # resend: nothing to resend
        return
    _queue(state, np.int64(0xFA), False)
    if byte == 0xFF:
        _queue(state, np.int64(0xAA), False)
    elif byte == 0xF2:
        _queue(state, np.int64(0xAB), False)
        _queue(state, np.int64(0x83), False)
    elif byte == 0xED or byte == 0xF3 or byte == 0xF0:
        state[S_KBD_PENDING] = byte


@kernel
def _write_data(state, byte):
    pending = state[S_PENDING]
    state[S_PENDING] = 0
    if pending == 0x60:
        state[S_CMDBYTE] = byte
    elif pending == 0xD1:
        state[S_OUTPORT] = byte
        if (byte & OUTPORT_RESET) == 0:
            return _reset_pulse(state)
    elif pending == 0xD2:
        _queue(state, byte, False)
    elif pending == 0xD3:
        _queue(state, byte, True)
    elif pending == 0xD4:
        pass  # no mouse behind the aux port
    else:
        _keyboard(state, byte)
    return kinds.ACT_CONTINUE


@kernel
def i8042_io(state, offset, size, is_write, value):
    """An access at ``offset`` from 0x60 (0: data, 1: port B, 4: status/command).

    Only the first byte lane is significant (the ports are not contiguous). (value, action).
    """
    value = value & 0xFF
    if is_write:
        act = kinds.ACT_CONTINUE
        if offset == OFF_DATA:
            state[S_LAST_CMD] = 0
            act = _write_data(state, value)
        elif offset == OFF_STATUS:
            state[S_LAST_CMD] = 1
            act = _command(state, value)
        elif offset == OFF_PORT_B:
            state[S_PORT_B] = value & 0x0F
        return np.int64(0), act
    if offset == OFF_DATA:
        return _read_data(state), kinds.ACT_CONTINUE
    if offset == OFF_STATUS:
        return _status(state), kinds.ACT_CONTINUE
    if offset == OFF_PORT_B:
        t = state[S_PORT_B_TOGGLE] ^ 0x30
        state[S_PORT_B_TOGGLE] = t
        return (state[S_PORT_B] & 0x0F) | t, kinds.ACT_CONTINUE
    return np.int64(0xFF), kinds.ACT_CONTINUE


class I8042(PortDevice):
    """Keyboard controller at 0x60/0x64 (and system control port B at 0x61 when ``port_b``)."""

    port_io = i8042_io

    def __init__(self, *, port_b: bool = True, name: str = "i8042"):
        super().__init__(DATA_PORT, name)
        self.port_b = port_b

    def _claim(self, bus, memory) -> None:
        bus.claim_ports(self.slot, DATA_PORT, 1)
        if self.port_b:
            bus.claim_ports(self.slot, PORT_B, 1)
        bus.claim_ports(self.slot, STATUS_PORT, 1)

    def attach(self, bus, memory=None) -> None:
        super().attach(bus, memory)
        state = bus.state(self.slot)
        state[S_CMDBYTE] = CMDBYTE_DEFAULT
        state[S_OUTPORT] = OUTPORT_DEFAULT

    @property
    def resets(self) -> int:
        return int(self.bus.state(self.slot)[S_RESETS])
