"""Driving a guest instruction by instruction: single steps against the decoder's trace,
software breakpoints by address and by ELF symbol (invisible to reads through hvjit),
hardware breakpoints, debug registers and capabilities — at CPL3 and CPL0."""

import shutil

import pytest

from hvjit import decode_buffer, loaders
from hvjit.abi import VmExitCode
from hvjit.asm import assemble
from hvjit.errors import GuestFault, UnsupportedError
from hvjit.vcpu_debug import Capability, DebugError, host_support

from .guests import LOOP, build_elf, load

needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="GNU as/ld (binutils) not installed")

STRAIGHT = """
.code64
    mov $1, %eax
    add $2, %eax
    lea 5(%rax), %ebx
    nop
    xchg %ebx, %ecx
    mov %ecx, %eax
    outl %eax, $0xf4
"""


def _trace(code: bytes, origin: int) -> list[int]:
    """Each instruction's address, from hvjit's decoder (the guest's known trace)."""
    records = decode_buffer(code, 64, origin)
    return [int(r["address"]) for r in records]


@pytest.mark.parametrize("cpl", [3, 0])
def test_stepping_follows_the_instruction_trace(session, cpl):
    vm = session.create_vm(f"step{cpl}", memory=2 << 20)
    load(vm, STRAIGHT, "long", cpl)
    code = assemble(STRAIGHT, 0x1000)
    expected = _trace(code, 0x1000)
    v = vm.vcpu(0)
    seen = [v.get_register("rip")]
    for _ in range(len(expected) - 2):  # up to (not into) the final out
        ex = v.step()
        assert ex.exitcode == VmExitCode.MTRAP, str(ex)
        assert ex.rip == v.get_register("rip")
        seen.append(ex.rip)
    assert seen == expected[: len(seen)]
    assert v.get_register("rax") == 3 and v.get_register("rcx") == 8  # lea and xchg done, mov not
    assert not v.get_capability(Capability.MTRAP_EXIT)  # step() puts it back
    assert vm.run(timeout=10).code == 8  # and the guest goes on normally


def test_step_n_counts_instructions(session):
    vm = session.create_vm("stepn", memory=2 << 20)
    load(vm, STRAIGHT, "long", 3)
    expected = _trace(assemble(STRAIGHT, 0x1000), 0x1000)
    ex = vm.vcpu(0).step(4)
    assert ex.exitcode == VmExitCode.MTRAP and ex.rip == expected[4]




@pytest.mark.parametrize("cpl", [3, 0])
def test_breakpoint_by_address_stops_each_time_and_is_invisible(session, cpl):
    vm = session.create_vm(f"bp{cpl}", memory=2 << 20)
    load(vm, LOOP, "long", cpl)
    code = assemble(LOOP, 0x1000)
    target = 0x1000 + 2 + 2  # xor (2 bytes) + inc (2 bytes)
    v = vm.vcpu(0)
    original = vm.memory.read(target, 3)
    v.add_breakpoint(target)
    assert vm.memory.read(target, 3) == original == code[4:7]  # hvjit's reads see the guest's bytes
    assert v.read_virtual(target, 1) == code[4:5]
    assert v.read_virtual(target, 1, raw=True) == b"\xcc"  # the CPU sees the int3
    hits = []
    for _ in range(5):
        ex = vm.run(timeout=10)
        if ex.exitcode != VmExitCode.BPT:
            break
        assert ex.rip == target == v.get_register("rip")
        hits.append(v.get_register("rbx"))
    assert hits == [1, 12, 23]  # each pass stopped before its add
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == 33, str(ex)
    v.remove_breakpoint(target)
    assert vm.memory.view(target, 1)[0] == code[4]


@needs_binutils
def test_breakpoint_by_symbol_reports_the_symbol(session, tmp_path):
    vm = session.create_vm("elfbp", memory=8 << 20)
    loaders.load(vm, build_elf(tmp_path), format="elf", mode="long", cpl=3)
    v = vm.vcpu(0)
    bp = v.add_breakpoint("add_two")
    assert bp.symbol == "add_two" and bp.gla == vm.symbols.lookup("add_two")
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.BPT and ex.symbol.startswith("add_two"), str(ex)
    assert "add_two" in str(ex)
    # Stepping from the breakpoint executes the real instruction (add $2), not the int3.
    ex = v.step()
    assert ex.exitcode == VmExitCode.MTRAP and v.get_register("rbx") == 2
    v.remove_breakpoint("add_two")
    assert vm.run(timeout=10).code == 6
    with pytest.raises(DebugError):
        v.add_breakpoint("no_such_symbol")


def test_hardware_breakpoint_where_the_host_delivers_it(session):
    vm = session.create_vm("hwbp", memory=2 << 20)
    load(vm, LOOP, "long", 0)
    v = vm.vcpu(0)
    support = host_support(vm.kvm)["hw_breakpoints"]
    assert support in ("yes", "CPL0 only (not delivered at CPL3)")
    slot = v.add_hw_breakpoint(0x1004)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.BPT and ex.rip == 0x1004, str(ex)
    assert ex.info[0] == slot
    v.remove_hw(slot)
    assert vm.run(timeout=10).code == 33


def test_debug_registers_in_the_register_api(session):
    vm = session.create_vm("dregs", memory=2 << 20)
    v = vm.vcpu(0)
    v.set_registers(dr0=0x1234, dr7=0x401)
    regs = v.get_registers("dr0", "dr7", "rip")
    assert regs["dr0"] == 0x1234 and regs["dr7"] & 0x3 == 0x1
    assert v.get_register("dr6") & 0xFFFF0FF0 == 0xFFFF0FF0  # the architectural fixed ones


def test_capabilities_by_name(session):
    vm = session.create_vm("caps", memory=2 << 20)
    v = vm.vcpu(0)
    assert v.get_capability("halt_exit") is True
    v.set_capability(Capability.HALT_EXIT, False)  # HLT now resumes instead of returning
    load(vm, ".code64\n hlt\n mov $5, %eax\n outl %eax, $0xf4\n", "long", 0)
    assert vm.run(timeout=10).code == 5
    with pytest.raises(UnsupportedError) as e:
        v.set_capability("pause_exit", True)
    assert e.value.flavour == vm.kvm.flavour
    irq = session.create_vm("caps-irq", memory=2 << 20, irqchip=True)
    with pytest.raises(UnsupportedError):
        irq.vcpu(0).set_capability("halt_exit", True)
    with pytest.raises(ValueError):
        v.set_capability("no_such_cap", True)


def test_bpt_exit_returns_guest_int3_to_the_host(session):
    vm = session.create_vm("bptexit", memory=2 << 20)
    load(vm, ".code64\n nop\n int3\n mov $7, %eax\n outl %eax, $0xf4\n", "long", 3)
    v = vm.vcpu(0)
    v.set_capability("bpt_exit", True)
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.BPT and ex.rip == 0x1001, str(ex)


def test_guest_virtual_access_faults_with_the_error_code(session):
    vm = session.create_vm("virt", memory=2 << 20)
    load(vm, STRAIGHT, "long", 3)
    v = vm.vcpu(0)
    v.write_virtual(0x5000, b"hello")
    assert v.read_virtual(0x5000, 5) == b"hello" == vm.memory.read(0x5000, 5)
    with pytest.raises(GuestFault) as e:
        v.read_virtual(0x7FFF_0000_0000, 4)  # not mapped by hvjit's page tables
    assert e.value.translation.error_code & 1 == 0  # not-present


def test_watchpoint_reports_the_write_where_the_host_delivers_it(session):
    vm = session.create_vm("watch", memory=2 << 20)
    load(vm, """
.code64
    movl $1, 0x5000
    movl $2, 0x5008
    movl $3, 0x5008
    mov $9, %eax
    outl %eax, $0xf4
""", "long", 0)
    v = vm.vcpu(0)
    if host_support(vm.kvm)["watchpoints"].startswith("no"):  # measured: PVM never delivers them
        with pytest.raises(UnsupportedError) as e:
            v.add_watchpoint(0x5008, 4, "w")
        assert e.value.flavour == vm.kvm.flavour
        return
    slot = v.add_watchpoint(0x5008, 4, "w")
    ex = vm.run(timeout=10)
    assert ex.exitcode == VmExitCode.DB and ex.info[:2] == (slot, 0x5008), str(ex)
    assert vm.memory.read_u32(0x5008) == 2  # a data breakpoint traps after the write
    v.remove_hw(slot)
    assert vm.run(timeout=10).code == 9
