"""What happens when KVM cannot run an instruction (KVM_EXIT_INTERNAL_ERROR).

``handle_emulation_failure(vcpu, exit_)`` fetches the instruction at RIP through the guest's
page tables (KVM's bytes from the exit info are the fall-back), decodes it and either
emulates it in user space — returning None, so the run loop resumes the guest — or returns
the exit with a typed :class:`~hvjit.exits.EmulationReport` (rip, mode, bytes, decoded text,
reason). Emulated, each counted in ``vcpu.emulation_counts`` under the OpClass name:

- ``int3`` and ``int n``: injected through KVM_SET_VCPU_EVENTS with RIP advanced to the next
  instruction (DESIGN.md's measured recipe: vectors 0-31 as an exception without error
  code, ``int n`` with n > 31 as a soft interrupt; ``flags`` kept as KVM returned them);
- data instructions run by ``hvjit.kernels.emulate`` against guest memory (page walk, RAM or
  a Python MMIO handler): CMPXCHG8B/16B, MOVBE, POPCNT and the MMIO set (MOV, MOVZX,
  MOVSX, MOVS, STOS, ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST, BT, PUSH, POP, group 1);
- ``xgetbv`` (ECX=0): XCR0 = x87|SSE|AVX as far as the host's CPUID leaf 0xD offers them
  (hvjit has no KVM_GET_XCRS; a guest cannot have changed XCR0 here, since XSETBV fails in
  KVM's emulator and is not emulated); ECX=1 gives 0 (no component in use is assumed);
- ``rdtscp`` (guest TSC from MSR 0x10 through KVM, TSC_AUX from MSR 0xc0000103) and
  ``rdpid``;
- ``clwb``, ``clflush``, ``clflushopt``: no-ops (guest memory is coherent host memory).

Anything else, a guest page fault while emulating, an exception the instruction would
raise, or MMIO without a Python handler: the report, e.g. text ``xsave [rax]`` and reason
``not emulated``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from typing import Optional

import numpy as np

from .abi import KvmInternalError
from .exits import EmulationReport, VmExit

EMULATION_FLAG_INSTRUCTION_BYTES = 1
MAX_REP_ITERATIONS = 4096  # per exit; a longer REP string resumes the guest mid-way
MSR_IA32_TSC = 0x10
MSR_TSC_AUX = 0xC0000103

__all__ = ["handle_emulation_failure", "disassemble", "translate", "cpu_mode",
           "instruction_bytes", "disassemble_text", "fetch_code", "GuestAccessError"]


def cpu_mode(sregs) -> tuple[str, int]:
    """A human name for the vCPU's mode and its bitness for the decoder."""
    cr0, efer = int(sregs["cr0"]), int(sregs["efer"])
    if not cr0 & 1:
        return "real", 16
    if efer & (1 << 10):
        if sregs["cs"]["l"]:
            return f"long (CPL{int(sregs['cs']['dpl'])})", 64
        return f"compatibility (CPL{int(sregs['cs']['dpl'])})", 32 if sregs["cs"]["db"] else 16
    return f"protected (CPL{int(sregs['cs']['dpl'])})", 32 if sregs["cs"]["db"] else 16


def instruction_bytes(exit_: VmExit) -> bytes:
    """The bytes KVM handed over with an emulation failure, if it did."""
    info = exit_.info
    if exit_.suberror != KvmInternalError.EMULATION or len(info) < 3:
        return b""
    if not info[0] & EMULATION_FLAG_INSTRUCTION_BYTES:
        return b""
    raw = b"".join(int(x).to_bytes(8, "little") for x in info[1:3])
    return raw[1 : 1 + min(raw[0], 15)]


def disassemble_text(code: bytes, bitness: int, address: int) -> str:
    try:
        from .kernels.decode import decode
        from .kernels.format import format_instruction
    except ImportError:  # the decoder is optional for the report
        return "(no decoder)"
    if not code:
        return "(no instruction bytes)"
    rec = decode(code, bitness=bitness, address=address)
    return format_instruction(rec, code)


# ---- guest-linear access through the vCPU's page tables --------------------------------------


class GuestAccessError(Exception):
    """A guest-linear access the emulator cannot complete (fault, unbacked, no device)."""


_ACCESS_NAMES = {"r": 0, "read": 0, "w": 1, "write": 1, "x": 2, "execute": 2, "exec": 2}


def _paging_registers(vcpu, sregs=None, regs=None) -> dict:
    sregs = vcpu.get_sregs() if sregs is None else sregs
    rflags = int((vcpu.get_regs() if regs is None else regs)["rflags"])
    mem, base = vcpu.vm.memory.flat()
    return dict(cr3=int(sregs["cr3"]), cr0=int(sregs["cr0"]), cr4=int(sregs["cr4"]),
                efer=int(sregs["efer"]), rflags=rflags, cpl=int(sregs["cs"]["dpl"]) & 3,
                mem_base_gpa=int(base)), mem


def translate(vcpu, gla: int, access: str = "r"):
    """Translate a guest-linear address with the vCPU's CR0/CR3/CR4/EFER, RFLAGS and CPL.

    ``access`` is "r", "w" or "x"; returns a ``pagewalk.Translation`` (a fault is a result).
    """
    from .kernels import pagewalk as pw

    try:
        code = _ACCESS_NAMES[access.lower() if isinstance(access, str) else access]
    except KeyError:
        raise ValueError(f"access must be 'r', 'w' or 'x', not {access!r}") from None
    kw, mem = _paging_registers(vcpu)
    return pw.translate(mem, int(gla), access=pw.Access(code), **kw)


def _chunks(vcpu, kw, mem, gla: int, size: int, access: int):
    from .kernels import pagewalk as pw

    setup = pw.copy_setup(mem, gla, size, access=pw.Access(access), **kw)
    if setup.fault is not None:
        t = setup.fault
        raise GuestAccessError(f"{t.status.name.lower().replace('_', ' ')} at guest-linear {t.gla:#x} "
                               f"(error code {t.error_code:#x})")
    return setup.chunks


def _read_phys(vcpu, gpa: int, n: int) -> bytes:
    memory = vcpu.vm.memory
    if memory.is_mapped(gpa, n):
        return memory.read(gpa, n)
    handler = vcpu.vm.bus.mmio_handler(gpa, n)
    if handler is None:
        raise GuestAccessError(f"MMIO read at {gpa:#x} ({n} bytes) has no Python handler")
    value = int(handler(gpa, n, False, 0) or 0) & ((1 << (8 * n)) - 1)
    return value.to_bytes(n, "little")


def _write_phys(vcpu, gpa: int, data: bytes) -> None:
    memory = vcpu.vm.memory
    if memory.is_mapped(gpa, len(data)):
        memory.write(gpa, data)
        return
    handler = vcpu.vm.bus.mmio_handler(gpa, len(data))
    if handler is None:
        raise GuestAccessError(f"MMIO write at {gpa:#x} ({len(data)} bytes) has no Python handler")
    handler(gpa, len(data), True, int.from_bytes(data, "little"))


def fetch_code(vcpu, linear: int, length: int = 15, sregs=None, regs=None) -> bytes:
    """Up to ``length`` instruction bytes at a guest-linear address (fewer if a page faults)."""
    kw, mem = _paging_registers(vcpu, sregs, regs)
    out = b""
    address = int(linear)
    while len(out) < length:
        n = min(length - len(out), 0x1000 - (address & 0xFFF))
        try:
            for gpa, size in _chunks(vcpu, kw, mem, address, n, 2):
                out += _read_phys(vcpu, gpa, size)
        except Exception:  # noqa: BLE001 - a fault or unbacked page ends the fetch
            break
        address += n
    return out


def disassemble(vcpu, rip: Optional[int] = None, count: int = 1) -> list[tuple[int, bytes, str]]:
    """Decode ``count`` instructions from ``rip`` (default: the vCPU's) through its page tables.

    Returns ``[(address, bytes, text)]``; stops early where the code is unreadable.
    """
    from .kernels.decode import decode
    from .kernels.format import format_instruction

    sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
    _, bitness = cpu_mode(sregs)
    address = int(regs["rip"]) if rip is None else int(rip)
    cs_base = int(sregs["cs"]["base"]) if bitness != 64 else 0
    wrap = (1 << 64) - 1 if bitness == 64 else 0xFFFFFFFF
    out = []
    for _ in range(int(count)):
        code = fetch_code(vcpu, (cs_base + address) & wrap, 15, sregs, regs)
        if not code:
            break
        rec = decode(code, bitness, address)
        n = int(rec["length"])
        out.append((address, code[:n], format_instruction(rec, code)))
        if rec["status"] != 0:
            break
        address = (address + n) & wrap
    return out


# ---- the exit path -----------------------------------------------------------------------------


def _report(vcpu, exit_: VmExit, rip: int, mode: str, code: bytes, text: str, reason: str,
            **extra) -> VmExit:
    report = EmulationReport(rip=rip, mode=mode, instruction=code, text=text, reason=reason,
                             suberror=exit_.suberror, extra=extra)
    return replace(exit_, report=report)


def _count(vcpu, kind: str) -> None:
    counts = vcpu.emulation_counts
    counts[kind] = counts.get(kind, 0) + 1


_HOST_XCR0: Optional[int] = None


def _host_xcr0_bits() -> int:
    """x87|SSE|AVX, as far as the host CPU's CPUID leaf 0xD (subleaf 0) offers them."""
    global _HOST_XCR0
    if _HOST_XCR0 is None:
        bits = 0x7
        try:
            fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY)
            try:
                eax, _, _, _ = struct.unpack("<4I", os.pread(fd, 16, 0xD))
            finally:
                os.close(fd)
            bits = (eax & 0x7) | 0x1
        except OSError:
            pass
        _HOST_XCR0 = bits
    return _HOST_XCR0


def _inject(vcpu, vector: int) -> None:
    """DESIGN.md's recipe: vectors 0-31 as an exception, higher ones as a soft interrupt."""
    ev = vcpu.get_events()
    if vector < 32:
        ev["exception"]["injected"] = 1
        ev["exception"]["nr"] = vector
        ev["exception"]["has_error_code"] = 0
        ev["exception"]["pending"] = 0
    else:
        ev["interrupt"]["injected"] = 1
        ev["interrupt"]["nr"] = vector
        ev["interrupt"]["soft"] = 1
    vcpu.set_events(ev)


def handle_emulation_failure(vcpu, exit_: VmExit) -> Optional[VmExit]:
    """Emulate the instruction KVM failed on (None: resume the guest) or report why not."""
    from .kernels import emulate as E
    from .kernels.decode import decode, OpClass
    from .kernels.format import format_instruction

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
        return _report(vcpu, exit_, rip, mode, kvm_code, disassemble_text(kvm_code, bitness, rip),
                       f"KVM: {name}")
    cs_base = int(sregs["cs"]["base"]) if bitness != 64 else 0
    wrap = (1 << 64) - 1 if bitness == 64 else 0xFFFFFFFF
    code = fetch_code(vcpu, (cs_base + rip) & wrap, 15, sregs, regs) or kvm_code
    if not code:
        return _report(vcpu, exit_, rip, mode, b"", "(no instruction bytes)",
                       "instruction unreadable (no guest mapping, no bytes from KVM)")
    rec = decode(code, bitness, rip)
    if rec["status"] != 0:
        return _report(vcpu, exit_, rip, mode, code, format_instruction(rec, code), "undecodable instruction")
    length = int(rec["length"])
    code = code[:length]
    text = format_instruction(rec, code)
    oc = int(rec["op_class"])
    try:
        kind = OpClass(oc).name.lower()
    except ValueError:
        kind = str(oc)

    def advance():
        regs["rip"] = (rip + length) & (wrap if bitness != 16 else 0xFFFF)

    if oc == OpClass.INT3 or oc == OpClass.INTN:
        vector = 3 if oc == OpClass.INT3 else int(rec["imm"]) & 0xFF
        _inject(vcpu, vector)
        advance()
        vcpu.set_regs(regs)
        _count(vcpu, kind)
        return None
    if oc in (OpClass.CLWB, OpClass.CLFLUSH, OpClass.CLFLUSHOPT):
        advance()
        vcpu.set_regs(regs)
        _count(vcpu, kind)
        return None
    if oc == OpClass.XGETBV:
        ecx = int(regs["rcx"]) & 0xFFFFFFFF
        if ecx not in (0, 1):
            return _report(vcpu, exit_, rip, mode, code, text, f"xgetbv ecx={ecx:#x} raises #GP (not injected)")
        value = _host_xcr0_bits() if ecx == 0 else 0
        regs["rax"], regs["rdx"] = value & 0xFFFFFFFF, value >> 32
        advance()
        vcpu.set_regs(regs)
        _count(vcpu, kind)
        return None
    if oc in (OpClass.RDTSCP, OpClass.RDPID):
        try:
            aux = vcpu.get_msr(MSR_TSC_AUX) & 0xFFFFFFFF
        except Exception:  # noqa: BLE001 - KVM without TSC_AUX: 0, as a fresh vCPU has
            aux = 0
        if oc == OpClass.RDTSCP:
            tsc = vcpu.get_msr(MSR_IA32_TSC)
            regs["rax"], regs["rdx"], regs["rcx"] = tsc & 0xFFFFFFFF, (tsc >> 32) & 0xFFFFFFFF, aux
        else:
            reg = int(rec["rm"])
            name = E.REG_NAMES[reg] if reg < 16 else "rax"
            regs[name] = aux
        advance()
        vcpu.set_regs(regs)
        _count(vcpu, kind)
        return None
    if oc not in E.EMULATED_CLASSES:
        return _report(vcpu, exit_, rip, mode, code, text, "not emulated")

    # Data instructions: the kernel's plan / read / execute / write protocol on guest memory.
    file = E.regs_from_kvm(regs)
    seg_bases = np.array([int(sregs[s]["base"]) for s in ("es", "cs", "ss", "ds", "fs", "gs")], np.uint64)
    stack_asz = 8 if bitness == 64 else (4 if sregs["ss"]["db"] else 2)
    mops, mdata, info = E.new_buffers()
    kw, mem = _paging_registers(vcpu, sregs, regs)
    kw["set_ad"] = True
    status = E.EmulateStatus.REPEAT
    iterations = 0
    try:
        while status == E.EmulateStatus.REPEAT and iterations < MAX_REP_ITERATIONS:
            n = int(E.step(rec, file, bitness, seg_bases, stack_asz, mops, mdata, info, E.PHASE_PLAN))
            if n < 0:
                status = E.EmulateStatus(-n)
                break
            chunks = []
            for i in range(n):
                gla, size, mkind = (int(x) for x in mops[i])
                access = 1 if mkind & E.MemKind.WRITE else 0
                chunks.append(_chunks(vcpu, kw, mem, gla, size, access))  # faults before any effect
                if mkind & E.MemKind.READ:
                    data = b"".join(_read_phys(vcpu, gpa, sz) for gpa, sz in chunks[i])
                    mdata[i, :size] = np.frombuffer(data, np.uint8)
            status = E.EmulateStatus(int(E.step(rec, file, bitness, seg_bases, stack_asz, mops, mdata, info,
                                                E.PHASE_EXECUTE)))
            if status not in (E.EmulateStatus.OK, E.EmulateStatus.REPEAT):
                break
            for i in range(n):
                if int(mops[i, 2]) & E.MemKind.WRITE:
                    data = mdata[i, :int(mops[i, 1])].tobytes()
                    at = 0
                    for gpa, sz in chunks[i]:
                        _write_phys(vcpu, gpa, data[at:at + sz])
                        at += sz
            iterations += 1
    except GuestAccessError as e:
        return _report(vcpu, exit_, rip, mode, code, text, f"not emulated: {e}")
    if status == E.EmulateStatus.EXCEPTION:
        return _report(vcpu, exit_, rip, mode, code, text,
                       f"raises exception {int(info[0])} (error code {int(info[1]):#x}); not injected")
    if status not in (E.EmulateStatus.OK, E.EmulateStatus.REPEAT):
        return _report(vcpu, exit_, rip, mode, code, text, f"not emulated ({status.name.lower()})")
    E.regs_to_kvm(file, regs)
    vcpu.set_regs(regs)
    _count(vcpu, kind)
    return None
