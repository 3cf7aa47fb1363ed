"""The emulation kernel against the real CPU: the same instruction run natively at CPL3.

For random forms of tests/unit/test_emulate.py and random operands, the guest runs
``popfq; <instruction>; pushfq; outl %eax, $0xf4`` at CPL3 (native speed on this host) with
the same registers and memory window the kernel gets; registers, the defined flags and the
window must agree.
"""

from __future__ import annotations

import os
import random

import numpy as np

from hvjit import entry
from hvjit.abi import VmExitCode
from tests.unit.test_emulate import (
    CODE,
    FORMS_64,
    WINDOW,
    WINDOW_SIZE,
    compare,
    random_state,
    run_hvjit,
)

CASES = int(os.environ.get("HVJIT_EMULATE_CPU_CASES", "300"))
KVM_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
IOPL3_IF = 0x3000 | 0x200


def test_kernel_matches_the_cpu_at_cpl3(session):
    vm = session.create_vm("emucpu", memory=2 << 20)
    vcpu = vm.vcpu(0)
    entry.setup_long_mode(vcpu, CODE - 1, cpl=3)
    rng = random.Random(99)
    forms = FORMS_64
    agree = ran = 0
    failures = []
    for _case in range(CASES):
        form = rng.choice(forms)
        regs, window = random_state(form, rng)
        if not WINDOW + 16 <= int(regs[4]) <= WINDOW + WINDOW_SIZE - 16:
            continue  # rsp is an operand value here (bt offset): no room for popfq's flags
        slot = int(regs[4]) - 8 - WINDOW  # where popfq finds the flags: part of both windows
        window = window[:slot] + (int(regs[17]) | IOPL3_IF).to_bytes(8, "little") + window[slot + 8:]
        status, want_regs, want_win = run_hvjit(form, regs, window)
        if not WINDOW + 16 <= int(want_regs[4]) <= WINDOW + WINDOW_SIZE:
            continue  # the instruction moved rsp away: pushfq could not report the flags
        ran += 1
        # Guest: popfq (at CODE-1) pops the case's flags, so rsp is the case's rsp after it.
        vm.memory.write(CODE - 1, b"\x9d" + form.code + b"\x9c\xe7\xf4")
        vm.memory.write(WINDOW, window)
        kregs = vcpu.get_regs()
        for i, name in enumerate(KVM_ORDER):
            kregs[name] = int(regs[i])
        kregs["rsp"] = int(regs[4]) - 8
        kregs["rip"] = CODE - 1
        kregs["rflags"] = 0x2 | IOPL3_IF
        vcpu.set_regs(kregs)
        ex = vcpu.run(timeout=10)
        assert ex.exitcode == VmExitCode.SUSPENDED, (form.name, str(ex))
        k = vcpu.get_regs()
        got = np.array([int(k[n]) for n in KVM_ORDER] + [0, 0], np.uint64)
        got[4] += np.uint64(8)  # pushfq
        got[17] = vm.memory.read_u64(int(got[4]) - 8)
        got[16] = want_regs[16]  # RIP: checked by the unicorn test (the CPU ran on)
        win = bytearray(vm.memory.read(WINDOW, WINDOW_SIZE))
        off = int(got[4]) - 8 - WINDOW  # the pushfq slot is not the instruction's doing
        if 0 <= off <= WINDOW_SIZE - 8:
            win[off:off + 8] = want_win[off:off + 8]
        d = compare(form, (got, bytes(win)), (want_regs, want_win), 64)
        if d:
            failures.append((form.name, form.code.hex(), d))
        else:
            agree += 1
    print(f"\nCPU vs kernel: {agree}/{ran} agree")
    assert ran >= CASES * 0.8
    assert not failures, failures[:5]
