"""A vCPU's events: what is being delivered or pending, and injecting exceptions, NMIs and
external interrupts (bhyve's intinfo and ``vm_inject_*`` over KVM_GET/SET_VCPU_EVENTS,
KVM_NMI and KVM_INTERRUPT).

Injection follows the recipe measured on PVM, which is KVM's ABI everywhere: read the
events, change only the event's fields, keep ``flags`` as KVM returned them (a flag for a
capability the VM has not enabled makes KVM_SET_VCPU_EVENTS fail with EINVAL), write back.
Exceptions (vectors 0-31) are set as *injected*, so they are delivered at the next entry
with the vCPU's current RIP in the frame, as for a fault; vectors 32-255 go in as software
interrupts (KVM refuses exception numbers above 31). A #PF's CR2 travels as the event's
payload where the host has KVM_CAP_EXCEPTION_PAYLOAD (KVM writes CR2 when it delivers the
#PF, as a CPU does), else it is written through the special registers before the run.

An exception injected while another event is in flight combines as on x86 (SDM vol. 3,
tables 6-4 and 6-5; bhyve's ``nested_fault``): after a benign event the new one is
delivered; contributory then contributory, or #PF then #PF or contributory, becomes #DF(0);
anything while a #DF is in flight is a triple fault. The triple fault does what the
architecture says, shutdown: the vCPU's next run returns SUSPENDED/TRIPLEFAULT, as for a
guest's own triple fault (KVM_CAP_X86_TRIPLE_FAULT_EVENT; without it UnsupportedError).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union

from . import _trampoline as _t
from .abi import Cap
from .errors import InjectionError, UnsupportedError

# kvm_vcpu_events.flags
VALID_NMI_PENDING = 0x1
VALID_SIPI_VECTOR = 0x2
VALID_SHADOW = 0x4
VALID_SMM = 0x8
VALID_PAYLOAD = 0x10
VALID_TRIPLE_FAULT = 0x20

NMI_VECTOR = 2
DF_VECTOR = 8
PF_VECTOR = 14
VE_VECTOR = 20
# Exceptions that push an error code (#DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CONTRIBUTORY_VECTORS = frozenset({0, 10, 11, 12, 13})  # #DE, #TS, #NP, #SS, #GP
PAGE_FAULT_VECTORS = frozenset({PF_VECTOR, VE_VECTOR})
RFLAGS_IF = 1 << 9
CR0_PE = 1


class ExceptionClass(enum.Enum):
    """SDM vol. 3 table 6-4."""
    BENIGN = "benign"
    CONTRIBUTORY = "contributory"
    PAGE_FAULT = "page fault"


@dataclass(frozen=True)
class ExceptionEvent:
    """An exception (vector 0-31). ``pending``: not yet being delivered (KVM may still act
    on it; reported apart from injected ones only where KVM_CAP_EXCEPTION_PAYLOAD is
    enabled). ``payload``: CR2 of a #PF (DR6 bits of a #DB) that KVM writes on delivery."""
    vector: int
    error_code: Optional[int] = None
    pending: bool = False
    payload: Optional[int] = None


@dataclass(frozen=True)
class InterruptEvent:
    """An interrupt being delivered: external (KVM_INTERRUPT) or software (``soft``)."""
    vector: int
    soft: bool = False


@dataclass(frozen=True)
class NmiEvent:
    """An NMI being delivered."""
    vector: int = NMI_VECTOR


@dataclass(frozen=True)
class TripleFault:
    """The outcome of a fault while a #DF is in flight: the vCPU shuts down."""


TRIPLE_FAULT = TripleFault()
Event = Union[ExceptionEvent, InterruptEvent, NmiEvent]


@dataclass(frozen=True)
class IntInfo:
    """A vCPU's event state (KVM_GET/SET_VCPU_EVENTS; bhyve's intinfo and pending events).

    ``nmi_pending``: an NMI waits (KVM_NMI, or one blocked by ``nmi_masked``);
    ``interrupt_shadow``: KVM_X86_SHADOW_INT_MOV_SS (1) / _STI (2) bits;
    ``triple_fault``: a triple fault is requested (the next run shuts the vCPU down).
    KVM does not report a #BP, #OF or software interrupt being delivered (it could not say
    their instruction length): they do not appear here, and writing the events back (a later
    injection, :func:`set_intinfo`) drops them. The combination rules are unaffected: they
    are benign, so the new event is delivered either way.
    """
    exception: Optional[ExceptionEvent] = None
    interrupt: Optional[InterruptEvent] = None
    nmi_injected: bool = False
    nmi_pending: bool = False
    nmi_masked: bool = False
    interrupt_shadow: int = 0
    triple_fault: bool = False

    @property
    def in_flight(self) -> Optional[Event]:
        """The event being delivered, as the combination rules see it (exception first)."""
        if self.exception is not None:
            return self.exception
        if self.nmi_injected:
            return NmiEvent()
        return self.interrupt


# ---- the x86 rules (pure) -------------------------------------------------------------------

def exception_class(event: Event) -> ExceptionClass:
    """Interrupts and NMIs are benign; exceptions by vector (SDM table 6-4)."""
    if not isinstance(event, ExceptionEvent):
        return ExceptionClass.BENIGN
    if event.vector in PAGE_FAULT_VECTORS:
        return ExceptionClass.PAGE_FAULT
    if event.vector in CONTRIBUTORY_VECTORS:
        return ExceptionClass.CONTRIBUTORY
    return ExceptionClass.BENIGN


def combine(first: Optional[Event], second: Event) -> Union[Event, TripleFault]:
    """What is delivered when ``second`` arises while ``first`` is being delivered."""
    if first is None:
        return second
    if isinstance(first, ExceptionEvent) and first.vector == DF_VECTOR:
        return TRIPLE_FAULT
    c1, c2 = exception_class(first), exception_class(second)
    if (c1 is ExceptionClass.CONTRIBUTORY and c2 is ExceptionClass.CONTRIBUTORY) or (
            c1 is ExceptionClass.PAGE_FAULT and c2 is not ExceptionClass.BENIGN):
        return ExceptionEvent(DF_VECTOR, 0)
    return second


def exception_event(vector: int, error_code: Optional[int] = None,
                    cr2: Optional[int] = None) -> Event:
    """The event ``inject_exception`` delivers, after checking the arguments."""
    if not isinstance(vector, int) or not 0 <= vector <= 255:
        raise InjectionError(f"vector {vector!r} is not 0..255")
    if vector == NMI_VECTOR:
        raise InjectionError("vector 2 is the NMI: use inject_nmi()")
    if cr2 is not None and vector != PF_VECTOR:
        raise InjectionError(f"cr2 goes with a #PF (vector 14), not vector {vector}")
    if cr2 is not None and not 0 <= cr2 < 1 << 64:
        raise InjectionError(f"cr2 {cr2:#x} is not a 64-bit address")
    if vector >= 32:
        if error_code is not None:
            raise InjectionError(f"vector {vector} is delivered as a software interrupt, which has no error code")
        return InterruptEvent(vector, soft=True)
    if vector in ERROR_CODE_VECTORS:
        code = 0 if error_code is None else error_code
        if not isinstance(code, int) or not 0 <= code < 1 << 32:
            raise InjectionError(f"error code {code!r} of vector {vector} is not 32-bit")
        return ExceptionEvent(vector, code, payload=cr2)
    if error_code is not None:
        raise InjectionError(f"vector {vector} has no error code (those that do: {sorted(ERROR_CODE_VECTORS)})")
    return ExceptionEvent(vector)


# ---- the vCPU's events ------------------------------------------------------------------------

def from_record(ev) -> IntInfo:
    exc = ev["exception"]
    exception = None
    if exc["injected"] or exc["pending"]:
        exception = ExceptionEvent(
            int(exc["nr"]), int(exc["error_code"]) if exc["has_error_code"] else None,
            pending=bool(exc["pending"]) and not exc["injected"],
            payload=int(ev["exception_payload"]) if ev["exception_has_payload"] else None)
    intr = ev["interrupt"]
    interrupt = InterruptEvent(int(intr["nr"]), bool(intr["soft"])) if intr["injected"] else None
    return IntInfo(exception, interrupt, bool(ev["nmi"]["injected"]), bool(ev["nmi"]["pending"]),
                   bool(ev["nmi"]["masked"]), int(intr["shadow"]),
                   bool(ev["triple_fault"]["pending"]) if int(ev["flags"]) & VALID_TRIPLE_FAULT else False)


def get_intinfo(vcpu) -> IntInfo:
    return from_record(vcpu.get_events())


def set_intinfo(vcpu, info: IntInfo) -> None:
    """Write ``info`` as the vCPU's event state (SMM and SIPI state are kept)."""
    exc = info.exception
    if exc is not None:
        if not 0 <= exc.vector < 32 or exc.vector == NMI_VECTOR:
            raise InjectionError(f"exception vector {exc.vector} is not 0..31 (2 is the NMI)")
        if exc.error_code is not None and not 0 <= exc.error_code < 1 << 32:
            raise InjectionError(f"error code {exc.error_code:#x} is not 32-bit")
    if info.interrupt is not None and not 0 <= info.interrupt.vector <= 255:
        raise InjectionError(f"interrupt vector {info.interrupt.vector} is not 0..255")
    need = 0
    if exc is not None and (exc.pending or exc.payload is not None):
        need |= VALID_PAYLOAD
    if info.triple_fault:
        need |= VALID_TRIPLE_FAULT
    ev = _events_with(vcpu, need)
    _clear_in_flight(ev)
    if exc is not None:
        _put_exception(ev, exc)
    if info.interrupt is not None:
        ev["interrupt"]["injected"] = 1
        ev["interrupt"]["nr"] = info.interrupt.vector
        ev["interrupt"]["soft"] = int(info.interrupt.soft)
    ev["nmi"]["injected"] = int(info.nmi_injected)
    ev["nmi"]["pending"] = int(info.nmi_pending)
    ev["nmi"]["masked"] = int(info.nmi_masked)
    ev["interrupt"]["shadow"] = info.interrupt_shadow
    if int(ev["flags"]) & VALID_TRIPLE_FAULT:
        ev["triple_fault"]["pending"] = int(info.triple_fault)
    vcpu.set_events(ev)


def inject_exception(vcpu, vector: int, error_code: Optional[int] = None,
                     cr2: Optional[int] = None) -> Union[Event, TripleFault]:
    """Deliver exception ``vector`` at the vCPU's next entry; returns what will be delivered
    after the combination rules (the event itself, a #DF, or TRIPLE_FAULT)."""
    new = exception_event(vector, error_code, cr2)
    ev = vcpu.get_events()
    prior = from_record(ev).in_flight
    outcome = combine(prior, new)
    # A #PF sets CR2 when it is raised, even when what gets delivered is another event.
    for fault in (prior, new):
        if isinstance(fault, ExceptionEvent) and fault.vector == PF_VECTOR and fault.payload is not None \
                and fault is not outcome:
            vcpu.set_registers(cr2=fault.payload)
    if isinstance(outcome, TripleFault):
        ev = _events_with(vcpu, VALID_TRIPLE_FAULT)
        _clear_in_flight(ev)
        ev["triple_fault"]["pending"] = 1
        vcpu.set_events(ev)
        return TRIPLE_FAULT
    if isinstance(outcome, ExceptionEvent) and outcome.payload is not None:
        if vcpu.vm.kvm.has(Cap.EXCEPTION_PAYLOAD):
            ev = _events_with(vcpu, VALID_PAYLOAD)
            outcome = ExceptionEvent(outcome.vector, outcome.error_code, pending=True, payload=outcome.payload)
        else:  # CR2 now: KVM has no way to write it at delivery here
            vcpu.set_registers(cr2=outcome.payload)
            outcome = ExceptionEvent(outcome.vector, outcome.error_code)
    if isinstance(outcome, ExceptionEvent) and outcome.error_code is not None and not _protected(vcpu):
        outcome = ExceptionEvent(outcome.vector, None, outcome.pending, outcome.payload)  # real mode pushes none
    _clear_in_flight(ev)
    if isinstance(outcome, ExceptionEvent):
        _put_exception(ev, outcome)
    else:
        ev["interrupt"]["injected"] = 1
        ev["interrupt"]["nr"] = outcome.vector
        ev["interrupt"]["soft"] = 1
    vcpu.set_events(ev)
    return outcome


def inject_nmi(vcpu) -> None:
    """Queue an NMI (KVM_NMI): delivered when NMIs are not masked."""
    if not vcpu.vm.kvm.has(Cap.USER_NMI):
        raise UnsupportedError("KVM_NMI (KVM_CAP_USER_NMI)", vcpu.vm.kvm.flavour)
    vcpu._check_access("inject_nmi")
    vcpu._call(_t.lib.hvt_vcpu_inject_nmi(vcpu.fd), "KVM_NMI")


def inject_extint(vcpu, vector: int) -> InterruptEvent:
    """An external interrupt, as a PIC would deliver it (KVM_INTERRUPT).

    KVM delivers it at the next entry whatever RFLAGS.IF says, so it is refused (with
    InjectionError) while the guest does not accept interrupts: IF clear, an interrupt
    shadow, or another event in flight.
    """
    if not isinstance(vector, int) or not 0 <= vector <= 255:
        raise InjectionError(f"vector {vector!r} is not 0..255")
    if vcpu.vm.irqchip:
        raise InjectionError(f"VM {vcpu.vm.name!r} has an in-kernel irqchip, which owns external "
                             "interrupts: raise them through it with vm.irq_line(gsi, level)")
    info = get_intinfo(vcpu)
    if not vcpu.get_register("rflags") & RFLAGS_IF:
        raise InjectionError("the guest does not accept interrupts now (RFLAGS.IF is clear)")
    if info.interrupt_shadow:
        raise InjectionError("the guest does not accept interrupts now (interrupt shadow after sti/mov ss)")
    if info.in_flight is not None:
        raise InjectionError(f"another event is being delivered: {info.in_flight}")
    vcpu._call(_t.lib.hvt_vcpu_inject_interrupt(vcpu.fd, vector), "KVM_INTERRUPT")
    return InterruptEvent(vector)


def enable_flags(vcpu, flags: int) -> None:
    """Enable on the VM the capabilities behind these ``kvm_vcpu_events`` flags (exception
    payload, triple fault), so that a record carrying them, e.g. a snapshot's, can be set.
    No ioctl when ``flags`` has neither."""
    vm = vcpu.vm
    for flag, cap in _FLAG_CAPS.items():
        if flags & flag:
            if cap.name not in vm.kvm.capabilities:
                raise UnsupportedError(f"KVM_CAP_{cap.name}", vm.kvm.flavour,
                                       "needed for " + ("exception payloads and pending exceptions"
                                                        if flag == VALID_PAYLOAD else "a triple fault"))
            vm._kvm_call(_t.lib.hvt_vm_enable_cap(vm.fd, cap, 1, 0), f"KVM_ENABLE_CAP({cap.name})")


# ---- helpers ----------------------------------------------------------------------------------

_FLAG_CAPS = {VALID_PAYLOAD: Cap.EXCEPTION_PAYLOAD, VALID_TRIPLE_FAULT: Cap.X86_TRIPLE_FAULT_EVENT}


def _events_with(vcpu, flags: int):
    """The vCPU's events, after enabling on the VM the capabilities behind ``flags`` (KVM
    reports a flag once its capability is enabled)."""
    ev = vcpu.get_events()
    missing = flags & ~int(ev["flags"])
    if not missing:
        return ev
    enable_flags(vcpu, missing)
    return vcpu.get_events()


def _clear_in_flight(ev) -> None:
    exc = ev["exception"]
    exc["injected"] = exc["pending"] = exc["has_error_code"] = exc["nr"] = 0
    exc["error_code"] = 0
    ev["exception_has_payload"], ev["exception_payload"] = 0, 0
    ev["interrupt"]["injected"] = ev["interrupt"]["nr"] = ev["interrupt"]["soft"] = 0
    ev["nmi"]["injected"] = 0


def _put_exception(ev, exc: ExceptionEvent) -> None:
    e = ev["exception"]
    e["nr"] = exc.vector
    e["has_error_code"] = 0 if exc.error_code is None else 1
    e["error_code"] = exc.error_code or 0
    # Without the payload capability KVM ignores ``pending``: the measured recipe is injected.
    pending = exc.pending and bool(int(ev["flags"]) & VALID_PAYLOAD)
    e["pending"], e["injected"] = int(pending), int(not pending)
    if pending and exc.payload is not None:
        ev["exception_has_payload"], ev["exception_payload"] = 1, exc.payload


def _protected(vcpu) -> bool:
    return bool(vcpu.get_register("cr0") & CR0_PE)
