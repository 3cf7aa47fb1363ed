"""Debian's stock kernel, booted with console=ttyS0 earlyprintk=serial.

Where KVM emulates ring 0 (PVM) the kernel runs instruction by instruction and cannot reach
init in a test's time; hvjit unpacks the bzImage on the host and boots its vmlinux through
the PVH entry, and this test asserts what it honestly can: the kernel's banner and the e820
map hvjit provided appear on the console, and the run ends with a typed emulation report
(the first instruction neither KVM nor hvjit emulates) or gets further. Bounded in time.
"""

import os
import time

import pytest

import hvjit
from hvjit import loaders
from hvjit.abi import VmExitCode
from hvjit.loaders.bzimage import extract_vmlinux
from hvjit.system import Kvm

from .debian import debian_kernel

CMDLINE = "console=ttyS0 earlyprintk=serial"
TIMEOUT = float(os.environ.get("HVJIT_E2E_TIMEOUT", "180"))

E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS"}


@pytest.fixture(scope="module")
def kernel_image():
    try:
        path = debian_kernel()
    except Exception as e:  # noqa: BLE001 - report why, rather than a bare traceback
        pytest.fail(f"could not fetch Debian's kernel: {e}")
    return path.read_bytes()


def test_debian_kernel_boots_to_its_banner_and_our_e820_map(kernel_image):
    pvm = Kvm.instance().flavour == "pvm"
    image = extract_vmlinux(kernel_image) if pvm else kernel_image
    with hvjit.Session() as s:
        vm = s.create_vm("debian", memory=256 << 20, irqchip=True)
        info = loaders.load(vm, image, cmdline=CMDLINE)
        t0 = time.monotonic()
        result = vm.run(timeout=TIMEOUT)
        elapsed = time.monotonic() - t0
    console = result.console.decode("latin-1")
    assert "Linux version 6." in console, f"no banner after {elapsed:.0f} s:\n{console[-2000:]}"
    assert f"Command line: {CMDLINE}" in console
    for region in info.memory_map:
        line = f"BIOS-e820: [mem {region.base:#018x}-{region.end - 1:#018x}] {E820_NAMES[region.type]}"
        assert line in console, f"{line!r} missing from the kernel's e820 report"
    assert "ACPI: RSDP" in console  # our firmware tables were found
    if result.exitcode == VmExitCode.EMULATION_FAILURE:
        report = result.exit.report
        assert report is not None and report.text and report.instruction
        assert report.rip >= 0xFFFFFFFF80000000  # in the kernel's text
        assert "not emulated" in report.reason
    else:
        # Further: it ran until the time bound, or powered off / rebooted by itself.
        assert result.exitcode in (VmExitCode.TIMEOUT, VmExitCode.SUSPENDED), result
    # Console output went through the native UART, not Python handlers.
    stats = result.vcpu_stats[0]
    assert stats["pio"] > 1000
