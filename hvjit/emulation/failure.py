"""What happens when KVM cannot run an instruction (KVM_EXIT_INTERNAL_ERROR).

``handle_emulation_failure(vcpu, exit_)`` fetches the instruction at RIP through the guest's
page tables (the bytes KVM captured with the exit win where they disagree: another vCPU may
have rewritten the code since), decodes it and either
emulates it in user space — returning None, so the run loop resumes the guest — or returns
the exit with a typed :class:`~hvjit.exits.EmulationReport` (rip, mode, bytes, decoded text,
reason). First :mod:`.faults` asks whether the CPU would refuse the instruction (bytes that
do not decode, a LOCK where none may be, VEX with AVX off, an instruction the guest's CPUID
does not advertise, ...): then its #UD/#NM/#GP goes to the guest, counted as
``<kind>_ud``/``_nm``/``_gp`` (``invalid_ud`` for undecodable bytes). Otherwise emulated,
each counted in ``vcpu.emulation_counts`` under the OpClass name (or :mod:`.faults`' name
for those an OpClass lumps together):

- ``int3`` and ``int n``: injected through KVM_SET_VCPU_EVENTS with RIP advanced to the next
  instruction (DESIGN.md's measured recipe: vectors 0-31 as an exception without error
  code, ``int n`` with n > 31 as a soft interrupt; ``flags`` kept as KVM returned them);
- data instructions run by ``hvjit.kernels.emulate`` against guest memory (page walk, RAM or
  a Python MMIO handler): CMPXCHG8B/16B, MOVBE, POPCNT and the MMIO set (MOV, MOVZX,
  MOVSX, MOVS, STOS, ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST, BT, PUSH, POP, group 1);
  cmpxchg8b/16b on aligned RAM is the host's own instruction (the emulation computes flags
  and registers from what memory held at that instant); another locked one (LOCK prefix)
  writes back with a compare-and-swap against what it read and runs again when its operand
  changed meanwhile (:mod:`.atomic`);
- the x87/SSE/XSAVE state instructions, with architectural checks and faults injected
  (#UD, #NM, #GP(0), #MF; RIP left on the instruction): ``xsetbv`` (XCR0 validated against
  CPUID 0xD.0, set with KVM_SET_XCRS), ``xgetbv`` (the real XCR0; ECX=1 gives XCR0 & XINUSE
  where XGETBV1 exists), ``xsave``/``xsaveopt`` (standard format), ``xsavec``/``xsaves``
  (compacted, :func:`compacted_offsets`), ``xrstor`` (both forms)/``xrstors``, ``fxsave``/
  ``fxrstor``, ``ldmxcsr``/``stmxcsr`` and their VEX forms, ``fwait``, and ``fninit``,
  ``fnclex``, ``fldcw``, ``fnstcw``, ``fnstsw``; the vCPU's state moves through
  KVM_GET/SET_XSAVE (standard format; XINUSE is approximated by its XSTATE_BV). XSAVEOPT,
  XSAVEC, XGETBV1 and XSAVES exist where the vCPU's CPUID or the host CPU has them (a PVM
  guest's CPL0 ``cpuid`` shows the host's);
- ``rdtscp`` (guest TSC from MSR 0x10 through KVM, TSC_AUX from MSR 0xc0000103) and
  ``rdpid``; ``rdpru``, ``invpcid`` (a TLB flush through KVM), ``rd``/``wr{fs,gs}base``,
  ``rdrand``/``rdseed`` (:mod:`.special`);
- ``clwb``, ``clflush``, ``clflushopt``: no-ops (guest memory is coherent host memory).

Anything else, a guest page fault while emulating, an exception the instruction would
raise, or MMIO without a Python handler: the report, e.g. text ``xsave [rax]`` and reason
``not emulated``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np

from .. import vcpu_debug
from ..abi import KvmInternalError, VmExitCode
from ..exits import EmulationReport, VmExit
from ..kernels import emulate as E
from ..kernels.decode import DecodeStatus, OpClass, decode
from ..kernels.format import format_instruction
from . import faults, special
from .atomic import compare_and_swap, exchange_if_equal
from .guest import (
    Fault,
    GuestAccessError,
    NotEmulated,
    chunks,
    cpl,
    cpu_mode,
    disassemble_text,
    fetch_code,
    inject_fault,
    inject_vector,
    instruction_bytes,
    paging_registers,
    read_phys,
    write_phys,
)
from .xstate import fpu_handler

MAX_REP_ITERATIONS = 4096  # per exit; a longer REP string resumes the guest mid-way
MAX_LOCKED_RETRIES = 1000  # a locked operand that keeps changing under the emulation
RFLAGS_AC = 1 << 18
MSR_IA32_TSC = 0x10
MSR_TSC_AUX = 0xC0000103


def report(vcpu, exit_: VmExit, rip: int, mode: str, code: bytes, text: str, reason: str,
           **extra) -> VmExit:
    """The exit with a typed report of why the instruction was not emulated."""
    report = EmulationReport(rip=rip, mode=mode, instruction=code, text=text, reason=reason,
                             suberror=exit_.suberror, extra=extra)
    return replace(exit_, report=report)


def count_emulated(vcpu, kind: str) -> None:
    counts = vcpu.emulation_counts
    counts[kind] = counts.get(kind, 0) + 1


@dataclass
class Failure:
    """One emulation failure, decoded: what every instruction-class handler works from."""

    vcpu: object
    exit: VmExit
    rec: np.void  # the VIE_DTYPE record
    regs: np.void
    sregs: np.void
    mode: str
    bitness: int
    rip: int
    code: bytes
    text: str
    kind: str  # the OpClass name, the key of vcpu.emulation_counts

    def report(self, reason: str) -> VmExit:
        return report(self.vcpu, self.exit, self.rip, self.mode, self.code, self.text, reason)

    def complete(self, name: Optional[str] = None) -> None:
        """The instruction ran: RIP past it, registers written back, counted."""
        wrap = {16: 0xFFFF, 32: 0xFFFFFFFF}.get(self.bitness, (1 << 64) - 1)
        self.regs["rip"] = (self.rip + int(self.rec["length"])) & wrap
        self.vcpu.set_regs(self.regs)
        count_emulated(self.vcpu, name or self.kind)

    def fault(self, vector: int, error_code: Optional[int] = None, name: Optional[str] = None) -> None:
        """The instruction raises an exception: delivered to the guest, RIP stays on it."""
        inject_fault(self.vcpu, vector, error_code)
        count_emulated(self.vcpu, name or self.kind)


# Each handler returns None (the guest resumes) or the exit with its report.
ClassHandler = Callable[[Failure], Optional[VmExit]]


def _software_interrupt(f: Failure) -> Optional[VmExit]:
    is_int3 = int(f.rec["op_class"]) == OpClass.INT3
    if is_int3 and (f.rip in f.vcpu.vm.breakpoints or f.vcpu._debug.bpt_exit):
        # A breakpoint (ours, or any int3 under BPT_EXIT): the host's, not the guest's IDT's.
        return replace(f.exit, exitcode=VmExitCode.BPT, rip=f.rip, report=None,
                       symbol=vcpu_debug.symbolize(f.vcpu.vm, f.rip))
    vector = 3 if is_int3 else int(f.rec["imm"]) & 0xFF
    inject_vector(f.vcpu, vector)
    f.complete()
    return None


def _cache_line_op(f: Failure) -> Optional[VmExit]:
    # Guest memory is coherent host memory: flushing and write-back have nothing to do.
    f.complete()
    return None


def _smap_ac(f: Failure) -> Optional[VmExit]:
    """CLAC/STAC toggle EFLAGS.AC (ring 0 and CPUID.SMAP: checked by :mod:`.faults`)."""
    if int(f.rec["op_class"]) == OpClass.CLAC:
        f.regs["rflags"] = int(f.regs["rflags"]) & ~RFLAGS_AC
    else:
        f.regs["rflags"] = int(f.regs["rflags"]) | RFLAGS_AC
    f.complete()
    return None


def _tsc_aux(f: Failure) -> Optional[VmExit]:
    """RDTSCP (guest TSC and TSC_AUX through KVM) and RDPID (TSC_AUX)."""
    try:
        aux = f.vcpu.get_msr(MSR_TSC_AUX) & 0xFFFFFFFF
    except Exception:  # noqa: BLE001 - KVM without TSC_AUX: 0, as a fresh vCPU has
        aux = 0
    if int(f.rec["op_class"]) == OpClass.RDTSCP:
        tsc = f.vcpu.get_msr(MSR_IA32_TSC)
        f.regs["rax"], f.regs["rdx"], f.regs["rcx"] = tsc & 0xFFFFFFFF, (tsc >> 32) & 0xFFFFFFFF, aux
    else:
        reg = int(f.rec["rm"])
        f.regs[E.REG_NAMES[reg] if reg < 16 else "rax"] = aux
    f.complete()
    return None


def _state_instruction(f: Failure) -> Optional[VmExit]:
    """x87/SSE/XSAVE state instructions (see :mod:`.xstate`)."""
    handler = fpu_handler(f.vcpu, f.rec, f.regs, f.sregs, f.bitness, int(f.rec["op_class"]))
    if handler is None:
        return f.report("not emulated")
    name, emulate = handler
    try:
        emulate()
    except Fault as fault:
        f.fault(fault.vector, fault.error_code, name)
        return None
    except (NotEmulated, GuestAccessError) as e:
        return f.report(f"not emulated: {e}")
    f.complete(name)
    return None


def _locked(rec) -> bool:
    """Whether the instruction's memory read-modify-write must be atomic: a LOCK prefix, or
    cmpxchg8b/16b (Linux's slab allocator runs them locked on shared freelists)."""
    return bool(rec["lock"]) or int(rec["op_class"]) in (OpClass.CMPXCHG8B, OpClass.CMPXCHG16B)


class _Changed(Exception):
    """A locked operand changed between the instruction's read and its write-back."""


CMPXCHG_WIDE = {int(OpClass.CMPXCHG8B): 8, int(OpClass.CMPXCHG16B): 16}


def _cmpxchg_wide(vcpu, rec, regs, pieces, mops, n: int) -> Optional[bytes]:
    """cmpxchg8b/16b as the host's own atomic instruction: the bytes its memory operand held
    at that instant (the emulation then computes flags and registers from them, and writes
    nothing back), or None where the general path must run it (not RAM, split, a breakpoint)."""
    size = CMPXCHG_WIDE.get(int(rec["op_class"]))
    if size is None or n != 1 or int(mops[0, 1]) != size or len(pieces[0]) != 1:
        return None
    half = size // 2

    def pair(low: str, high: str) -> bytes:
        mask = (1 << (8 * half)) - 1
        return (int(regs[low]) & mask).to_bytes(half, "little") + (int(regs[high]) & mask).to_bytes(half, "little")

    return exchange_if_equal(vcpu.vm.memory, pieces[0][0][0], pair("rax", "rdx"), pair("rbx", "rcx"))


def _write_back(vcpu, pieces, mops, mdata, read_data, n: int, locked: bool) -> None:
    """Store the instruction's results; a locked read-modify-write as a compare-and-swap
    against what it read (plainly where that cannot be done, as KVM does)."""
    for i in range(n):
        kind = int(mops[i, 2])
        if not kind & E.MemKind.WRITE:
            continue
        data = mdata[i, :int(mops[i, 1])].tobytes()
        if locked and kind & E.MemKind.READ and len(pieces[i]) == 1:
            swapped = compare_and_swap(vcpu.vm.memory, pieces[i][0][0], read_data[i], data)
            if swapped is False:
                raise _Changed()
            if swapped:
                continue
        at = 0
        for gpa, sz in pieces[i]:
            write_phys(vcpu, gpa, data[at:at + sz])
            at += sz


def _data_instruction(f: Failure) -> Optional[VmExit]:
    """Data instructions: the kernel's plan / read / execute / write protocol on guest memory."""
    vcpu, rec, regs, sregs, bitness = f.vcpu, f.rec, f.regs, f.sregs, f.bitness
    file = E.regs_from_kvm(regs)
    seg_bases = np.array([int(sregs[s]["base"]) for s in ("es", "cs", "ss", "ds", "fs", "gs")], np.uint64)
    stack_asz = 8 if bitness == 64 else (4 if sregs["ss"]["db"] else 2)
    mops, mdata, info = E.new_buffers()
    kw, mem = paging_registers(vcpu, sregs, regs)
    kw["set_ad"] = True
    locked = _locked(rec)
    status = E.EmulateStatus.REPEAT
    iterations = 0
    retries = 0
    try:
        while status == E.EmulateStatus.REPEAT and iterations < MAX_REP_ITERATIONS:
            before = file.copy()
            n = int(E.step(rec, file, bitness, seg_bases, stack_asz, mops, mdata, info, E.PHASE_PLAN))
            if n < 0:
                status = E.EmulateStatus(-n)
                break
            pieces = [chunks(vcpu, kw, mem, int(mops[i, 0]), int(mops[i, 1]), 1 if int(mops[i, 2]) & E.MemKind.WRITE else 0)
                      for i in range(n)]  # faults before any effect
            atomic = _cmpxchg_wide(vcpu, rec, regs, pieces, mops, n) if locked else None
            read_data = []
            for i in range(n):
                size, mkind = int(mops[i, 1]), int(mops[i, 2])
                data = b""
                if atomic is not None:
                    data = atomic  # what memory held when the host's cmpxchg ran
                elif mkind & E.MemKind.READ:
                    data = b"".join(read_phys(vcpu, gpa, sz) for gpa, sz in pieces[i])
                if data:
                    mdata[i, :size] = np.frombuffer(data, np.uint8)
                read_data.append(data)
            status = E.EmulateStatus(int(E.step(rec, file, bitness, seg_bases, stack_asz, mops, mdata, info,
                                                E.PHASE_EXECUTE)))
            if status not in (E.EmulateStatus.OK, E.EmulateStatus.REPEAT):
                break
            if atomic is not None:  # done by the host's instruction: nothing to write back
                iterations += 1
                continue
            try:
                _write_back(vcpu, pieces, mops, mdata, read_data, n, locked)
            except _Changed:
                retries += 1
                count_emulated(vcpu, "locked_retry")
                if retries > MAX_LOCKED_RETRIES:
                    return f.report(f"not emulated: its locked operand changed {retries} times under it")
                file[:] = before  # start over on the new value, as the CPU's locked access would
                status = E.EmulateStatus.REPEAT
                continue
            iterations += 1
    except GuestAccessError as e:
        return f.report(f"not emulated: {e}")
    if status == E.EmulateStatus.EXCEPTION:
        return f.report(f"raises exception {int(info[0])} (error code {int(info[1]):#x}); not injected")
    if status not in (E.EmulateStatus.OK, E.EmulateStatus.REPEAT):
        return f.report(f"not emulated ({status.name.lower()})")
    E.regs_to_kvm(file, regs)
    vcpu.set_regs(regs)
    count_emulated(vcpu, f.kind)
    return None


def _vcpu_state(run: Callable) -> ClassHandler:
    """A handler running one of :mod:`.special`'s functions on the failure's registers."""

    def handler(f: Failure) -> Optional[VmExit]:
        try:
            run(f.vcpu, f.rec, f.regs, f.sregs, f.bitness)
        except Fault as fault:
            f.fault(fault.vector, fault.error_code)
            return None
        except (NotEmulated, GuestAccessError) as e:
            return f.report(f"not emulated: {e}")
        f.complete()
        return None

    return handler


def _not_emulated(f: Failure) -> Optional[VmExit]:
    return f.report("not emulated")


# bhyve's table, by instruction class: what to do with each instruction KVM could not run.
BY_CLASS: dict[int, ClassHandler] = {
    OpClass.INT3: _software_interrupt,
    OpClass.INTN: _software_interrupt,
    OpClass.CLWB: _cache_line_op,
    OpClass.CLFLUSH: _cache_line_op,
    OpClass.CLFLUSHOPT: _cache_line_op,
    OpClass.CLAC: _smap_ac,
    OpClass.STAC: _smap_ac,
    OpClass.RDTSCP: _tsc_aux,
    OpClass.RDPID: _tsc_aux,
    OpClass.XSETBV: _state_instruction,
    OpClass.XGETBV: _state_instruction,
    OpClass.XSAVE_FAMILY: _state_instruction,
    OpClass.FXSAVE: _state_instruction,
    OpClass.FXRSTOR: _state_instruction,
    OpClass.LDMXCSR: _state_instruction,
    OpClass.STMXCSR: _state_instruction,
    OpClass.SSE_AVX: _state_instruction,  # VEX-encoded vldmxcsr/vstmxcsr
    OpClass.FWAIT: _state_instruction,
    OpClass.X87: _state_instruction,
    OpClass.RDRAND: _vcpu_state(special.random_number),
    OpClass.RDSEED: _vcpu_state(special.random_number),
    **{int(c): _data_instruction for c in E.EMULATED_CLASSES},
}
# Instructions an OpClass shares with others, by :func:`.faults.special_name`.
BY_NAME: dict[str, ClassHandler] = {
    "rdpru": _vcpu_state(special.rdpru),
    "invpcid": _vcpu_state(special.invpcid),
    "fsgsbase": _vcpu_state(special.fsgsbase),
}


def handle_emulation_failure(vcpu, exit_: VmExit) -> Optional[VmExit]:
    """Emulate the instruction KVM failed on (None: resume the guest) or report why not."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    mode, bitness = cpu_mode(sregs)
    rip = int(regs["rip"])
    kvm_code = instruction_bytes(exit_)
    if exit_.suberror != KvmInternalError.EMULATION:
        try:
            name = KvmInternalError(exit_.suberror).name.lower().replace("_", " ")
        except ValueError:
            name = f"internal error {exit_.suberror}"
        return report(vcpu, exit_, rip, mode, kvm_code, disassemble_text(kvm_code, bitness, rip),
                      f"KVM: {name}")
    cs_base = int(sregs["cs"]["base"]) if bitness != 64 else 0
    wrap = (1 << 64) - 1 if bitness == 64 else 0xFFFFFFFF
    code = fetch_code(vcpu, (cs_base + rip) & wrap, 15, sregs, regs)
    if kvm_code and code[:len(kvm_code)] != kvm_code:
        # What KVM failed on wins: another vCPU may have rewritten the code since.
        code = kvm_code + code[len(kvm_code):]
    if not code:
        return report(vcpu, exit_, rip, mode, b"", "(no instruction bytes)",
                      "instruction unreadable (no guest mapping, no bytes from KVM)")
    rec = decode(code, bitness, rip)
    if rec["status"] != 0:
        refused = faults.invalid_encoding(code, bitness) if rec["status"] == DecodeStatus.INVALID else None
        if refused is None:
            return report(vcpu, exit_, rip, mode, code, format_instruction(rec, code), "undecodable instruction")
        inject_fault(vcpu, refused.vector, refused.error_code)  # the CPU's answer to these bytes
        count_emulated(vcpu, f"invalid_{refused.name}")
        return None
    code = code[:int(rec["length"])]
    oc = int(rec["op_class"])
    special_name = faults.special_name(rec)
    kind = special_name
    if not kind:
        try:
            kind = OpClass(oc).name.lower()
        except ValueError:
            kind = str(oc)
    failure = Failure(vcpu, exit_, rec, regs, sregs, mode, bitness, rip, code,
                      format_instruction(rec, code), kind)
    refused = faults.refusal(rec, faults.cpu_view(vcpu, regs, sregs, bitness, cpl(sregs, regs)), special_name)
    if refused is not None:  # an instruction the CPU would refuse: its fault, not a stop
        failure.fault(refused.vector, refused.error_code, f"{kind}_{refused.name}")
        return None
    handler = BY_NAME.get(kind) or BY_CLASS.get(oc, _not_emulated)
    return handler(failure)
