"""Completing the ``syscall`` entry a PVM host leaves half done.

On a PVM host a 64-bit guest's ``syscall`` at CPL3 loads RIP from LSTAR and saves RIP and
RFLAGS in RCX and R11, but leaves CS and SS at the user's selectors. The kernel's entry code
then runs at CPL3 and faults on its first instruction: a #PF on supervisor-only text, or a
#GP at ``swapgs``. The guest's own handler would call that a user segfault, so init dies at
its first system call.

hvjit finishes the architectural entry itself. When the guest programs LSTAR (an MSR trap),
the vCPU gets hardware breakpoints on the guest's #PF and #GP handlers (CPL0 code, where
PVM delivers them as ``KVM_EXIT_DEBUG``). At a hit, the exception frame tells the two cases
apart:

- frame RIP == LSTAR and a CPL3 CS: a system call. The frame is dropped, RSP is the user's
  again, CS/SS become STAR's kernel selectors, RFLAGS = R11 & ~FMASK, and the guest goes on
  at LSTAR at CPL0 — as a CPU would have entered it;
- anything else is an ordinary fault. The handler's first instruction (a NOP, ``endbr64``,
  ``clac`` or ``cld`` in a stock kernel) is executed here and the guest goes on after it,
  so the breakpoint does not fire again.

Only installed where the host has the quirk (``flavour == "pvm"``); on VMX/SVM ``syscall``
works and nothing is trapped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from . import vcpu_debug
from .abi import Cap
from .errors import GuestFault
from .exits import VmExit

MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
VECTOR_GP, VECTOR_PF = 13, 14
RFLAGS_RF, RFLAGS_AC, RFLAGS_DF, RFLAGS_FIXED = 1 << 16, 1 << 18, 1 << 10, 1 << 1
# Long-mode flat segments (VMX-style access: type | S<<4 | DPL<<5 | P<<7 | L<<13 | D<<14 | G<<15).
KERNEL_CS_ACCESS = 0xB | 1 << 4 | 1 << 7 | 1 << 13 | 1 << 15
KERNEL_SS_ACCESS = 0x3 | 1 << 4 | 1 << 7 | 1 << 14 | 1 << 15

# First instructions of an exception handler this module can execute itself: bytes -> what
# they do to RFLAGS (bits cleared, bits set). Alternatives patching leaves NOPs, clac or
# endbr64 at the top of Linux's entry stubs.
_LEADING = {
    b"\x90": (0, 0),
    b"\x66\x90": (0, 0),
    b"\x0f\x1f\x00": (0, 0),
    b"\x0f\x1f\x40\x00": (0, 0),
    b"\x0f\x1f\x44\x00\x00": (0, 0),
    b"\xf3\x0f\x1e\xfa": (0, 0),  # endbr64
    b"\x0f\x01\xca": (RFLAGS_AC, 0),  # clac
    b"\x0f\x01\xcb": (0, RFLAGS_AC),  # stac
    b"\xfc": (RFLAGS_DF, 0),  # cld
}


@dataclass
class SyscallStats:
    """What the fix-up did for one VM."""

    syscalls: int = 0  # system calls whose entry hvjit completed
    faults: int = 0  # ordinary #PF/#GP that went on to the guest's handler
    armed: int = 0  # times a vCPU's breakpoints were (re)armed


def install(vm) -> bool:
    """Trap the guest's writes of LSTAR so that each vCPU arms the fix-up once its kernel
    has set up system calls. False where the host cannot trap MSRs or set breakpoints."""
    kvm = vm.kvm
    if not all(kvm.has(c) for c in (Cap.X86_MSR_FILTER, Cap.X86_USER_SPACE_MSR, Cap.SET_GUEST_DEBUG)):
        return False
    vm.syscall_stats = SyscallStats()
    vm.trap_msrs({MSR_LSTAR: _LstarWrite(vm)}, read=False, write=True)
    return True


class _LstarWrite:
    """The LSTAR write handler: performs the write, then (re)arms the writing vCPU."""

    takes_vcpu = True  # exit_handlers passes the vCPU that wrote

    def __init__(self, vm):
        self.vm = vm

    def __call__(self, index: int, is_write: bool, value: int, vcpu=None) -> Optional[int]:
        if not is_write or vcpu is None:
            return None
        vcpu.set_msrs({MSR_LSTAR: value})  # a host-side write: the filter does not apply
        arm(vcpu)
        return True


def handler_address(vcpu, vector: int, sregs=None) -> Optional[int]:
    """The 64-bit IDT gate's target for ``vector``, or None if the IDT cannot be read."""
    sregs = vcpu.get_sregs() if sregs is None else sregs
    base, limit = int(sregs["idt"]["base"]), int(sregs["idt"]["limit"])
    if vector * 16 + 15 > limit:
        return None
    gate = _read_kernel(vcpu, base + vector * 16, 16)
    if gate is None:
        return None
    lo, _selector, _ist, _attr, mid, hi = struct.unpack("<HHBBHI", gate[:12])
    return lo | mid << 16 | hi << 32


def arm(vcpu) -> bool:
    """Put this module's breakpoints on the guest's #PF and #GP handlers (replacing earlier
    ones); False if the IDT or a handler's first instruction is not usable."""
    state: vcpu_debug.DebugState = vcpu._debug
    for slot in [s for s, hw in state.hw.items() if hw.on_hit is _on_hit]:
        del state.hw[slot]
    sregs = vcpu.get_sregs()
    targets = [handler_address(vcpu, v, sregs) for v in (VECTOR_PF, VECTOR_GP)]
    usable = [t for t in targets if t is not None and _leading(vcpu, t) is not None]
    if len(usable) != len(targets):
        state.dirty = True
        return False
    for target in usable:
        vcpu_debug.add_hw(vcpu, target, "x", on_hit=_on_hit)
    vcpu.vm.syscall_stats.armed += 1
    return True


def _leading(vcpu, address: int) -> Optional[tuple[int, int, int]]:
    """(length, RFLAGS bits cleared, set) of the instruction at ``address`` if it is one
    this module executes itself."""
    code = _read_kernel(vcpu, address, 5)
    if code is None:
        return None
    for pattern, (clear, set_) in _LEADING.items():
        if code.startswith(pattern):
            return len(pattern), clear, set_
    return None


def _read_kernel(vcpu, gla: int, n: int) -> Optional[bytes]:
    """Bytes of kernel memory as the CPU reads the IDT and fetches a handler: supervisor
    accesses, whatever the vCPU's CPL now (a restored guest may be in user mode)."""
    from .emulation import guest  # the page walker loads on first use
    from .kernels import pagewalk as pw

    kw, mem = guest.paging_registers(vcpu)
    setup = pw.copy_setup(mem, gla, n, access=pw.Access.READ, implicit_supervisor=True, **kw)
    if setup.fault is not None:
        return None
    memory = vcpu.vm.memory
    if not all(memory.is_mapped(gpa, size) for gpa, size in setup.chunks):
        return None
    return b"".join(memory.read(gpa, size) for gpa, size in setup.chunks)


def _on_hit(vcpu, exit_: VmExit) -> Optional[VmExit]:
    """A breakpoint on a #PF/#GP handler: complete a system call's entry, or step the
    handler past its first instruction. None: the guest goes on."""
    regs = vcpu.get_regs()
    rsp = int(regs["rsp"])
    try:
        # Error code, RIP, CS, RFLAGS, RSP, SS: #PF and #GP both push an error code.
        _error, rip, cs, _rflags, user_rsp, _ss = struct.unpack("<6Q", vcpu.read_virtual(rsp, 48))
    except GuestFault:
        rip = cs = user_rsp = 0
    stats = vcpu.vm.syscall_stats
    if cs & 3 == 3:
        msrs = vcpu.get_msrs([MSR_STAR, MSR_LSTAR, MSR_FMASK])
        if rip == msrs[MSR_LSTAR]:
            _enter_kernel(vcpu, regs, user_rsp, msrs[MSR_STAR] or 0, msrs[MSR_LSTAR] or 0, msrs[MSR_FMASK] or 0)
            stats.syscalls += 1
            return None
    at = int(regs["rip"])
    leading = _leading(vcpu, at)
    if leading is None:  # the guest rewrote its handler: stop watching, let it run
        arm(vcpu)
        return None
    length, clear, set_ = leading
    regs["rip"] = at + length
    regs["rflags"] = (int(regs["rflags"]) & ~clear) | set_
    vcpu.set_regs(regs)
    stats.faults += 1
    return None


def _enter_kernel(vcpu, regs, user_rsp: int, star: int, lstar: int, fmask: int) -> None:
    """What SYSCALL does in 64-bit mode (SDM Vol. 2B), from the state PVM left: RCX and R11
    already hold the return RIP and the old RFLAGS."""
    selector = (star >> 32) & 0xFFFC
    regs["rip"] = lstar
    regs["rsp"] = user_rsp
    regs["rflags"] = (int(regs["r11"]) & ~fmask & ~RFLAGS_RF) | RFLAGS_FIXED
    vcpu.set_regs(regs)
    sregs = vcpu.get_sregs()
    for name, sel, access in (("cs", selector, KERNEL_CS_ACCESS), ("ss", selector + 8, KERNEL_SS_ACCESS)):
        seg = sregs[name]
        seg["selector"], seg["base"], seg["limit"] = sel, 0, 0xFFFFFFFF
        seg["type"], seg["s"], seg["dpl"], seg["present"] = access & 0xF, 1, 0, 1
        seg["avl"], seg["l"], seg["db"], seg["g"], seg["unusable"] = 0, (access >> 13) & 1, (access >> 14) & 1, 1, 0
    vcpu.set_sregs(sregs)
