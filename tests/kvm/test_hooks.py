"""Hooks: code hooks through breakpoints (the guest runs on transparently), exit hooks by
kind, and memory hooks that make RAM pages exit (all accesses, or only writes)."""

import shutil

import pytest

from hvjit import loaders
from hvjit.abi import VmExitCode
from hvjit.hooks import HookError

from .guests import LOOP, LOOP_TARGET, build_elf, load

needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="GNU as/ld (binutils) not installed")

TARGET = LOOP_TARGET


@pytest.mark.parametrize("cpl", [3, 0])
def test_code_hook_runs_at_each_pass_and_the_guest_goes_on(session, cpl):
    vm = session.create_vm(f"hookcode{cpl}", memory=2 << 20)
    load(vm, LOOP, "long", cpl)
    original = vm.memory.view(TARGET, 1)[0]
    seen = []
    h = vm.hook_code(TARGET, lambda vcpu, address: seen.append((address, vcpu.get_register("rbx"))))
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == 33, str(ex)  # no BPT reached the caller
    assert seen == [(TARGET, 1), (TARGET, 12), (TARGET, 23)]  # before each pass's add
    vm.unhook(h)
    assert not vm.breakpoints and vm.memory.view(TARGET, 1)[0] == original
    with pytest.raises(HookError):
        vm.unhook(h)


def test_a_users_breakpoint_still_stops_where_a_code_hook_is(session):
    vm = session.create_vm("hookbp", memory=2 << 20)
    load(vm, LOOP, "long", 3)
    v = vm.vcpu(0)
    v.add_breakpoint(TARGET)
    seen = []
    h = vm.hook_code(TARGET, lambda vcpu, address: seen.append(address))
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.BPT and ex.rip == TARGET and seen == [TARGET]
    vm.unhook(h)
    assert TARGET in vm.breakpoints  # the user's breakpoint stays




@needs_binutils
def test_code_hook_on_a_symbol(session, tmp_path):
    vm = session.create_vm("hooksym", memory=8 << 20)
    loaders.load(vm, build_elf(tmp_path), format="elf", mode="long", cpl=3)
    calls = []
    vm.hook_code("add_two", lambda vcpu, address: calls.append(vcpu.get_register("rbx")))
    assert vm.run(timeout=30).code == 6
    assert calls == [0, 2, 4]


PORTS = """
.code64
    mov $0x555, %dx
    mov $0x11, %eax
    outb %al, %dx
    mov $0x22, %eax
    outb %al, %dx
    inc %dx
    inb %dx, %al
    outl %eax, $0xf4
"""


def test_exit_hook_sees_and_handles_unclaimed_ports(session):
    vm = session.create_vm("hookexit", memory=2 << 20)
    load(vm, PORTS, "long", 3)
    seen = []

    def on_port(vcpu, exit_):
        seen.append((exit_.port, exit_.is_in, exit_.data))
        if exit_.is_in:
            vcpu._page[vcpu._run[0]["io_data_offset"]] = 0x3C  # answer the read
        return True

    h = vm.hook_exit("inout", on_port)
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == 0x3C, str(ex)
    assert seen == [(0x555, False, 0x11), (0x555, False, 0x22), (0x556, True, 0)]
    vm.unhook(h)
    load(vm, PORTS, "long", 3)
    ex = vm.run(timeout=30)  # without the hook the first OUT goes to the caller again
    assert ex.exitcode == VmExitCode.INOUT and ex.port == 0x555


def test_an_exit_hook_that_returns_none_only_watches(session):
    vm = session.create_vm("hookwatch", memory=2 << 20)
    load(vm, ".code64\n hlt\n mov $9, %eax\n outl %eax, $0xf4\n", "long", 0)
    seen = []
    vm.hook_exit(VmExitCode.HLT, lambda vcpu, exit_: seen.append(exit_.exitcode))
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.HLT and seen == [VmExitCode.HLT]  # hvjit's handling as before
    with pytest.raises(HookError):
        vm.hook_exit("no_such_exit", print)
    with pytest.raises(HookError):
        vm.hook_exit("hlt", "not callable")


DATA = 0x8000
MEMORY = f"""
.code64
    mov ${DATA:#x}, %edi
    movl $0x1234, 8(%rdi)       # hooked: a write
    mov 8(%rdi), %eax           # hooked: a read (answered from RAM)
    add 16(%rdi), %eax          # hooked: a read the hook answers (0x100)
    movl $0x55, 0x800(%rdi)     # same page, outside the range: emulated, not reported
    add 0x800(%rdi), %eax
    outl %eax, $0xf4
"""


@pytest.mark.parametrize("cpl", [3, 0])
def test_memory_hook_sees_reads_and_writes(session, cpl):
    vm = session.create_vm(f"hookmem{cpl}", memory=2 << 20)
    load(vm, MEMORY, "long", cpl)
    vm.trace.enable(64)
    seen = []

    def watch(gpa, size, is_write, value):
        seen.append((gpa, size, is_write, value))
        return 0x100 if gpa == DATA + 16 else None

    h = vm.hook_memory(DATA + 8, 16, watch)
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == 0x1234 + 0x100 + 0x55, str(ex)
    assert seen == [(DATA + 8, 4, True, 0x1234), (DATA + 8, 4, False, 0x1234), (DATA + 16, 4, False, 0)]
    assert vm.memory.read_u32(DATA + 8) == 0x1234 and vm.memory.read_u32(DATA + 0x800) == 0x55
    mmio = vm.trace.records()["exitcode"] == VmExitCode.INST_EMUL
    assert mmio.sum() == 5  # every access to the page exited
    vm.unhook(h)
    vm.trace.clear()
    load(vm, MEMORY, "long", cpl)
    assert vm.run(timeout=30).code == 0x1234 + 0x55  # RAM again: no hook answers 16(%rdi)
    assert not (vm.trace.records()["exitcode"] == VmExitCode.INST_EMUL).any()


def test_write_hook_maps_the_page_read_only(session):
    vm = session.create_vm("hookw", memory=2 << 20)
    load(vm, MEMORY, "long", 3)
    vm.memory.write_u32(DATA + 16, 7)
    vm.trace.enable(64)
    seen = []
    vm.hook_memory(DATA + 8, 16, lambda *access: seen.append(access), access="w")
    ex = vm.run(timeout=30)
    assert ex.code == 0x1234 + 7 + 0x55, str(ex)
    assert seen == [(DATA + 8, 4, True, 0x1234)]  # reads did not exit
    mmio = vm.trace.records()["exitcode"] == VmExitCode.INST_EMUL
    assert mmio.sum() == 2  # the two writes to the page


def test_memory_hooks_refuse_what_they_cannot_do(session):
    vm = session.create_vm("hookbad", memory=2 << 20)
    vm.hook_memory(DATA, 8, print)
    with pytest.raises(HookError):
        vm.hook_memory(DATA + 0x100, 8, print)  # the same page
    with pytest.raises(HookError):
        vm.hook_memory(0x10000000, 8, print)  # not RAM
    with pytest.raises(HookError):
        vm.hook_memory(DATA + 0x1000, 8, print, access="x")


def test_memory_hooks_survive_reinit(session):
    vm = session.create_vm("hookreinit", memory=2 << 20)
    seen = []
    vm.hook_memory(DATA + 8, 16, lambda *access: seen.append(access))
    vm.reinit()
    load(vm, MEMORY, "long", 3)
    assert vm.run(timeout=30).code == 0x1234 + 0x55
    assert len(seen) == 3
