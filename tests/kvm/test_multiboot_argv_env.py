"""What conformance-suite kernels (kvm-unit-tests) take from their VMM, seen by real guests:
the command line "<image> <args>" (argv[0] = the image) and the environment file passed with
``--initrd`` as the first multiboot module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from hvjit import loaders
from hvjit.abi import VmExitCode

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
