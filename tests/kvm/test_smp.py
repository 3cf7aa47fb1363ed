"""Several vCPUs, one thread each, started by the guest's own INIT/SIPI via the in-kernel LAPIC."""

import pytest

from hvjit.abi import SuspendHow, VmExitCode
from hvjit.asm import assemble

from .guests import load

AP_GPA = 0x8000  # SIPI vector 0x08
COUNTER = 0x9000

AP_CODE = f"""
.code16
    # An AP wakes in real mode at {AP_GPA:#x}: count itself in, say hello, and stop.
    mov $0, %ax
    mov %ax, %ds
    lock incw ({COUNTER:#x})
    mov $0x3f8, %dx
    mov $'A', %al
    outb %al, %dx
    cli
1:  hlt
    jmp 1b
"""

BSP_CODE = f"""
.code64
    mov $0xfee00000, %rbx
    movl $0x1ff, 0xf0(%rbx)         # SVR: software-enable the LAPIC
    movl $0x000c4500, 0x300(%rbx)   # ICR: INIT to all but self
    mov $20000, %ecx
1:  loop 1b                         # (a short wait between INIT and SIPI)
    movl $0x000c4608, 0x300(%rbx)   # ICR: SIPI, vector 0x08 -> {AP_GPA:#x}
2:  movzwl ({COUNTER:#x}), %eax
    cmp ${{aps}}, %eax
    jne 2b
    mov $0x3f8, %dx
    mov $'B', %al
    outb %al, %dx
    movzwl ({COUNTER:#x}), %eax
    outl %eax, $0xf4
"""


@pytest.mark.parametrize("cpus", [2, 4])
def test_guest_starts_its_aps_with_init_sipi(session, cpus):
    vm = session.create_vm(f"smp{cpus}", memory=4 << 20, vcpus=cpus, irqchip=True)
    vm.memory.write(AP_GPA, assemble(AP_CODE, AP_GPA))
    load(vm, BSP_CODE.replace("{aps}", str(cpus - 1)), "long", 3)
    result = vm.run(timeout=60)
    assert result.exitcode == VmExitCode.SUSPENDED and result.how == SuspendHow.POWEROFF, result
    assert result.code == cpus - 1
    assert result.reason == "poweroff" and result.vcpu == 0
    assert sorted(result.console) == sorted(b"A" * (cpus - 1) + b"B")
    assert result.console.endswith(b"B")
    assert len(result.vcpu_stats) == cpus
    for ap in result.vcpu_stats[1:]:
        assert ap["pio"] >= 1  # each AP ran and printed


def test_timeout_stops_every_vcpu(session):
    vm = session.create_vm("smpspin", memory=2 << 20, vcpus=2, irqchip=True)
    load(vm, ".code64\n1: jmp 1b\n", "long", 3)
    result = vm.run(timeout=0.5)
    assert result.exitcode == VmExitCode.TIMEOUT
    assert result.reason == "timeout"


def test_irq_line_needs_an_irqchip(session):
    from hvjit.errors import HvjitError

    vm = session.create_vm("noirq", memory=1 << 20)
    with pytest.raises(HvjitError, match="irqchip"):
        vm.pulse_irq(4)
    vm2 = session.create_vm("irq", memory=1 << 20, irqchip=True)
    vm2.pulse_irq(4)
    with pytest.raises(ValueError):
        vm2.irq_line(99, 1)
