"""hvjit's own devices by name: what ``Vm.add_device(name)`` finds when no factory of the
VM's session provides that name.

Adding a native device is one new file in this package (a :class:`~hvjit.devices.bus.PortDevice`
subclass naming its Numba handlers) plus one line in ``BUILTIN_DEVICES`` below. The run
loop's dispatch switch is generated from the native classes (:mod:`hvjit.run_loop`), so
nothing else changes. A device of your own (outside hvjit) is registered the same way at run
time with :func:`register`, or offered through a session's component factory.
"""

from __future__ import annotations

from ..errors import FactoryNotFoundError
from . import kinds
from .cmos import Cmos
from .debug_exit import DebugExit
from .fw_cfg import FwCfg
from .i8042 import I8042
from .pci import PciHost
from .pci_testdev import PciTestDev
from .pm_timer import PmTimer
from .port_sink import PortSink
from .testdev import TestDev
from .uart16550 import Uart16550

BUILTIN_DEVICES: dict[str, type] = {
    "uart16550": Uart16550,
    "debug-exit": DebugExit,
    "pc-testdev": TestDev,
    "port-sink": PortSink,
    "i8042": I8042,
    "cmos": Cmos,
    "fw_cfg": FwCfg,
    "pci-host": PciHost,
    "acpi-pm": PmTimer,
    "pci-testdev": PciTestDev,
}

_registered: dict[str, type] = dict(BUILTIN_DEVICES)

# Number the built-in native devices in a fixed order, so every process generates (and
# caches) the same run loop for them.
for _cls in BUILTIN_DEVICES.values():
    kinds.native_kind(_cls)


def register(name: str, cls: type) -> None:
    """Make ``cls`` available to every VM as ``add_device(name)`` (native or Python device)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a device name is a non-empty string, not {name!r}")
    if name in _registered and _registered[name] is not cls:
        raise ValueError(f"a device named {name!r} is already registered")
    _registered[name] = cls
    if getattr(cls, "port_io", None) is not None or getattr(cls, "mmio_io", None) is not None:
        kinds.native_kind(cls)


def device_class(name: str) -> type:
    """The device class registered as ``name``."""
    try:
        return _registered[name]
    except KeyError:
        raise FactoryNotFoundError(f"no device named {name!r}; known: {', '.join(sorted(_registered))}") from None


def names() -> list[str]:
    return sorted(_registered)
