"""A vCPU's TSC: its frequency (KVM_SET_TSC_KHZ) and its offset from the host's TSC
(KVM_VCPU_TSC_OFFSET, a vCPU device attribute).

Both are checked rather than assumed: the frequency needs KVM_CAP_TSC_CONTROL, and the
offset is read back after it is set, because a host may accept it without applying it (PVM
does: its guests run RDTSC natively at CPL3, and the offset reads back as 0).
"""

from __future__ import annotations

import numpy as np

from . import _trampoline as _t
from .abi import Cap
from .errors import KvmError, UnsupportedError

TSC_CTRL_GROUP = 0  # KVM_VCPU_TSC_CTRL
TSC_OFFSET_ATTR = 0  # KVM_VCPU_TSC_OFFSET
MASK64 = (1 << 64) - 1


def set_khz(vcpu, khz: int) -> None:
    """Run the vCPU's TSC at ``khz`` kHz."""
    kvm = vcpu.vm.kvm
    if not kvm.has(Cap.TSC_CONTROL):
        raise UnsupportedError("KVM_SET_TSC_KHZ (KVM_CAP_TSC_CONTROL)", kvm.flavour,
                               f"the guest TSC stays at {vcpu.tsc_khz()} kHz")
    if not isinstance(khz, int) or not 0 < khz < 1 << 32:
        raise ValueError(f"TSC frequency {khz!r} kHz is not a positive 32-bit number")
    vcpu._check_access("set_tsc_khz")
    vcpu._call(_t.lib.hvt_vcpu_set_tsc_khz(vcpu.fd, khz), "KVM_SET_TSC_KHZ")


def has_offset(fd: int) -> bool:
    return _t.lib.hvt_vcpu_has_attr(fd, TSC_CTRL_GROUP, TSC_OFFSET_ATTR) == 0


def _read_offset(fd: int) -> int:
    value = np.zeros(1, np.uint64)
    _t.check(_t.lib.hvt_vcpu_get_attr(fd, TSC_CTRL_GROUP, TSC_OFFSET_ATTR, _t.ptr(value)),
             "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)")
    return int(value[0])


def _write_offset(fd: int, offset: int) -> None:
    value = np.array([offset & MASK64], np.uint64)
    _t.check(_t.lib.hvt_vcpu_set_attr(fd, TSC_CTRL_GROUP, TSC_OFFSET_ATTR, _t.ptr(value)),
             "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def get_offset(vcpu) -> int:
    """Guest TSC minus (scaled) host TSC, signed."""
    _require_offset(vcpu)
    return _signed(_read_offset(vcpu.fd))


def set_offset(vcpu, offset: int) -> None:
    """Make the guest's TSC read the host's plus ``offset`` (signed or two's complement)."""
    if not isinstance(offset, int) or not -(1 << 63) <= offset < 1 << 64:
        raise ValueError(f"TSC offset {offset!r} does not fit 64 bits")
    _require_offset(vcpu)
    _write_offset(vcpu.fd, offset)
    got = _read_offset(vcpu.fd)
    if got != offset & MASK64:
        raise UnsupportedError("KVM_VCPU_TSC_OFFSET", vcpu.vm.kvm.flavour,
                               f"KVM accepted offset {offset & MASK64:#x} but keeps {got:#x}")


def probe_offset(fd: int) -> str:
    """On a scratch vCPU: 'applied', 'ignored' (accepted, not kept) or 'absent'."""
    if not has_offset(fd):
        return "absent"
    try:
        _write_offset(fd, 1 << 40)
        return "applied" if _read_offset(fd) == 1 << 40 else "ignored"
    except KvmError:  # refused: the control is not there
        return "absent"


def _require_offset(vcpu) -> None:
    vcpu._check_access("TSC offset")
    if not has_offset(vcpu.fd):
        raise UnsupportedError("KVM_VCPU_TSC_OFFSET (vCPU attribute KVM_VCPU_TSC_CTRL/0)", vcpu.vm.kvm.flavour)
