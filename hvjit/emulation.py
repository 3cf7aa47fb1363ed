"""What happens when KVM cannot run an instruction (KVM_EXIT_INTERNAL_ERROR).

The exit becomes a typed report: rip, CPU mode, the instruction's bytes (from KVM's
emulation-failure data, else fetched from guest memory) and its decoded text.
"""

from __future__ import annotations

from dataclasses import replace

from .abi import KvmInternalError
from .exits import EmulationReport, VmExit

EMULATION_FLAG_INSTRUCTION_BYTES = 1


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


def report_for(vcpu, exit_: VmExit) -> VmExit:
    sregs = vcpu.get_sregs()
    mode, bitness = cpu_mode(sregs)
    code = instruction_bytes(exit_)
    try:
        reason = KvmInternalError(exit_.suberror).name.lower().replace("_", " ")
    except ValueError:
        reason = f"internal error {exit_.suberror}"
    report = EmulationReport(
        rip=exit_.rip, mode=mode, instruction=code,
        text=disassemble_text(code, bitness, exit_.rip), reason=f"KVM: {reason}",
        suberror=exit_.suberror,
    )
    return replace(exit_, report=report)
