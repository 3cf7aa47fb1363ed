"""Trapping chosen MSRs to Python: an MSR filter (KVM_X86_SET_MSR_FILTER) that denies the
guest's RDMSR/WRMSR of exactly those MSRs, and KVM_CAP_X86_USER_SPACE_MSR's FILTER reason,
which turns a denied access into an RDMSR/WRMSR exit instead of a #GP.

The exits reach the VM's MSR handlers (``exit_handlers`` dispatches them), so a trapped MSR
is answered by its handler even where KVM would have handled it itself. Every other MSR
stays KVM's: the filter allows by default, and each range's bitmap allows all but the
trapped MSRs. KVM always handles x2APIC MSRs (0x800-0x8ff) itself, whatever the filter says.
Reads and writes get ranges of their own, so an MSR can be trapped for one and not the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import numpy as np

from . import _trampoline as _t
from .abi import KVM_MSR_FILTER_DTYPE, KVM_MSR_FILTER_MAX_RANGES, Cap
from .errors import MsrTrapError, UnsupportedError

FILTER_READ, FILTER_WRITE = 1, 2  # KVM_MSR_FILTER_READ / _WRITE
FILTER_DEFAULT_ALLOW = 0
EXIT_REASON_FILTER = 4  # KVM_MSR_EXIT_REASON_FILTER
MAX_RANGE_MSRS = 0x600 * 8  # KVM_MSR_FILTER_MAX_BITMAP_SIZE bytes of bits
X2APIC_MSRS = range(0x800, 0x900)

MsrHandler = Callable[[int, bool, int], Optional[int]]


@dataclass
class MsrTraps:
    """The MSRs a VM traps, by operation."""
    reads: set[int] = field(default_factory=set)
    writes: set[int] = field(default_factory=set)


def _clusters(indices: set[int]) -> list[list[int]]:
    """Sorted indices cut into runs that one range's bitmap can cover."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and i - out[-1][0] < MAX_RANGE_MSRS:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def build_filter(traps: MsrTraps) -> tuple[np.ndarray, list[np.ndarray]]:
    """The ``kvm_msr_filter`` denying exactly the trapped accesses, and the bitmaps its
    ranges point at (keep them alive until the ioctl returned; KVM copies them)."""
    if traps.reads == traps.writes:
        plan = [(FILTER_READ | FILTER_WRITE, c) for c in _clusters(traps.reads)]
    else:
        plan = [(FILTER_READ, c) for c in _clusters(traps.reads)]
        plan += [(FILTER_WRITE, c) for c in _clusters(traps.writes)]
    if len(plan) > KVM_MSR_FILTER_MAX_RANGES:
        raise MsrTrapError(f"the trapped MSRs need {len(plan)} filter ranges; KVM takes at most "
                           f"{KVM_MSR_FILTER_MAX_RANGES} (ranges span up to {MAX_RANGE_MSRS:#x} MSRs)")
    filt = np.zeros(1, KVM_MSR_FILTER_DTYPE)
    filt[0]["flags"] = FILTER_DEFAULT_ALLOW
    bitmaps = []
    for r, (flags, cluster) in enumerate(plan):
        base, n = cluster[0], cluster[-1] - cluster[0] + 1
        bits = np.ones(n, np.uint8)
        bits[np.array(cluster) - base] = 0
        bitmap = np.zeros((n + 63) // 64 * 8, np.uint8)  # KVM reads whole longs
        bitmap[: (n + 7) // 8] = np.packbits(bits, bitorder="little")
        rng = filt[0]["ranges"][r]
        rng["flags"], rng["nmsrs"], rng["base"] = flags, n, base
        rng["bitmap"] = bitmap.ctypes.data
        bitmaps.append(bitmap)
    return filt, bitmaps


def trap(vm, handlers: Mapping[int, Optional[MsrHandler]], *, read: bool = True, write: bool = True) -> None:
    """Send the guest's accesses to these MSRs to their handlers (None stops trapping one)."""
    kvm = vm.kvm
    for cap in (Cap.X86_MSR_FILTER, Cap.X86_USER_SPACE_MSR):
        if not kvm.has(cap):
            raise UnsupportedError(f"KVM_CAP_{cap.name}", kvm.flavour, "needed to trap MSRs")
    for index, handler in handlers.items():
        if not isinstance(index, int) or not 0 <= index < 1 << 32:
            raise MsrTrapError(f"MSR index {index!r} is not 32-bit")
        if index in X2APIC_MSRS:
            raise MsrTrapError(f"MSR {index:#x} is an x2APIC register: KVM never filters those")
        if handler is not None and not callable(handler):
            raise MsrTrapError(f"the handler of MSR {index:#x} is not callable")
    traps = vm._msr_traps if vm._msr_traps is not None else MsrTraps()
    new = MsrTraps(set(traps.reads), set(traps.writes))
    for index, handler in handlers.items():
        for on, chosen in ((read, new.reads), (write, new.writes)):
            if handler is None:
                chosen.discard(index)
            elif on:
                chosen.add(index)
    filt, bitmaps = build_filter(new)  # referenced until the ioctl has copied them
    reasons = vm._msr_exits | EXIT_REASON_FILTER
    if reasons != vm._msr_exits:
        vm._kvm_call(_t.lib.hvt_vm_enable_cap(vm.fd, Cap.X86_USER_SPACE_MSR, reasons, 0),
                     "KVM_ENABLE_CAP(X86_USER_SPACE_MSR)")
        vm._msr_exits = reasons
    vm._kvm_call(_t.lib.hvt_vm_set_msr_filter(vm.fd, _t.ptr(filt)), "KVM_X86_SET_MSR_FILTER")
    vm._msr_traps = new
    for index, handler in handlers.items():
        if handler is None:
            vm._msr_handlers.pop(index, None)
        else:
            vm._msr_handlers[index] = handler
