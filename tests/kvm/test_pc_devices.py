"""PC platform devices seen by a real guest (long mode, CPL3: native speed, IO via the TSS bitmap)."""

import calendar
import struct
import time

import pytest

from hvjit.abi import SuspendHow, VmExitCode
from hvjit.devices.cmos import Cmos
from hvjit.devices.fw_cfg import FwCfg
from hvjit.devices.i8042 import I8042
from hvjit.devices.pci import PciHost
from hvjit.devices.pm_timer import PM_TIMER_HZ, PmTimer
from hvjit.firmware import write_acpi_tables

from .guests import load

RESULTS = 0x9000
RAM = 4 << 20


def pc_vm(session, name, cpus=1):
    vm = session.create_vm(name, memory=RAM, vcpus=cpus)
    devices = [(I8042(), 0x64), (Cmos(cpus=cpus), 0x70), (FwCfg(cpus=cpus), 0x510),
               (PciHost(), 0xCF8), (PmTimer(), 0x608)]
    for dev, port in devices:
        if vm.bus.port_map[port] == 0:  # not attached by default (yet)
            dev.attach(vm.bus, vm.memory)
    write_acpi_tables(vm.memory, cpus=cpus, pm_base=0x600)
    return vm


PROBE = f"""
.code64
    mov ${RESULTS}, %edi
    mov $0x510, %dx                 # fw_cfg: signature, 4 bytes, one inb at a time
    xor %eax, %eax
    outw %ax, %dx
    inc %dx
    mov $4, %ecx
1:  inb %dx, %al
    stosb
    loop 1b
    dec %dx                         # NB_CPUS (u16) and RAM_SIZE (u64) with rep insb
    mov $5, %ax
    outw %ax, %dx
    inc %dx
    mov $2, %ecx
    rep insb
    dec %dx
    mov $3, %ax
    outw %ax, %dx
    inc %dx
    mov $8, %ecx
    rep insb
    xor %eax, %eax                  # CMOS seconds, minutes, hours (BCD)
    outb %al, $0x70
    inb $0x71, %al
    stosb
    mov $2, %al
    outb %al, $0x70
    inb $0x71, %al
    stosb
    mov $4, %al
    outb %al, $0x70
    inb $0x71, %al
    stosb
    mov $0x80000000, %eax           # PCI 00:00.0 register 0: vendor/device
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    inl %dx, %eax
    stosl
    mov $0x80000800, %eax           # 00:01.0: nobody
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    inl %dx, %eax
    stosl
    mov $0x608, %dx                 # PM timer twice, ~some work apart
    inl %dx, %eax
    stosl
    mov $2000000, %ecx
2:  dec %ecx
    jnz 2b
    inl %dx, %eax
    stosl
    mov $0xe0000, %esi              # find the RSDP like a kernel, follow RSDT -> FADT
    movabs $0x2052545020445352, %rbx
3:  cmp (%rsi), %rbx
    je 4f
    add $16, %esi
    cmp $0x100000, %esi
    jb 3b
    xor %esi, %esi
4:  mov %esi, %eax
    stosl
    test %esi, %esi
    jz 5f
    mov 16(%rsi), %eax              # RSDT
    mov 36(%rax), %eax              # its first entry: the FADT
    mov 76(%rax), %eax              # PM_TMR_BLK
    stosl
5:  mov $0x2a, %eax
    outl %eax, $0xf4
"""


def test_guest_reads_fw_cfg_cmos_pci_pm_timer_and_acpi(session):
    vm = pc_vm(session, "pcprobe", cpus=1)
    load(vm, PROBE, "long", 3)
    before = time.time()
    ex = vm.run(timeout=60)  # the first run may compile the run loop
    after = time.time()
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == 0x2A
    raw = vm.memory.read(RESULTS, 4 + 2 + 8 + 3 + 4 * 4 + 4 + 4)
    sig, cpus, ram, ss, mm, hh, pci0, pci1, t0, t1, rsdp, pm_tmr_blk = struct.unpack(
        "<4sHQBBBIIIIII", raw)
    assert sig == b"QEMU" and cpus == 1 and ram == RAM

    def bcd(v):
        return (v >> 4) * 10 + (v & 0xF)

    now = time.gmtime(before)
    guest = calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, bcd(hh), bcd(mm), bcd(ss)))
    if guest < before - 43200:  # read just after midnight UTC
        guest += 86400
    assert before - 2 <= guest <= after + 2
    assert pci0 == 0x12378086 and pci1 == 0xFFFFFFFF
    assert 0 <= t0 <= 0xFFFFFF and 0 <= t1 <= 0xFFFFFF
    elapsed = (t1 - t0) & 0xFFFFFF
    assert 0 < elapsed < PM_TIMER_HZ  # increasing (and under a second for 2M loop iterations)
    assert 0xE0000 <= rsdp < 0x100000 and pm_tmr_blk == 0x608
    assert vm.vcpu(0).stats()["escalated"] == 0  # all of it handled in the native loop


def test_i8042_pulse_reset_is_a_reset(session):
    vm = pc_vm(session, "kbdreset")
    load(vm, ".code64\n mov $0xfe, %al\n outb %al, $0x64\n1: jmp 1b\n", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.SUSPENDED
    assert ex.how == SuspendHow.RESET


def test_pci_reset_control_register_is_a_reset(session):
    vm = pc_vm(session, "cf9reset")
    load(vm, ".code64\n mov $0x06, %al\n mov $0xcf9, %dx\n outb %al, %dx\n1: jmp 1b\n", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.RESET


def test_acpi_sleep_enable_is_a_poweroff(session):
    vm = pc_vm(session, "acpioff")
    load(vm, ".code64\n mov $0x2001, %ax\n mov $0x604, %dx\n outw %ax, %dx\n1: jmp 1b\n", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.how == SuspendHow.POWEROFF
    assert ex.code == 0


@pytest.mark.parametrize("cpus", [2])
def test_fw_cfg_cpu_count_follows_the_vm(session, cpus):
    vm = pc_vm(session, "fwcpus", cpus=cpus)
    load(vm, """
.code64
    mov $0x510, %dx
    mov $5, %ax
    outw %ax, %dx
    inc %dx
    inb %dx, %al
    movzx %al, %eax
    outl %eax, $0xf4
""", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == cpus
