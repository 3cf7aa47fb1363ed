"""Stopping a guest where the user wants: capabilities, single-step, breakpoints, watchpoints.

Everything goes through ``KVM_SET_GUEST_DEBUG``; what comes back differs by host, and this
module turns it into bhyve's exits: ``MTRAP`` after a single step, ``BPT`` at a breakpoint,
``DB`` at a watchpoint. Measured on a PVM host (ring 0 emulated by KVM):

- a single step at CPL3, and a guest ``int3`` (with software breakpoints enabled) at any CPL,
  come back as ``KVM_EXIT_SHUTDOWN`` — the same exit as a triple fault. They are told apart
  by what was asked (stepping) and by the 0xCC byte just before RIP (breakpoints; in 32-bit
  protected mode at CPL3, RIP stays on the breakpoint's own int3);
- a single step at CPL0 and hardware breakpoints at CPL0 come back as ``KVM_EXIT_DEBUG``;
- hardware breakpoints at CPL3 are not delivered, nor are watchpoints at any CPL (CPL0
  accesses run in KVM's emulator, which does not check data breakpoints): :func:`host_support`
  says so.

On VMX/SVM hosts everything arrives as ``KVM_EXIT_DEBUG`` (#DB or #BP) as KVM documents.

Software breakpoints patch 0xCC into guest memory through ``GuestMemory.patch``: reads
through hvjit (``vm.memory.read``, ``vcpu.read_virtual``) keep returning the guest's own
byte; numpy views from ``vm.memory.view`` see the patch. Continuing from a breakpoint takes
the breakpoint out, steps one instruction and puts it back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import numpy as np

from . import _trampoline as _t
from .abi import KVM_DEBUGREGS_DTYPE, KVM_GUEST_DEBUG_DTYPE, Cap, KvmExit, SuspendHow, VmExitCode
from .errors import GuestFault, HvjitError, UnsupportedError
from .exits import VmExit

GUESTDBG_ENABLE = 0x1
GUESTDBG_SINGLESTEP = 0x2
GUESTDBG_USE_SW_BP = 0x10000
GUESTDBG_USE_HW_BP = 0x20000
INT3 = 0xCC
DR6_BS = 1 << 14  # single-step
DR7_GLOBAL_ENABLE = 2  # G0; slot n is bit 2n+1
HW_SLOTS = 4
# DR7 R/W bits: what a hardware slot watches.
HW_KINDS = {"x": 0b00, "w": 0b01, "rw": 0b11}
HW_LENGTHS = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}

Address = Union[int, str]


class Capability(str, enum.Enum):
    """bhyve's ``vm_cap_type`` names for what makes a vCPU return to the host."""

    HALT_EXIT = "halt_exit"  # HLT returns to the caller (else the run loop resumes the guest)
    MTRAP_EXIT = "mtrap_exit"  # single-step: return after every instruction
    BPT_EXIT = "bpt_exit"  # a guest int3 returns to the host instead of the guest's IDT
    PAUSE_EXIT = "pause_exit"  # PAUSE returns to the host (spin-loop detection)


class DebugError(HvjitError, ValueError):
    """A breakpoint or watchpoint that cannot be placed (bad address, no free slot, ...)."""


def host_support(kvm) -> dict[str, str]:
    """What this host's KVM delivers for each debug control: 'yes', 'no' or a limit."""
    flavour = kvm.flavour
    can_debug = kvm.has(Cap.SET_GUEST_DEBUG)
    if not can_debug:
        return {c.value: "no" for c in Capability} | {"hw_breakpoints": "no", "watchpoints": "no"}
    pvm = flavour == "pvm"
    return {
        Capability.HALT_EXIT.value: "yes (without the in-kernel irqchip, which handles HLT itself)",
        Capability.MTRAP_EXIT.value: "yes" + (" (steps arrive as KVM_EXIT_SHUTDOWN at CPL3)" if pvm else ""),
        Capability.BPT_EXIT.value: "yes" + (" (int3 arrives as KVM_EXIT_SHUTDOWN)" if pvm else ""),
        Capability.PAUSE_EXIT.value: "no (KVM handles PAUSE itself; no capability exposes it)",
        "hw_breakpoints": "CPL0 only (not delivered at CPL3)" if pvm else "yes",
        # Measured: CPL0 data accesses run in KVM's instruction emulator, which ignores DR7.
        "watchpoints": "no (not delivered at CPL3; CPL0 accesses are emulated without them)" if pvm else "yes",
    }


@dataclass
class Breakpoint:
    """A software breakpoint: where the guest sees it (linear) and where the 0xCC is (physical)."""

    gla: int
    gpa: int
    symbol: str = ""


@dataclass
class HwSlot:
    address: int
    kind: str  # "x", "w" or "rw"
    length: int
    # Set for hvjit's own breakpoints (e.g. :mod:`hvjit.syscall_entry`): called with the
    # vCPU and the exit at a hit; returns None to let the guest go on, else the exit.
    on_hit: Optional[Callable] = None


@dataclass
class DebugState:
    """One vCPU's debug controls; ``apply`` hands them to KVM when they changed."""

    single_step: bool = False
    bpt_exit: bool = False
    halt_exit: bool = True
    hw: dict[int, HwSlot] = field(default_factory=dict)
    dirty: bool = False
    # The breakpoint (gla) the vCPU last stopped at: stepped over before the guest goes on.
    stopped_at: Optional[int] = None

    def control(self, software_breakpoints: bool) -> int:
        c = 0
        if self.single_step:
            c |= GUESTDBG_SINGLESTEP
        if software_breakpoints or self.bpt_exit:
            c |= GUESTDBG_USE_SW_BP
        if self.hw:
            c |= GUESTDBG_USE_HW_BP
        return c | GUESTDBG_ENABLE if c else 0


def apply(vcpu) -> None:
    """KVM_SET_GUEST_DEBUG with the vCPU's controls and the VM's breakpoints."""
    if vcpu._deferred:  # it reads RFLAGS: registers a reset left in kvm_run go first
        vcpu._flush_deferred()
    state: DebugState = vcpu._debug
    record = np.zeros(1, KVM_GUEST_DEBUG_DTYPE)
    record[0]["control"] = state.control(bool(vcpu.vm.breakpoints))
    dr7 = 0
    for slot, hw in state.hw.items():
        record[0]["debugreg"][slot] = hw.address
        dr7 |= DR7_GLOBAL_ENABLE << (2 * slot)
        dr7 |= (HW_KINDS[hw.kind] | HW_LENGTHS[hw.length] << 2) << (16 + 4 * slot)
    record[0]["debugreg"][7] = dr7
    vcpu._call(_t.lib.hvt_vcpu_set_guest_debug(vcpu.fd, _t.ptr(record)), "KVM_SET_GUEST_DEBUG")
    state.dirty = False


def _require_guest_debug(vcpu, what: str) -> None:
    kvm = vcpu.vm.kvm
    if not kvm.has(Cap.SET_GUEST_DEBUG):
        raise UnsupportedError(what, kvm.flavour, "KVM_CAP_SET_GUEST_DEBUG is missing")


# ---- capabilities ----------------------------------------------------------------------------


def get_capability(vcpu, cap: Union[Capability, str]) -> bool:
    cap = Capability(cap)
    state: DebugState = vcpu._debug
    if cap == Capability.HALT_EXIT:
        return state.halt_exit and not vcpu.vm.irqchip
    if cap == Capability.MTRAP_EXIT:
        return state.single_step
    if cap == Capability.BPT_EXIT:
        return state.bpt_exit
    return False


def set_capability(vcpu, cap: Union[Capability, str], on: bool) -> None:
    cap = Capability(cap)
    kvm = vcpu.vm.kvm
    state: DebugState = vcpu._debug
    if cap == Capability.HALT_EXIT:
        if on and vcpu.vm.irqchip:
            raise UnsupportedError("HALT_EXIT", kvm.flavour,
                                   "with the in-kernel irqchip KVM handles HLT and never exits")
        state.halt_exit = bool(on)
        return
    if cap == Capability.PAUSE_EXIT:
        if on:
            raise UnsupportedError("PAUSE_EXIT", kvm.flavour, "KVM handles PAUSE itself and offers no exit for it")
        return
    _require_guest_debug(vcpu, cap.name)
    if cap == Capability.MTRAP_EXIT:
        state.single_step = bool(on)
    else:
        state.bpt_exit = bool(on)
    state.dirty = True


# ---- breakpoints and watchpoints -------------------------------------------------------------


def resolve(vcpu, where: Address) -> tuple[int, str]:
    """(guest-linear address, symbol) for an address or an ELF symbol name."""
    symbols = vcpu.vm.symbols
    if isinstance(where, str):
        if symbols is None:
            raise DebugError(f"no symbols are loaded for VM {vcpu.vm.name!r}; give an address")
        try:
            return int(symbols.lookup(where)), where
        except Exception as e:  # noqa: BLE001 - the loader's lookup error, retyped
            raise DebugError(f"unknown symbol {where!r}: {e}") from None
    return int(where), symbolize(vcpu.vm, int(where))


def symbolize(vm, address: int) -> str:
    """The ELF symbol (``name+0x..``) at a guest address, or "" where none is known."""
    symbols = vm.symbols
    if symbols is None:
        return ""
    try:
        return symbols.symbolize(address)
    except Exception:  # noqa: BLE001 - an address outside every symbol: no name
        return ""


def add_breakpoint(vcpu, where: Address) -> Breakpoint:
    """Patch an int3 at ``where`` (linear address through this vCPU's paging, or a symbol)."""
    _require_guest_debug(vcpu, "software breakpoints")
    gla, symbol = resolve(vcpu, where)
    t = vcpu.translate(gla, access="x")
    if t.fault:
        raise DebugError(f"breakpoint at {gla:#x}: {t}")
    vm = vcpu.vm
    if not vm.memory.is_mapped(t.gpa):
        raise DebugError(f"breakpoint at {gla:#x}: guest-physical {t.gpa:#x} is not RAM")
    bp = Breakpoint(gla, t.gpa, symbol)
    vm.memory.patch(t.gpa, INT3)
    vm.breakpoints[gla] = bp
    for v in vm.vcpus:
        v._debug.dirty = True
    return bp


def remove_breakpoint(vcpu, where: Address) -> None:
    gla, _ = resolve(vcpu, where)
    vm = vcpu.vm
    bp = vm.breakpoints.pop(gla, None)
    if bp is None:
        raise DebugError(f"no breakpoint at {gla:#x}")
    vm.memory.unpatch(bp.gpa)
    for v in vm.vcpus:
        v._debug.dirty = True


def add_hw(vcpu, where: Address, kind: str = "x", length: int = 1, *,
           on_hit: Optional[Callable] = None) -> int:
    """A hardware breakpoint (``kind`` "x") or watchpoint ("w", "rw") in a free debug
    register; returns its slot (0-3). With ``on_hit`` the slot is hvjit's own: it takes the
    highest free register, and its hits go to ``on_hit`` instead of the caller."""
    _require_guest_debug(vcpu, "hardware breakpoints")
    if kind not in HW_KINDS:
        raise DebugError(f"kind must be one of {sorted(HW_KINDS)}, not {kind!r}")
    if kind != "x" and host_support(vcpu.vm.kvm)["watchpoints"].startswith("no"):
        raise UnsupportedError("watchpoints", vcpu.vm.kvm.flavour, "this KVM does not deliver data breakpoints")
    if kind == "x":
        length = 1
    if length not in HW_LENGTHS:
        raise DebugError(f"a watched length is 1, 2, 4 or 8 bytes, not {length}")
    gla, _ = resolve(vcpu, where)
    if gla % length:
        raise DebugError(f"a {length}-byte watchpoint needs a {length}-aligned address, not {gla:#x}")
    state: DebugState = vcpu._debug
    free = [s for s in range(HW_SLOTS) if s not in state.hw]
    if not free:
        raise DebugError("all four debug registers are in use")
    slot = free[-1] if on_hit is not None else free[0]
    state.hw[slot] = HwSlot(gla, kind, length, on_hit)
    state.dirty = True
    return slot


def remove_hw(vcpu, slot: int) -> None:
    hw = vcpu._debug.hw.get(slot)
    if hw is None or hw.on_hit is not None:
        raise DebugError(f"debug register slot {slot} is not in use" if hw is None else
                         f"debug register slot {slot} is hvjit's own ({hw.on_hit.__module__})")
    del vcpu._debug.hw[slot]
    vcpu._debug.dirty = True


def owned_hit(vcpu, exit_: VmExit) -> Optional[HwSlot]:
    """The slot of hvjit's own that this KVM_EXIT_DEBUG hit, if any."""
    if exit_.kvm_reason != KvmExit.DEBUG:
        return None
    dr6 = (list(exit_.info) + [0, 0, 0])[2]
    for s, hw in vcpu._debug.hw.items():
        if hw.on_hit is not None and dr6 & (1 << s):
            return hw
    return None


# ---- exits ----------------------------------------------------------------------------------


def _stop(vcpu, code: VmExitCode, rip: int, exit_: VmExit, **fields) -> VmExit:
    return replace(exit_, exitcode=code, rip=rip, symbol=symbolize(vcpu.vm, rip), **fields)


def classify(vcpu, exit_: VmExit) -> Optional[VmExit]:
    """A KVM_EXIT_DEBUG, or a KVM_EXIT_SHUTDOWN while debugging, as MTRAP/BPT/DB; None for
    a shutdown that is a real triple fault."""
    state: DebugState = vcpu._debug
    vm = vcpu.vm
    if exit_.kvm_reason == KvmExit.DEBUG:
        exception, pc, dr6 = (list(exit_.info) + [0, 0, 0])[:3]
        if exception == 3:  # #BP: software breakpoint (VMX/SVM), RIP on the int3
            return _stop(vcpu, VmExitCode.BPT, int(pc), exit_)
        hit = [s for s in state.hw if dr6 & (1 << s)]
        if hit:
            slot = state.hw[hit[0]]
            code = VmExitCode.BPT if slot.kind == "x" else VmExitCode.DB
            return _stop(vcpu, code, int(pc), exit_, info=(hit[0], slot.address, int(dr6)))
        if state.single_step or dr6 & DR6_BS:
            return _stop(vcpu, VmExitCode.MTRAP, int(pc), exit_)
        return _stop(vcpu, VmExitCode.DB, int(pc), exit_, info=(-1, 0, int(dr6)))
    # KVM_EXIT_SHUTDOWN (PVM's way of reporting a step and an int3).
    regs = vcpu.get_regs()
    rip = int(regs["rip"])
    if rip in vm.breakpoints and not state.single_step:  # 32-bit protected mode at CPL3:
        return _stop(vcpu, VmExitCode.BPT, rip, exit_, how=SuspendHow.NONE)  # RIP stays on the int3
    if (vm.breakpoints or state.bpt_exit) and _int3_before(vcpu, rip):
        regs["rip"] = rip - 1  # back onto the breakpoint, as VMX/SVM report it
        vcpu.set_regs(regs)
        return _stop(vcpu, VmExitCode.BPT, rip - 1, exit_, how=SuspendHow.NONE)
    if state.single_step:
        return _stop(vcpu, VmExitCode.MTRAP, rip, exit_, how=SuspendHow.NONE)
    return None


def _int3_before(vcpu, rip: int) -> bool:
    """Is the byte the CPU sees just before ``rip`` an int3 (ours or the guest's)? Read raw,
    not looked up: a breakpoint taken out to step over its one-byte instruction is not."""
    gla = rip - 1
    try:
        return vcpu.read_virtual(gla, 1, raw=True) == bytes([INT3])
    except GuestFault:
        return False


def is_debugging(vcpu) -> bool:
    """Are any controls on that make KVM report a shutdown for a step or an int3?"""
    state: DebugState = vcpu._debug
    return state.single_step or state.bpt_exit or bool(vcpu.vm.breakpoints)


def get_debugregs(vcpu) -> dict[str, int]:
    rec = vcpu._get_record(KVM_DEBUGREGS_DTYPE, _t.lib.hvt_vcpu_get_debugregs, "KVM_GET_DEBUGREGS")
    out = {f"dr{i}": int(rec["db"][i]) for i in range(4)}
    out.update(dr6=int(rec["dr6"]), dr7=int(rec["dr7"]))
    return out


def set_debugregs(vcpu, **values: int) -> None:
    rec = vcpu._get_record(KVM_DEBUGREGS_DTYPE, _t.lib.hvt_vcpu_get_debugregs, "KVM_GET_DEBUGREGS")
    for name, value in values.items():
        if name in ("dr6", "dr7"):
            rec[name] = value
        else:
            rec["db"][int(name[2])] = value
    rec["flags"] = 0
    vcpu._set_record(rec, KVM_DEBUGREGS_DTYPE, _t.lib.hvt_vcpu_set_debugregs, "KVM_SET_DEBUGREGS")
