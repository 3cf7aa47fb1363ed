"""How one execution ended, and what ``hvjit run --input`` exits with for it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# x86 exception mnemonics by vector.
VECTOR_NAMES = {0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM", 8: "DF", 9: "CSO",
                10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF", 17: "AC", 18: "MC", 19: "XM",
                20: "VE", 21: "CP"}

# Crash kinds (docs/fuzzing.md) and the exit status `hvjit run --input` gives each; the values
# 124-126 are the ones `hvjit run` already uses for a timeout, triple fault, emulation failure.
KINDS = ("ok", "exception", "abort", "triplefault", "emulation", "timeout", "mmio", "other")
STATUS = {"ok": 0, "exception": 120, "abort": 121, "mmio": 122, "other": 123,
          "timeout": 124, "triplefault": 125, "emulation": 126}


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of KINDS
    rip: int  # where it happened (the faulting instruction for an exception)
    vector: int = -1  # exception vector, for kind "exception"
    error_code: int = 0
    detail: str = ""

    @property
    def crashed(self) -> bool:
        return self.kind != "ok"

    @property
    def label(self) -> str:
        """The kind, with the exception's mnemonic: ``exception-de``, ``triplefault``, ..."""
        if self.kind == "exception":
            return f"exception-{VECTOR_NAMES.get(self.vector, str(self.vector)).lower()}"
        return self.kind

    @property
    def key(self) -> tuple[str, int]:
        """What crashes are deduplicated by."""
        return (self.label, self.rip)

    @property
    def status(self) -> int:
        return STATUS[self.kind]

    def describe(self) -> str:
        what = self.kind if self.kind != "exception" else \
            f"exception #{VECTOR_NAMES.get(self.vector, self.vector)} (vector {self.vector})"
        return f"{what} at rip={self.rip:#x}" + (f": {self.detail}" if self.detail else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label"] = self.label
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Outcome":
        return cls(d["kind"], d["rip"], d.get("vector", -1), d.get("error_code", 0), d.get("detail", ""))
