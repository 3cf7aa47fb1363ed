"""hvjit: a hypervisor library for Python.

Linux KVM through a tiny C trampoline, VM exits dispatched by Numba kernels at native speed,
and a Python object model after FreeBSD bhyve (VM / vCPU / memory) and VirtualBox's support
driver (sessions, handles, registered objects, component factories)::

    import hvjit
    with hvjit.Session() as s:
        vm = s.create_vm("hello", memory=2 << 20)
        ...

Submodules load lazily: the pure kernels (``hvjit.decode_buffer``) work without KVM.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Session": ("hvjit.session", "Session"),
    "Vm": ("hvjit.vm", "Vm"),
    "Vcpu": ("hvjit.vcpu", "Vcpu"),
    "VmExit": ("hvjit.exits", "VmExit"),
    "EmulationReport": ("hvjit.exits", "EmulationReport"),
    "VmExitCode": ("hvjit.abi", "VmExitCode"),
    "SuspendHow": ("hvjit.abi", "SuspendHow"),
    "Kvm": ("hvjit.system", "Kvm"),
    "assemble": ("hvjit.asm", "assemble"),
    "decode_buffer": ("hvjit.kernels.decode", "decode_buffer"),
    "decode": ("hvjit.kernels.decode", "decode"),
    "format_instruction": ("hvjit.kernels.format", "format_instruction"),
    "RunResult": ("hvjit.vcpu_threads", "RunResult"),
    "entry": ("hvjit.entry", None),
    "loaders": ("hvjit.loaders", None),
    "errors": ("hvjit.errors", None),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'hvjit' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
