"""The in-kernel interrupt controllers: PIC, IOAPIC and LAPIC, the PIT, and GSI routing.

Created where KVM has them (``Vm(..., irqchip=True)``), before any vCPU. GSIs are routed as
PCs wire them (and as QEMU does): GSI n goes to PIC pin n (n < 16) and IOAPIC pin n, except
that the PIT's GSI 0 lands on IOAPIC pin 2 (the MADT says so with an interrupt source
override) and GSI 2 is the PICs' cascade.
"""

from __future__ import annotations

import numpy as np

from . import _trampoline as _t
from .abi import (
    KVM_IRQ_ROUTING_ENTRY_DTYPE,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    Cap,
)
from .errors import CapabilityError, HvjitError

IOAPIC_PINS = 24
PIT_SPEAKER_DUMMY = 1  # KVM_PIT_SPEAKER_DUMMY: port 0x61 answered in the kernel


def pc_routing() -> np.ndarray:
    entries = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 16 and gsi != 2:
            chip, pin = (KVM_IRQCHIP_PIC_MASTER, gsi) if gsi < 8 else (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            entries.append((gsi, chip, pin))
        if gsi == 0:
            entries.append((0, KVM_IRQCHIP_IOAPIC, 2))
        elif gsi != 2:
            entries.append((gsi, KVM_IRQCHIP_IOAPIC, gsi))
    table = np.zeros(len(entries), KVM_IRQ_ROUTING_ENTRY_DTYPE)
    for i, (gsi, chip, pin) in enumerate(entries):
        table[i]["gsi"], table[i]["type"] = gsi, KVM_IRQ_ROUTING_IRQCHIP
        table[i]["irqchip"], table[i]["pin"] = chip, pin
    return table


def create_irqchip(vm) -> None:
    kvm = vm.kvm
    if not kvm.has(Cap.IRQCHIP):
        raise CapabilityError("this host's KVM has no in-kernel irqchip (KVM_CAP_IRQCHIP)")
    vm._kvm_call(_t.lib.hvt_vm_create_irqchip(vm.fd), "KVM_CREATE_IRQCHIP")
    if kvm.has(Cap.IRQ_ROUTING):
        routing = pc_routing()
        vm._kvm_call(_t.lib.hvt_vm_set_gsi_routing(vm.fd, _t.ptr(routing), len(routing)),
                     "KVM_SET_GSI_ROUTING")
    if kvm.has(Cap.PIT2):
        vm._kvm_call(_t.lib.hvt_vm_create_pit2(vm.fd, PIT_SPEAKER_DUMMY), "KVM_CREATE_PIT2")


def irq_line(vm, irq: int, level: int) -> None:
    if not vm.irqchip:
        raise HvjitError(f"VM {vm.name!r} has no in-kernel irqchip: create it with irqchip=True")
    if not 0 <= irq < IOAPIC_PINS:
        raise ValueError(f"GSI {irq} is outside 0..{IOAPIC_PINS - 1}")
    vm._kvm_call(_t.lib.hvt_vm_irq_line(vm.fd, irq, 1 if level else 0), "KVM_IRQ_LINE", f"gsi {irq}")
