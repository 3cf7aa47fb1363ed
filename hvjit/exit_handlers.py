"""What Python does with an exit the native run loop handed back: bhyve's handler table.

The run loop normalises every exit into one ``VM_EXIT_DTYPE`` record; :data:`HANDLERS` maps
its exit code to one handler. A handler either completes the exit (a Python device, an MSR
handler, an emulated instruction) and returns None, so the vCPU resumes, or returns the
:class:`~hvjit.exits.VmExit` that ``Vcpu.run`` gives its caller. Exit codes without an entry
go to the caller as they are.
"""

from __future__ import annotations

import errno
from typing import Callable, Optional

import numpy as np

from . import vcpu_debug
from .abi import KvmExit, VmExitCode
from .errors import KvmError
from .exits import VmExit

ExitHandler = Callable[[object, np.void], Optional[VmExit]]


def to_caller(vcpu, rec) -> VmExit:
    """The exit as the caller sees it (with the vCPU's RIP now)."""
    return VmExit.from_record(rec, int(vcpu.get_regs()["rip"]))


def _port_io(vcpu, rec) -> Optional[VmExit]:
    """A port claimed by a Python handler: call it for each element of the access."""
    handler = vcpu.vm.bus.port_handler(int(rec["port"]))
    if handler is None:
        if vcpu.vm.unassigned_ports != "ones":
            return to_caller(vcpu, rec)
        handler = _unassigned_port
        vcpu.vm.unassigned_port_accesses += 1
    r, page = vcpu._run[0], vcpu._page
    size, count = int(r["io_size"]), int(r["io_count"])
    port, at = int(r["io_port"]), int(r["io_data_offset"])
    is_write = int(r["io_direction"]) == 1
    if at < 0 or at + size * count > page.size:
        raise KvmError("KVM_RUN", errno.EFAULT, f"port-IO data area {at:#x}+{size * count} outside the run page")
    for i in range(count):
        view = page[at + i * size : at + (i + 1) * size]
        value = int.from_bytes(view.tobytes(), "little") if is_write else 0
        result = handler(port, size, is_write, value)
        if not is_write:
            view[:] = np.frombuffer(int(result or 0).to_bytes(8, "little", signed=False)[:size], np.uint8)
    return None


def _unassigned_port(port: int, size: int, is_write: bool, value: int) -> int:
    """A port no device decodes, on a PC bus: reads float high, writes go nowhere."""
    return (1 << (8 * size)) - 1


def _mmio(vcpu, rec) -> Optional[VmExit]:
    """An MMIO access to a range a Python handler claimed."""
    handler = vcpu.vm.bus.mmio_handler(int(rec["gpa"]), int(rec["mmio_len"]))
    if handler is None:
        return to_caller(vcpu, rec)
    r = vcpu._run[0]
    size, gpa = int(r["mmio_len"]), int(r["mmio_phys_addr"])
    is_write = bool(r["mmio_is_write"])
    data = r["mmio_data"]
    value = int.from_bytes(data[:size].tobytes(), "little") if is_write else 0
    result = handler(gpa, size, is_write, value)
    if not is_write:
        data[:size] = np.frombuffer((int(result or 0) & ((1 << 64) - 1)).to_bytes(8, "little")[:size], np.uint8)
    return None


def _msr(vcpu, rec) -> Optional[VmExit]:
    """A user-space MSR exit: the handler's value, or a #GP when it returns None for a read
    (False for a write)."""
    handler = vcpu.vm.msr_handler(int(rec["msr_index"]))
    if handler is None:
        return to_caller(vcpu, rec)
    r = vcpu._run[0]
    index = int(r["msr_index"])
    extra = {"vcpu": vcpu} if getattr(handler, "takes_vcpu", False) else {}
    if int(rec["exitcode"]) == VmExitCode.WRMSR:
        ok = handler(index, True, int(r["msr_data"]), **extra)
        r["msr_error"] = 1 if ok is False else 0
    else:
        value = handler(index, False, 0, **extra)
        r["msr_error"] = 1 if value is None else 0
        r["msr_data"] = 0 if value is None else int(value) & (1 << 64) - 1
    return None


def _debug_stop(vcpu, rec) -> Optional[VmExit]:
    """KVM_EXIT_DEBUG, or a shutdown while debug controls are on: a step, a breakpoint or a
    watchpoint (see :mod:`hvjit.vcpu_debug`); a real triple fault goes to the caller."""
    exit_ = to_caller(vcpu, rec)
    owned = vcpu_debug.owned_hit(vcpu, exit_)
    if owned is not None and owned.on_hit is not None:
        return owned.on_hit(vcpu, exit_)
    shutdown = exit_.kvm_reason == KvmExit.SHUTDOWN
    if exit_.kvm_reason != KvmExit.DEBUG and not (shutdown and vcpu_debug.is_debugging(vcpu)):
        return exit_
    stop = vcpu_debug.classify(vcpu, exit_)
    return exit_ if stop is None else stop


def _emulation_failure(vcpu, rec) -> Optional[VmExit]:
    """KVM could not run an instruction: emulate it, or return the exit with a typed report."""
    from .emulation import handle_emulation_failure  # the decoder loads on the first failure

    return handle_emulation_failure(vcpu, to_caller(vcpu, rec))


def _unknown(vcpu, rec) -> Optional[VmExit]:
    """An exit the run loop has no code for. A full dirty ring (hvjit.dirty) is read and
    freed, and the guest goes on; anything else goes to the caller."""
    rings = vcpu.vm._rings
    if int(rec["kvm_reason"]) == KvmExit.DIRTY_RING_FULL and rings is not None:
        rings.drain(vcpu.vm)
        return None
    return to_caller(vcpu, rec)


HANDLERS: dict[int, ExitHandler] = {
    VmExitCode.INOUT: _port_io,
    VmExitCode.INOUT_STR: _port_io,
    VmExitCode.INST_EMUL: _mmio,
    VmExitCode.RDMSR: _msr,
    VmExitCode.WRMSR: _msr,
    VmExitCode.EMULATION_FAILURE: _emulation_failure,
    VmExitCode.DEBUG: _debug_stop,
    VmExitCode.SUSPENDED: _debug_stop,  # a PVM host reports steps and int3 as a shutdown
    VmExitCode.UNKNOWN: _unknown,
}


def handle(vcpu, rec) -> Optional[VmExit]:
    """Dispatch one exit record: None to resume the guest, else the exit for the caller.
    The VM's hooks (:mod:`hvjit.hooks`) see exits before the table and breakpoints after."""
    hooks = vcpu.vm.hooks
    if hooks.exit_hooks and hooks.on_exit(vcpu, rec):
        return None
    result = HANDLERS.get(int(rec["exitcode"]), to_caller)(vcpu, rec)
    if result is not None and result.exitcode == VmExitCode.BPT and result.rip in vcpu.vm.breakpoints:
        vcpu._debug.stopped_at = result.rip  # stepped over before the guest goes on
        if hooks.on_breakpoint(vcpu, result):
            return None  # a code hook's breakpoint: the guest goes on
    return result
