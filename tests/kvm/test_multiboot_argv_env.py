"""What conformance-suite kernels (kvm-unit-tests) take from their VMM, seen by real guests:
the command line "<image> <args>" (argv[0] = the image), the environment file passed with
``--initrd`` as the first multiboot module, and a bzImage decompression bomb refused by
``hvjit run`` without taking the host's memory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from hvjit import loaders
from hvjit.abi import VmExitCode

from ..unit.test_loaders import bzimage_with_payload, compress, tiny_vmlinux
from .test_multiboot import OK, build

needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="GNU as/ld (binutils) not installed")

ENV = b"QEMU_ACCEL=kvm\nTESTNAME=argv\n"


def hvjit(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hvjit", *args], capture_output=True, cwd=cwd, check=False,
                          timeout=timeout)


def console_lines(text: str) -> dict:
    """The guest's "name=value" lines (cmdline=, mods=, module=... string=)."""
    return {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines() if "=" in line}


@needs_binutils
def test_guest_sees_its_path_as_argv0_and_its_environment(session, tmp_path):
    image = tmp_path / "argv.elf"
    image.write_bytes(build(tmp_path, 0x0))
    (tmp_path / "env").write_bytes(ENV)
    vm = session.create_vm("mb-argv", memory=16 << 20)
    info = loaders.load(vm, str(image), cmdline="-smp 1 answer=42", initrd=f"{tmp_path / 'env'} x=1")
    assert info.cmdline == f"{image} -smp 1 answer=42"
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == OK, (ex, vm.console)
    text = vm.console.decode()
    assert f"cmdline={image} -smp 1 answer=42\n" in text
    assert f"module={ENV.decode()} string={tmp_path / 'env'} x=1\n" in text
    assert console_lines(text)["mods"] == "00000001"


@needs_binutils
def test_cli_passes_initrd_as_module_and_image_as_argv0(tmp_path):
    """``hvjit run --initrd`` as QEMU's -initrd: relative paths, exactly as given."""
    (tmp_path / "argv.elf").write_bytes(build(tmp_path, 0x0))
    (tmp_path / "env").write_bytes(ENV)
    p = hvjit("run", "argv.elf", "--format", "multiboot", "--append", "answer=42", "--initrd", "env arg=1",
              "--memory", "16M", cwd=tmp_path)
    assert p.returncode == OK, p.stderr
    text = p.stdout.decode()
    assert "cmdline=argv.elf answer=42\n" in text
    assert f"module={ENV.decode()} string=env arg=1\n" in text
    p = hvjit("run", "argv.elf", "--initrd", "missing.env", "--memory", "16M", cwd=tmp_path)
    assert p.returncode == 1 and b"cannot read module 0 'missing.env'" in p.stderr


MEASURED_RUN = """
import sys
import hvjit.loaders.bzimage, hvjit.system
from hvjit import Session
from hvjit.cli import main
hvjit.system.Kvm.instance()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM): what follows is the run, not the imports
rc = main(sys.argv[1:])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(hwm.split()[1], file=sys.stderr)
sys.exit(rc)
"""


def _run_measured(*args, cwd):
    """``hvjit`` in a child that reports its peak RSS (KiB) during the run on its last stderr line."""
    p = subprocess.run([sys.executable, "-c", MEASURED_RUN, *args], capture_output=True, cwd=cwd, timeout=120,
                       check=False)
    return p, int(p.stderr.decode().strip().splitlines()[-1])


def test_cli_refuses_a_decompression_bomb_within_the_guest_ram(tmp_path):
    from hvjit.system import Kvm

    if Kvm.instance().flavour != "pvm":
        pytest.skip("hvjit run decompresses a bzImage on the host only where ring 0 is emulated (PVM)")
    # 64 MiB of zeros behind an ELF header (~65 KB of gzip), and a payload that is refused at once.
    (tmp_path / "bomb").write_bytes(bzimage_with_payload(compress("gzip", tiny_vmlinux(), zeros=64 << 20)))
    (tmp_path / "small").write_bytes(bzimage_with_payload(compress("gzip", b"MZ" + bytes(100))))
    base, base_rss = _run_measured("run", "--kernel", "small", "--memory", "16M", cwd=tmp_path)
    assert base.returncode == 1 and b"not an ELF kernel" in base.stderr, base.stderr
    bomb, bomb_rss = _run_measured("run", "--kernel", "bomb", "--memory", "16M", cwd=tmp_path)
    assert bomb.returncode == 1, bomb.stderr
    assert b"error: bzImage payload (gzip, 0x" in bomb.stderr
    assert b"decompresses to more than 0x1000000 bytes" in bomb.stderr and b"Traceback" not in bomb.stderr
    # The 16 MiB cap and little more, never the 64 MiB (measured: 17-18 MiB over the baseline).
    assert bomb_rss - base_rss < 24 << 10, (bomb_rss, base_rss)
    print(f"peak RSS: bomb {bomb_rss} KiB, baseline {base_rss} KiB")
