"""numpy mirrors of the kernel's KVM structures, and the enums hvjit speaks.

The dtypes are the one Python-side description of each layout: kernels index them with
``r["field"]``, Python fills them and hands ``ffi.from_buffer`` pointers to the trampoline.
``tests/unit/test_abi.py`` compiles a C program against ``<linux/kvm.h>`` and checks every
size and offset here (``C_NAMES`` maps the flattened kvm_run fields to their C paths).
"""

from __future__ import annotations

import enum

import numpy as np

# ---- registers and state -------------------------------------------------------------------

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)
KVM_REGS_DTYPE = np.dtype([(n, "<u8") for n in GPR_NAMES])

KVM_SEGMENT_DTYPE = np.dtype([
    ("base", "<u8"), ("limit", "<u4"), ("selector", "<u2"), ("type", "u1"),
    ("present", "u1"), ("dpl", "u1"), ("db", "u1"), ("s", "u1"), ("l", "u1"),
    ("g", "u1"), ("avl", "u1"), ("unusable", "u1"), ("padding", "u1"),
])
KVM_DTABLE_DTYPE = np.dtype([("base", "<u8"), ("limit", "<u2"), ("padding", "<u2", (3,))])
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
KVM_SREGS_DTYPE = np.dtype(
    [(n, KVM_SEGMENT_DTYPE) for n in SEGMENT_NAMES]
    + [("gdt", KVM_DTABLE_DTYPE), ("idt", KVM_DTABLE_DTYPE)]
    + [(n, "<u8") for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
    + [("interrupt_bitmap", "<u8", (4,))]
)

KVM_FPU_DTYPE = np.dtype([
    ("fpr", "u1", (8, 16)), ("fcw", "<u2"), ("fsw", "<u2"), ("ftwx", "u1"), ("pad1", "u1"),
    ("last_opcode", "<u2"), ("last_ip", "<u8"), ("last_dp", "<u8"), ("xmm", "u1", (16, 16)),
    ("mxcsr", "<u4"), ("pad2", "<u4"),
])

KVM_MSR_ENTRY_DTYPE = np.dtype([("index", "<u4"), ("reserved", "<u4"), ("data", "<u8")])

KVM_CPUID_ENTRY2_DTYPE = np.dtype([
    ("function", "<u4"), ("index", "<u4"), ("flags", "<u4"),
    ("eax", "<u4"), ("ebx", "<u4"), ("ecx", "<u4"), ("edx", "<u4"), ("padding", "<u4", (3,)),
])

KVM_VCPU_EVENTS_DTYPE = np.dtype([
    ("exception", [("injected", "u1"), ("nr", "u1"), ("has_error_code", "u1"),
                   ("pending", "u1"), ("error_code", "<u4")]),
    ("interrupt", [("injected", "u1"), ("nr", "u1"), ("soft", "u1"), ("shadow", "u1")]),
    ("nmi", [("injected", "u1"), ("pending", "u1"), ("masked", "u1"), ("pad", "u1")]),
    ("sipi_vector", "<u4"), ("flags", "<u4"),
    ("smi", [("smm", "u1"), ("pending", "u1"), ("smm_inside_nmi", "u1"), ("latched_init", "u1")]),
    ("triple_fault", [("pending", "u1")]),
    ("reserved", "u1", (26,)), ("exception_has_payload", "u1"), ("exception_payload", "<u8"),
], align=True)

KVM_XCR_DTYPE = np.dtype([("xcr", "<u4"), ("reserved", "<u4"), ("value", "<u8")])
KVM_MAX_XCRS = 16
KVM_XCRS_DTYPE = np.dtype([("nr_xcrs", "<u4"), ("flags", "<u4"), ("xcrs", KVM_XCR_DTYPE, (KVM_MAX_XCRS,)),
                           ("padding", "<u8", (16,))])
KVM_XSAVE_SIZE = 4096  # struct kvm_xsave; larger with dynamic features (KVM_CAP_XSAVE2)

KVM_GUEST_DEBUG_DTYPE = np.dtype([("control", "<u4"), ("pad", "<u4"), ("debugreg", "<u8", (8,))])
KVM_DEBUGREGS_DTYPE = np.dtype([("db", "<u8", (4,)), ("dr6", "<u8"), ("dr7", "<u8"), ("flags", "<u8"),
                                ("reserved", "<u8", (9,))])
KVM_MP_STATE_DTYPE = np.dtype([("mp_state", "<u4")])
KVM_LAPIC_STATE_DTYPE = np.dtype([("regs", "u1", (1024,))])

# VM-wide state of the in-kernel devices and kvmclock.
KVM_IRQCHIP_DTYPE = np.dtype([("chip_id", "<u4"), ("pad", "<u4"), ("chip", "u1", (512,))])
KVM_PIT_CHANNEL_STATE_DTYPE = np.dtype([
    ("count", "<u4"), ("latched_count", "<u2"), ("count_latched", "u1"), ("status_latched", "u1"),
    ("status", "u1"), ("read_state", "u1"), ("write_state", "u1"), ("write_latch", "u1"),
    ("rw_mode", "u1"), ("mode", "u1"), ("bcd", "u1"), ("gate", "u1"), ("count_load_time", "<i8"),
])
KVM_PIT_STATE2_DTYPE = np.dtype([("channels", KVM_PIT_CHANNEL_STATE_DTYPE, (3,)), ("flags", "<u4"),
                                 ("reserved", "<u4", (9,))])
KVM_CLOCK_DATA_DTYPE = np.dtype([("clock", "<u8"), ("flags", "<u4"), ("pad0", "<u4"), ("realtime", "<u8"),
                                 ("host_tsc", "<u8"), ("pad", "<u4", (4,))])

KVM_IRQ_ROUTING_ENTRY_DTYPE = np.dtype({
    "names": ["gsi", "type", "flags", "irqchip", "pin"],
    "formats": ["<u4"] * 5,
    "offsets": [0, 4, 8, 16, 20],
    "itemsize": 48,
})
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2

# KVM_X86_SET_MSR_FILTER: ``bitmap`` is a host pointer (one bit per MSR from ``base``, 1 = allow).
KVM_MSR_FILTER_RANGE_DTYPE = np.dtype([("flags", "<u4"), ("nmsrs", "<u4"), ("base", "<u4"),
                                       ("bitmap", "<u8")], align=True)
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_DTYPE = np.dtype([("flags", "<u4"),
                                 ("ranges", KVM_MSR_FILTER_RANGE_DTYPE, (KVM_MSR_FILTER_MAX_RANGES,))],
                                align=True)

HVT_LOOP_STATS_DTYPE = np.dtype([
    (n, "<u8") for n in ("exits", "pio", "mmio", "hlt", "last_reason", "last_port", "last_data")
])

# hvt_vm_reset's per-slot and per-vCPU records (trampoline/include/hvt.h); pointers as uint64.
HVT_RESET_SLOT_DTYPE = np.dtype([("slot", "<i4"), ("pad", "<u4"), ("npages", "<u8"), ("dst", "<u8"),
                                 ("src", "<u8"), ("bitmap", "<u8"), ("extra", "<u8"), ("host_dirty", "<u8"),
                                 ("logged", "<u8")])
HVT_RESET_VCPU_DTYPE = np.dtype([("fd", "<i4"), ("done", "<i4"), ("run", "<u8"), ("regs", "<u8"),
                                 ("sregs", "<u8"), ("events", "<u8"), ("xsave", "<u8"), ("xcrs", "<u8"),
                                 ("msrs", "<u8"), ("nmsrs", "<i4"), ("msrs_set", "<i4"), ("mp_state", "<u8"),
                                 ("lapic", "<u8"), ("debugregs", "<u8"), ("flags", "<u4"), ("pad", "<u4")])
HVT_RESET_VMSTATE_DTYPE = np.dtype([("irqchip", "<u8"), ("nirqchip", "<i4"), ("pad", "<u4"), ("pit2", "<u8"),
                                    ("clock", "<u8")])
HVT_RESET_ROWS_DTYPE = np.dtype([("live", "<u8"), ("saved", "<u8"), ("slots", "<u8"), ("count", "<i4"),
                                 ("row_bytes", "<u4"), ("touched", "<u8"), ("python", "<u8"), ("changed", "<u8")])
HVT_RESET_TALLY_DTYPE = np.dtype([("completed", "<i4"), ("synced", "<i4"), ("settled", "<i4"), ("left", "<u4")])
# KVM_CAP_DIRTY_LOG_RING: a ring entry, and hvt_dirty_rings_harvest's record.
KVM_DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
HVT_DIRTY_RINGS_DTYPE = np.dtype([("rings", "<u8"), ("fetch", "<u8"), ("count", "<i4"), ("entries", "<u4"),
                                  ("bitmaps", "<u8"), ("npages", "<u8"), ("nslots", "<i4"), ("pad", "<u4"),
                                  ("stray", "<u8")])


# ---- kvm_run, flattened: the union's members become prefixed fields at their offsets -------

_U = 32  # offset of the exit-specific union inside struct kvm_run
_KVM_RUN_FIELDS = [
    # (our name, C path, format, offset)
    ("request_interrupt_window", "request_interrupt_window", "u1", 0),
    ("immediate_exit", "immediate_exit", "u1", 1),
    ("exit_reason", "exit_reason", "<u4", 8),
    ("ready_for_interrupt_injection", "ready_for_interrupt_injection", "u1", 12),
    ("if_flag", "if_flag", "u1", 13),
    ("flags", "flags", "<u2", 14),
    ("cr8", "cr8", "<u8", 16),
    ("apic_base", "apic_base", "<u8", 24),
    ("hw_exit_reason", "hw.hardware_exit_reason", "<u8", _U),
    ("fail_entry_reason", "fail_entry.hardware_entry_failure_reason", "<u8", _U),
    ("fail_entry_cpu", "fail_entry.cpu", "<u4", _U + 8),
    ("ex_exception", "ex.exception", "<u4", _U),
    ("ex_error_code", "ex.error_code", "<u4", _U + 4),
    ("io_direction", "io.direction", "u1", _U),
    ("io_size", "io.size", "u1", _U + 1),
    ("io_port", "io.port", "<u2", _U + 2),
    ("io_count", "io.count", "<u4", _U + 4),
    ("io_data_offset", "io.data_offset", "<u8", _U + 8),
    ("debug_exception", "debug.arch.exception", "<u4", _U),
    ("debug_pc", "debug.arch.pc", "<u8", _U + 8),
    ("debug_dr6", "debug.arch.dr6", "<u8", _U + 16),
    ("debug_dr7", "debug.arch.dr7", "<u8", _U + 24),
    ("mmio_phys_addr", "mmio.phys_addr", "<u8", _U),
    ("mmio_data", "mmio.data", ("u1", (8,)), _U + 8),
    ("mmio_len", "mmio.len", "<u4", _U + 16),
    ("mmio_is_write", "mmio.is_write", "u1", _U + 20),
    ("hypercall_nr", "hypercall.nr", "<u8", _U),
    ("hypercall_args", "hypercall.args", ("<u8", (6,)), _U + 8),
    ("hypercall_ret", "hypercall.ret", "<u8", _U + 56),
    ("hypercall_longmode", "hypercall.longmode", "<u4", _U + 64),
    ("internal_suberror", "internal.suberror", "<u4", _U),
    ("internal_ndata", "internal.ndata", "<u4", _U + 4),
    ("internal_data", "internal.data", ("<u8", (16,)), _U + 8),
    ("emulation_flags", "emulation_failure.flags", "<u8", _U + 8),
    ("emulation_insn_size", "emulation_failure.insn_size", "u1", _U + 16),
    ("emulation_insn_bytes", "emulation_failure.insn_bytes", ("u1", (15,)), _U + 17),
    ("system_event_type", "system_event.type", "<u4", _U),
    ("system_event_ndata", "system_event.ndata", "<u4", _U + 4),
    ("system_event_data", "system_event.data", ("<u8", (16,)), _U + 8),
    ("msr_error", "msr.error", "u1", _U),
    ("msr_reason", "msr.reason", "<u4", _U + 8),
    ("msr_index", "msr.index", "<u4", _U + 12),
    ("msr_data", "msr.data", "<u8", _U + 16),
    ("kvm_valid_regs", "kvm_valid_regs", "<u8", 288),
    ("kvm_dirty_regs", "kvm_dirty_regs", "<u8", 296),
    ("sync_regs", "s.regs.regs", KVM_REGS_DTYPE, 304),
    ("sync_sregs", "s.regs.sregs", KVM_SREGS_DTYPE, 448),
    ("sync_events", "s.regs.events", KVM_VCPU_EVENTS_DTYPE, 760),
]
# kvm_valid_regs / kvm_dirty_regs bits (KVM_CAP_SYNC_REGS): state carried in kvm_run itself.
KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, KVM_SYNC_X86_EVENTS = 1, 2, 4
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1  # kvm_run.io.direction
KVM_RUN_SIZE = 2352  # sizeof(struct kvm_run) on x86-64
KVM_RUN_DTYPE = np.dtype({
    "names": [f[0] for f in _KVM_RUN_FIELDS],
    "formats": [f[2] for f in _KVM_RUN_FIELDS],
    "offsets": [f[3] for f in _KVM_RUN_FIELDS],
    "itemsize": KVM_RUN_SIZE,
})
C_NAMES = {
    "kvm_run": {f[0]: f[1] for f in _KVM_RUN_FIELDS},
    "kvm_irq_routing_entry": {"irqchip": "u.irqchip.irqchip", "pin": "u.irqchip.pin"},
    "kvm_irqchip": {"chip": "chip.dummy"},
}

# C struct name for each dtype, for the layout test and for documentation.
C_STRUCTS = {
    "kvm_regs": KVM_REGS_DTYPE,
    "kvm_segment": KVM_SEGMENT_DTYPE,
    "kvm_dtable": KVM_DTABLE_DTYPE,
    "kvm_sregs": KVM_SREGS_DTYPE,
    "kvm_fpu": KVM_FPU_DTYPE,
    "kvm_msr_entry": KVM_MSR_ENTRY_DTYPE,
    "kvm_cpuid_entry2": KVM_CPUID_ENTRY2_DTYPE,
    "kvm_vcpu_events": KVM_VCPU_EVENTS_DTYPE,
    "kvm_guest_debug": KVM_GUEST_DEBUG_DTYPE,
    "kvm_debugregs": KVM_DEBUGREGS_DTYPE,
    "kvm_mp_state": KVM_MP_STATE_DTYPE,
    "kvm_xcrs": KVM_XCRS_DTYPE,
    "kvm_lapic_state": KVM_LAPIC_STATE_DTYPE,
    "kvm_irqchip": KVM_IRQCHIP_DTYPE,
    "kvm_pit_channel_state": KVM_PIT_CHANNEL_STATE_DTYPE,
    "kvm_pit_state2": KVM_PIT_STATE2_DTYPE,
    "kvm_clock_data": KVM_CLOCK_DATA_DTYPE,
    "hvt_loop_stats": HVT_LOOP_STATS_DTYPE,
    "hvt_reset_slot": HVT_RESET_SLOT_DTYPE,
    "hvt_reset_vcpu": HVT_RESET_VCPU_DTYPE,
    "hvt_reset_vmstate": HVT_RESET_VMSTATE_DTYPE,
    "hvt_reset_rows": HVT_RESET_ROWS_DTYPE,
    "hvt_reset_tally": HVT_RESET_TALLY_DTYPE,
    "kvm_dirty_gfn": KVM_DIRTY_GFN_DTYPE,
    "hvt_dirty_rings": HVT_DIRTY_RINGS_DTYPE,
    "kvm_irq_routing_entry": KVM_IRQ_ROUTING_ENTRY_DTYPE,
    "kvm_msr_filter_range": KVM_MSR_FILTER_RANGE_DTYPE,
    "kvm_msr_filter": KVM_MSR_FILTER_DTYPE,
    "kvm_run": KVM_RUN_DTYPE,
}


# ---- KVM's numbers ----------------------------------------------------------------------------

class KvmExit(enum.IntEnum):
    """``kvm_run.exit_reason``."""
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    X86_BUS_LOCK = 33
    NOTIFY = 37


class KvmInternalError(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class KvmSystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class Cap(enum.IntEnum):
    """KVM capabilities hvjit looks at (numbers past the 6.1 headers defined here)."""
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    VAPIC = 6
    EXT_CPUID = 7
    CLOCKSOURCE = 8
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    NOP_IO_DELAY = 12
    PV_MMU = 13
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    IOMMU = 18
    DESTROY_MEMORY_REGION_WORKS = 21
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    REINJECT_CONTROL = 24
    IRQ_ROUTING = 25
    MCE = 31
    IRQFD = 32
    PIT2 = 33
    SET_BOOT_CPU_ID = 34
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    PCI_SEGMENT = 47
    INTR_SHADOW = 49
    DEBUGREGS = 50
    X86_ROBUST_SINGLESTEP = 51
    XSAVE = 55
    XCRS = 56
    ASYNC_PF = 59
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    SYNC_REGS = 74
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    GET_MSR_FEATURES = 153
    IMMEDIATE_EXIT = 136
    SPLIT_IRQCHIP = 121
    X86_DISABLE_EXITS = 143
    MSR_PLATFORM_INFO = 159
    EXCEPTION_PAYLOAD = 164
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    EXIT_HYPERCALL = 201
    BINARY_STATS_FD = 203
    DIRTY_LOG_RING = 192
    DIRTY_LOG_RING_ACQ_REL = 223
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    COALESCED_PIO = 162
    NESTED_STATE = 157
    X86_TRIPLE_FAULT_EVENT = 218
    XSAVE2 = 208
    MAX_VCPU_ID = 128
    INTERNAL_ERROR_DATA = 40
    X86_BUS_LOCK_EXIT = 193
    X86_NOTIFY_VMEXIT = 219


class VmExitCode(enum.IntEnum):
    """bhyve's ``vm_exitcode`` numbering, plus hvjit's own past MAX."""
    INOUT = 0
    VMX = 1
    BOGUS = 2
    RDMSR = 3
    WRMSR = 4
    HLT = 5
    MTRAP = 6
    PAUSE = 7
    PAGING = 8
    INST_EMUL = 9
    SPINUP_AP = 10
    RENDEZVOUS = 12
    IOAPIC_EOI = 13
    SUSPENDED = 14
    INOUT_STR = 15
    TASK_SWITCH = 16
    MONITOR = 17
    MWAIT = 18
    SVM = 19
    REQIDLE = 20
    DEBUG = 21
    VMINSN = 22
    BPT = 23
    IPI = 24
    DB = 25
    # hvjit's own:
    EMULATION_FAILURE = 64  # KVM_EXIT_INTERNAL_ERROR: KVM could not run an instruction
    HYPERCALL = 65
    TIMEOUT = 66  # the watchdog kicked the vCPU out
    FAIL_ENTRY = 67  # hardware refused VM entry
    SYSTEM_EVENT = 68
    UNKNOWN = 127


MMIO = VmExitCode.INST_EMUL  # bhyve reports MMIO as an instruction to emulate


class SuspendHow(enum.IntEnum):
    """bhyve's ``vm_suspend_how``."""
    NONE = 0
    RESET = 1
    POWEROFF = 2
    HALT = 3
    TRIPLEFAULT = 4
    DESTROY = 5


# ---- the normalised exit record the run loop fills (bhyve's struct vm_exit) -----------------

VM_EXIT_DTYPE = np.dtype([
    ("exitcode", "<i4"),
    ("kvm_reason", "<u4"),
    ("rip", "<u8"),
    # INOUT / INOUT_STR
    ("port", "<u2"), ("bytes", "u1"), ("is_in", "u1"), ("string", "u1"), ("rep", "u1"),
    ("count", "<u4"), ("data", "<u8"),
    # INST_EMUL (MMIO)
    ("gpa", "<u8"), ("mmio_len", "u1"), ("is_write", "u1"),
    # RDMSR / WRMSR
    ("msr_index", "<u4"), ("msr_data", "<u8"),
    # SUSPENDED
    ("how", "<u4"), ("code", "<u8"),
    # EMULATION_FAILURE / FAIL_ENTRY / SYSTEM_EVENT / UNKNOWN / DEBUG
    ("suberror", "<u4"), ("ndata", "<u4"), ("info", "<u8", (16,)),
])
