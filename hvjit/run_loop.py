"""The VM-exit run loop: ``KVM_RUN`` in a loop, exits dispatched to native device handlers.

One kernel per vCPU thread (``nogil``): it calls the trampoline's ``hvt_vcpu_run`` (a Numba
``ExternalFunction``, ~2 ns a call), decodes ``kvm_run``, and hands port-IO and MMIO to the
native device handlers. It returns to Python only for an exit no native handler claims, a
buffer to drain, the exit budget, or a KVM error; the exit is normalised into one
``VM_EXIT_DTYPE`` record (bhyve's ``struct vm_exit``), which :mod:`hvjit.exit_handlers`
dispatches by exit code.

The device switch is not written by hand: :func:`compiled` generates it from the registered
native device classes (:func:`hvjit.devices.kinds.native_classes`). This module's source is
the template: the generated module is this text plus a ``_pio_device``/``_mmio_device`` pair
with one arm per native kind, written once under the kernel cache directory (named by a hash
of its text) so Numba caches it like any other kernel. Adding a native device therefore
needs no edit here.

Every index the guest influences (ports, MMIO offsets, the IO data area) is range-checked
here: Numba does no bounds checking.

Exit tracing (:mod:`hvjit.trace`): with a non-empty ring the loop writes one record per exit
(:data:`hvjit.kernels.tracering.TRACE_DTYPE`); with the zero-length ring it only tests the
ring's length once per call. A module generated with ``trace_support=False`` has no tracing
code at all: the benchmark's untraced reference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import threading
from pathlib import Path

import numpy as np

from hvjit import _trampoline
from hvjit._jit import CACHE_DIR, kernel, rdtsc
from hvjit.abi import KvmExit, KvmSystemEvent, SuspendHow, VmExitCode
from hvjit.devices import catalog, kinds  # noqa: F401  (catalog numbers the built-in native devices)
from hvjit.kernels import tracering

hvt_vcpu_run = _trampoline.external("hvt_vcpu_run")
hvt_vm_irq_line = _trampoline.external("hvt_vm_irq_line")
MAX_GSI = 24

# What the loop returns.
LOOP_EXIT = 0  # `out` holds an exit for Python (a Python handler or the user)
LOOP_DRAIN = 1  # a device buffer needs draining; call again to go on
LOOP_BUDGET = 2  # max_exits handled natively; call again to go on
LOOP_ERRNO = 3  # KVM_RUN failed: counters[C_ERRNO] holds the errno (EINTR when kicked)

# Loop options (bit flags).
FLAG_RESUME_HLT = 1  # treat HLT as handled (count it and re-enter) instead of returning

# Counter slots (int64 array of N_COUNTERS).
C_EXITS = 0  # KVM_RUN returns with an exit
C_NATIVE = 1  # exits the loop handled itself
C_ESCALATED = 2  # exits handed to Python
C_PIO = 3
C_PIO_STRING = 4
C_MMIO = 5
C_HLT = 6
C_ERRNO = 7
C_EINTR = 8
C_SUSPEND_SLOT = 9  # device slot that asked to stop
N_COUNTERS = 16
N_REASONS = 64  # per-KVM-exit-reason counts live after the named counters
REASON_BASE = N_COUNTERS

U64_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)

# A compile-time constant (Numba freezes globals): generate_source(trace_support=False) sets it
# False, and the tracing code is compiled out.
TRACE_SUPPORT = True
# Exit codes of natively handled exits, as plain ints (they go into an int64 local).
_X_INOUT, _X_INOUT_STR = int(VmExitCode.INOUT), int(VmExitCode.INOUT_STR)
_X_MMIO, _X_HLT, _X_UNKNOWN = int(VmExitCode.INST_EMUL), int(VmExitCode.HLT), int(VmExitCode.UNKNOWN)


# The template's switch knows no device; generated modules redefine both (see compiled()).
@kernel
def _pio_device(kind, state, buf, offset, size, is_write, value):
    """The native port-IO switch (kvmtool's single run-loop switch): (value, action)."""
    return np.int64(0), kinds.ACT_PYTHON


@kernel
def _mmio_device(kind, state, buf, offset, size, is_write, data):
    """The native MMIO switch: an action (``data`` is kvm_run's 8-byte MMIO buffer)."""
    return kinds.ACT_PYTHON


@kernel
def _load_le(page, offset, size):
    v = np.int64(0)
    for k in range(size):
        v |= np.int64(page[offset + k]) << (8 * k)
    return v


@kernel
def _store_le(page, offset, size, value):
    for k in range(size):
        page[offset + k] = (value >> (8 * k)) & 0xFF


@kernel
def _update_irq(vm_fd, state):
    """Tell the in-kernel irqchip when a device's interrupt output changed (vm_fd < 0: none)."""
    gsi = state[kinds.STATE_IRQ_GSI]
    level = state[kinds.STATE_IRQ_LEVEL]
    if vm_fd < 0 or gsi < 0 or gsi >= MAX_GSI or level == state[kinds.STATE_IRQ_REPORTED]:
        return
    hvt_vm_irq_line(vm_fd, np.uint32(gsi), np.uint32(level))
    state[kinds.STATE_IRQ_REPORTED] = level


@kernel
def _handle_pio(vm_fd, run, page, port_map, dev_kind, dev_base, dev_state, dev_buf, counters):
    """Returns an action; ACT_PYTHON when no native device claims the port."""
    r = run[0]
    port = np.int64(r["io_port"])
    slot = np.int64(port_map[port])
    if slot <= 0 or slot >= dev_kind.size:
        return kinds.ACT_PYTHON
    kind = dev_kind[slot]
    if kind == kinds.PYTHON or kind == kinds.NONE:
        return kinds.ACT_PYTHON
    size = np.int64(r["io_size"])
    count = np.int64(r["io_count"])
    data_offset = np.int64(r["io_data_offset"])
    # KVM sets these, not the guest, but a wrong value would let us scribble: check anyway.
    if size != 1 and size != 2 and size != 4:
        return kinds.ACT_PYTHON
    if count < 1 or data_offset < 0 or data_offset + size * count > page.size:
        return kinds.ACT_PYTHON
    is_write = r["io_direction"] == 1
    offset = port - dev_base[slot]
    state = dev_state[slot]
    buf = dev_buf[slot]
    act = kinds.ACT_CONTINUE
    for i in range(count):
        at = data_offset + i * size
        value = _load_le(page, at, size) if is_write else np.int64(0)
        value, a = _pio_device(kind, state, buf, offset, size, is_write, value)
        if not is_write:
            _store_le(page, at, size, value)
        if a != kinds.ACT_CONTINUE:
            act = a
            if a == kinds.ACT_PYTHON:
                break
    _update_irq(vm_fd, state)
    state[kinds.STATE_ACCESSES] += 1
    counters[C_PIO] += 1
    if count > 1:
        counters[C_PIO_STRING] += 1
    if act == kinds.ACT_POWEROFF or act == kinds.ACT_RESET:
        counters[C_SUSPEND_SLOT] = slot
    return act


@kernel
def _handle_mmio(run, mmio_ranges, dev_kind, dev_state, dev_buf, counters):
    r = run[0]
    gpa = np.int64(r["mmio_phys_addr"])
    size = np.int64(r["mmio_len"])
    if size < 1 or size > 8:
        return kinds.ACT_PYTHON
    for i in range(mmio_ranges.shape[0]):
        start = mmio_ranges[i, 0]
        end = mmio_ranges[i, 1]
        slot = mmio_ranges[i, 2]
        if start <= gpa and gpa + size <= end:
            if slot <= 0 or slot >= dev_kind.size:
                return kinds.ACT_PYTHON
            act = _mmio_device(dev_kind[slot], dev_state[slot], dev_buf[slot], gpa - start, size,
                               r["mmio_is_write"] != 0, r["mmio_data"])
            dev_state[slot, kinds.STATE_ACCESSES] += 1
            if act != kinds.ACT_PYTHON:
                counters[C_MMIO] += 1
            return act
    return kinds.ACT_PYTHON


@kernel
def fill_exit(run, page, exit_out):
    """Normalise the exit in ``kvm_run`` into ``exit_out`` (a 1-record VM_EXIT_DTYPE array)."""
    r = run[0]
    out = exit_out[0]
    reason = np.int64(r["exit_reason"])
    out["kvm_reason"] = reason
    out["exitcode"] = VmExitCode.UNKNOWN
    out["port"] = 0
    out["bytes"] = 0
    out["is_in"] = 0
    out["string"] = 0
    out["rep"] = 0
    out["count"] = 0
    out["data"] = 0
    out["gpa"] = 0
    out["mmio_len"] = 0
    out["is_write"] = 0
    out["msr_index"] = 0
    out["msr_data"] = 0
    out["how"] = SuspendHow.NONE
    out["code"] = 0
    out["suberror"] = 0
    out["ndata"] = 0
    for i in range(16):
        out["info"][i] = 0
    if reason == KvmExit.IO:
        size = np.int64(r["io_size"])
        count = np.int64(r["io_count"])
        out["exitcode"] = VmExitCode.INOUT_STR if count > 1 else VmExitCode.INOUT
        out["port"] = r["io_port"]
        out["bytes"] = size
        out["is_in"] = r["io_direction"] == 0
        out["string"] = count > 1
        out["rep"] = count > 1
        out["count"] = count
        at = np.int64(r["io_data_offset"])
        out["data"] = 0
        if r["io_direction"] == 1 and size <= 8 and at >= 0 and at + size <= page.size:
            out["data"] = _load_le(page, at, size)
    elif reason == KvmExit.MMIO:
        out["exitcode"] = VmExitCode.INST_EMUL
        out["gpa"] = r["mmio_phys_addr"]
        out["mmio_len"] = r["mmio_len"]
        out["is_write"] = r["mmio_is_write"]
        out["data"] = _load_le(r["mmio_data"], 0, min(np.int64(r["mmio_len"]), 8))
    elif reason == KvmExit.HLT:
        out["exitcode"] = VmExitCode.HLT
    elif reason == KvmExit.SHUTDOWN:
        out["exitcode"] = VmExitCode.SUSPENDED
        out["how"] = SuspendHow.TRIPLEFAULT
    elif reason == KvmExit.SYSTEM_EVENT:
        kind = r["system_event_type"]
        out["info"][0] = kind
        if kind == KvmSystemEvent.SHUTDOWN:
            out["exitcode"] = VmExitCode.SUSPENDED
            out["how"] = SuspendHow.POWEROFF
        elif kind == KvmSystemEvent.RESET:
            out["exitcode"] = VmExitCode.SUSPENDED
            out["how"] = SuspendHow.RESET
        elif kind == KvmSystemEvent.CRASH:
            out["exitcode"] = VmExitCode.SUSPENDED
            out["how"] = SuspendHow.HALT
        else:
            out["exitcode"] = VmExitCode.SYSTEM_EVENT
    elif reason == KvmExit.INTERNAL_ERROR:
        out["exitcode"] = VmExitCode.EMULATION_FAILURE
        out["suberror"] = r["internal_suberror"]
        n = min(np.int64(r["internal_ndata"]), 16)
        out["ndata"] = n
        for i in range(n):
            out["info"][i] = r["internal_data"][i]
    elif reason == KvmExit.FAIL_ENTRY:
        out["exitcode"] = VmExitCode.FAIL_ENTRY
        out["info"][0] = r["fail_entry_reason"]
        out["info"][1] = r["fail_entry_cpu"]
    elif reason == KvmExit.DEBUG:
        out["exitcode"] = VmExitCode.DEBUG
        out["info"][0] = r["debug_exception"]
        out["info"][1] = r["debug_pc"]
        out["info"][2] = r["debug_dr6"]
        out["info"][3] = r["debug_dr7"]
    elif reason == KvmExit.X86_RDMSR:
        out["exitcode"] = VmExitCode.RDMSR
        out["msr_index"] = r["msr_index"]
    elif reason == KvmExit.X86_WRMSR:
        out["exitcode"] = VmExitCode.WRMSR
        out["msr_index"] = r["msr_index"]
        out["msr_data"] = r["msr_data"]
    elif reason == KvmExit.HYPERCALL:
        out["exitcode"] = VmExitCode.HYPERCALL
        out["info"][0] = r["hypercall_nr"]
        for i in range(6):
            out["info"][1 + i] = r["hypercall_args"][i]
    elif reason == KvmExit.INTR:
        out["exitcode"] = VmExitCode.BOGUS
    elif reason == KvmExit.UNKNOWN:
        out["info"][0] = r["hw_exit_reason"]


@kernel
def _trace_exit(trace, tstate, run, page, t_exit, exitcode, native):
    """Write the exit in ``kvm_run`` into the trace ring. ``exitcode`` < 0: derive it from
    KVM's reason (a natively handled exit, which has no VM_EXIT record)."""
    e = trace[tracering.ring_slot(trace, tstate)]
    r = run[0]
    reason = np.int64(r["exit_reason"])
    code = np.int64(exitcode)
    addr = np.uint64(0)
    data = np.int64(0)
    size = np.int64(0)
    count = np.int64(1)
    is_write = False
    if reason == KvmExit.IO:
        addr = np.uint64(r["io_port"])
        size = np.int64(r["io_size"])
        count = np.int64(r["io_count"])
        is_write = r["io_direction"] == 1
        at = np.int64(r["io_data_offset"])
        # An IN handled in Python has no value yet: hvjit.trace adds it after the handler.
        if (is_write or native) and 1 <= size <= 8 and at >= 0 and at + size <= page.size:
            data = _load_le(page, at, size)
        if code < 0:
            code = _X_INOUT_STR if count > 1 else _X_INOUT
    elif reason == KvmExit.MMIO:
        addr = np.uint64(r["mmio_phys_addr"])
        size = min(np.int64(r["mmio_len"]), 8)
        is_write = r["mmio_is_write"] != 0
        if is_write or native:
            data = _load_le(r["mmio_data"], 0, size)
        if code < 0:
            code = _X_MMIO
    elif reason == KvmExit.X86_RDMSR or reason == KvmExit.X86_WRMSR:
        addr = np.uint64(r["msr_index"])
        is_write = reason == KvmExit.X86_WRMSR
        size = 8
        if is_write:
            data = np.int64(r["msr_data"])
    elif reason == KvmExit.HLT and code < 0:
        code = _X_HLT
    if code < 0:
        code = _X_UNKNOWN
    e["tsc"] = t_exit
    e["ns"] = -1
    e["handler_tsc"] = rdtsc() - t_exit if native else -1
    e["handler_ns"] = -1
    rip_valid = (tstate[tracering.T_FLAGS] & tracering.TRACE_RIP) != 0
    e["rip"] = r["sync_regs"]["rip"] if rip_valid else 0
    e["rip_valid"] = rip_valid
    e["addr"] = addr
    e["data"] = data
    e["exitcode"] = code
    e["kvm_reason"] = reason
    e["count"] = min(count, 0xFFFF)
    e["vcpu"] = tstate[tracering.T_VCPU]
    e["size"] = size
    e["is_write"] = is_write
    e["native"] = native
    tracering.ring_advance(tstate)


@kernel
def trace_write_loop(trace, tstate, run, page, n):
    """Record the exit in ``kvm_run`` ``n`` times: what one trace record costs the loop."""
    if trace.shape[0] == 0:
        return
    for _ in range(n):
        _trace_exit(trace, tstate, run, page, rdtsc(), -1, True)


@kernel
def run_loop(vcpu_fd, vm_fd, run, page, port_map, mmio_ranges, dev_kind, dev_base, dev_state,
             dev_buf, counters, out, max_exits, flags, trace, tstate):
    """Run the vCPU until Python is needed. Returns a LOOP_* status; see the module doc.

    ``vm_fd`` is the VM's fd when it has an in-kernel irqchip (device interrupts go there),
    else -1. ``run`` is the kvm_run page as a 1-record KVM_RUN_DTYPE array, ``page`` the same mapping
    as bytes (the port-IO data area lies past the struct), ``out`` a 1-record VM_EXIT_DTYPE.
    ``trace`` is the exit-trace ring (zero-length: off) and ``tstate`` its state array.
    """
    r = run[0]
    o = out[0]
    handled = 0
    tracing = TRACE_SUPPORT and trace.shape[0] > 0
    t_exit = np.int64(0)
    while handled < max_exits:
        rc = hvt_vcpu_run(vcpu_fd)
        if rc < 0:
            counters[C_ERRNO] = -rc
            if rc == -4:  # EINTR
                counters[C_EINTR] += 1
            return LOOP_ERRNO
        if tracing:
            t_exit = rdtsc()
        counters[C_EXITS] += 1
        reason = np.int64(r["exit_reason"])
        if 0 <= reason < N_REASONS:
            counters[REASON_BASE + reason] += 1
        act = kinds.ACT_PYTHON
        if reason == KvmExit.IO:
            act = _handle_pio(vm_fd, run, page, port_map, dev_kind, dev_base, dev_state, dev_buf, counters)
        elif reason == KvmExit.MMIO:
            act = _handle_mmio(run, mmio_ranges, dev_kind, dev_state, dev_buf, counters)
        elif reason == KvmExit.HLT:
            counters[C_HLT] += 1
            if flags & FLAG_RESUME_HLT:
                act = kinds.ACT_CONTINUE
        if act == kinds.ACT_CONTINUE:
            counters[C_NATIVE] += 1
            handled += 1
            if tracing:
                _trace_exit(trace, tstate, run, page, t_exit, -1, True)
            continue
        if act == kinds.ACT_DRAIN:
            counters[C_NATIVE] += 1
            if tracing:
                _trace_exit(trace, tstate, run, page, t_exit, -1, True)
            return LOOP_DRAIN
        fill_exit(run, page, out)
        if act == kinds.ACT_POWEROFF or act == kinds.ACT_RESET:
            counters[C_NATIVE] += 1
            slot = counters[C_SUSPEND_SLOT]
            o["exitcode"] = VmExitCode.SUSPENDED
            o["how"] = SuspendHow.POWEROFF if act == kinds.ACT_POWEROFF else SuspendHow.RESET
            o["code"] = dev_state[slot, kinds.STATE_EXIT_CODE]
            if tracing:
                _trace_exit(trace, tstate, run, page, t_exit, o["exitcode"], True)
            return LOOP_EXIT
        counters[C_ESCALATED] += 1
        if tracing:
            _trace_exit(trace, tstate, run, page, t_exit, o["exitcode"], False)
        return LOOP_EXIT
    return LOOP_BUDGET


# ---- generating the device switch ---------------------------------------------------------

_PIO_ARGS = ("state", "buf", "offset", "size", "is_write", "value")
_MMIO_ARGS = ("state", "buf", "offset", "size", "is_write", "data")
_GENERATED_MARK = "# ---- generated: the native device switch "
_compiled: dict[tuple[tuple[type, ...], bool], object] = {}
_compiled_lock = threading.Lock()


def _handler_call(handler, allowed: tuple[str, ...], alias: str, owner: type) -> tuple[str, str]:
    """(import line, call expression) for one device handler, by its parameter names."""
    func = getattr(handler, "py_func", None)
    if func is None:
        raise TypeError(f"{owner.__name__}: native handlers must be Numba kernels (hvjit._jit.kernel)")
    if "<locals>" in func.__qualname__:
        raise TypeError(f"{owner.__name__}.{func.__name__}: native handlers must be module-level "
                        "functions (the generated run loop imports them)")
    params = list(inspect.signature(func).parameters)
    unknown = [p for p in params if p not in allowed]
    if unknown:
        raise TypeError(f"{owner.__name__}.{func.__name__}: parameters {unknown} are not among {allowed}")
    return (f"from {func.__module__} import {func.__qualname__} as {alias}",
            f"{alias}({', '.join(params)})")


def _module_digest(module_name: str) -> str:
    """A hash of a handler module's source, so an edited handler gets a new generated loop."""
    module = sys.modules[module_name]
    path = getattr(module, "__file__", None)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else module_name


_TRACE_SUPPORT_LINE = "TRACE_SUPPORT = True\n"


def generate_source(classes: tuple[type, ...], trace_support: bool = True) -> str:
    """This module's text with a switch over ``classes`` (kind FIRST_NATIVE + i for entry i);
    without ``trace_support`` the tracing code is compiled out."""
    template = Path(__file__).read_text()
    if not trace_support:
        template = template.replace(_TRACE_SUPPORT_LINE, "TRACE_SUPPORT = False\n", 1)
    imports, pio_arms, mmio_arms, digests = [], [], [], []
    for i, cls in enumerate(classes):
        kind = kinds.FIRST_NATIVE + i
        for attr, allowed, arms in (("port_io", _PIO_ARGS, pio_arms), ("mmio_io", _MMIO_ARGS, mmio_arms)):
            handler = getattr(cls, attr, None)
            if handler is None:
                continue
            line, call = _handler_call(handler, allowed, f"_{attr}_{kind}", cls)
            imports.append(line)
            digests.append(_module_digest(handler.py_func.__module__))
            arms.append(f"    if kind == {kind}:  # {cls.__module__}.{cls.__qualname__}\n        return {call}\n")
    return (template + "\n\n" + _GENERATED_MARK + f"({len(classes)} classes) ----\n"
            + f"# handler sources: {' '.join(digests)}\n"
            + "\n".join(imports) + "\n\n\n@kernel\n"
            + "def _pio_device(kind, state, buf, offset, size, is_write, value):  # noqa: F811\n"
            + "".join(pio_arms) + "    return np.int64(0), kinds.ACT_PYTHON\n\n\n@kernel\n"
            + "def _mmio_device(kind, state, buf, offset, size, is_write, data):  # noqa: F811\n"
            + "".join(mmio_arms) + "    return kinds.ACT_PYTHON\n")


def compiled(classes: tuple[type, ...] | None = None, *, trace_support: bool = True):
    """The generated run-loop module for ``classes`` (default: every registered native class).

    Its ``run_loop`` is the kernel a vCPU runs; compiled once per process, and loaded from
    Numba's cache when the same device set ran before. ``trace_support=False`` gives a loop
    without the tracing code (what the benchmark compares tracing against).
    """
    classes = kinds.native_classes() if classes is None else tuple(classes)
    key = (classes, trace_support)
    with _compiled_lock:
        module = _compiled.get(key)
        if module is not None:
            return module
        source = generate_source(classes, trace_support)
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        directory = CACHE_DIR / "run_loops"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"run_loop_{digest}.py"
        if not path.exists():  # written once: Numba's cache keys on the file's stamp
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)
        name = f"hvjit_run_loop_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _compiled[key] = module
        return module
