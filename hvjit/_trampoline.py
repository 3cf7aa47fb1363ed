"""The only user of cffi/ctypes in hvjit: loads ``libhvt.so`` and declares its API, once.

``_CDEF`` below is the one Python-side declaration of the C ABI. Both faces of the library
are built from it: cffi's ``lib`` for Python callers, and :func:`external`, the Numba
``ExternalFunction`` of a symbol for kernels (its signature is derived from the same
prototype, so the two cannot drift apart). ``tests/unit/test_c_abi.py`` re-declares every
prototype after ``#include "hvt.h"`` and lets the C compiler reject any disagreement.

The library is loaded twice over the same handle: globally with ``RTLD_GLOBAL`` so Numba
kernels can call it (an unloaded symbol would segfault, not raise), and through cffi.
Structures are opaque here; their layouts live in :mod:`hvjit.abi` as numpy dtypes and cross
the boundary as ``ffi.from_buffer`` pointers.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.util
import os
import re
from functools import cache
from importlib import resources
from pathlib import Path

from ._cachedir import cache_base
from .errors import HvjitError, KvmError

_CDEF = """
struct kvm_run;
struct kvm_cpuid_entry2;
struct kvm_msr_entry;
struct kvm_regs;
struct kvm_sregs;
struct kvm_fpu;
struct kvm_vcpu_events;
struct kvm_guest_debug;
struct kvm_debugregs;
struct kvm_lapic_state;
struct kvm_mp_state;
struct kvm_msr_filter;
struct kvm_irq_routing_entry;
struct kvm_xcrs;
struct kvm_irqchip;
struct kvm_pit_state2;
struct kvm_clock_data;
struct hvt_loop_stats;
struct hvt_reset_slot;
struct hvt_reset_vcpu;
struct hvt_reset_vmstate;
struct hvt_reset_rows;
struct hvt_reset_tally;
struct hvt_dirty_rings;
struct kvm_dirty_gfn;

int hvt_sys_open(const char *path);
int hvt_sys_close(int fd);
int hvt_sys_api_version(int kvm_fd);
int hvt_sys_check_extension(int fd, long cap);
int hvt_sys_vcpu_mmap_size(int kvm_fd);
int hvt_sys_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int max, int *needed);
int hvt_sys_get_msr_index_list(int kvm_fd, uint32_t *indices, int max, int *needed);
int hvt_sys_get_msr_feature_index_list(int kvm_fd, uint32_t *indices, int max, int *needed);
int hvt_sys_get_feature_msrs(int kvm_fd, struct kvm_msr_entry *entries, int count);
int hvt_sys_nop(void);
int hvt_sys_nop_ioctl(int kvm_fd);
uint64_t hvt_sys_rdtsc(void);
uint64_t hvt_sys_rdtscp(uint32_t *aux);
int hvt_sys_init_kick_signal(void);
int hvt_sys_kick_signal(void);

int hvt_vm_create(int kvm_fd, unsigned long type);
int hvt_vm_set_user_memory(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, void *host_addr);
int hvt_vm_set_tss_addr(int vm_fd, uint64_t gpa);
int hvt_vm_set_identity_map_addr(int vm_fd, uint64_t gpa);
int hvt_vm_create_irqchip(int vm_fd);
int hvt_vm_create_pit2(int vm_fd, uint32_t flags);
int hvt_vm_irq_line(int vm_fd, uint32_t irq, uint32_t level);
int hvt_vm_set_gsi_routing(int vm_fd, const struct kvm_irq_routing_entry *entries, int count);
int hvt_vm_enable_cap(int vm_fd, uint32_t cap, uint64_t arg0, uint64_t arg1);
int hvt_vm_set_msr_filter(int vm_fd, struct kvm_msr_filter *filter);
int hvt_vm_get_irqchip(int vm_fd, struct kvm_irqchip *chip);
int hvt_vm_set_irqchip(int vm_fd, const struct kvm_irqchip *chip);
int hvt_vm_get_pit2(int vm_fd, struct kvm_pit_state2 *pit);
int hvt_vm_set_pit2(int vm_fd, const struct kvm_pit_state2 *pit);
int hvt_vm_get_clock(int vm_fd, struct kvm_clock_data *clock);
int hvt_vm_set_clock(int vm_fd, const struct kvm_clock_data *clock);
int hvt_vm_get_dirty_log(int vm_fd, uint32_t slot, uint64_t *bitmap);
int hvt_vm_clear_dirty_log(int vm_fd, uint32_t slot, uint64_t first_page, uint32_t num_pages, uint64_t *bitmap);
int hvt_vm_reset(int vm_fd, struct hvt_reset_slot *slots, int nslots, struct hvt_reset_vcpu *vcpus, int nvcpus, const struct hvt_reset_vmstate *vmstate, struct hvt_reset_rows *rows, struct hvt_dirty_rings *rings, struct hvt_reset_tally *tally);
int hvt_vm_reset_dirty_rings(int vm_fd);
int hvt_dirty_ring_map(int vcpu_fd, uint32_t bytes, struct kvm_dirty_gfn **ring_out);
int hvt_dirty_ring_unmap(struct kvm_dirty_gfn *ring, uint32_t bytes);
int64_t hvt_dirty_rings_harvest(struct hvt_dirty_rings *rings);

int hvt_vcpu_create(int vm_fd, int id, int mmap_size, struct kvm_run **run_out);
int hvt_vcpu_destroy(int vcpu_fd, struct kvm_run *run, int mmap_size);
int hvt_vcpu_run(int vcpu_fd);
int64_t hvt_vcpu_first_run_ns(void);
int hvt_vcpu_kick(uint64_t thread, struct kvm_run *run);
int hvt_vcpu_get_regs(int fd, struct kvm_regs *regs);
int hvt_vcpu_set_regs(int fd, const struct kvm_regs *regs);
int hvt_vcpu_get_sregs(int fd, struct kvm_sregs *sregs);
int hvt_vcpu_set_sregs(int fd, const struct kvm_sregs *sregs);
int hvt_vcpu_get_fpu(int fd, struct kvm_fpu *fpu);
int hvt_vcpu_set_fpu(int fd, const struct kvm_fpu *fpu);
int hvt_vcpu_get_msrs(int fd, struct kvm_msr_entry *entries, int count);
int hvt_vcpu_set_msrs(int fd, const struct kvm_msr_entry *entries, int count);
int hvt_vcpu_get_events(int fd, struct kvm_vcpu_events *events);
int hvt_vcpu_set_events(int fd, const struct kvm_vcpu_events *events);
int hvt_vcpu_set_cpuid(int fd, const struct kvm_cpuid_entry2 *entries, int count);
int hvt_vcpu_get_tsc_khz(int fd);
int hvt_vcpu_set_guest_debug(int fd, const struct kvm_guest_debug *dbg);
int hvt_vcpu_get_debugregs(int fd, struct kvm_debugregs *regs);
int hvt_vcpu_set_debugregs(int fd, const struct kvm_debugregs *regs);
int hvt_vcpu_stats_fd(int fd);
int hvt_vcpu_get_xsave(int fd, void *area, int size);
int hvt_vcpu_set_xsave(int fd, const void *area);
int hvt_vcpu_get_xcrs(int fd, struct kvm_xcrs *xcrs);
int hvt_vcpu_set_xcrs(int fd, const struct kvm_xcrs *xcrs);
int hvt_vcpu_get_lapic(int fd, struct kvm_lapic_state *lapic);
int hvt_vcpu_get_mp_state(int fd, struct kvm_mp_state *state);
int hvt_vcpu_set_mp_state(int fd, const struct kvm_mp_state *state);
int hvt_vcpu_set_lapic(int fd, const struct kvm_lapic_state *lapic);
int hvt_vcpu_get_cpuid(int fd, struct kvm_cpuid_entry2 *entries, int max);
int hvt_vcpu_inject_nmi(int fd);
int hvt_vcpu_inject_interrupt(int fd, uint32_t vector);
int hvt_vcpu_set_tsc_khz(int fd, uint32_t khz);
int hvt_vcpu_has_attr(int fd, uint32_t group, uint64_t attr);
int hvt_vcpu_get_attr(int fd, uint32_t group, uint64_t attr, void *value);
int hvt_vcpu_set_attr(int fd, uint32_t group, uint64_t attr, const void *value);
int hvt_vcpu_exit_pending(const struct kvm_run *run);
int hvt_vcpu_flush_sync(int vcpu_fd, struct kvm_run *run);
int hvt_vcpu_reset(int vcpu_fd, struct kvm_run *run, const struct kvm_regs *regs, const struct kvm_sregs *sregs, const struct kvm_vcpu_events *events, const void *xsave, uint32_t flags);

int hvt_mem_copy_pages(void *dst, const void *src, const uint64_t *bitmap, uint64_t npages, uint64_t page_size);
int hvt_mem_reset_pages(int vm_fd, int slot, void *dst, const void *src, uint64_t *bitmap, const uint64_t *logged, const uint64_t *extra, uint8_t *host_dirty, uint64_t npages, uint64_t page_size);
uint64_t hvt_mem_reset_rows(struct hvt_reset_rows *rows);
int hvt_mem_cas(void *addr, uint32_t size, void *expected, const void *desired);

int hvt_msr_host_read(int cpu, uint32_t index, uint64_t *value);
int hvt_msr_host_write(int cpu, uint32_t index, uint64_t value);


int hvt_loop_reference(int vcpu_fd, struct kvm_run *run, uint64_t max_exits, uint16_t stop_port, struct hvt_loop_stats *stats);
"""

LIBRARY_NAME = "libhvt.so"


def library_path() -> Path:
    """Where ``libhvt.so`` is: ``$HVJIT_LIBHVT``, else inside the installed package."""
    override = os.environ.get("HVJIT_LIBHVT")
    if override:
        return Path(override)
    with resources.as_file(resources.files("hvjit") / LIBRARY_NAME) as p:
        return Path(p)


def _load():
    path = library_path()
    if not path.exists():
        raise HvjitError(
            f"{LIBRARY_NAME} not found at {path}: hvjit must be installed with pip "
            "(`pip install .` or `pip install -e .`), which builds the trampoline"
        )
    # RTLD_GLOBAL first: Numba's ExternalFunction resolves symbols in the global namespace.
    global_handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    ffi = _compiled_ffi()
    return ffi, ffi.dlopen(str(path)), global_handle, path


def _inline_ffi():
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi


def _compiled_ffi():
    """The FFI for ``_CDEF``, parsed once: cffi's out-of-line ABI mode writes the parsed
    declarations as a small Python module (under the kernel cache directory, named by a hash of
    ``_CDEF`` and cffi's version), which later processes import instead of parsing the C text
    with pycparser again (~30-50 ms a start-up). Same FFI operations, same library; where the
    cache cannot be written, the declarations are parsed in process as before."""
    import _cffi_backend

    digest = hashlib.sha256(f"{_CDEF}\0{_cffi_backend.__version__}".encode()).hexdigest()[:16]
    name = f"_hvt_ffi_{digest}"
    path = cache_base() / "cffi" / f"{name}.py"
    try:
        if not path.exists():
            import cffi

            builder = cffi.FFI()
            builder.cdef(_CDEF)
            builder.set_source(name, None, compiler_verbose=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            builder.emit_python_code(str(tmp))
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.ffi
    except (OSError, ImportError, SyntaxError, AttributeError):
        return _inline_ffi()


ffi, lib, _global_handle, LIBRARY = _load()


# C scalar types of the prototypes, as Numba sees them (by name in numba.types, imported only
# when a kernel needs one: `hvjit info` needs no Numba); every pointer is a void pointer.
_NUMBA_SCALARS = {
    "void": "void",
    "int": "int32",
    "unsigned int": "uint32",
    "long": "int64",
    "unsigned long": "uint64",
    "uint16_t": "uint16",
    "uint32_t": "uint32",
    "uint64_t": "uint64",
    "int64_t": "int64",
}
_PROTOTYPE = re.compile(r"^\s*([\w ]+?)\s*(\*?)\s*(hvt_\w+)\((.*)\);\s*$")


def prototypes() -> dict[str, tuple[str, list[str]]]:
    """``{name: (return type, [parameter types])}`` of every function in ``_CDEF``."""
    out = {}
    for line in _CDEF.splitlines():
        m = _PROTOTYPE.match(line)
        if not m:
            continue
        ret, ret_ptr, name, params = m.groups()
        args = [] if params.strip() in ("", "void") else [
            re.sub(r"\s*\b\w+$", "", p.strip()) if not p.strip().endswith("*") else p.strip()
            for p in params.split(",")
        ]
        out[name] = (ret.strip() + (" *" if ret_ptr else ""), args)
    return out


def _numba_type(ctype: str):
    from numba import types

    if "*" in ctype:
        return types.voidptr
    return getattr(types, _NUMBA_SCALARS[ctype.replace("const ", "").strip()])


@cache
def external(name: str):
    """The Numba ``ExternalFunction`` for trampoline symbol ``name``, typed from ``_CDEF``."""
    from numba import types

    try:
        ret, args = prototypes()[name]
    except KeyError:
        raise HvjitError(f"{name} is not declared in hvjit's C ABI") from None
    return types.ExternalFunction(name, _numba_type(ret)(*(_numba_type(a) for a in args)))


def check(rc: int, op: str, detail: str = "") -> int:
    """Turn the trampoline's ``-errno`` convention into :class:`KvmError`; pass counts through."""
    if rc < 0:
        raise KvmError(op, -rc, detail)
    return rc


def ptr(array, ctype: str = "void *"):
    """A C pointer to a numpy array's (or buffer's) memory, for one call."""
    return ffi.cast(ctype, ffi.from_buffer(array))


def errno_name(rc: int) -> str:
    return errno.errorcode.get(-rc, str(-rc)) if rc < 0 else "OK"
