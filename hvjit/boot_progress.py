"""Where a long boot is: the console's milestones, timed, and the vCPUs' counters on one line.

A Linux boot whose ring 0 runs in KVM's instruction emulator (PVM) takes many minutes;
``hvjit run --kernel`` prints a progress line from this module so that a user sees which
milestone the kernel passed last and whether it is still moving (exits, instructions KVM
emulated, what hvjit finished for it). The soak benchmark times the same milestones.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

# (name, what the console prints there), in boot order. "int3 self-test" is the first line
# after alternative_instructions(), whose int3 self-test kills the kernel on hosts that get
# int3 wrong; "initcalls done" is free_initmem(), after every initcall and async probe.
LINUX_MILESTONES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("banner", re.compile(rb"Linux version \d")),
    ("e820", re.compile(rb"BIOS-e820: \[mem")),
    ("int3 self-test", re.compile(rb"Freeing SMP alternatives memory|pid_max: default")),
    ("initcalls done", re.compile(rb"Freeing unused kernel (image|memory)")),
    ("/init", re.compile(rb"Run /init as init process")),
)


@dataclass
class BootWatch:
    """Feed it the console (``feed``); it keeps when each milestone first appeared."""

    milestones: tuple[tuple[str, re.Pattern[bytes]], ...] = LINUX_MILESTONES
    marker: Optional[bytes] = None  # the user's own last milestone ("shell marker")
    t0: float = field(default_factory=time.monotonic)
    reached: dict[str, float] = field(default_factory=dict)
    _tail: bytes = b""
    last_line: str = ""

    def feed(self, chunk: bytes) -> None:
        now = time.monotonic() - self.t0
        text = self._tail + chunk
        for name, pattern in self.milestones:
            if name not in self.reached and pattern.search(text):
                self.reached[name] = now
        if self.marker and "marker" not in self.reached and self.marker in text:
            self.reached["marker"] = now
        lines = [ln for ln in text.replace(b"\r", b"").split(b"\n") if ln.strip()]
        if lines:
            self.last_line = lines[-1].decode("latin-1", "replace")
        self._tail = text[-256:]  # a milestone split across two chunks is still found

    @property
    def latest(self) -> str:
        return max(self.reached, key=self.reached.__getitem__) if self.reached else "(none yet)"

    def line(self, vm) -> str:
        """One status line: elapsed time, the latest milestone, the vCPUs' counters."""
        from .run_loop import C_ESCALATED, C_EXITS  # the machine layer, loaded by now

        exits = sum(int(v.counters[C_EXITS]) for v in vm.vcpus)
        python = sum(int(v.counters[C_ESCALATED]) for v in vm.vcpus)
        emulated = sum(sum(v.emulation_counts.values()) for v in vm.vcpus)
        parts = [f"[{time.monotonic() - self.t0:7.1f} s] {self.latest}",
                 f"exits {exits} ({python} to Python)", f"hvjit emulated {emulated}"]
        kvm = sum(v.kvm_stat("insn_emulation") or 0 for v in vm.vcpus)
        if kvm:
            parts.append(f"KVM emulated {kvm}")
        if vm.rep_string_stats is not None and vm.rep_string_stats.finished:
            parts.append(f"rep strings {vm.rep_string_stats.bytes >> 20} MiB")
        if vm.syscall_stats is not None and vm.syscall_stats.syscalls:
            parts.append(f"syscalls {vm.syscall_stats.syscalls}")
        return " | ".join(parts) + (f" | {self.last_line[:60]}" if self.last_line else "")
