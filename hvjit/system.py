"""``/dev/kvm`` itself: availability, API version, capabilities, flavour, supported CPUID/MSRs.

One :class:`Kvm` per process is enough (``Kvm.instance()``); VMs are created from it.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from . import _trampoline as _t
from . import tsc
from .abi import KVM_CPUID_ENTRY2_DTYPE, KVM_MSR_ENTRY_DTYPE, Cap
from .errors import KvmUnavailableError

KVM_API_VERSION = 12
DEFAULT_DEVICE = "/dev/kvm"


def detect_flavour() -> str:
    """How this host's KVM virtualizes: 'vmx', 'svm', 'pvm' (software, kvm_pvm) or 'unknown'."""
    modules = Path("/sys/module")
    if (modules / "kvm_pvm").exists():
        return "pvm"
    if (modules / "kvm_intel").exists():
        return "vmx"
    if (modules / "kvm_amd").exists():
        return "svm"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    if " vmx" in flags:
        return "vmx"
    if " svm" in flags:
        return "svm"
    return "unknown"


def cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


@contextmanager
def scratch_vcpu(kvm: "Kvm") -> Iterator[Optional[int]]:
    """A throwaway VM's vCPU fd for probing (None if KVM would not create one)."""
    vm_fd = _t.lib.hvt_vm_create(kvm.fd, 0)
    if vm_fd < 0:
        yield None
        return
    run = _t.ffi.new("struct kvm_run **")
    fd = _t.lib.hvt_vcpu_create(vm_fd, 0, kvm.vcpu_mmap_size, run)
    try:
        yield fd if fd >= 0 else None
    finally:
        if fd >= 0:
            _t.lib.hvt_vcpu_destroy(fd, run[0], kvm.vcpu_mmap_size)
        _t.lib.hvt_sys_close(vm_fd)


def probe_tsc_khz(kvm: "Kvm") -> Optional[int]:
    """The guest TSC frequency KVM reports, from a throwaway VM and vCPU (None if not offered)."""
    if not kvm.has(Cap.GET_TSC_KHZ):
        return None
    with scratch_vcpu(kvm) as fd:
        khz = _t.lib.hvt_vcpu_get_tsc_khz(fd) if fd is not None else -1
    return khz if khz > 0 else None


class Kvm:
    """An open ``/dev/kvm``."""

    _instance: Optional["Kvm"] = None
    _instance_lock = threading.Lock()

    def __init__(self, path: str = DEFAULT_DEVICE):
        self.path = path
        if not os.path.exists(path):
            raise KvmUnavailableError(f"{path} does not exist: KVM is not available on this host "
                                      "(no kvm module, or not exposed to this container)")
        fd = _t.lib.hvt_sys_open(path.encode())
        if fd < 0:
            err = -fd
            why = {13: "permission denied (add the user to the 'kvm' group or run as root)",
                   1: "operation not permitted"}.get(err, os.strerror(err))
            raise KvmUnavailableError(f"cannot open {path}: {why}")
        self.fd = fd
        version = _t.lib.hvt_sys_api_version(fd)
        if version != KVM_API_VERSION:
            _t.lib.hvt_sys_close(fd)
            raise KvmUnavailableError(f"{path} speaks KVM API {version}, hvjit needs {KVM_API_VERSION}")
        self.api_version = version
        size = _t.lib.hvt_sys_vcpu_mmap_size(fd)
        if size < 4096:
            _t.lib.hvt_sys_close(fd)
            raise KvmUnavailableError(f"{path}: bad vCPU mmap size {size}")
        self.vcpu_mmap_size = size
        self._supported_cpuid: Optional[np.ndarray] = None
        # What hvjit learnt by running a probe guest on this host, by name: filled by the
        # layer that needs it (e.g. hvjit.reset's "out_exit_settled"), shown by `hvjit info`.
        self.behaviour: dict[str, bool] = {}

    @classmethod
    def instance(cls) -> "Kvm":
        """The process-wide ``/dev/kvm`` (opened on first use)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def close_instance(cls) -> None:
        """Close the process-wide ``/dev/kvm`` (the next :meth:`instance` opens it again, and
        probes the host afresh); no VM made from it may be left."""
        with cls._instance_lock:
            kvm, cls._instance = cls._instance, None
        if kvm is not None:
            _t.lib.hvt_sys_close(kvm.fd)

    def check_extension(self, cap: int) -> int:
        rc = _t.lib.hvt_sys_check_extension(self.fd, int(cap))
        return rc if rc > 0 else 0

    def has(self, cap: Cap) -> bool:
        return self.check_extension(cap) > 0

    @cached_property
    def capabilities(self) -> dict[str, int]:
        return {c.name: v for c in Cap if (v := self.check_extension(c))}

    @cached_property
    def tsc_khz(self) -> Optional[int]:
        """The TSC frequency KVM gives guests (None where KVM does not say)."""
        return probe_tsc_khz(self)

    @cached_property
    def flavour(self) -> str:
        return detect_flavour()

    def supported_cpuid(self) -> np.ndarray:
        """KVM_GET_SUPPORTED_CPUID: what a guest may be shown."""
        size = 128
        while True:
            entries = np.zeros(size, KVM_CPUID_ENTRY2_DTYPE)
            needed = _t.ffi.new("int *")
            rc = _t.lib.hvt_sys_get_supported_cpuid(self.fd, _t.ptr(entries), size, needed)
            if rc == -7 and size < 4096:  # E2BIG
                size *= 2
                continue
            _t.check(rc, "KVM_GET_SUPPORTED_CPUID")
            return entries[:rc].copy()

    def vcpu_cpuid(self, apic_id: int) -> np.ndarray:
        """The supported CPUID with ``apic_id`` as the initial (x2)APIC ID, for one vCPU."""
        if self._supported_cpuid is None:
            self._supported_cpuid = self.supported_cpuid()
        entries = self._supported_cpuid.copy()
        for e in entries:
            if e["function"] == 1:
                e["ebx"] = (int(e["ebx"]) & 0x00FFFFFF) | (apic_id & 0xFF) << 24
            elif e["function"] in (0xB, 0x1F):
                e["edx"] = apic_id
        return entries

    def _msr_list(self, fn, op: str) -> list[int]:
        size = 64
        while True:
            indices = np.zeros(size, np.uint32)
            needed = _t.ffi.new("int *")
            rc = fn(self.fd, _t.ptr(indices, "uint32_t *"), size, needed)
            if rc == -7 and needed[0] > size:  # E2BIG: KVM said how many
                size = needed[0]
                continue
            _t.check(rc, op)
            return [int(i) for i in indices[:rc]]

    def msr_index_list(self) -> list[int]:
        """MSRs KVM saves and restores for a guest (KVM_GET_MSR_INDEX_LIST)."""
        return self._msr_list(_t.lib.hvt_sys_get_msr_index_list, "KVM_GET_MSR_INDEX_LIST")

    def feature_msr_index_list(self) -> list[int]:
        if not self.has(Cap.GET_MSR_FEATURES):
            return []
        return self._msr_list(_t.lib.hvt_sys_get_msr_feature_index_list, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def feature_msrs(self) -> dict[int, int]:
        indices = self.feature_msr_index_list()
        entries = np.zeros(len(indices), KVM_MSR_ENTRY_DTYPE)
        entries["index"] = indices
        n = _t.check(_t.lib.hvt_sys_get_feature_msrs(self.fd, _t.ptr(entries), len(entries)), "KVM_GET_MSRS(features)")
        return {int(e["index"]): int(e["data"]) for e in entries[:n]}

    @cached_property
    def vcpu_controls(self) -> dict[str, object]:
        """What the vCPU control plane can use on this host (events, TSC, MSR traps)."""
        with scratch_vcpu(self) as fd:
            tsc_offset = tsc.probe_offset(fd) if fd is not None else "absent"
        return {
            "nmi": self.has(Cap.USER_NMI),
            "exception_payload": self.has(Cap.EXCEPTION_PAYLOAD),
            "triple_fault_event": self.has(Cap.X86_TRIPLE_FAULT_EVENT),
            "tsc_khz": self.has(Cap.TSC_CONTROL),
            "tsc_offset": tsc_offset,  # applied / ignored (accepted, not kept) / absent
            "msr_filter": self.has(Cap.X86_MSR_FILTER) and self.has(Cap.X86_USER_SPACE_MSR),
        }

    def info(self) -> dict:
        """What ``hvjit info`` prints."""
        return {
            "device": self.path,
            "available": True,
            "flavour": self.flavour,
            "api_version": self.api_version,
            "vcpu_mmap_size": self.vcpu_mmap_size,
            "cpu_vendor": cpu_vendor(),
            "cpu_model": cpu_model(),
            "tsc_khz": self.tsc_khz,
            "capabilities": self.capabilities,
            "msr_index_count": len(self.msr_index_list()),
            "feature_msr_count": len(self.feature_msr_index_list()),
            "host_msr_device": os.path.exists("/dev/cpu/0/msr"),
            "vcpu_controls": self.vcpu_controls,
        }
