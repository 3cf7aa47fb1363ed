"""A virtual machine (after bhyve's vmm API): memory segments, vCPUs, devices, run.

A ``Vm`` is created through a session (``session.create_vm(...)``). Guest RAM is a list of
segments mapped into guest-physical space; whatever is not RAM is MMIO, answered by the
devices on the VM's bus or returned to the caller as an exit.
"""

from __future__ import annotations

import re
import threading
from typing import Callable, Iterable, Optional, Union

from . import _trampoline as _t
from . import dirty, interrupts, msr_filter, rep_strings, reset, snapshot, syscall_entry, timer_slack
from .abi import Cap, SuspendHow
from .devices import catalog
from .devices.bus import IoBus
from .devices.debug_exit import DebugExit
from .devices.testdev import IRQ_LINES, IRQ_PORT, TestDev
from .devices.uart16550 import Uart16550
from .errors import (
    CapabilityError,
    FactoryNotFoundError,
    HvjitError,
    MemoryMapError,
    ObjectDestroyedError,
)
from .hooks import Hooks
from .memory import (
    PAGE_SIZE,
    GuestMemory,
    MemorySegment,
    allocate_segment,
    validate_layout,
)
from .snapshot import Snapshot
from .system import Kvm
from .trace import Trace
from .vcpu import Vcpu
from .vcpu_lifecycle import Request, VcpuBusyError, authorize
from .vcpu_threads import RunResult, run_vm

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
# Where KVM may put its real-mode TSS (3 pages) and identity map (1 page) on Intel hosts:
# just below the BIOS area at 4 GiB, as QEMU and kvmtool do. Never RAM.
KVM_IDENTITY_MAP_GPA = 0xFFFBC000
KVM_TSS_GPA = 0xFFFBD000
LOWMEM_LIMIT = 0xC0000000  # RAM above this goes above 4 GiB (the PCI hole stays MMIO)
HIGHMEM_BASE = 1 << 32
MAX_VCPUS = 64
PM_BASE = 0x600  # ACPI PM1a blocks and the PM timer (the FADT written by the loaders agrees)

MemorySpec = Union[int, Iterable[tuple[int, int]]]


def _memory_layout(memory: MemorySpec) -> list[tuple[int, int]]:
    """A size becomes bhyve's lowmem/highmem split; a list of (gpa, size) is taken as is."""
    if isinstance(memory, int):
        if memory <= 0 or memory % PAGE_SIZE:
            raise MemoryMapError(f"memory size {memory:#x} must be a positive multiple of {PAGE_SIZE:#x}")
        if memory <= LOWMEM_LIMIT:
            return [(0, memory)]
        return [(0, LOWMEM_LIMIT), (HIGHMEM_BASE, memory - LOWMEM_LIMIT)]
    return [(int(g), int(s)) for g, s in memory]


class Vm:
    """One KVM virtual machine."""

    def __init__(self, session, name: str, *, memory: MemorySpec = 16 << 20, vcpus: int = 1,
                 devices: bool = True, irqchip: bool = False, kvm: Optional[Kvm] = None,
                 syscall_fixup: Optional[bool] = None, accelerate_strings: Optional[bool] = None,
                 dirty_ring: Optional[int] = None):
        """``dirty_ring``: entries of each vCPU's dirty ring, which snapshots and resets read
        the guest's writes from (:mod:`hvjit.dirty`); None: the default where the host offers
        rings, else KVM's dirty bitmap; 0: the bitmap."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"VM name {name!r}: 1-32 characters of letters, digits, '.', '_', '-', "
                             "starting with a letter or digit")
        if not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, got {vcpus!r}")
        layout = _memory_layout(memory)
        validate_layout(layout)  # before anything is created
        # Strong: a VM keeps its session alive (the session owns the VM through its handle
        # table; the cycle is collected when neither is reachable, and the session's
        # finalizer then tears both down).
        self._session = session
        self._handles: list[tuple[int, str]] = []  # what this VM registered with its session
        self.name = name
        self.kvm = kvm or Kvm.instance()
        self.memory = GuestMemory()
        self.bus = IoBus()
        self.devices: list = []
        self._syncing: list = []  # devices whose sync() runs when the loop drains
        self.device_specs: list[tuple[str, dict]] = []  # (factory name, config) of each device
        self.default_devices = devices
        self._dirty = None  # hvjit.dirty.DirtyTracker, once a snapshot is taken
        self._ring_entries = dirty.ring_entries(self.kvm, dirty_ring)  # checked before anything is made
        self._ring_asked = dirty_ring is not None
        self._vcpu_count = vcpus
        self._rings: Optional[dirty.DirtyRings] = None  # with the KVM VM, where it has dirty rings
        # hvjit.reset's short ways to the next reset, while they hold: [CPL3-only, with CPL0 state]
        self._reset_ready: list = [None, None]
        self._msr_handlers: dict = {}
        self._msr_exits = 0
        self.syscall_stats: Optional[syscall_entry.SyscallStats] = None
        # A port that no device or handler claims: "exit" returns the access to the caller
        # (an INOUT exit); "ones" answers as a PC bus does (PC guests' loaders choose it).
        self.unassigned_ports = "exit"
        self.unassigned_port_accesses = 0
        self.timer_slack_stats: Optional[timer_slack.SlackStats] = None
        self.rep_string_stats: Optional[rep_strings.RepStringStats] = None
        self.uart: Optional[Uart16550] = None
        self.debug_exit: Optional[DebugExit] = None
        self.testdev: Optional[TestDev] = None
        self.fw_cfg = None
        self.symbols = None  # the loaded image's symbol table (lookup/symbolize), if it has one
        self.breakpoints: dict = {}  # guest-linear address -> vcpu_debug.Breakpoint
        self.trace = Trace(self)  # exit tracing (off until vm.trace.enable())
        self.hooks = Hooks(self)  # code, exit and memory hooks (vm.hook_*)
        self.console_sink: Optional[Callable[[bytes], None]] = None
        self._console = bytearray()
        self._drain_lock = threading.Lock()
        self.fd = -1
        self.vcpus: list[Vcpu] = []
        self.destroyed = False
        self._teardown_lock = threading.Lock()
        # Held by a reset or snapshot (hvjit.reset) and by destroy and reinit while they close
        # or unmap what those use.
        self._state_lock = threading.Lock()
        self._unreleased = 0  # vCPUs whose fd and run page are not released yet
        self._vm_released = False
        self._suspend_how: Optional[SuspendHow] = None
        self._paused = False
        self.handle = 0
        # Counts changes of what cached plans are made for (memory layout, devices, vCPUs,
        # the KVM VM itself): hvjit.reset checks it instead of comparing them all.
        self.generation = 0
        self._next_slot = 0
        self.irqchip = irqchip
        try:
            self._create_kvm_vm()
            for gpa, size in layout:
                self.add_memory(gpa, size, name="lowmem" if gpa == 0 else f"mem@{gpa:#x}")
            self._create_irqchip()
            if devices:
                self._attach_default_devices(vcpus)
            for i in range(vcpus):
                vcpu = Vcpu(self, i)
                self.vcpus.append(vcpu)
                vcpu.handle = self._own(vcpu, "vcpu", vcpu._destroy)
            pvm = self.kvm.flavour == "pvm"
            # PVM leaves a CPL3 syscall half done (see syscall_entry). By default the Linux
            # and multiboot loaders install the fix-up there: its MSR trap changes how that
            # host treats unknown MSRs, which bare guests would notice.
            self.syscall_fixup = syscall_fixup
            if syscall_fixup:
                syscall_entry.install(self)
            # Ring 0 in KVM's emulator runs string instructions element by element.
            if accelerate_strings if accelerate_strings is not None else pvm:
                self.rep_string_stats = rep_strings.RepStringStats()
                for vcpu in self.vcpus:
                    vcpu.tick_hooks.append(rep_strings.on_tick)
        except BaseException:
            self.destroy()
            raise

    # ---- lifetime ------------------------------------------------------------------------

    def _create_kvm_vm(self) -> None:
        self.fd = _t.check(_t.lib.hvt_vm_create(self.kvm.fd, 0), "KVM_CREATE_VM", self.name)
        entries = dirty.enable_ring(self, self._ring_entries, self._ring_asked)
        self._rings = dirty.DirtyRings(entries, self._vcpu_count) if entries else None
        if self.kvm.has(Cap.SET_IDENTITY_MAP_ADDR):
            self._kvm_call(_t.lib.hvt_vm_set_identity_map_addr(self.fd, KVM_IDENTITY_MAP_GPA),
                           "KVM_SET_IDENTITY_MAP_ADDR")
        if self.kvm.has(Cap.SET_TSS_ADDR):
            self._kvm_call(_t.lib.hvt_vm_set_tss_addr(self.fd, KVM_TSS_GPA), "KVM_SET_TSS_ADDR")

    def _create_irqchip(self) -> None:
        """After the memory slots (before any vCPU): with an in-kernel irqchip present, KVM
        takes 5-8 ms more to add a slot on PVM (0.1-0.3 ms without one)."""
        if self.irqchip:
            interrupts.create_irqchip(self)

    @property
    def xsave_size(self) -> int:
        """Bytes of a vCPU's XSAVE area (KVM_CAP_XSAVE2 on the VM: more with dynamic features)."""
        rc = _t.lib.hvt_sys_check_extension(self.fd, Cap.XSAVE2)
        return rc if rc > 0 else 4096

    def _attach_default_devices(self, cpus: int) -> None:
        """What PC guests and conformance-suite kernels expect (see DESIGN.md)."""
        tsc_khz = self.kvm.tsc_khz
        self.uart = self.add_device("uart16550")
        self.debug_exit = self.add_device("debug-exit")
        self.testdev = self.add_device("pc-testdev")
        if self.irqchip:
            # pc-testdev's IRQ lines: a byte written to 0x2000+n sets GSI n's level.
            self.add_port_handler(IRQ_PORT, self._testdev_irq, count=IRQ_LINES, name="pc-testdev-irq")
        self.add_device("port-sink")
        self.add_device("i8042")
        self.add_device("cmos", cpus=cpus, tsc_khz=tsc_khz)
        self.fw_cfg = self.add_device("fw_cfg", cpus=cpus)
        self.add_device("pci-host")
        self.add_device("acpi-pm", base=PM_BASE, tsc_khz=tsc_khz)
        # QEMU-minded suites find it by PCI enumeration; it costs a slot and no exits.
        self.add_device("pci-testdev")

    def add_device(self, name: str, **config):
        """Attach a device by its factory name (built-in or registered by a user).

        The device belongs to the VM's session: it is detached when the VM is destroyed.
        """
        self._check()
        authorize(self, "add_device")
        device = self._device_class(name)(**config)
        device.attach(self.bus, self.memory)
        bus = self.bus
        device.handle = self._own(device, "device", lambda: device.detach(bus))
        self.devices.append(device)
        self.generation += 1
        if callable(getattr(device, "sync", None)):
            self._syncing.append(device)  # its native handler asks for Python with ACT_DRAIN
        self.device_specs.append((name, dict(config)))
        return device

    def _device_class(self, name: str) -> type:
        """A factory of the owning session first (a user's own device), else hvjit's catalog."""
        session = self.session
        if session is not None:
            try:
                return session.device_class(name)
            except FactoryNotFoundError:
                pass
        return catalog.device_class(name)

    @property
    def session(self):
        """The session that owns this VM (None once that session is gone)."""
        session = self._session
        return None if session is None or getattr(session, "closed", False) else session

    def _own(self, obj, kind: str, destructor) -> int:
        """Register a part of this VM with the session, so it is torn down with it."""
        session = self.session
        if session is None:
            return 0
        handle = session.register(obj, kind, destructor)
        self._handles.append((handle, kind))
        return handle

    def _release_handles(self) -> None:
        from .errors import InvalidHandleError, SessionClosedError

        session = self.session
        while self._handles:
            handle, kind = self._handles.pop()
            if session is None:
                continue
            try:
                session.release_handle(handle, kind)
            except (InvalidHandleError, SessionClosedError):
                pass  # the session is closing and already released it

    def _release_handles_of_kind(self, kind: str, only: int = 0) -> None:
        keep = []
        for handle, k in self._handles:
            if k == kind and only in (0, handle):
                session = self.session
                if session is not None:
                    session.release_handle(handle, kind)
            else:
                keep.append((handle, k))
        self._handles = keep

    def _check(self) -> None:
        if self.destroyed:
            raise ObjectDestroyedError(f"VM {self.name!r} was destroyed")

    def _kvm_call(self, rc: int, op: str, detail: str = "") -> int:
        return _t.check(rc, op, f"VM {self.name!r}" + (f", {detail}" if detail else ""))

    def destroy(self) -> None:
        """Stop every vCPU, then close the vCPUs and the VM fd and release memory; idempotent.

        Safe from any thread, also while vCPUs run (they are stopped and waited for first) and
        from a Python handler on a vCPU thread (what that run still uses is released when it
        returns). Nothing a running loop uses is closed or unmapped under it.
        """
        if self.destroyed:
            return
        with self._state_lock:  # a reset or snapshot in another thread ends first; later ones see this
            self.destroyed = True
            self._reset_ready = [None, None]
        for v in self.vcpus:  # stop them all at once, then wait for each
            v._control.request(Request.TEARDOWN)
        with self._teardown_lock:
            self._unreleased = sum(1 for v in self.vcpus if not v._released)
        for v in self.vcpus:
            v._destroy()
        self._release_handles()
        session = self.session
        if session is not None and hasattr(session, "_forget_vm"):
            session._forget_vm(self)
        self._maybe_release_vm()

    def _vcpu_released(self, vcpu: Vcpu) -> None:
        """A vCPU's fd and run page are gone; the last one releases the VM (when destroyed)."""
        with self._teardown_lock:
            self._unreleased -= 1
        self._maybe_release_vm()

    def _maybe_release_vm(self) -> None:
        with self._teardown_lock:
            if not self.destroyed or self._unreleased > 0 or self._vm_released:
                return
            self._vm_released = True
        if self.fd >= 0:
            _t.lib.hvt_sys_close(self.fd)
            self.fd = -1
        # The RAM goes when the last numpy view of it goes (see memory.allocate_segment).
        self.memory._close()
        # Drop the bus tables now rather than when the garbage collector finds the
        # VM <-> vCPU cycles: they are most of a VM's host memory.
        self.bus.release()

    def reinit(self) -> None:
        """Reset to power-on: a fresh KVM VM and vCPUs over the same memory; devices reset.

        Guest memory keeps its contents (as bhyve's vm_reinit does): a reboot's firmware or
        loader rewrites what it needs. Every vCPU must be stopped (no run active).
        """
        self._check()
        authorize(self, "reinit")
        if any(v._control.thread is not None for v in self.vcpus):
            raise VcpuBusyError(f"VM {self.name!r}: stop every vCPU before reinit")
        with self._state_lock:  # a reset or snapshot in another thread ends first (see destroy)
            n = len(self.vcpus)
            with self._teardown_lock:
                self._unreleased = n
            for v in self.vcpus:
                v._destroy()
            self._release_handles_of_kind("vcpu")
            self.vcpus = []
            _t.lib.hvt_sys_close(self.fd)
            self.fd = -1
            self._suspend_how = None
            self._paused = False
            self._create_kvm_vm()
            self.generation += 1
            self._dirty = None  # the new VM logs nothing yet (its fd may well have the old number)
            for seg in self.memory.segments:
                self._map_segment(seg)
            self.hooks.remap()
            self._create_irqchip()
            self.bus.dev_state[:] = 0
            self._console.clear()
            for i in range(n):
                vcpu = Vcpu(self, i)
                self.vcpus.append(vcpu)
                vcpu.handle = self._own(vcpu, "vcpu", vcpu._destroy)

    # ---- the whole VM's lifecycle (bhyve's vm_suspend, suspend/resume of every vCPU) ------

    def _request(self) -> Request:
        """What every vCPU's run must do next, from the VM's side."""
        if self._suspend_how is not None:
            return Request.SUSPEND
        if self._paused:
            return Request.PAUSE
        return Request.NONE

    def pause(self, timeout: float = 5.0) -> None:
        """Park every vCPU; returns once each running one has parked. Runs stay active
        (``vm.run`` does not return) until :meth:`resume`."""
        self._check()
        authorize(self, "pause")
        self._paused = True
        for v in self.vcpus:
            v._control.request(Request.PAUSE)
        for v in self.vcpus:
            if not v._control.wait_parked_or_idle(timeout):
                raise VcpuBusyError(f"vcpu {v.index} of VM {self.name!r} did not pause within {timeout} s")

    def resume(self) -> None:
        """Let every vCPU run again after :meth:`pause` (or per-vCPU pauses)."""
        self._check()
        authorize(self, "resume")
        self._paused = False
        for v in self.vcpus:
            v._control.resume()

    def suspend(self, how: SuspendHow = SuspendHow.POWEROFF) -> None:
        """Host-side suspend (bhyve's vm_suspend): every vCPU's run returns a SUSPENDED exit
        with ``how``, now and at every later run, until :meth:`reinit`."""
        self._check()
        authorize(self, "suspend")
        self._suspend_how = SuspendHow(how)
        for v in self.vcpus:
            v._control.request(Request.SUSPEND, self._suspend_how)

    @property
    def state(self) -> dict[int, str]:
        """Each vCPU's state by index: 'stopped', 'running' or 'paused'."""
        return {v.index: v.state.value for v in self.vcpus}

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    # ---- memory --------------------------------------------------------------------------

    def add_memory(self, gpa: int, size: int, *, readonly: bool = False, name: str = "") -> MemorySegment:
        """Map ``size`` bytes of fresh zeroed RAM at ``gpa`` (read-only: writes become MMIO exits)."""
        self._check()
        self.memory.check_new_segment(gpa, size)
        for start, end, _ in self.bus.mmio_table():
            if gpa < end and start < gpa + size:
                raise MemoryMapError(f"memory {gpa:#x}+{size:#x} overlaps an MMIO device range")
        if readonly and not self.kvm.has(Cap.READONLY_MEM):
            raise HvjitError("read-only memory needs KVM_CAP_READONLY_MEM, which this host lacks")
        host, array = allocate_segment(size)
        seg = MemorySegment(gpa, size, self._next_slot, readonly, name or f"mem@{gpa:#x}", host, array)
        self._map_segment(seg)
        self._next_slot += 1
        self.memory._add(seg)
        self.generation += 1
        seg.handle = self._own(seg, "memory", None)
        return seg

    def _map_segment(self, seg: MemorySegment) -> None:
        flags = 2 if seg.readonly else 0  # KVM_MEM_READONLY
        self._kvm_call(_t.lib.hvt_vm_set_user_memory(self.fd, seg.slot, flags, seg.gpa, seg.size,
                                                     _t.ffi.cast("void *", seg.host_address)),
                       "KVM_SET_USER_MEMORY_REGION", f"{seg.name} at {seg.gpa:#x}+{seg.size:#x}")

    def remove_memory(self, segment: MemorySegment) -> None:
        self._check()
        if segment not in self.memory.segments:
            raise MemoryMapError(f"segment {segment.name!r} is not mapped in VM {self.name!r}")
        self._kvm_call(_t.lib.hvt_vm_set_user_memory(self.fd, segment.slot, 0, segment.gpa, 0, _t.ffi.NULL),
                       "KVM_SET_USER_MEMORY_REGION(delete)")
        self.memory._remove(segment)
        self.generation += 1
        self._release_handles_of_kind("memory", segment.handle)

    # ---- devices and handlers ------------------------------------------------------------

    def add_port_handler(self, port: int, handler, count: int = 1, name: str = "") -> int:
        """A Python handler ``handler(port, size, is_write, value) -> value`` for ports
        ``port..port+count-1`` (the slow path: each access returns to Python)."""
        self._check()
        return self.bus.add_port_handler(port, count, handler, name)

    def add_mmio_handler(self, gpa: int, size: int, handler, name: str = "") -> int:
        """A Python handler ``handler(gpa, size, is_write, value) -> value`` for an MMIO range."""
        self._check()
        return self.bus.add_mmio_handler(gpa, size, handler, name, self.memory)

    def remove_handler(self, slot: int) -> None:
        self.bus.remove_slot(slot)

    # ---- hooks (see hvjit.hooks) ------------------------------------------------------------

    def hook_code(self, where, fn, *, vcpu: int = 0) -> int:
        """``fn(vcpu, address)`` each time the guest reaches an address or ELF symbol."""
        self._check()
        return self.hooks.code(where, fn, vcpu)

    def hook_exit(self, kind, fn) -> int:
        """``fn(vcpu, exit)`` for each exit of ``kind`` reaching Python; True = handled."""
        self._check()
        return self.hooks.exit(kind, fn)

    def hook_memory(self, gpa: int, size: int, fn, access: str = "rw") -> int:
        """``fn(gpa, size, is_write, value)`` for guest accesses to a RAM range."""
        self._check()
        return self.hooks.memory(gpa, size, fn, access)

    def unhook(self, handle: int) -> None:
        self._check()
        self.hooks.remove(handle)

    def enable_msr_exits(self, *, unknown: bool = True, invalid: bool = True) -> None:
        """Send guest RDMSR/WRMSR of MSRs KVM does not know (or refuses) to user space
        (KVM_CAP_X86_USER_SPACE_MSR): they come back as RDMSR/WRMSR exits or reach the
        handlers of :meth:`add_msr_handler`, instead of KVM injecting #GP."""
        self._check()
        if not self.kvm.has(Cap.X86_USER_SPACE_MSR):
            raise CapabilityError("this host's KVM cannot exit to user space on MSR accesses")
        reasons = (2 if unknown else 0) | (1 if invalid else 0) | (self._msr_exits & msr_filter.EXIT_REASON_FILTER)
        self._kvm_call(_t.lib.hvt_vm_enable_cap(self.fd, Cap.X86_USER_SPACE_MSR, reasons, 0),
                       "KVM_ENABLE_CAP(X86_USER_SPACE_MSR)")
        self._msr_exits = reasons

    def add_msr_handler(self, index: int, handler) -> None:
        """A Python handler for an MSR that exits to user space:
        ``handler(index, is_write, value)`` returns the value read (None → #GP), or for a
        write False to refuse it with a #GP."""
        self._check()
        if not self._msr_exits:
            self.enable_msr_exits()
        self._msr_handlers[int(index)] = handler

    def msr_handler(self, index: int):
        return self._msr_handlers.get(index)

    _msr_traps: Optional[msr_filter.MsrTraps] = None

    def set_timer_slack(self, seconds: float) -> None:
        """Let each TSC-deadline timer the guest arms fire no sooner than ``seconds`` after
        (0: off). For guests whose ring 0 is emulated: see :mod:`hvjit.timer_slack`."""
        self._check()
        authorize(self, "set_timer_slack")
        stats = timer_slack.set_slack(self, seconds)
        self.timer_slack_stats = stats if seconds else None

    def trap_msrs(self, handlers: dict, *, read: bool = True, write: bool = True) -> None:
        """Send the guest's RDMSR (``read``) and WRMSR (``write``) of these MSRs to Python,
        also those KVM would handle itself: ``{index: handler}`` with handlers as for
        :meth:`add_msr_handler`; a None handler stops trapping that MSR. See
        :mod:`hvjit.msr_filter`."""
        self._check()
        authorize(self, "trap_msrs")
        msr_filter.trap(self, handlers, read=read, write=write)

    def _drain_devices(self) -> None:
        for device in self._syncing:
            device.sync()
        if self.uart is not None and self.uart.pending():
            with self._drain_lock:  # vCPU threads drain in turn
                data = self.uart.drain()
                self._console += data
                if self.console_sink is not None and data:
                    self.console_sink(data)

    def _testdev_irq(self, port: int, size: int, is_write: bool, value: int) -> int:
        if is_write:
            self.irq_line(port - IRQ_PORT, value & 1)
        return 0

    def send_console_input(self, data: bytes) -> int:
        """Type into COM1: queue bytes for the guest's receiver (raising its interrupt where
        the VM has an irqchip). Returns how many fitted in the receive FIFO."""
        self._check()
        if self.uart is None:
            raise HvjitError(f"VM {self.name!r} has no UART")
        n = self.uart.feed(data)
        level = self.uart.irq_change()
        if level is not None and self.irqchip:
            self.irq_line(self.uart.irq, level)
        return n

    @property
    def console(self) -> bytes:
        """Everything the guest wrote to COM1 so far."""
        return bytes(self._console)

    # ---- vCPUs ---------------------------------------------------------------------------

    def vcpu(self, index: int = 0) -> Vcpu:
        self._check()
        if not 0 <= index < len(self.vcpus):
            raise IndexError(f"VM {self.name!r} has {len(self.vcpus)} vcpus; no vcpu {index}")
        return self.vcpus[index]

    def run(self, *, timeout: Optional[float] = None, resume_hlt: bool = False) -> RunResult:
        """Run every vCPU (one thread each) until the VM stops; see :class:`RunResult`.

        The VM stops at the first exit a vCPU returns (a suspend, an unhandled exit, an
        emulation failure) or at ``timeout`` seconds; the other vCPUs are kicked out.
        """
        self._check()
        authorize(self, "run")
        return run_vm(self, timeout=timeout, resume_hlt=resume_hlt)

    def serve_gdb(self, port: int = 0, host: str = "127.0.0.1", **options):
        """Let GDB debug this VM over TCP (``target remote HOST:PORT``) until it detaches or
        kills it, or the guest exits; each vCPU is a GDB thread. The VM must be stopped.
        ``options``: see :class:`hvjit.gdbstub.GdbStub` and its ``serve``. Returns a
        :class:`hvjit.gdbstub.GdbOutcome`."""
        from .gdbstub import GdbStub

        serve_options = {k: options.pop(k) for k in ("accept_timeout", "on_listening") if k in options}
        with GdbStub(self, host, port, **options) as stub:
            return stub.serve(**serve_options)

    def irq_line(self, irq: int, level: int) -> None:
        """Drive an interrupt line (GSI) of the in-kernel irqchip."""
        self._check()
        interrupts.irq_line(self, irq, level)

    def pulse_irq(self, irq: int) -> None:
        """An edge on an interrupt line: raise then lower it."""
        self.irq_line(irq, 1)
        self.irq_line(irq, 0)

    def translate(self, gla: int, *, vcpu: int = 0, access: str = "r"):
        """Guest-linear to guest-physical through vCPU ``vcpu``'s page tables (a page-walk
        ``Translation``: gpa, page size, or the #PF error code a CPU would raise)."""
        return self.vcpu(vcpu).translate(gla, access=access)

    # ---- snapshots (hvjit.snapshot, hvjit.reset) ----------------------------------------

    def snapshot(self, path=None) -> Snapshot:
        """The whole state of this stopped (or paused) VM; also written to ``path`` if given.

        Turns on dirty-page tracking, so :meth:`reset_to` copies back only what changed.
        """
        snap = reset.take(self)
        if path is not None:
            snap.save(path)
        return snap

    @classmethod
    def restore(cls, session, source, *, name: Optional[str] = None) -> "Vm":
        """A new VM in ``session`` from a :class:`Snapshot` or a snapshot file (any process)."""
        return snapshot.restore(cls, session, source, name)

    # vm.reset_to(snap, privileged=True): put this VM back into ``snap``'s state in place
    # (hvjit.reset.reset_to). Bound as it is: a wrapper's frame costs ~0.4 us in a reset,
    # which runs right after the guest, with cold caches.
    reset_to = reset.reset_to

    def __repr__(self) -> str:
        state = "destroyed" if self.destroyed else f"fd={self.fd}"
        return f"<Vm {self.name!r} {state} vcpus={len(self.vcpus)} memory={self.memory.size:#x}>"
