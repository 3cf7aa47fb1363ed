"""What a vCPU run returns: the normalised exit (bhyve's ``struct vm_exit``) and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .abi import KvmExit, SuspendHow, VmExitCode


@dataclass(frozen=True)
class VmExit:
    """One exit, by bhyve's ``vm_exitcode``, with rip and the exit-specific fields.

    Fields that do not apply to an exit code are 0. ``kvm_reason`` keeps KVM's own reason.
    """

    exitcode: VmExitCode
    rip: int
    kvm_reason: int
    # INOUT / INOUT_STR
    port: int = 0
    bytes: int = 0
    is_in: bool = False
    string: bool = False
    count: int = 0
    data: int = 0
    # INST_EMUL (MMIO)
    gpa: int = 0
    is_write: bool = False
    # RDMSR / WRMSR
    msr_index: int = 0
    msr_data: int = 0
    # SUSPENDED
    how: SuspendHow = SuspendHow.NONE
    code: int = 0
    # EMULATION_FAILURE and other diagnostics
    suberror: int = 0
    info: tuple = ()
    report: Optional["EmulationReport"] = None
    # MTRAP / BPT / DB: the guest symbol at rip, where the VM has an ELF symbol table
    symbol: str = ""

    @classmethod
    def from_record(cls, rec, rip: int) -> "VmExit":
        code = VmExitCode(int(rec["exitcode"]))
        n = int(rec["ndata"]) if code == VmExitCode.EMULATION_FAILURE else 4
        return cls(
            exitcode=code,
            rip=rip,
            kvm_reason=int(rec["kvm_reason"]),
            port=int(rec["port"]),
            bytes=int(rec["bytes"]) or int(rec["mmio_len"]),
            is_in=bool(rec["is_in"]),
            string=bool(rec["string"]),
            count=int(rec["count"]),
            data=int(np.uint64(rec["data"])),
            gpa=int(rec["gpa"]),
            is_write=bool(rec["is_write"]),
            msr_index=int(rec["msr_index"]),
            msr_data=int(rec["msr_data"]),
            how=SuspendHow(int(rec["how"])),
            code=int(np.uint64(rec["code"])),
            suberror=int(rec["suberror"]),
            info=tuple(int(x) for x in rec["info"][:n]),
        )

    @property
    def kvm_reason_name(self) -> str:
        try:
            return KvmExit(self.kvm_reason).name
        except ValueError:
            return str(self.kvm_reason)

    def describe(self) -> str:
        c = self.exitcode
        if c in (VmExitCode.INOUT, VmExitCode.INOUT_STR):
            d = "in" if self.is_in else "out"
            s = f"{d} port {self.port:#x} ({self.bytes} bytes" + (f" x{self.count}" if self.string else "") + ")"
            return s if self.is_in else f"{s} = {self.data:#x}"
        if c == VmExitCode.INST_EMUL:
            d = "write" if self.is_write else "read"
            return f"MMIO {d} {self.gpa:#x} ({self.bytes} bytes)" + (f" = {self.data:#x}" if self.is_write else "")
        if c == VmExitCode.SUSPENDED:
            return f"suspended: {self.how.name.lower()}" + (f" (code {self.code})" if self.how == SuspendHow.POWEROFF else "")
        if c == VmExitCode.EMULATION_FAILURE and self.report is not None:
            return str(self.report)
        if c in (VmExitCode.MTRAP, VmExitCode.BPT, VmExitCode.DB):
            what = {VmExitCode.MTRAP: "single step", VmExitCode.BPT: "breakpoint", VmExitCode.DB: "watchpoint"}[c]
            return what + (f" in {self.symbol}" if self.symbol else "")
        return c.name.lower()

    def to_dict(self) -> dict:
        d = {
            "exitcode": self.exitcode.name,
            "rip": self.rip,
            "kvm_reason": self.kvm_reason_name,
        }
        c = self.exitcode
        if c in (VmExitCode.INOUT, VmExitCode.INOUT_STR):
            d.update(port=self.port, bytes=self.bytes, direction="in" if self.is_in else "out",
                     string=self.string, count=self.count, data=self.data)
        elif c == VmExitCode.INST_EMUL:
            d.update(gpa=self.gpa, bytes=self.bytes, is_write=self.is_write, data=self.data)
        elif c in (VmExitCode.RDMSR, VmExitCode.WRMSR):
            d.update(msr_index=self.msr_index, msr_data=self.msr_data)
        elif c == VmExitCode.SUSPENDED:
            d.update(how=self.how.name, code=self.code)
        else:
            d.update(suberror=self.suberror, info=list(self.info))
        if self.report is not None:
            d["report"] = self.report.to_dict()
        if self.symbol:
            d["symbol"] = self.symbol
        return d

    def __str__(self) -> str:
        return f"{self.exitcode.name} at rip={self.rip:#x}: {self.describe()}"


@dataclass(frozen=True)
class EmulationReport:
    """Why KVM (and hvjit) could not run an instruction: rip, mode, bytes and decoded text."""

    rip: int
    mode: str
    instruction: bytes
    text: str
    reason: str
    suberror: int = 0
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        hexbytes = self.instruction.hex(" ") or "(unreadable)"
        return (f"emulation failure at rip={self.rip:#x} ({self.mode}): {self.text} "
                f"[{hexbytes}]: {self.reason}")

    def to_dict(self) -> dict:
        return {"rip": self.rip, "mode": self.mode, "bytes": self.instruction.hex(),
                "text": self.text, "reason": self.reason, "suberror": self.suberror}
