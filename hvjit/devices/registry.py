"""Devices as component factories (after SUPDrv's factories).

hvjit's own devices are registered by a library-owned session under their names, answering
``DEVICE_INTERFACE_UUID`` with the device class. ``Vm.add_device(name, **config)`` asks the
factory by name, so a research user adds a device of their own the same way::

    session.register_factory(SimpleFactory("my-dev", {DEVICE_INTERFACE_UUID: lambda s: MyDevice}))
    vm.add_device("my-dev", port=0x600)

A device class takes its configuration as keyword arguments and has ``attach(bus, memory)``
and ``detach(bus)``; its native handler (if any) is one arm of the run loop's switch, else it
uses Python handlers on the bus.
"""

from __future__ import annotations

import threading

from ..factory import DEVICE_INTERFACE_UUID, SimpleFactory
from .cmos import Cmos
from .debug_exit import DebugExit
from .fw_cfg import FwCfg
from .i8042 import I8042
from .pci import PciHost
from .pm_timer import PmTimer
from .port_sink import PortSink
from .testdev import TestDev
from .uart16550 import Uart16550

BUILTIN_DEVICES = {
    "uart16550": Uart16550,
    "debug-exit": DebugExit,
    "pc-testdev": TestDev,
    "port-sink": PortSink,
    "i8042": I8042,
    "cmos": Cmos,
    "fw_cfg": FwCfg,
    "pci-host": PciHost,
    "acpi-pm": PmTimer,
}

_lock = threading.Lock()
_library_session = None


def library_session():
    """The session that owns hvjit's built-in factories (created on first use)."""
    global _library_session
    with _lock:
        if _library_session is None or _library_session.closed:
            from ..session import Session

            s = Session()
            for name, cls in BUILTIN_DEVICES.items():
                s.register_factory(SimpleFactory(name, {DEVICE_INTERFACE_UUID: lambda _s, c=cls: c}))
            _library_session = s
        return _library_session


def device_class(session, name: str):
    """The device class the factory ``name`` provides (raises the factory lookup errors)."""
    library_session()
    return (session or library_session()).query_factory(name, DEVICE_INTERFACE_UUID)
