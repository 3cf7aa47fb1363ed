"""Timer slack: fewer timer interrupts for a guest whose ring 0 runs in an emulator.

Where KVM emulates ring 0 (PVM) one timer tick of a stock Linux kernel — the interrupt, the
scheduler and timekeeping bookkeeping, RCU — is thousands of emulated instructions: at
HZ=250 a quarter or more of a boot goes to ticks (Linux itself warns "hrtimer: interrupt
took 10 ms"). With a slack of S seconds, every TSC-deadline the guest arms (WRMSR
IA32_TSC_DEADLINE, trapped) fires no sooner than S after it was armed. The guest sees what a
busy host would show it — interrupts late, never early, time read from its clocksource
still right — and ticks S apart instead of 4 ms.

Opt-in (``vm.set_timer_slack(S)``, ``hvjit run --timer-slack MS``): it changes when the guest
gets interrupts, which timing-sensitive guests (timer conformance tests) would notice.
Guests that use the LAPIC's one-shot/periodic count instead of the TSC deadline are not
affected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import UnsupportedError

MSR_TSC, MSR_TSC_DEADLINE = 0x10, 0x6E0


@dataclass
class SlackStats:
    deadlines: int = 0  # deadlines the guest armed
    deferred: int = 0  # of those, moved later by the slack


class _DeadlineWrite:
    """The trapped WRMSR: arm the guest's deadline, no sooner than ``slack`` TSC cycles ahead."""

    takes_vcpu = True  # exit_handlers passes the writing vCPU

    def __init__(self, slack_cycles: int, stats: SlackStats):
        self.slack = slack_cycles
        self.stats = stats

    def __call__(self, index: int, is_write: bool, value: int, vcpu=None) -> Optional[bool]:
        if not is_write or vcpu is None:
            return None
        self.stats.deadlines += 1
        if value:  # 0 disarms
            earliest = vcpu.get_msr(MSR_TSC) + self.slack
            if value < earliest:
                value = earliest
                self.stats.deferred += 1
        vcpu.set_msrs({MSR_TSC_DEADLINE: value})  # host-side: the filter does not apply
        return True


def set_slack(vm, seconds: float) -> SlackStats:
    """Trap the guest's TSC-deadline writes and defer each to at least ``seconds`` ahead;
    0 stops trapping."""
    if seconds < 0:
        raise ValueError(f"timer slack must be >= 0 seconds, not {seconds}")
    if not seconds:
        vm.trap_msrs({MSR_TSC_DEADLINE: None}, read=False, write=True)
        return SlackStats()
    khz = vm.kvm.tsc_khz
    if not khz:
        raise UnsupportedError("timer slack", vm.kvm.flavour, "the TSC frequency is unknown")
    stats = SlackStats()
    vm.trap_msrs({MSR_TSC_DEADLINE: _DeadlineWrite(int(seconds * khz * 1000), stats)}, read=False, write=True)
    return stats
