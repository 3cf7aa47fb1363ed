"""Injecting exceptions, software interrupts, NMIs and external interrupts, at CPL0 and CPL3.

The guest has an IDT whose 256 handlers each store their RSP on entry, their vector and CR2
at RESULT and stop the guest (debug-exit code HANDLED). The test reads the architectural
frame at that RSP: the stack top is known (STACK at CPL0; TSS.RSP0, the system area, from
CPL3), so the frame's size says whether an error code was pushed, and the frame gives the
interrupted RIP and CS.
"""

from __future__ import annotations

import struct

import pytest

from hvjit import entry
from hvjit.abi import Cap, SuspendHow, VmExitCode
from hvjit.asm import assemble
from hvjit.errors import InjectionError
from hvjit.vcpu_events import (
    TRIPLE_FAULT,
    ExceptionEvent,
    InterruptEvent,
    IntInfo,
)

CODE, STUBS, IDT, RESULT, STACK = 0x1000, 0x2000, 0x6000, 0x7000, 0x9000
HANDLED, NOT_INTERRUPTED = 0x99, 0x77
# Reached only if nothing was injected: the first instruction is 1 byte long.
MAIN = f".code64\n nop\n nop\n mov ${NOT_INTERRUPTED}, %eax\n outl %eax, $0xf4\n"


def _stubs() -> str:
    lines = [".code64"]
    for v in range(256):
        lines += [f".org {v * 32}", f"  mov %rsp, {RESULT}", f"  movl ${v}, {RESULT + 8}", "  jmp common"]
    lines += [".org 256*32", "common:", "  mov %cr2, %rax", f"  mov %rax, {RESULT + 16}",
              f"  mov ${HANDLED}, %eax", "  outl %eax, $0xf4", "1: jmp 1b"]
    return "\n".join(lines)


def _gate(offset: int) -> bytes:
    """A 64-bit interrupt gate, DPL3 (so software interrupts from CPL3 pass), to CS 0x08."""
    return struct.pack("<HHBBHII", offset & 0xFFFF, entry.SEL_CODE64, 0, 0xEE, (offset >> 16) & 0xFFFF,
                       offset >> 32, 0)


class Guest:
    def __init__(self, session, name: str, cpl: int, source: str = MAIN, irqchip: bool = False):
        self.vm = vm = session.create_vm(name, memory=2 << 20, irqchip=irqchip)
        self.cpl = cpl
        vm.memory.write(CODE, assemble(source, CODE))
        vm.memory.write(STUBS, assemble(_stubs(), STUBS))
        vm.memory.write(IDT, b"".join(_gate(STUBS + 32 * v) for v in range(256)))
        self.vcpu = vcpu = vm.vcpu(0)
        state = entry.setup_long_mode(vcpu, CODE, cpl=cpl, stack=STACK)
        vcpu.set_desc("idtr", IDT, 256 * 16 - 1)
        self.stack_top = state.sysarea if cpl == 3 else STACK  # TSS.RSP0 is the system area

    def run_to_handler(self) -> dict:
        ex = self.vm.run(timeout=20)
        assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == HANDLED, ex
        mem = self.vm.memory
        rsp = mem.read_u64(RESULT)
        words = (self.stack_top - rsp) // 8
        assert words in (5, 6), f"frame of {words} words at {rsp:#x}"
        frame = [mem.read_u64(rsp + 8 * i) for i in range(words)]
        has_ec = words == 6
        return {"vector": mem.read_u32(RESULT + 8), "cr2": mem.read_u64(RESULT + 16),
                "error_code": frame[0] if has_ec else None,
                "rip": frame[has_ec], "cs": frame[has_ec + 1], "rflags": frame[has_ec + 2]}


def _cs(cpl: int) -> int:
    return entry.SEL_CODE64 if cpl == 0 else entry.SEL_USER_CODE64


def _soft_rips(vm, rip: int) -> set[int]:
    """Where the frame of a software interrupt/#BP points. Measured on PVM: the current RIP.
    KVM on SVM/VMX treats it as raised by the instruction at RIP and may point past it."""
    return {rip} if vm.kvm.flavour == "pvm" else {rip, rip + 1}


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("vector,error_code", [(13, 0x18), (6, None), (17, 0), (0, None), (3, None), (0x40, None)])
def test_injected_event_arrives_with_its_frame(session, cpl, vector, error_code):
    g = Guest(session, f"inj{cpl}-{vector}", cpl)
    result = g.vcpu.inject_exception(vector, error_code)
    if vector < 32:
        assert result == ExceptionEvent(vector, error_code)
    else:
        assert result == InterruptEvent(vector, soft=True)
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["cs"]) == (vector, error_code, _cs(cpl))
    if vector == 3 or vector >= 32:
        assert f["rip"] in _soft_rips(g.vm, CODE)
    else:
        assert f["rip"] == CODE


@pytest.mark.parametrize("cpl", [0, 3])
def test_page_fault_sets_cr2(session, cpl):
    g = Guest(session, f"pf{cpl}", cpl)
    addr = 0xDEAD_B000_1234
    assert g.vcpu.inject_exception(14, 0x6, cr2=addr).vector == 14
    # With KVM_CAP_EXCEPTION_PAYLOAD CR2 is written when the #PF is delivered, as on a CPU.
    before = g.vcpu.get_register("cr2")
    assert before == (0 if g.vm.kvm.has(Cap.EXCEPTION_PAYLOAD) else addr)
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["rip"], f["cs"], f["cr2"]) == (14, 0x6, CODE, _cs(cpl), addr)


def test_page_fault_error_code_defaults_to_zero(session):
    g = Guest(session, "pf-ec0", 0)
    g.vcpu.inject_exception(14, cr2=0x5000)
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["cr2"]) == (14, 0, 0x5000)


@pytest.mark.parametrize("cpl", [0, 3])
def test_injection_after_an_exit_interrupts_the_next_instruction(session, cpl):
    # CPL0 stops at HLT, CPL3 at an OUT to a port nobody claims: both return to the caller.
    stop = "hlt" if cpl == 0 else "outb %al, $0x99"
    g = Guest(session, f"mid{cpl}", cpl, f".code64\n nop\n {stop}\n nop\n mov ${NOT_INTERRUPTED}, %eax\n outl %eax, $0xf4\n")
    ex = g.vm.run(timeout=20)
    assert ex.exitcode in (VmExitCode.HLT, VmExitCode.INOUT)
    rip = g.vcpu.get_register("rip")
    assert rip > CODE + 1
    g.vcpu.inject_exception(13, 0)
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["rip"], f["cs"]) == (13, 0, rip, _cs(cpl))


@pytest.mark.parametrize("first,second,outcome,cr2", [
    ((13, 0), (13, 0), (8, 0), 0),            # contributory, contributory
    ((14, 2), (13, 0), (8, 0), 0x1000),       # #PF, contributory (CR2 from the #PF)
    ((14, 2), (14, 4), (8, 0), 0x2000),       # #PF, #PF (CR2 from the second)
    ((6, None), (13, 0x10), (13, 0x10), 0),   # benign first: the new one
    ((13, 0), (6, None), (6, None), 0),       # contributory, then benign: the new one
    ((13, 0), (14, 4), (14, 4), 0x2000),      # contributory, then #PF: the #PF
])
def test_exception_while_another_is_in_flight_combines(session, first, second, outcome, cr2):
    g = Guest(session, "nest", 0)
    g.vcpu.inject_exception(first[0], first[1], cr2=0x1000 if first[0] == 14 else None)
    got = g.vcpu.inject_exception(second[0], second[1], cr2=0x2000 if second[0] == 14 else None)
    assert (got.vector, got.error_code) == outcome
    info = g.vcpu.get_intinfo()
    assert info.exception is not None and (info.exception.vector, info.exception.error_code) == outcome
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["rip"], f["cr2"]) == (*outcome, CODE, cr2)


def test_fault_during_double_fault_shuts_the_vcpu_down(session):
    g = Guest(session, "triple", 3)
    g.vcpu.inject_exception(13, 0)
    assert g.vcpu.inject_exception(11, 0x20) == ExceptionEvent(8, 0)
    assert g.vcpu.inject_exception(6) is TRIPLE_FAULT
    info = g.vcpu.get_intinfo()
    assert info.triple_fault and info.exception is None
    ex = g.vm.run(timeout=20)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.TRIPLEFAULT


@pytest.mark.parametrize("cpl", [0, 3])
def test_nmi(session, cpl):
    g = Guest(session, f"nmi{cpl}", cpl)
    g.vcpu.inject_nmi()
    assert g.vcpu.get_intinfo().nmi_pending
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["rip"], f["cs"]) == (2, None, CODE, _cs(cpl))


@pytest.mark.parametrize("cpl", [0, 3])
def test_external_interrupt(session, cpl):
    g = Guest(session, f"extint{cpl}", cpl)
    rflags = g.vcpu.get_register("rflags") | 1 << 9
    g.vcpu.set_register("rflags", rflags)
    assert g.vcpu.inject_extint(0x31) == InterruptEvent(0x31)
    assert g.vcpu.get_intinfo().interrupt == InterruptEvent(0x31)
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["rip"], f["cs"], f["rflags"]) == (0x31, None, CODE, _cs(cpl), rflags)


def test_external_interrupt_waits_for_rflags_if(session):
    g = Guest(session, "extint-if0", 0)
    with pytest.raises(InjectionError, match="RFLAGS.IF"):
        g.vcpu.inject_extint(0x31)
    assert g.vcpu.get_intinfo().interrupt is None


def test_external_interrupt_with_an_irqchip_says_to_use_it(session):
    g = Guest(session, "extint-chip", 0, irqchip=True)
    g.vcpu.set_register("rflags", g.vcpu.get_register("rflags") | 1 << 9)
    with pytest.raises(InjectionError, match="irq_line"):
        g.vcpu.inject_extint(0x31)


def test_intinfo_round_trip_and_delivery(session):
    g = Guest(session, "intinfo", 3)
    assert g.vcpu.get_intinfo() == IntInfo()
    g.vcpu.set_intinfo(IntInfo(exception=ExceptionEvent(12, 0x28)))
    assert g.vcpu.get_intinfo().exception == ExceptionEvent(12, 0x28)
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["rip"], f["cs"]) == (12, 0x28, CODE, _cs(3))


@pytest.mark.parametrize("args,match", [
    ((256,), "not 0..255"),
    ((-1,), "not 0..255"),
    ((2,), "inject_nmi"),
    ((6, 0), "no error code"),
    ((0x40, 0), "no error code"),
    ((13, 1 << 32), "32-bit"),
    ((13, None, 0x1000), "cr2 goes with a #PF"),
])
def test_invalid_injections_are_typed_errors(session, args, match):
    g = Guest(session, "bad", 0)
    with pytest.raises(InjectionError, match=match):
        g.vcpu.inject_exception(*args)
    assert g.vcpu.get_intinfo() == IntInfo()  # nothing half-done
    with pytest.raises(InjectionError, match="not 0..255"):
        g.vcpu.inject_extint(300)


def test_a_snapshot_with_an_event_in_flight_restores_it(session):
    from hvjit.vm import Vm

    g = Guest(session, "snapev", 3)
    g.vcpu.inject_exception(14, 0x7, cr2=0xC0DE_0000)
    copy = Vm.restore(session, g.vm.snapshot(), name="snapev2")
    assert copy.vcpu(0).get_intinfo().exception == g.vcpu.get_intinfo().exception
    g.vm, g.vcpu = copy, copy.vcpu(0)
    f = g.run_to_handler()
    assert (f["vector"], f["error_code"], f["rip"], f["cr2"]) == (14, 0x7, CODE, 0xC0DE_0000)
