"""`syscall` from CPL3 into a guest kernel, on any host: where KVM leaves the entry half done
(PVM: CS/SS stay the user's), hvjit completes it; ordinary faults still reach the guest.

The guest is a tiny kernel: it loads an IDT (#GP and #PF handlers that report through port
0xf4), programs STAR/FMASK/LSTAR with WRMSR, and IRETs to user code that makes three system
calls and then touches an unmapped address. Its syscall entry checks what a CPU guarantees
(CS/SS from STAR, CPL0, IF masked, the user's RSP) and returns with IRETQ.
"""

import struct

import pytest

from hvjit import entry
from hvjit.asm import assemble
from hvjit.system import Kvm
from hvjit.vm import Vm

KERNEL, USER, IDT, USER_STACK = 0x200000, 0x1000, 0x300000, 0x80000
UNMAPPED = 0x100000000000  # beyond the identity map: PML4 slot 0's PDPT has 4 entries
OK, GP_SEEN, WRONG_PF, KERNEL_BAD, USER_BAD = 0xE14, 0xE13, 0xE15, 0xBAD, 0xBAD2

KERNEL_SOURCE = f"""
.code64
kstart:
    lidt idtr(%rip)
    mov $0xC0000081, %ecx      # STAR: kernel CS 0x08 (SS 0x10)
    xor %eax, %eax
    mov $0x8, %edx
    wrmsr
    mov $0xC0000084, %ecx      # FMASK: IF, DF, TF, AC
    mov $0x40700, %eax
    xor %edx, %edx
    wrmsr
    mov $0xC0000082, %ecx      # LSTAR
    lea sys_entry(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    push $0x2b                 # to user mode: SS, RSP, RFLAGS (IF, IOPL3), CS, RIP
    push ${USER_STACK}
    push $0x3202
    push $0x23
    push ${USER}
    iretq

sys_entry:
    swapgs                     # #GP at CPL3
    mov %ss, %r8d
    cmp $0x10, %r8d
    jne kbad
    mov %cs, %r8d
    cmp $0x8, %r8d
    jne kbad
    mov %cr0, %r8              # CPL0 only
    pushfq
    pop %r8
    test $0x200, %r8d          # IF masked by FMASK
    jnz kbad
    cmp %rbx, %rsp             # still the user's stack
    jne kbad
    swapgs
    add $100, %rax
    mov %rsp, %r9
    push $0x2b
    push %r9
    push %r11
    push $0x23
    push %rcx
    iretq
kbad:
    mov ${KERNEL_BAD}, %eax
    outl %eax, $0xf4

gp_handler:
    nop
    mov ${GP_SEEN}, %eax
    outl %eax, $0xf4
pf_handler:
    nop
    mov %cr2, %rax
    movabs ${UNMAPPED}, %rdx
    cmp %rdx, %rax
    jne 1f
    mov ${OK}, %eax
    outl %eax, $0xf4
1:  mov ${WRONG_PF}, %eax
    outl %eax, $0xf4

.balign 8
idtr:
    .word 16 * 32 - 1
    .quad {IDT}
"""

USER_SOURCE = f"""
.code64
    outb %al, $0x99            # an unclaimed port: the run returns here (snapshot point)
    mov $3, %r12d
1:  mov %rsp, %rbx
    mov %r12, %rax
    syscall
    lea 100(%r12), %rdx
    cmp %rdx, %rax
    jne bad
    cmp %rbx, %rsp
    jne bad
    dec %r12d
    jnz 1b
    movabs ${UNMAPPED}, %rdx
    mov (%rdx), %rax           # an ordinary #PF: the guest's handler reports it
bad:
    mov ${USER_BAD}, %eax
    outl %eax, $0xf4
"""


def _gate(target: int) -> bytes:
    return struct.pack("<HHBBHII", target & 0xFFFF, entry.SEL_CODE64, 0, 0x8E,
                       (target >> 16) & 0xFFFF, target >> 32, 0)


def _boot(session, name: str, kernel_page_user: bool, fixup):
    # A bare guest: ask for the fix-up where the host needs it (the Linux and multiboot
    # loaders install it by themselves).
    pvm = Kvm.instance().flavour == "pvm"
    vm = session.create_vm(name, memory=4 << 20, syscall_fixup=pvm if fixup is None else fixup)
    code = assemble(KERNEL_SOURCE, KERNEL)
    vm.memory.write(KERNEL, code)
    vm.memory.write(USER, assemble(USER_SOURCE, USER))
    state = entry.setup_mode(vm.vcpu(0), "long", KERNEL, cpl=0)
    symbols = _symbols(code)
    vm.memory.write(IDT + 13 * 16, _gate(KERNEL + symbols["gp_handler"]))
    vm.memory.write(IDT + 14 * 16, _gate(KERNEL + symbols["pf_handler"]))
    if not kernel_page_user:  # the 2 MiB page holding the kernel: supervisor-only, as Linux's text
        pde = state.sysarea + entry.PD_OFF + 8 * (KERNEL >> 21)
        vm.memory.write_u64(pde, vm.memory.read_u64(pde) & ~0x4)
    return vm


def _symbols(code: bytes) -> dict[str, int]:
    """Offsets of the handlers: they follow known byte patterns (nop; mov $imm32, %eax)."""
    gp = code.index(b"\x90\xb8" + GP_SEEN.to_bytes(4, "little"))
    pf = code.index(b"\x90\x0f\x20\xd0")  # nop; mov %cr2, %rax
    return {"gp_handler": gp, "pf_handler": pf}


@pytest.mark.parametrize("kernel_page_user", [True, False], ids=["gp-at-swapgs", "pf-on-supervisor-text"])
def test_syscall_from_cpl3_enters_the_kernel_as_on_hardware(session, kernel_page_user):
    vm = _boot(session, f"sys-{int(kernel_page_user)}", kernel_page_user, fixup=None)
    assert vm.run(timeout=20).exit.port == 0x99
    result = vm.run(timeout=20)
    assert result.code == OK, f"guest reported {result.code:#x} ({result})"
    if vm.kvm.flavour == "pvm":
        stats = vm.syscall_stats
        assert stats is not None and stats.armed == 1
        assert stats.syscalls == 3 and stats.faults == 1, stats


def test_a_restored_guest_keeps_the_fixup(session):
    """LSTAR comes back by KVM_SET_MSRS, which no trap sees: the restore arms the fix-up."""
    vm = _boot(session, "sys-snap", False, fixup=None)
    assert vm.run(timeout=20).exit.port == 0x99  # the kernel has set LSTAR, user mode next
    snap = vm.snapshot()
    vm.destroy()
    again = Vm.restore(session, snap, name="sys-restored")
    result = again.run(timeout=20)
    assert result.code == OK, f"guest reported {result.code:#x} ({result})"
    if again.kvm.flavour == "pvm":
        assert again.syscall_stats.syscalls == 3 and again.syscall_stats.armed == 1


def test_without_the_fixup_pvm_shows_the_quirk(session):
    """The negative control: where the host has the quirk, the guest sees it without hvjit."""
    vm = _boot(session, "sys-off", True, fixup=False)
    assert vm.run(timeout=20).exit.port == 0x99
    result = vm.run(timeout=20)
    if vm.kvm.flavour == "pvm":
        assert result.code == GP_SEEN  # swapgs ran at CPL3
        assert vm.syscall_stats is None
    else:
        assert result.code == OK


def test_the_fixups_breakpoints_are_not_the_users(session):
    vm = _boot(session, "sys-slots", True, fixup=None)
    vm.unassigned_ports = "ones"
    assert vm.run(timeout=20).code == OK
    if vm.kvm.flavour != "pvm":
        pytest.skip("no fix-up on this host: syscall works natively")
    v = vm.vcpu(0)
    owned = [s for s, hw in v._debug.hw.items() if hw.on_hit is not None]
    assert owned == [3, 2] or sorted(owned) == [2, 3]
    from hvjit.vcpu_debug import DebugError

    with pytest.raises(DebugError, match="hvjit's own"):
        v.remove_hw(owned[0])
    assert v.add_hw_breakpoint(KERNEL) == 0  # the user's slots are the low ones
