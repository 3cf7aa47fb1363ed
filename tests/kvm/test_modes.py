"""Tiny guests in every entry mode print through the UART and leave through port 0xf4."""

import pytest

from hvjit.abi import SuspendHow, VmExitCode

from .guests import hello_source, load

CASES = [("real", 0), ("protected", 0), ("protected", 3), ("long", 0), ("long", 3)]


@pytest.mark.parametrize("mode,cpl", CASES)
def test_guest_prints_and_exits_with_its_code(session, mode, cpl):
    vm = session.create_vm(f"{mode}-{cpl}", memory=2 << 20)
    code = 0x40 + 2 * CASES.index((mode, cpl))
    text = f"hello from {mode} mode at CPL{cpl}"
    load(vm, hello_source(mode, text + "\\n", code), mode, cpl)
    ex = vm.run(timeout=20)
    assert ex.exitcode == VmExitCode.SUSPENDED, ex
    assert ex.how == SuspendHow.POWEROFF
    assert ex.code == code
    assert vm.console == (text + "\n").encode()
    stats = vm.vcpu(0).stats()
    # One exit per byte plus the debug exit, all handled by the native loop.
    assert stats["pio"] == len(text) + 2
    assert stats["native"] == stats["exits"] and stats["escalated"] == 0


@pytest.mark.parametrize("mode,cpl", [("protected", 3), ("long", 3)])
def test_user_mode_really_runs_at_cpl3(session, mode, cpl):
    vm = session.create_vm("cpl3", memory=2 << 20)
    load(vm, hello_source(mode, "x", 1), mode, cpl)
    v = vm.vcpu(0)
    assert v.get_desc("cs").dpl == 3 and v.get_desc("ss").dpl == 3
    assert v.get_register("cs") & 3 == 3
    assert v.get_register("rflags") & 0x3000 == 0x3000  # IOPL 3
    assert vm.run(timeout=10).code == 1


def test_string_io_rep_outsb_reaches_the_uart(session):
    vm = session.create_vm("outs", memory=2 << 20)
    load(vm, r"""
.code64
    lea msg(%rip), %rsi
    mov $msglen, %ecx
    mov $0x3f8, %dx
    rep outsb
    mov $3, %eax
    outl %eax, $0xf4
msg: .ascii "string IO works\n"
.set msglen, . - msg
""", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.code == 3
    assert vm.console == b"string IO works\n"
