"""Hooks after Unicorn's ``hook_add``, without its per-instruction cost.

hvjit never interprets the guest, so a hook is made from something that already exits:

- **code hooks** (``vm.hook_code``): a software breakpoint at the address or ELF symbol. The
  BPT exit calls ``fn(vcpu, address)``, then the vCPU steps over the breakpoint and goes on;
  the guest only pays at the hooked address.
- **exit hooks** (``vm.hook_exit``): ``fn(vcpu, exit)`` for each exit of a kind (a
  :class:`~hvjit.abi.VmExitCode`) that reaches Python, before hvjit's own handler. A hook
  returning True has dealt with the exit: the guest resumes without hvjit's handler. Exits
  the native loop handles itself (native devices' ports and MMIO, resumed HLTs) never reach
  Python: the exit trace (:mod:`hvjit.trace`) sees those. Native (Numba) exit hooks are not
  offered yet: a native device on the port or range is the fast path.
- **memory hooks** (``vm.hook_memory``): the guest pages holding the range leave the RAM slot
  so that accesses exit as MMIO (``access`` "r" or "rw"), or are mapped read-only so that
  only writes exit (``access`` "w", with KVM_CAP_READONLY_MEM). KVM decodes the access and
  hvjit completes it against the guest's RAM; ``fn(gpa, size, is_write, value)`` sees each
  access to the range, and for a read may return a value to use instead of memory's. Code
  and page tables must not live in an "r"/"rw" page (KVM cannot fetch or walk through MMIO).

Hooks change KVM's memory map and breakpoints: install and remove them while no vCPU runs.
Memory hooks and dirty-page tracking (snapshots' fast reset) both own the RAM slots and do
not combine yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from . import _trampoline as _t
from . import vcpu_debug
from .abi import KVM_SYNC_X86_REGS, Cap, VmExitCode
from .errors import HvjitError, UnsupportedError
from .exits import VmExit
from .memory import PAGE_SIZE, MemorySegment
from .vcpu_lifecycle import VcpuBusyError

Vm = Any  # hvjit.vm.Vm: not imported, the VM imports this module
KVM_MEM_READONLY = 2
ACCESS_KINDS = ("r", "w", "rw")

CodeHook = Callable[[Any, int], None]
ExitHook = Callable[[Any, VmExit], Optional[bool]]
MemoryHook = Callable[[int, int, bool, int], Optional[int]]


class HookError(HvjitError, ValueError):
    """A hook that cannot be installed or removed as asked."""


@dataclass(eq=False)
class _MemoryHook:
    start: int  # the hooked range
    end: int
    first_page: int  # the pages that exit
    end_page: int
    fn: MemoryHook
    access: str
    segment: MemorySegment
    bus_slot: int = 0


class Hooks:
    """``vm.hooks``: every hook of one VM, by handle (``vm.hook_*`` return the handles)."""

    def __init__(self, vm: Vm):
        self._vm = vm
        self._next = 1
        self._code: dict[int, dict[int, CodeHook]] = {}  # guest-linear address -> handle -> fn
        self._own_breakpoints: set[int] = set()  # breakpoints placed for code hooks
        self._exit: dict[int, dict[int, ExitHook]] = {}  # exit code -> handle -> fn
        self._memory: dict[int, _MemoryHook] = {}
        self._where: dict[int, tuple[str, int]] = {}  # handle -> (kind, key)
        self._extra_slots: dict[int, list[int]] = {}  # id(segment) -> KVM slots carved from it
        self._spare_slots: list[int] = []

    def _handle(self, kind: str, key: int) -> int:
        h, self._next = self._next, self._next + 1
        self._where[h] = (kind, key)
        return h

    # ---- code ---------------------------------------------------------------------------------

    def code(self, where: Union[int, str], fn: CodeHook, vcpu: int = 0) -> int:
        """Call ``fn(vcpu, address)`` each time a vCPU reaches ``where`` (a guest-linear
        address or ELF symbol, translated through vCPU ``vcpu``'s paging)."""
        _callable(fn)
        v = self._vm.vcpu(vcpu)
        gla, _ = vcpu_debug.resolve(v, where)
        if gla not in self._vm.breakpoints:
            v.add_breakpoint(gla)
            self._own_breakpoints.add(gla)
        h = self._handle("code", gla)
        self._code.setdefault(gla, {})[h] = fn
        return h

    def on_breakpoint(self, vcpu, exit_: VmExit) -> bool:
        """A BPT exit: run the code hooks there; True when the guest should just go on (the
        breakpoint is a hook's, not the user's)."""
        fns = self._code.get(exit_.rip)
        if not fns:
            return False
        for fn in list(fns.values()):
            fn(vcpu, exit_.rip)
        return exit_.rip in self._own_breakpoints

    # ---- exits --------------------------------------------------------------------------------

    def exit(self, kind: Union[VmExitCode, int, str], fn: ExitHook) -> int:
        """Call ``fn(vcpu, exit)`` for every exit of ``kind`` that reaches Python."""
        _callable(fn)
        code = _exit_code(kind)
        h = self._handle("exit", code)
        self._exit.setdefault(code, {})[h] = fn
        return h

    @property
    def exit_hooks(self) -> bool:
        return bool(self._exit)

    def on_exit(self, vcpu, rec) -> bool:
        """Run the exit hooks for the exit record ``rec``; True when one of them handled it."""
        fns = self._exit.get(int(rec["exitcode"]))
        if not fns:
            return False
        exit_ = VmExit.from_record(rec, _rip(vcpu))
        handled = False
        for fn in list(fns.values()):
            handled = bool(fn(vcpu, exit_)) or handled
        return handled

    # ---- memory -------------------------------------------------------------------------------

    def memory(self, gpa: int, size: int, fn: MemoryHook, access: str = "rw") -> int:
        """Call ``fn(gpa, size, is_write, value)`` for guest accesses to ``[gpa, gpa+size)``
        of the kinds in ``access`` ("r", "w" or "rw")."""
        _callable(fn)
        if access not in ACCESS_KINDS:
            raise HookError(f"access must be one of {ACCESS_KINDS}, not {access!r}")
        if not isinstance(gpa, int) or not isinstance(size, int) or gpa < 0 or size <= 0:
            raise HookError(f"invalid guest-physical range {gpa!r}+{size!r}")
        first, end = gpa & ~(PAGE_SIZE - 1), -(-(gpa + size) // PAGE_SIZE) * PAGE_SIZE
        vm = self._vm
        if not vm.memory.is_mapped(first, end - first):
            raise HookError(f"memory hook {gpa:#x}+{size:#x}: pages {first:#x}-{end:#x} are not inside "
                            "one RAM segment")
        for other in self._memory.values():
            if first < other.end_page and other.first_page < end:
                raise HookError(f"memory hook {gpa:#x}+{size:#x} shares a page with the hook at "
                                f"{other.start:#x}+{other.end - other.start:#x}")
        if access == "w" and not vm.kvm.has(Cap.READONLY_MEM):
            raise UnsupportedError("write-only memory hooks", vm.kvm.flavour, "KVM_CAP_READONLY_MEM is missing")
        dirty = getattr(vm, "_dirty", None)
        if dirty is not None and dirty.valid:
            raise HookError("memory hooks and dirty-page tracking (snapshots' fast reset) do not combine: "
                            "both own the RAM slots")
        self._require_stopped()
        hook = _MemoryHook(gpa, gpa + size, first, end, fn, access, vm.memory.find(first, end - first))
        hook.bus_slot = vm.bus.add_mmio_handler(first, end - first, lambda *a: self._access(hook, *a),
                                                f"hook@{gpa:#x}")
        h = self._handle("memory", 0)
        self._memory[h] = hook
        try:
            self._carve(hook.segment)
        except BaseException:
            del self._memory[h]
            vm.bus.remove_slot(hook.bus_slot)
            raise
        return h

    def _access(self, hook: _MemoryHook, gpa: int, size: int, is_write: bool, value: int) -> int:
        """Complete one access that exited from a hooked page, against the guest's RAM."""
        memory = self._vm.memory
        hit = gpa < hook.end and hook.start < gpa + size and ("w" if is_write else "r") in hook.access
        mask = (1 << (8 * size)) - 1
        if is_write:
            if hit:
                hook.fn(gpa, size, True, value & mask)
            memory.write(gpa, (value & mask).to_bytes(size, "little"))
            return 0
        current = int.from_bytes(memory.view(gpa, size).tobytes(), "little")  # as the CPU sees RAM
        if hit:
            answer = hook.fn(gpa, size, False, current)
            if answer is not None:
                current = int(answer) & mask
        return current

    def _carve(self, seg: MemorySegment) -> None:
        """Map ``seg`` into KVM as RAM slots around its hooked pages (read-only slots for
        write hooks), in place of its current slots. KVM cannot move or resize a slot, so
        they are deleted and created anew."""
        vm = self._vm
        pieces, at = [], seg.gpa
        ram_flags = KVM_MEM_READONLY if seg.readonly else 0
        for hook in sorted((m for m in self._memory.values() if m.segment is seg), key=lambda m: m.first_page):
            if hook.first_page > at:
                pieces.append((at, hook.first_page - at, ram_flags))
            if hook.access == "w":
                pieces.append((hook.first_page, hook.end_page - hook.first_page, KVM_MEM_READONLY))
            at = hook.end_page
        if at < seg.end:
            pieces.append((at, seg.end - at, ram_flags))
        extra = self._extra_slots.pop(id(seg), [])
        for slot in [seg.slot] + extra:
            self._set_slot(slot, 0, seg.gpa, 0, 0)
        self._spare_slots += extra
        slots = [seg.slot]
        while len(slots) < len(pieces):
            if self._spare_slots:
                slots.append(self._spare_slots.pop())
            else:
                slots.append(vm._next_slot)
                vm._next_slot += 1
        for slot, (gpa, size, flags) in zip(slots, pieces):
            self._set_slot(slot, flags, gpa, size, seg.host_address + (gpa - seg.gpa))
        if len(slots) > 1:
            self._extra_slots[id(seg)] = slots[1:]

    def _set_slot(self, slot: int, flags: int, gpa: int, size: int, host: int) -> None:
        vm = self._vm
        vm._kvm_call(_t.lib.hvt_vm_set_user_memory(vm.fd, slot, flags, gpa, size, _t.ffi.cast("void *", host)),
                     "KVM_SET_USER_MEMORY_REGION", f"hook slot {slot} at {gpa:#x}+{size:#x}")

    def remap(self) -> None:
        """After ``vm.reinit`` mapped every segment whole again: carve the hooked ones."""
        self._spare_slots += [s for slots in self._extra_slots.values() for s in slots]
        self._extra_slots.clear()
        for seg in {id(m.segment): m.segment for m in self._memory.values()}.values():
            self._carve(seg)

    def _require_stopped(self) -> None:
        if any(v._control.thread is not None for v in self._vm.vcpus):
            raise VcpuBusyError(f"VM {self._vm.name!r}: install and remove memory hooks while no vCPU runs")

    # ---- removing -----------------------------------------------------------------------------

    def remove(self, handle: int) -> None:
        """Remove one hook by the handle ``vm.hook_*`` returned."""
        where = self._where.pop(handle, None)
        if where is None:
            raise HookError(f"no hook with handle {handle}")
        kind, key = where
        if kind == "code":
            fns = self._code[key]
            del fns[handle]
            if not fns:
                del self._code[key]
                if key in self._own_breakpoints:
                    self._own_breakpoints.discard(key)
                    if key in self._vm.breakpoints:
                        vcpu_debug.remove_breakpoint(self._vm.vcpu(0), key)
        elif kind == "exit":
            del self._exit[key][handle]
            if not self._exit[key]:
                del self._exit[key]
        else:
            self._require_stopped()
            hook = self._memory.pop(handle)
            self._vm.bus.remove_slot(hook.bus_slot)
            self._carve(hook.segment)

    def __len__(self) -> int:
        return len(self._where)


def _callable(fn) -> None:
    if not callable(fn):
        raise HookError(f"a hook must be callable, not {fn!r}")


def _exit_code(kind) -> int:
    try:
        if isinstance(kind, str):
            return int(VmExitCode[kind.upper()])
        return int(VmExitCode(int(kind)))
    except (KeyError, ValueError):
        names = ", ".join(c.name.lower() for c in VmExitCode)
        raise HookError(f"unknown exit kind {kind!r}; known: {names}") from None


def _rip(vcpu) -> int:
    """rip at the exit: from kvm_run where KVM syncs the registers (tracing), else an ioctl."""
    r = vcpu._run[0]
    if int(r["kvm_valid_regs"]) & KVM_SYNC_X86_REGS:
        return int(r["sync_regs"]["rip"])
    return int(vcpu.get_regs()["rip"])
