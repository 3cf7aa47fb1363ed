"""Long ``rep stos``/``rep movs`` at CPL0, finished by hvjit in one go.

Where KVM runs ring-0 code in its instruction emulator (PVM), a string instruction costs one
emulation round per element: Linux's ``clear_bss`` (``rep stosb`` over ~18 MB) alone takes
about ten seconds. hvjit finishes such an instruction itself when a periodic tick finds the
vCPU inside one — the emulator stops between elements with RIP on the instruction and RCX
counting what is left, which is an architectural state like any interrupt boundary. The rest
is stored through the guest's page tables (A/D bits set by the walk) into guest RAM; a range
that faults or leaves RAM is cut short there and KVM goes on with the remainder, so faults
and MMIO keep their meaning.

Handled: 64-bit code, address size 64, DF=0, ``rep stos{b,w,d,q}`` and non-overlapping
``rep movs{b,w,d,q}`` without segment overrides. Not while the VM tracks dirty pages or has
software breakpoints (both need every store to be seen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_REMAINING = 1024  # elements: below this KVM finishes sooner than a round trip here
RFLAGS_DF = 1 << 10
REX_W = 0x08
WIDTH = {0xAA: 1, 0xAB: 4, 0xA4: 1, 0xA5: 4}  # with 66: 2, with REX.W: 8 (AB, A5)
DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass
class RepStringStats:
    """What the accelerator did for one VM."""

    ticks: int = 0  # times a tick looked at a vCPU
    finished: int = 0  # string instructions hvjit completed (wholly or up to a fault)
    bytes: int = 0  # bytes stored by them


@dataclass(frozen=True)
class StringOp:
    store: bool  # stos (else movs)
    width: int
    length: int  # instruction bytes


def decode(code: bytes):
    """The ``rep stos``/``rep movs`` at the start of ``code`` (64-bit mode), or None."""
    rep = opsize = False
    rex = 0
    for i, byte in enumerate(code[:15]):
        if byte == 0xF3:
            rep = True
        elif byte == 0x66:
            opsize = True
        elif 0x40 <= byte <= 0x4F:
            rex = byte
            nxt = code[i + 1] if i + 1 < len(code) else 0
            if nxt not in WIDTH:  # REX must be last before the opcode
                return None
        elif byte in WIDTH:
            if not rep:
                return None
            width = WIDTH[byte]
            if width == 4:
                width = 8 if rex & REX_W else 2 if opsize else 4
            return StringOp(byte in (0xAA, 0xAB), width, i + 1)
        else:  # 0x67 (32-bit addresses), segment overrides, anything else: not ours
            return None
    return None


def on_tick(vcpu) -> None:
    """Finish the long string instruction the vCPU is in, if it is one of ours."""
    vm = vcpu.vm
    stats = vm.rep_string_stats
    stats.ticks += 1
    if vm.breakpoints or (vm._dirty is not None and vm._dirty.valid):
        return
    from .emulation import guest  # the decoder and page walker load on first use

    regs = vcpu.get_regs()
    count = int(regs["rcx"])
    if count < MIN_REMAINING or int(regs["rflags"]) & RFLAGS_DF:
        return
    sregs = vcpu.get_sregs()
    if guest.cpl(sregs, regs) != 0 or guest.cpu_mode(sregs)[1] != 64:
        return
    rip = int(regs["rip"])
    op = decode(guest.fetch_code(vcpu, rip, 15, sregs, regs))
    if op is None:
        return
    kw, mem = guest.paging_registers(vcpu, sregs, regs)
    done = _store(vm, kw, mem, regs, op, count) if op.store else _move(vm, kw, mem, regs, op, count)
    if not done:
        return
    regs["rcx"] = count - done
    regs["rdi"] = int(regs["rdi"]) + done * op.width
    if not op.store:
        regs["rsi"] = int(regs["rsi"]) + done * op.width
    if done == count:
        regs["rip"] = rip + op.length
    vcpu.set_regs(regs)
    stats.finished += 1
    stats.bytes += done * op.width


def _ram_chunks(vm, kw, mem, gla: int, size: int, write: bool):
    """Host views of the longest prefix of ``[gla, gla+size)`` that maps to RAM without a
    fault, page-granular; empty when the first page does not."""
    from .kernels import pagewalk as pw

    access = pw.Access.WRITE if write else pw.Access.READ
    setup = pw.copy_setup(mem, gla, size, access=access, **kw)
    if setup.fault is not None:
        prefix = (setup.fault.gla & ~0xFFF) - gla
        if prefix <= 0:
            return []
        setup = pw.copy_setup(mem, gla, prefix, access=access, **kw)
        if setup.fault is not None:
            return []
    views = []
    for gpa, length in setup.chunks:
        if not vm.memory.is_mapped(gpa, length):
            break
        views.append(vm.memory.view(gpa, length))
    return views


def _store(vm, kw, mem, regs, op: StringOp, count: int) -> int:
    value = int(regs["rax"]) & ((1 << (8 * op.width)) - 1)
    done_bytes = 0
    for view in _ram_chunks(vm, kw, mem, int(regs["rdi"]), count * op.width, True):
        usable = len(view) - len(view) % op.width
        view[:usable].view(DTYPES[op.width])[:] = value
        done_bytes += usable
        if usable != len(view):
            break
    return done_bytes // op.width


def _move(vm, kw, mem, regs, op: StringOp, count: int) -> int:
    src, dst, size = int(regs["rsi"]), int(regs["rdi"]), count * op.width
    if src < dst + size and dst < src + size:
        return 0  # overlapping: element order matters, KVM keeps it
    sources = _ram_chunks(vm, kw, mem, src, size, False)
    targets = _ram_chunks(vm, kw, mem, dst, size, True)
    data = np.concatenate(sources) if sources else np.zeros(0, np.uint8)
    room = sum(len(t) for t in targets)
    n = min(len(data), room)
    n -= n % op.width
    at = 0
    for view in targets:
        take = min(len(view), n - at)
        if take <= 0:
            break
        view[:take] = data[at:at + take]
        at += take
    return n // op.width
