"""Numbers shared by the native device handlers and the run loop, and the native-kind registry.

Each native device owns one slot on the VM's bus: a row of ``STATE_WORDS`` int64 registers
and a row of ``BUFFER_BYTES`` bytes (a UART's transmit ring, pc-testdev's MMIO scratch RAM).

A native device class names its Numba handlers as class attributes ``port_io`` and/or
``mmio_io``; :func:`native_kind` gives each such class a kind number the first time it is
asked, and :mod:`hvjit.run_loop` builds its dispatch switch from :func:`native_classes`.
"""

from __future__ import annotations

import threading

# Device kinds below FIRST_NATIVE; native classes are numbered from it in registration order.
NONE = 0
PYTHON = 1  # a Python handler: the exit goes back to Python (slow path)
FIRST_NATIVE = 2

MAX_DEVICES = 32
STATE_WORDS = 64
BUFFER_BYTES = 1 << 16

# What a handler asks of the run loop after an access.
ACT_CONTINUE = 0
ACT_POWEROFF = 1  # leave: SUSPENDED / POWEROFF with state[STATE_EXIT_CODE]
ACT_RESET = 2  # leave: SUSPENDED / RESET
ACT_DRAIN = 3  # handled, but return to Python to drain a buffer before going on
ACT_PYTHON = 4  # not handled natively after all: hand the exit to Python

# State words every device may use the same way.
STATE_EXIT_CODE = 0
# Guest accesses to the device so far, counted by the run loop: with the rest of the row it
# tells a reset which devices the guest can have changed since a snapshot.
STATE_ACCESSES = STATE_WORDS - 4
# The last three words wire a device to an interrupt line; the run loop tells KVM (through
# KVM_IRQ_LINE, when the VM has an in-kernel irqchip) whenever the wanted level changes.
STATE_IRQ_REPORTED = STATE_WORDS - 3  # the level KVM was last told
STATE_IRQ_LEVEL = STATE_WORDS - 2  # the level the device wants now (0/1)
STATE_IRQ_GSI = STATE_WORDS - 1  # the GSI it is wired to, -1 for none

_native: list[type] = []
_native_lock = threading.Lock()


def native_kind(cls: type) -> int:
    """The kind number of native device class ``cls`` (registered on first use)."""
    if getattr(cls, "port_io", None) is None and getattr(cls, "mmio_io", None) is None:
        raise TypeError(f"{cls.__name__} has neither a port_io nor an mmio_io Numba handler")
    with _native_lock:
        if cls not in _native:
            _native.append(cls)
        return FIRST_NATIVE + _native.index(cls)


def native_classes() -> tuple[type, ...]:
    """Every registered native device class; kind ``FIRST_NATIVE + i`` is entry ``i``."""
    with _native_lock:
        return tuple(_native)
