"""Bad input gets typed errors; destroying VMs releases every fd and mapping."""

import os

import numpy as np
import pytest

from hvjit.errors import (
    GuestMemoryError,
    KvmError,
    MemoryMapError,
    ObjectDestroyedError,
    RegisterError,
)

from .guests import hello_source, load


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _mappings():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_thousand_create_destroy_cycles_leak_nothing(session):
    # Warm up once (first VM opens /dev/kvm, imports, JIT caches), then count.
    session.create_vm("warm", memory=1 << 20, vcpus=2).destroy()
    fds, maps = _fds(), _mappings()
    for i in range(1000):
        vm = session.create_vm(f"cycle{i}", memory=1 << 20, vcpus=2)
        vm.memory.write(0x1000, b"\xf4")
        vm.destroy()
    assert _fds() == fds
    assert _mappings() <= maps + 2  # the allocator may keep an arena around
    assert session.vms == ()


def test_destroyed_vm_refuses_use(session):
    vm = session.create_vm("gone", memory=1 << 20)
    v = vm.vcpu(0)
    vm.destroy()
    vm.destroy()  # idempotent
    with pytest.raises(ObjectDestroyedError):
        v.run(timeout=1)
    with pytest.raises(ObjectDestroyedError):
        vm.run()
    with pytest.raises(ObjectDestroyedError):
        vm.memory.read(0, 4)
    with pytest.raises(ObjectDestroyedError):
        v.get_register("rip")


def test_user_views_of_memory_stay_valid_after_destroy(session):
    vm = session.create_vm("keep", memory=1 << 20)
    view = vm.memory.view(0x2000, 16)
    view[:] = 7
    vm.destroy()
    assert view.sum() == 7 * 16  # no dangling pointer: the RAM lives as long as the view


@pytest.mark.parametrize("gpa,size,match", [
    (0x1000, 0x1800, "multiples"),          # misaligned size
    (0x800, 0x1000, "multiples"),           # misaligned gpa
    (0x80000, 0x1000, "overlaps"),          # inside the existing RAM
    (0xFF000000, 0x1000, "MMIO"),           # over pc-testdev's MMIO range
])
def test_bad_memory_segments_are_refused(session, gpa, size, match):
    vm = session.create_vm("mm", memory=1 << 20)
    before = vm.memory.segments
    with pytest.raises(MemoryMapError, match=match):
        vm.add_memory(gpa, size)
    assert vm.memory.segments == before


def test_overlapping_layout_refused_before_anything_is_created(session):
    fds = _fds()
    with pytest.raises(MemoryMapError, match="overlaps"):
        session.create_vm("ov", memory=[(0, 0x10000), (0x8000, 0x10000)])
    assert _fds() == fds
    assert session.vms == ()


def test_extra_memory_segment_and_readonly_memory(session):
    vm = session.create_vm("ro", memory=1 << 20)
    vm.add_memory(0x200000, 0x10000, readonly=True)
    vm.memory.write(0x200000, b"\x11\x22")
    load(vm, """
.code64
    mov $0x200000, %ebx
    movzwl (%rbx), %eax         # reads RAM
    movw $0x3333, (%rbx)        # a write to read-only memory is an MMIO exit
    outl %eax, $0xf4
""", "long", 3)
    ex = vm.run(timeout=10)
    assert ex.exitcode.name == "INST_EMUL" and ex.is_write and ex.gpa == 0x200000
    assert vm.memory.read(0x200000, 2) == b"\x11\x22"


def test_guest_memory_range_checks(session):
    vm = session.create_vm("rc", memory=1 << 20)
    with pytest.raises(GuestMemoryError):
        vm.memory.read((1 << 20) - 2, 4)
    with pytest.raises(GuestMemoryError):
        vm.memory.write(1 << 20, b"x")
    with pytest.raises(GuestMemoryError):
        vm.memory.read(-1, 1)
    vm.memory.write_u64(0x100, 0x1122334455667788)
    assert vm.memory.read_u32(0x104) == 0x11223344
    assert isinstance(vm.memory.view(0, 8), np.ndarray)


def test_registers_by_name_and_descriptors(session):
    vm = session.create_vm("regs", memory=1 << 20)
    v = vm.vcpu(0)
    v.set_registers(rax=1, r15=0xFFFFFFFFFFFFFFFF, rip=0x1234, cr3=0x5000, efer=0)
    got = v.get_registers("rax", "r15", "rip", "cr3")
    assert got == {"rax": 1, "r15": 0xFFFFFFFFFFFFFFFF, "rip": 0x1234, "cr3": 0x5000}
    v.set_register("RBX", 42)
    assert v.get_register("rbx") == 42
    v.set_desc("fs", base=0x12345000, limit=0xFFFF, access=0x93, selector=0x10)
    d = v.get_desc("fs")
    assert (d.base, d.limit, d.access & 0xFF) == (0x12345000, 0xFFFF, 0x93)
    assert v.get_register("fs") == 0x10
    v.set_desc("gdtr", base=0x9000, limit=0x47)
    assert v.get_desc("gdtr").base == 0x9000
    all_regs = v.get_registers()
    assert {"rax", "rflags", "cr0", "efer", "cs", "tr"} <= set(all_regs)


@pytest.mark.parametrize("call", [
    lambda v: v.get_register("xmm0"),
    lambda v: v.set_register("eax", 1),
    lambda v: v.set_register("rax", -1),
    lambda v: v.set_register("rax", 1 << 64),
    lambda v: v.set_register("cs", 0x10000),
    lambda v: v.get_desc("rax"),
])
def test_bad_register_access_raises_register_error(session, call):
    vm = session.create_vm("badreg", memory=1 << 20)
    v = vm.vcpu(0)
    before = v.get_registers()
    with pytest.raises(RegisterError):
        call(v)
    assert v.get_registers() == before


def test_bad_vm_arguments(session):
    for name in ("", "has space", "x" * 33, "../etc", None):
        with pytest.raises(ValueError):
            session.create_vm(name, memory=1 << 20)
    for vcpus in (0, -1, 1000, 1.5):
        with pytest.raises(ValueError):
            session.create_vm("v", memory=1 << 20, vcpus=vcpus)
    with pytest.raises(MemoryMapError):
        session.create_vm("m", memory=12345)
    assert session.vms == ()


def test_failed_ioctl_is_typed_with_operation_and_errno(session):
    vm = session.create_vm("msr", memory=1 << 20)
    with pytest.raises(KvmError) as e:
        vm.vcpu(0).get_msr(0xDEADBEEF)  # no such MSR
    assert e.value.op == "KVM_GET_MSRS" and e.value.errno


def test_reinit_gives_fresh_vcpus_over_the_same_memory(session):
    vm = session.create_vm("re", memory=2 << 20)
    load(vm, hello_source("long", "one", 1), "long", 3)
    assert vm.run(timeout=10).code == 1
    fds = _fds()
    vm.reinit()
    assert _fds() == fds
    assert vm.console == b""
    load(vm, hello_source("long", "two", 2), "long", 3)
    assert vm.run(timeout=10).code == 2
    assert vm.console == b"two"


def test_vcpus_each_have_their_own_state(session):
    vm = session.create_vm("smp", memory=1 << 20, vcpus=3)
    for i, v in enumerate(vm.vcpus):
        v.set_register("rax", 100 + i)
    assert [v.get_register("rax") for v in vm.vcpus] == [100, 101, 102]
    with pytest.raises(IndexError):
        vm.vcpu(3)


def test_many_msrs_in_one_call_are_chunked(session):
    vm = session.create_vm("msrs", memory=1 << 20)
    v = vm.vcpu(0)
    indices = [0x174, 0x175, 0x176] * 200  # 600 entries: more than one KVM_GET_MSRS takes
    values = v.get_msrs(indices)
    assert set(values) == {0x174, 0x175, 0x176}
    assert v.set_msrs({0x174: 0x10, 0x175: 0x2000, 0x176: 0x3000}) == 3
    assert v.get_msrs([0x174, 0x175, 0x176] * 100) == {0x174: 0x10, 0x175: 0x2000, 0x176: 0x3000}


def test_each_vcpu_gets_kvm_cpuid_with_its_apic_id(session):
    """CPUID at CPL0 goes through KVM (at CPL3 PVM hosts answer from the host CPU)."""
    from hvjit import entry
    from hvjit.asm import assemble

    vm = session.create_vm("cpuid", memory=2 << 20, vcpus=2)
    vm.memory.write(0x1000, assemble("""
.code64
    mov $1, %eax
    cpuid
    shr $24, %ebx                 # initial APIC ID
    mov %ebx, %esi
    mov $0x80000001, %eax
    cpuid
    shr $29, %edx                 # long mode supported
    and $1, %edx
    shl $8, %edx
    or %esi, %edx
    mov %edx, %eax
    outl %eax, $0xf4
""", 0x1000))
    for v in vm.vcpus:
        entry.setup_long_mode(v, 0x1000, cpl=0)
        ex = v.run(timeout=20)
        assert ex.code == 0x100 | v.index


def test_xsave_area_and_xcrs_round_trip(session):
    vm = session.create_vm("xsave", memory=1 << 20)
    v = vm.vcpu(0)
    xcrs = v.get_xcrs()
    assert xcrs[0] & 1  # XCR0.x87 is always set
    area = v.get_xsave()
    assert area.size >= 4096
    area[160:176] = np.arange(16, dtype=np.uint8)  # XMM0 in the legacy region
    area[512] |= 2  # XSTATE_BV: SSE state present (else it reads as the init state)
    v.set_xsave(area)
    assert bytes(v.get_xsave()[160:176]) == bytes(range(16))
    assert bytes(v.get_fpu()["xmm"][0]) == bytes(range(16))
    v.set_xcrs({0: xcrs[0]})
    assert v.get_xcrs()[0] == xcrs[0]
