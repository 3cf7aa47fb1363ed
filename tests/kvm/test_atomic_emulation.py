"""Emulated locked instructions are atomic against other vCPUs.

Several vCPUs at CPL0 (on a PVM host KVM's emulator runs them, and hands ``cmpxchg16b`` to
hvjit) hammer one 16-byte word: some increment both halves with ``lock cmpxchg16b`` retry
loops, one adds to the low half with ``lock xadd`` (run by KVM). Nothing may be lost: the
low half ends at the sum of all increments, the high half at the cmpxchg16b ones. hvjit runs
each cmpxchg16b as the host's own (hvjit.emulation.atomic.exchange_if_equal), so none has to
start over however often the xadd changes the word.
"""

import struct

import pytest

from hvjit import entry
from hvjit.abi import SuspendHow, VmExitCode
from hvjit.asm import assemble

CODE = 0x1000
COUNTER = 0x4000  # 16-byte aligned
DONE = 0x4040  # another cache line
EXIT_CODE = 0x2A

GUEST = f"""
.code64
cas_worker:                     # rsi: iterations
    mov ${COUNTER}, %edi
    mov (%rdi), %rax
    mov 8(%rdi), %rdx
1:  lea 1(%rax), %rbx
    lea 1(%rdx), %rcx
    lock cmpxchg16b (%rdi)
    jnz 1b                      # rdx:rax hold what was there: again from that
    mov %rbx, %rax
    mov %rcx, %rdx
    dec %rsi
    jnz 1b
    lock incl {DONE}
2:  pause
    jmp 2b

.org 0x100
xadd_worker:                    # rsi: iterations, r8: cas workers to wait for
    mov ${COUNTER}, %edi
1:  mov $1, %eax
    lock xadd %rax, (%rdi)
    dec %rsi
    jnz 1b
2:  cmp %r8d, {DONE}
    jne 2b
    mov ${EXIT_CODE}, %eax
    outl %eax, $0xf4
"""


@pytest.mark.parametrize("cas_cpus", [2])
def test_locked_cmpxchg16b_and_xadd_lose_nothing(session, cas_cpus):
    cas_rounds, xadd_rounds = 150, 30000
    vm = session.create_vm(f"atomic{cas_cpus}", memory=2 << 20, vcpus=1 + cas_cpus)
    vm.memory.write(CODE, assemble(GUEST, CODE))
    cpuid = vm.kvm.vcpu_cpuid(0).copy()
    cpuid["ecx"][cpuid["function"] == 1] |= 1 << 13  # CX16
    for vcpu in vm.vcpus:
        vcpu.set_cpuid(cpuid)
        worker = vcpu.index > 0
        entry.setup_long_mode(vcpu, CODE if worker else CODE + 0x100, cpl=0)
        vcpu.set_registers(rsi=cas_rounds if worker else xadd_rounds, r8=cas_cpus)
    result = vm.run(timeout=240)
    assert result.exitcode == VmExitCode.SUSPENDED and result.how == SuspendHow.POWEROFF, result
    assert result.code == EXIT_CODE
    low, high = struct.unpack("<QQ", vm.memory.read(COUNTER, 16))
    assert high == cas_cpus * cas_rounds
    assert low == cas_cpus * cas_rounds + xadd_rounds
    emulated = sum(v.emulation_counts.get("cmpxchg16b", 0) for v in vm.vcpus)
    retried = sum(v.emulation_counts.get("locked_retry", 0) for v in vm.vcpus)
    failed = emulated - cas_cpus * cas_rounds  # guest-level retries (ZF=0) that hvjit ran too
    print(f"\ncmpxchg16b emulated {emulated} times ({failed} failed compares in the guest), "
          f"{retried} write-backs found the word changed and ran again")
    if emulated:  # KVM handed them to hvjit (a host whose KVM runs them needs no emulation)
        assert emulated >= cas_cpus * cas_rounds
        # Each one is the host's atomic instruction: no read-compute-swap window to lose in
        assert retried == 0
