"""Flat binaries: the bytes go to one guest-physical address and run from there.

The entry state is chosen by the caller (``mode``: real, protected or long; ``cpl`` 0 or 3);
entry defaults to the load address.
"""

from __future__ import annotations

from typing import Optional

from ..errors import HvjitError, LoaderError
from . import BootInfo, Placer

DEFAULT_GPA = 0x1000


def load(vm, vcpu, data: bytes, *, gpa: Optional[int] = None, entry: Optional[int] = None,
         mode: str = "long", cpl: int = 0) -> BootInfo:
    from .. import entry as _entry

    gpa = DEFAULT_GPA if gpa is None else gpa
    if not isinstance(gpa, int) or gpa < 0:
        raise LoaderError(f"flat image load address {gpa!r} is not a non-negative integer")
    if not data:
        raise LoaderError("flat image is empty")
    try:
        mode = _entry.Mode(mode)
    except ValueError:
        raise LoaderError(f"unknown entry mode {mode!r}; known: real, protected, long") from None
    limit = {_entry.Mode.REAL: 0x100000, _entry.Mode.PROTECTED: 1 << 32}.get(mode)
    placer = Placer(vm, limit=limit)
    placer.claim(gpa, len(data), "flat image")
    entry = gpa if entry is None else entry
    if not isinstance(entry, int) or not gpa <= entry < gpa + len(data):
        shown = f"{entry:#x}" if isinstance(entry, int) else repr(entry)
        raise LoaderError(f"entry {shown} is outside the flat image [{gpa:#x}-{gpa + len(data):#x})")
    stack = None if mode == _entry.Mode.REAL else placer.boot_stack()
    vm.memory.write(gpa, data)
    try:
        state = _entry.setup_mode(vcpu, mode, entry, cpl=cpl, stack=stack)
    except HvjitError as e:
        raise LoaderError(f"cannot enter the flat image: {e}") from None
    return BootInfo(format="flat", entry=entry, mode=mode.value, stack=state.stack,
                    loaded=[("flat image", gpa, len(data))], memory_map=placer.memory_map)
