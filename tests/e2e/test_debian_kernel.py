"""Debian's stock kernel with a busybox initramfs, booted with console=ttyS0.

On a host with hardware virtualization the kernel reaches /init and the shell prints its
marker and powers off. Where KVM emulates ring 0 (PVM) the boot takes tens of minutes
(bench/soak_linux_shell.py goes all the way): this test boots the vmlinux through its PVH
entry until the kernel is past its int3 self-test — where QEMU and kvmtool die on that host —
and then stops it. Either way the milestones are asserted; running into the time bound fails.
"""

import os

import pytest

import hvjit
from hvjit import loaders
from hvjit.abi import VmExitCode
from hvjit.boot_progress import BootWatch
from hvjit.loaders.bzimage import extract_vmlinux
from hvjit.loaders.linux import EMULATED_RING0_ARGS
from hvjit.system import Kvm

from .debian import SHELL_MARKER, debian_kernel, shell_initramfs

CMDLINE = "console=ttyS0 earlyprintk=serial " + EMULATED_RING0_ARGS
TIMEOUT = float(os.environ.get("HVJIT_E2E_TIMEOUT", "420"))
STOP_AFTER = "int3 self-test"  # on a ring-0-emulating host

E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS"}


@pytest.fixture(scope="module")
def guest_files():
    try:
        return debian_kernel().read_bytes(), shell_initramfs()
    except Exception as e:  # noqa: BLE001 - report why, rather than a bare traceback
        pytest.fail(f"could not fetch Debian's kernel or busybox: {e}")


def test_debian_kernel_boots_to_its_shell_or_past_the_int3_self_test(guest_files):
    kernel, initrd = guest_files
    pvm = Kvm.instance().flavour == "pvm"
    image = extract_vmlinux(kernel) if pvm else kernel
    watch = BootWatch(marker=SHELL_MARKER.encode())
    with hvjit.Session() as s:
        vm = s.create_vm("debian", memory=256 << 20, irqchip=True)

        def sink(chunk: bytes) -> None:
            watch.feed(chunk)
            if pvm and STOP_AFTER in watch.reached:
                for v in vm.vcpus:
                    v.stop()

        vm.console_sink = sink
        info = loaders.load(vm, image, cmdline=CMDLINE, initrd=initrd)
        result = vm.run(timeout=TIMEOUT)
    console = result.console.decode("latin-1")
    reached = {k: round(v, 1) for k, v in watch.reached.items()}
    assert result.exitcode != VmExitCode.TIMEOUT, f"time bound hit; milestones {reached}:\n{console[-2000:]}"
    assert "Linux version 6." in console
    assert f"Command line: {CMDLINE}" in console
    for region in info.memory_map:
        line = f"BIOS-e820: [mem {region.base:#018x}-{region.end - 1:#018x}] {E820_NAMES[region.type]}"
        assert line in console, f"{line!r} missing from the kernel's e820 report"
    assert "ACPI: RSDP" in console  # our firmware tables were found
    assert ["banner", "e820", STOP_AFTER] == [m for m in watch.reached if m != "marker"][:3], reached
    if pvm:
        assert result.exitcode == VmExitCode.BOGUS, str(result)  # our stop, after the self-test
        assert vm.rep_string_stats is not None and vm.rep_string_stats.bytes > 16 << 20  # clear_bss
    else:
        assert "marker" in watch.reached and result.reason == "poweroff", f"{result}; {reached}"
    # Console output went through the native UART, not Python handlers.
    assert result.vcpu_stats[0]["pio"] > 1000
