"""The MSR prober, after VirtualBox SUPDrv's (``SUP_IOCTL_MSR_PROBER``): host and guest MSRs.

Three views of a model-specific register:

- **host** (:class:`HostMsrProber`): read, write and read-modify-write-restore on a host CPU
  through ``/dev/cpu/N/msr`` (the Linux msr driver). A #GP there is reported as ``faulted``,
  never raised. Only unrestricted sessions may touch host MSRs.
- **KVM** (:meth:`GuestMsrProber.kvm_values`): ``KVM_GET_MSRS`` on the probe vCPU, i.e. what a
  VMM saving the vCPU sees (host-initiated accesses, which KVM allows more liberally than a
  guest's), plus the feature MSRs of the system fd (``KVM_GET_MSR_FEATURE_INDEX_LIST``).
- **in-guest** (:meth:`GuestMsrProber.read`, :meth:`GuestMsrProber.writable_mask`): what a guest
  really sees. A tiny long-mode CPL0 guest executes RDMSR/WRMSR with every exception vector
  0-31 pointing at a stub that writes "faulted" to a port. The handler never returns (on the
  PVM host CPL0 exceptions arrive without their error code, so the stack layout is not to be
  trusted): the host instead puts the saved register snapshot back before each probe, and
  after any write also the saved special registers, the MSRs KVM saves for a VMM
  (``KVM_SET_MSRS``) and the guest pages the prober uses, so a write that breaks the guest
  (EFER, APIC base, TSC moving TSC_ADJUST, a paravirtual MSR making KVM write guest memory)
  cannot spoil later probes. One watchdog thread per prober kicks a run that hangs.
  ``kvm_value`` is read on the probe vCPU after its CPUID and long-mode entry state were
  set and before the guest first ran (so EFER shows LME|LMA; TSC has moved on by the time
  the guest reads it).

Writable bits: for each bit, one guest run does RDMSR (orig), WRMSR(orig ^ bit), RDMSR
(after), WRMSR(orig). The bit is writable when the WRMSR did not fault and ``after`` carries
the flipped bit. Before the 64 bit runs, one run writes the value back unchanged: if that
faults the MSR is read-only (mask 0) and the bit runs are skipped. Counters (TSC, APERF...)
show their low bits as "writable" because they move between the two reads. A ``--range``
probe finds writable bits only for ranges of at most :data:`RANGE_WRITABLE_LIMIT` MSRs (and
only for MSRs the guest can read); larger ranges are read-only surveys.

The in-guest vCPU gets KVM's supported CPUID (as ``-cpu host`` would) unless
``cpuid=None``: without CPUID entries KVM hides MSRs whose feature bit the guest lacks
(TSC_AUX, SPEC_CTRL...), even though ``KVM_GET_MSRS`` (host-initiated) still reads them.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import numpy as np

from .abi import KVM_CPUID_ENTRY2_DTYPE
from .errors import (
    AccessDeniedError,
    HostMsrUnavailableError,
    HvjitError,
    SessionClosedError,
)

# ---- names ----------------------------------------------------------------------------------

MSR_NAMES: dict[int, str] = {
    0x00000000: "P5_MC_ADDR",
    0x00000001: "P5_MC_TYPE",
    0x00000010: "TSC",
    0x00000011: "KVM_WALL_CLOCK",
    0x00000012: "KVM_SYSTEM_TIME",
    0x00000017: "PLATFORM_ID",
    0x0000001B: "APIC_BASE",
    0x00000034: "SMI_COUNT",
    0x00000035: "CORE_THREAD_COUNT",
    0x0000003A: "FEATURE_CONTROL",
    0x0000003B: "TSC_ADJUST",
    0x00000048: "SPEC_CTRL",
    0x00000049: "PRED_CMD",
    0x00000079: "BIOS_UPDT_TRIG",
    0x0000008B: "BIOS_SIGN_ID",
    0x000000C1: "PMC0",
    0x000000CE: "PLATFORM_INFO",
    0x000000E1: "UMWAIT_CONTROL",
    0x000000E7: "MPERF",
    0x000000E8: "APERF",
    0x000000FE: "MTRRCAP",
    0x0000010A: "ARCH_CAPABILITIES",
    0x0000010B: "FLUSH_CMD",
    0x00000122: "TSX_CTRL",
    0x00000140: "MISC_FEATURES_ENABLES",
    0x00000174: "SYSENTER_CS",
    0x00000175: "SYSENTER_ESP",
    0x00000176: "SYSENTER_EIP",
    0x00000179: "MCG_CAP",
    0x0000017A: "MCG_STATUS",
    0x0000017B: "MCG_CTL",
    0x00000186: "PERFEVTSEL0",
    0x000001A0: "MISC_ENABLE",
    0x000001C4: "XFD",
    0x000001C5: "XFD_ERR",
    0x000001D9: "DEBUGCTL",
    0x000001DB: "LASTBRANCH_FROM_IP",
    0x000001DC: "LASTBRANCH_TO_IP",
    0x000001DD: "LASTINT_FROM_IP",
    0x000001DE: "LASTINT_TO_IP",
    0x000001FC: "POWER_CTL",
    0x00000200: "MTRR_PHYSBASE0",
    0x00000201: "MTRR_PHYSMASK0",
    0x00000250: "MTRR_FIX64K_00000",
    0x00000258: "MTRR_FIX16K_80000",
    0x00000259: "MTRR_FIX16K_A0000",
    0x00000268: "MTRR_FIX4K_C0000",
    0x00000277: "PAT",
    0x000002FF: "MTRR_DEF_TYPE",
    0x00000345: "PERF_CAPABILITIES",
    0x0000038D: "FIXED_CTR_CTRL",
    0x0000038F: "PERF_GLOBAL_CTRL",
    0x00000400: "MC0_CTL",
    0x00000401: "MC0_STATUS",
    0x00000480: "VMX_BASIC",
    0x000004D0: "MCG_EXT_CTL",
    0x000006E0: "TSC_DEADLINE",
    0x00000802: "X2APIC_APICID",
    0x00000803: "X2APIC_VERSION",
    0x00000DA0: "XSS",
    0x40000000: "HV_GUEST_OS_ID",
    0x40000001: "HV_HYPERCALL",
    0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN",
    0x4B564D03: "KVM_STEAL_TIME",
    0x4B564D04: "KVM_PV_EOI_EN",
    0x4B564D05: "KVM_POLL_CONTROL",
    0x4B564D06: "KVM_ASYNC_PF_INT",
    0x4B564D07: "KVM_ASYNC_PF_ACK",
    0x4B564D08: "KVM_MIGRATION_CONTROL",
    0xC0000080: "EFER",
    0xC0000081: "STAR",
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SFMASK",
    0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE",
    0xC0000102: "KERNEL_GS_BASE",
    0xC0000103: "TSC_AUX",
    0xC0000104: "AMD_TSC_RATIO",
    0xC0010000: "AMD_PERF_CTL0",
    0xC0010004: "AMD_PERF_CTR0",
    0xC0010010: "AMD_SYSCFG",
    0xC0010015: "AMD_HWCR",
    0xC001001F: "AMD_NB_CFG",
    0xC0010055: "AMD_INT_PENDING",
    0xC0010114: "AMD_VM_CR",
    0xC0010117: "AMD_VM_HSAVE_PA",
    0xC001011F: "AMD_VIRT_SPEC_CTRL",
    0xC0010140: "AMD_OSVW_ID_LENGTH",
    0xC0010141: "AMD_OSVW_STATUS",
    0xC0011029: "AMD_DE_CFG",
}

# The well-known MSRs a default probe adds to KVM's lists: architectural ones a VMM or a
# guest kernel touches early, and the AMD ones that tell hosts apart.
DEFAULT_EXTRA_MSRS: tuple[int, ...] = (
    0x10, 0x1B, 0x3A, 0x3B, 0x48, 0x49, 0x8B, 0xCE, 0xFE, 0x10A, 0x174, 0x175, 0x176,
    0x179, 0x17A, 0x1A0, 0x1D9, 0x277, 0x2FF, 0x6E0,
    0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101,
    0xC0000102, 0xC0000103, 0xC0010015, 0xC0010114, 0xC0011029,
)

# A --range larger than this is a read-only survey (no writable-bit search).
RANGE_WRITABLE_LIMIT = 64

MSR_INDEX_MAX = (1 << 32) - 1


def msr_name(index: int) -> Optional[str]:
    """The name of a well-known MSR, or None (MTRR variable pairs and MC banks by pattern)."""
    index = int(index)
    name = MSR_NAMES.get(index)
    if name is not None:
        return name
    if 0x200 <= index <= 0x21F:
        return f"MTRR_PHYS{'MASK' if index & 1 else 'BASE'}{(index - 0x200) // 2}"
    if 0x269 <= index <= 0x26F:
        return f"MTRR_FIX4K_{0xC8000 + (index - 0x269) * 0x8000:05X}"
    if 0x400 <= index < 0x480:
        bank, reg = divmod(index - 0x400, 4)
        return f"MC{bank}_{('CTL', 'STATUS', 'ADDR', 'MISC')[reg]}"
    if 0x480 <= index <= 0x491:
        return "VMX_" + ("BASIC", "PINBASED_CTLS", "PROCBASED_CTLS", "EXIT_CTLS", "ENTRY_CTLS",
                         "MISC", "CR0_FIXED0", "CR0_FIXED1", "CR4_FIXED0", "CR4_FIXED1",
                         "VMCS_ENUM", "PROCBASED_CTLS2", "EPT_VPID_CAP", "TRUE_PINBASED_CTLS",
                         "TRUE_PROCBASED_CTLS", "TRUE_EXIT_CTLS", "TRUE_ENTRY_CTLS",
                         "VMFUNC")[index - 0x480]
    if 0x280 <= index <= 0x29F:
        return f"MC{index - 0x280}_CTL2"
    if 0x800 <= index <= 0x8FF:
        return f"X2APIC_{index - 0x800:#04x}"
    if 0xC1 <= index <= 0xC8:
        return f"PMC{index - 0xC1}"
    if 0x186 <= index <= 0x18D:
        return f"PERFEVTSEL{index - 0x186}"
    if 0xC0010000 <= index <= 0xC0010003:
        return f"AMD_PERF_CTL{index - 0xC0010000}"
    if 0xC0010004 <= index <= 0xC0010007:
        return f"AMD_PERF_CTR{index - 0xC0010004}"
    return None


def parse_range(text: str) -> tuple[int, int]:
    """``"A-B"`` (hex, ``0x`` optional; inclusive) as ``(first, last)``; a single index too."""
    parts = text.strip().split("-")
    try:
        if len(parts) == 1:
            first = last = int(parts[0], 16)
        elif len(parts) == 2:
            first, last = int(parts[0], 16), int(parts[1], 16)
        else:
            raise ValueError
    except ValueError:
        raise HvjitError(f"MSR range {text!r}: expected A-B in hex, e.g. 0x10-0x12 or c0000080-c0000084") from None
    if not 0 <= first <= last <= MSR_INDEX_MAX:
        raise HvjitError(f"MSR range {text!r}: need 0 <= A <= B <= {MSR_INDEX_MAX:#x}")
    return first, last


# ---- host MSRs -------------------------------------------------------------------------------


class HostMsrAvailability(NamedTuple):
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class HostMsrRead:
    cpu: int
    index: int
    value: Optional[int]  # None when faulted
    faulted: bool


@dataclass(frozen=True)
class HostMsrWrite:
    cpu: int
    index: int
    value: int
    faulted: bool


@dataclass(frozen=True)
class HostMsrModify:
    """SUPMSRPROBERMODIFYRESULT: before, written, after, and whether each step faulted."""

    cpu: int
    index: int
    and_mask: int
    or_mask: int
    before: Optional[int]
    before_faulted: bool
    written: Optional[int]
    modify_faulted: bool
    after: Optional[int]
    after_faulted: bool
    restored: bool
    restore_faulted: bool


def _msr_device(cpu: int) -> Path:
    return Path(f"/dev/cpu/{int(cpu)}/msr")


def host_msr_availability(cpu: int = 0) -> HostMsrAvailability:
    """Whether ``/dev/cpu/<cpu>/msr`` can be used, and why not."""
    dev = _msr_device(cpu)
    if not dev.exists():
        if not Path(f"/dev/cpu/{int(cpu)}").exists() and Path("/dev/cpu/0").exists():
            return HostMsrAvailability(False, f"{dev} is absent: there is no CPU {cpu}")
        if Path("/sys/module/msr").exists():
            why = "the msr driver is loaded but its device nodes are not exposed here (container?)"
        else:
            why = "the msr kernel module is not loaded (modprobe msr), or this is a container without it"
        return HostMsrAvailability(False, f"{dev} is absent: {why}")
    if not os.access(dev, os.R_OK):
        return HostMsrAvailability(False, f"{dev}: permission denied (needs root with CAP_SYS_RAWIO)")
    return HostMsrAvailability(True, f"{dev} is present")


def _check_session(session, what: str) -> None:
    if session is None:
        raise AccessDeniedError(f"{what} needs an unrestricted hvjit session")
    if session.closed:
        raise SessionClosedError(f"session {session.id} is closed")
    if session.restricted:
        raise AccessDeniedError(f"{what}: restricted sessions may not probe host MSRs")


class HostMsrProber:
    """Host MSRs through ``/dev/cpu/N/msr``; a #GP is reported (``faulted``), never raised.

    ``session`` must be an open, unrestricted :class:`~hvjit.session.Session`
    (:class:`AccessDeniedError` otherwise). An absent device raises
    :class:`HostMsrUnavailableError`; a permission problem :class:`AccessDeniedError`.
    """

    def __init__(self, session, cpu: int = 0):
        _check_session(session, "host MSR probing")
        self.session = session
        self.cpu = int(cpu)

    @staticmethod
    def available(cpu: int = 0) -> HostMsrAvailability:
        return host_msr_availability(cpu)

    def _call(self, rc: int, cpu: int, index: int, op: str) -> bool:
        """True when the access faulted; raises for anything but success or a fault."""
        if rc == 0:
            return False
        if rc == -errno.EIO:
            return True
        if rc in (-errno.ENOENT, -errno.ENXIO, -errno.ENODEV):
            raise HostMsrUnavailableError(host_msr_availability(cpu).reason
                                          + f" ({op} of MSR {index:#x} on CPU {cpu})")
        if rc in (-errno.EACCES, -errno.EPERM):
            raise AccessDeniedError(f"{op} of host MSR {index:#x} on CPU {cpu}: "
                                    f"{os.strerror(-rc)} (needs root with CAP_SYS_RAWIO)")
        raise HvjitError(f"{op} of host MSR {index:#x} on CPU {cpu}: "
                         f"{errno.errorcode.get(-rc, -rc)} ({os.strerror(-rc)})")

    def _prepare(self, index: int, cpu: Optional[int]) -> tuple[int, int]:
        _check_session(self.session, "host MSR probing")
        index = int(index)
        if not 0 <= index <= MSR_INDEX_MAX:
            raise ValueError(f"MSR index {index:#x} does not fit 32 bits")
        return (self.cpu if cpu is None else int(cpu)), index

    def _read(self, cpu: int, index: int) -> tuple[Optional[int], bool]:
        from . import _trampoline as _t

        out = _t.ffi.new("uint64_t *")
        faulted = self._call(_t.lib.hvt_msr_host_read(cpu, index, out), cpu, index, "read")
        return (None if faulted else int(out[0])), faulted

    def _write(self, cpu: int, index: int, value: int) -> bool:
        from . import _trampoline as _t

        return self._call(_t.lib.hvt_msr_host_write(cpu, index, value & (1 << 64) - 1), cpu, index, "write")

    def read(self, index: int, cpu: Optional[int] = None) -> HostMsrRead:
        cpu, index = self._prepare(index, cpu)
        value, faulted = self._read(cpu, index)
        return HostMsrRead(cpu, index, value, faulted)

    def write(self, index: int, value: int, cpu: Optional[int] = None) -> HostMsrWrite:
        cpu, index = self._prepare(index, cpu)
        value = int(value) & (1 << 64) - 1
        return HostMsrWrite(cpu, index, value, self._write(cpu, index, value))

    def modify(self, index: int, and_mask: int, or_mask: int, *, restore: bool = True,
               cpu: Optional[int] = None) -> HostMsrModify:
        """Read, write ``(value & and_mask) | or_mask``, read back, then (``restore``) put the
        original value back. Stops at a faulting read."""
        cpu, index = self._prepare(index, cpu)
        and_mask &= (1 << 64) - 1
        or_mask &= (1 << 64) - 1
        before, before_faulted = self._read(cpu, index)
        if before_faulted:
            return HostMsrModify(cpu, index, and_mask, or_mask, None, True, None, False, None,
                                 False, False, False)
        written = (before & and_mask) | or_mask
        modify_faulted = self._write(cpu, index, written)
        after, after_faulted = self._read(cpu, index)
        restored = restore_faulted = False
        if restore:
            restore_faulted = self._write(cpu, index, before)
            restored = not restore_faulted
        return HostMsrModify(cpu, index, and_mask, or_mask, before, False, written, modify_faulted,
                             after, after_faulted, restored, restore_faulted)


# ---- guest MSRs ------------------------------------------------------------------------------

PORT_DONE = 0xD0
PORT_FAULT = 0xD1
CODE_GPA = 0x1000
IDT_GPA = 0x2000
READ_OFF, WTEST_OFF, STUBS_OFF = 0x0, 0x40, 0x100
N_VECTORS = 32
GUEST_MEMORY = 2 << 20
VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}

# Stages (r12) at which a guest run can fault.
STAGE_READ, STAGE_WRITE, STAGE_READBACK, STAGE_RESTORE, STAGE_DONE = 1, 2, 3, 4, 5

# read: RCX=index -> RAX=value (64-bit). wtest: RCX=index, RBX=xor mask -> R8=orig,
# R9=written, R10=after; the original value is written back before reporting.
_GUEST_SOURCE = f"""
.code64
read:
    mov ${STAGE_READ}, %r12d
    rdmsr
    shl $32, %rdx
    mov %eax, %eax
    or %rdx, %rax
    mov ${STAGE_DONE}, %r12d
    outb %al, ${PORT_DONE}
    hlt
    jmp read
.org {WTEST_OFF:#x}
wtest:
    mov ${STAGE_READ}, %r12d
    rdmsr
    shl $32, %rdx
    mov %eax, %eax
    or %rdx, %rax
    mov %rax, %r8
    xor %rbx, %rax
    mov %rax, %r9
    mov %rax, %rdx
    shr $32, %rdx
    mov ${STAGE_WRITE}, %r12d
    wrmsr
    mov ${STAGE_READBACK}, %r12d
    rdmsr
    shl $32, %rdx
    mov %eax, %eax
    or %rdx, %rax
    mov %rax, %r10
    mov %r8, %rax
    mov %r8, %rdx
    shr $32, %rdx
    mov ${STAGE_RESTORE}, %r12d
    wrmsr
    mov ${STAGE_DONE}, %r12d
    outb %al, ${PORT_DONE}
    hlt
    jmp wtest
.org {STUBS_OFF:#x}
""" + "".join(f"""
.balign 16
    mov ${v}, %r13d
    outb %al, ${PORT_FAULT}
    hlt
    jmp .
""" for v in range(N_VECTORS))


def _idt_gate(offset: int, selector: int) -> bytes:
    """A 64-bit interrupt gate (P=1, DPL0, type 0xE, IST 0)."""
    lo = ((offset & 0xFFFF) | selector << 16 | 0x8E << 40 | ((offset >> 16) & 0xFFFF) << 48)
    return lo.to_bytes(8, "little") + (offset >> 32).to_bytes(8, "little")


@dataclass(frozen=True)
class GuestAccess:
    """One in-guest run: the value(s) on success, or the exception vector and the stage."""

    ok: bool
    value: Optional[int] = None  # read: the value; wtest: the value read back after the write
    original: Optional[int] = None
    written: Optional[int] = None
    vector: Optional[int] = None
    stage: int = 0
    broken: str = ""  # the guest left some other way (its exit, described)

    @property
    def fault_name(self) -> Optional[str]:
        if self.vector is None:
            return None
        return VECTOR_NAMES.get(self.vector, f"vector {self.vector}")


@dataclass
class MsrReport:
    """One MSR's row: KVM's view, the guest's view, and the guest-writable bits."""

    index: int
    name: Optional[str]
    kvm_value: Optional[int]  # KVM_GET_MSRS; None when KVM refused it
    guest_value: Optional[int]  # in-guest RDMSR; None when it faulted
    guest_fault: Optional[str]  # "#GP" (or another vector's name) when the read faulted
    writable_mask: Optional[int]  # None when not probed (unreadable, or a large range)
    feature_value: Optional[int] = None  # KVM_GET_MSRS on the system fd (feature MSRs)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_vm_serial = itertools.count(1)


class GuestMsrProber:
    """MSRs as a guest sees them: a 2 MiB long-mode CPL0 guest in a VM of ``session``.

    ``cpuid="supported"`` gives the vCPU KVM's supported CPUID first (None: no CPUID at
    all). ``timeout`` bounds each guest run. Close it (or use ``with``) to destroy the VM.
    """

    def __init__(self, session, *, cpuid: Optional[str] = "supported", timeout: float = 5.0):
        from . import entry
        from .asm import assemble

        if session.closed:
            raise SessionClosedError(f"session {session.id} is closed")
        if cpuid not in (None, "supported"):
            raise ValueError(f"cpuid must be 'supported' or None, not {cpuid!r}")
        self.session = session
        self.timeout = timeout
        self.cpuid = cpuid
        self.vm = session.create_vm(f"msr-probe-{next(_vm_serial)}", memory=GUEST_MEMORY, devices=False)
        try:
            self.vcpu = vcpu = self.vm.vcpu(0)
            if cpuid is None:  # vCPUs start with KVM's supported CPUID; None takes it away
                vcpu.set_cpuid(np.zeros(0, KVM_CPUID_ENTRY2_DTYPE))
            mem = self.vm.memory
            mem.write(CODE_GPA, assemble(_GUEST_SOURCE, CODE_GPA))
            state = entry.setup_long_mode(vcpu, CODE_GPA)
            gates = b"".join(_idt_gate(CODE_GPA + STUBS_OFF + 16 * v, entry.SEL_CODE64)
                             for v in range(N_VECTORS))
            mem.write(IDT_GPA, gates)
            self.vm.vcpu(0).set_desc("idtr", IDT_GPA, len(gates) - 1)
            self.sysarea = state.sysarea
            # The snapshot every probe starts from.
            self._regs = vcpu.get_regs()
            self._sregs = vcpu.get_sregs()
            # Code and IDT, and the GDT/TSS/page tables: what a guest write (an MSR making
            # KVM write guest memory) could spoil. The stack's contents never matter.
            self._saved_pages = [(gpa, mem.read(gpa, size))
                                 for gpa, size in ((CODE_GPA, IDT_GPA + 0x1000 - CODE_GPA),
                                                   (self.sysarea, entry.SYSAREA_SIZE))]
            # The MSRs KVM saves for a VMM, put back after every write probe (TSC writes
            # move TSC_ADJUST, and so on). Refused ones are left out.
            saved = self.kvm_values(self.vm.kvm.msr_index_list())
            self._saved_msrs = {i: v for i, v in saved.items() if v is not None}
            self._dirty = False
            self.runs = 0
            warm = self.read(0xC0000080)
            if not warm.ok:
                raise HvjitError(f"the MSR probe guest does not work here: reading EFER gave {warm}")
        except BaseException:
            self.close()
            raise

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        vm = getattr(self, "vm", None)
        if vm is not None and not vm.destroyed and not self.session.closed:
            self.session.destroy_vm(vm)

    def __enter__(self) -> "GuestMsrProber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- KVM's view ----------------------------------------------------------------------------

    def kvm_values(self, indices: Iterable[int]) -> dict[int, Optional[int]]:
        """KVM_GET_MSRS on the probe vCPU (None: refused)."""
        return self.vcpu.get_msrs(indices)

    def feature_values(self) -> dict[int, int]:
        """The feature MSRs KVM reports on the system fd (empty without the capability)."""
        kvm = self.vm.kvm
        if not kvm.feature_msr_index_list():
            return {}
        return kvm.feature_msrs()

    # -- the guest's view ----------------------------------------------------------------------

    def _restore(self) -> None:
        mem = self.vm.memory
        for gpa, data in self._saved_pages:
            mem.write(gpa, data)
        self.vcpu.set_sregs(self._sregs)
        items = list(self._saved_msrs.items())
        while items:  # KVM stops at the first MSR it refuses: skip it and go on
            n = self.vcpu.set_msrs(dict(items))
            items = items[n + 1:]
        self._dirty = False

    def _run(self, offset: int, rcx: int, rbx: int = 0) -> GuestAccess:
        from .abi import VmExitCode

        if self._dirty:
            self._restore()
        regs = self._regs.copy()
        regs["rip"] = CODE_GPA + offset
        regs["rcx"] = rcx
        regs["rbx"] = rbx
        vcpu = self.vcpu
        vcpu.set_regs(regs)
        self.runs += 1
        ex = vcpu.run(timeout=self.timeout)
        if ex.exitcode == VmExitCode.INOUT and not ex.is_in and ex.port in (PORT_DONE, PORT_FAULT):
            r = vcpu.get_regs()
            if ex.port == PORT_DONE:
                if offset == READ_OFF:
                    return GuestAccess(True, value=int(r["rax"]))
                return GuestAccess(True, value=int(r["r10"]), original=int(r["r8"]), written=int(r["r9"]))
            stage = int(r["r12"])
            if stage >= STAGE_WRITE:
                self._dirty = True
            return GuestAccess(False, vector=int(r["r13"]), stage=stage,
                               original=int(r["r8"]) if stage >= STAGE_WRITE else None,
                               written=int(r["r9"]) if stage >= STAGE_WRITE else None)
        self._dirty = True
        return GuestAccess(False, broken=str(ex))

    def read(self, index: int) -> GuestAccess:
        """RDMSR in the guest: ``ok`` with ``value``, or the fault's ``vector``."""
        return self._run(READ_OFF, _check_index(index))

    def write_test(self, index: int, xor_mask: int) -> GuestAccess:
        """RDMSR, WRMSR(orig ^ xor_mask), RDMSR back, WRMSR(orig) in one guest run."""
        res = self._run(WTEST_OFF, _check_index(index), int(xor_mask) & (1 << 64) - 1)
        if res.ok or res.written is not None:
            self._dirty = True  # the MSR was written: start the next probe from the snapshot
        return res

    def writable_mask(self, index: int) -> tuple[int, list[str]]:
        """The bits the guest can flip with WRMSR, and notes on anything unusual."""
        notes: list[str] = []
        first = self.write_test(index, 0)
        if not first.ok:
            if first.stage == STAGE_WRITE:
                return 0, [f"writing the value back raises {first.fault_name}: read-only"]
            if first.stage == STAGE_READ:
                return 0, [f"not readable in the guest ({first.fault_name or first.broken})"]
            notes.append(f"writing the value back: stage {first.stage} {first.fault_name or first.broken}")
            return 0, notes
        # A value that moves by itself (a counter) between the two reads of one run: judge
        # bits at or above `noise` on whether the high bits took the written value, and the
        # bits below it like the first bit above.
        noise = 0
        if first.value != first.original:
            noise = min(64, ((first.value - first.original) & (1 << 64) - 1).bit_length() + 2)
            notes.append(f"volatile (moved by {(first.value - first.original) & (1 << 64) - 1:#x} "
                         f"within one run): bits below {noise} inferred from bit {noise}")
        mask = 0
        broken = restore_faults = 0
        for bit in range(noise, 64) if noise < 64 else ():
            r = self.write_test(index, 1 << bit)
            if r.ok:
                took = (((r.value ^ r.written) >> noise) == 0) if noise else (r.value ^ r.original) >> bit & 1
                if took:
                    mask |= 1 << bit
            elif r.broken:
                broken |= 1 << bit
            elif r.stage in (STAGE_READBACK, STAGE_RESTORE):
                mask |= 1 << bit  # the write took; the guest could not read or undo it
                restore_faults |= 1 << bit
            if r.written is not None and not r.ok and r.stage >= STAGE_READBACK:
                self._restore_through_kvm(index, r.original)
        if noise and noise < 64 and mask >> noise & 1:
            mask |= (1 << noise) - 1
        if broken:
            notes.append(f"writes of bits {broken:#x} left the guest unable to report (state restored)")
        if restore_faults:
            notes.append(f"after flipping bits {restore_faults:#x} the guest could not restore the value "
                         "(e.g. a lock bit); restored through KVM_SET_MSRS")
        return mask, notes

    def _restore_through_kvm(self, index: int, value: Optional[int]) -> None:
        if value is None:
            return
        try:
            self.vcpu.set_msrs({index: value})
        except HvjitError:
            pass  # the snapshot restore of regs/sregs/memory still happens

    def probe(self, indices: Iterable[int], *, writable: bool = True,
              sources: Optional[dict[int, list[str]]] = None) -> list[MsrReport]:
        """Rows for ``indices`` (sorted, unique): KVM_GET_MSRS values read before any guest
        run, feature MSRs, in-guest reads and (``writable``) the guest-writable bits."""
        indices = sorted({_check_index(i) for i in indices})
        kvm = self.kvm_values(indices)
        features = self.feature_values()
        rows = []
        for index in indices:
            g = self.read(index)
            row = MsrReport(
                index=index, name=msr_name(index), kvm_value=kvm.get(index),
                guest_value=g.value if g.ok else None,
                guest_fault=None if g.ok else (g.fault_name or "broken"),
                writable_mask=None, feature_value=features.get(index),
                sources=list((sources or {}).get(index, [])),
            )
            if g.broken:
                row.notes.append(f"the read left the guest: {g.broken}")
            if g.ok and writable:
                row.writable_mask, notes = self.writable_mask(index)
                row.notes.extend(notes)
            rows.append(row)
        return rows


def _check_index(index) -> int:
    index = int(index)
    if not 0 <= index <= MSR_INDEX_MAX:
        raise ValueError(f"MSR index {index:#x} does not fit 32 bits")
    return index


def default_indices(kvm) -> dict[int, list[str]]:
    """KVM's saved-MSR list, its feature-MSR list and :data:`DEFAULT_EXTRA_MSRS`, each index
    with the lists it came from."""
    out: dict[int, list[str]] = {}
    for src, indices in (("index_list", kvm.msr_index_list()),
                         ("feature_list", kvm.feature_msr_index_list()),
                         ("well_known", DEFAULT_EXTRA_MSRS)):
        for i in indices:
            out.setdefault(int(i), []).append(src)
    return out


# ---- the command -----------------------------------------------------------------------------


def _kvm_param(name: str) -> Optional[str]:
    try:
        return Path(f"/sys/module/kvm/parameters/{name}").read_text().strip()
    except OSError:
        return None


def collect(*, msr_range: Optional[str] = None, host: bool = False, session=None) -> dict:
    """Everything ``hvjit msr-probe`` prints, as the JSON document."""
    from .session import Session
    from .system import Kvm, cpu_model

    kvm = Kvm.instance()
    if msr_range:
        first, last = parse_range(msr_range)
        sources = {i: ["range"] for i in range(first, last + 1)}
        writable = len(sources) <= RANGE_WRITABLE_LIMIT
    else:
        sources = default_indices(kvm)
        writable = True
    own = session is None
    s = Session() if own else session
    try:
        t0 = time.monotonic()
        with GuestMsrProber(s) as prober:
            rows = prober.probe(sources, writable=writable, sources=sources)
            runs = prober.runs
        elapsed = time.monotonic() - t0
        avail = host_msr_availability(0)
        host_probe: object
        if not host:
            host_probe = "not requested (use --host)"
        elif not avail:
            host_probe = f"absent: {avail.reason}"
        else:
            try:
                prober = HostMsrProber(s, 0)
                host_probe = [asdict(prober.read(r.index)) for r in rows]
            except (AccessDeniedError, HostMsrUnavailableError) as e:
                host_probe = f"unavailable: {e}"
    finally:
        if own:
            s.close()
    return {
        "host": {
            "flavour": kvm.flavour,
            "cpu": cpu_model(),
            "msr_device": bool(avail),
            "host_probe": host_probe,
            "kvm_ignore_msrs": _kvm_param("ignore_msrs"),
        },
        "guest": {
            "mode": "long mode, CPL0",
            "cpuid": "KVM_GET_SUPPORTED_CPUID",
            "kvm_value": "KVM_GET_MSRS on the probe vCPU in its entry state, before the guest ran",
            "writable_bits": writable,
            "runs": runs,
            "seconds": round(elapsed, 3),
        },
        "msrs": [r.to_dict() for r in rows],
    }


def _hex(v: Optional[int], width: int = 16) -> str:
    return "-" if v is None else f"{v:0{width}x}"


def format_table(doc: dict) -> str:
    lines = [f"{'index':>10}  {'name':<22} {'KVM_GET_MSRS':>16}  {'in guest':>16}  {'writable bits':>16}"]
    for m in doc["msrs"]:
        guest = m["guest_fault"] if m["guest_value"] is None else _hex(m["guest_value"])
        kvm = "refused" if m["kvm_value"] is None else _hex(m["kvm_value"])
        line = (f"{m['index']:#10x}  {(m['name'] or ''):<22} {kvm:>16}  {guest:>16}  "
                f"{_hex(m['writable_mask']):>16}")
        if m["feature_value"] is not None:
            line += f"  feature={m['feature_value']:#x}"
        lines.append(line)
    g, h = doc["guest"], doc["host"]
    n = len(doc["msrs"])
    gp = sum(m["guest_value"] is None for m in doc["msrs"])
    refused = sum(m["kvm_value"] is None for m in doc["msrs"])
    lines.append(f"{n} MSRs: {gp} fault in the guest, {refused} refused by KVM_GET_MSRS; "
                 f"{g['runs']} guest runs in {g['seconds']:.2f} s ({h['flavour']}, {h['cpu']})")
    hp = h["host_probe"]
    if isinstance(hp, str):
        lines.append(f"host MSRs: {hp}")
    else:
        faulted = sum(r["faulted"] for r in hp)
        lines.append(f"host MSRs (CPU 0): {len(hp) - faulted} read, {faulted} faulted")
        for r in hp:
            lines.append(f"  host {r['index']:#10x}  {'#GP' if r['faulted'] else _hex(r['value'])}")
    return "\n".join(lines)


def probe_main(args, out=None) -> int:
    """``hvjit msr-probe``: a table, or with ``--json`` the JSON document; exit status 0."""
    out = out or sys.stdout
    doc = collect(msr_range=getattr(args, "range", None), host=bool(getattr(args, "host", False)))
    if getattr(args, "json", False):
        json.dump(doc, out, indent=1)
        out.write("\n")
    else:
        out.write(format_table(doc) + "\n")
    return 0
