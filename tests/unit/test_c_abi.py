"""The C ABI is declared once in Python (``_trampoline._CDEF``); the C compiler checks it
against ``trampoline/include/hvt.h``, and the Numba signatures are derived from it."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from numba import types

import hvjit
from hvjit import _trampoline

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to read hvt.h")

HEADER_DIR = Path(hvjit.__file__).resolve().parent.parent / "trampoline" / "include"
HEADER = HEADER_DIR / "hvt.h"


def _compile(tmp_path, body: str) -> subprocess.CompletedProcess:
    src = tmp_path / "abi.c"
    src.write_text('#include "hvt.h"\n' + body)
    return subprocess.run(["cc", "-fsyntax-only", "-Werror", "-I", str(HEADER_DIR), str(src)],
                          capture_output=True, text=True)


def _python_prototypes() -> str:
    """Every prototype of the Python declaration, as C, to be re-declared after hvt.h."""
    return "\n".join(line for line in _trampoline._CDEF.splitlines() if "hvt_" in line and "(" in line)


def test_every_python_prototype_agrees_with_the_header(tmp_path):
    # A redeclaration with another type is a hard error in C ("conflicting types").
    result = _compile(tmp_path, _python_prototypes() + "\n")
    assert result.returncode == 0, result.stderr


def test_a_perturbed_prototype_is_caught(tmp_path):
    wrong = _python_prototypes().replace("int hvt_vm_irq_line(int vm_fd, uint32_t irq",
                                         "int hvt_vm_irq_line(int vm_fd, uint64_t irq")
    assert wrong != _python_prototypes()
    result = _compile(tmp_path, wrong + "\n")
    assert result.returncode != 0 and "hvt_vm_irq_line" in result.stderr


def test_header_and_python_declare_the_same_functions():
    in_header = set(re.findall(r"HVT_EXPORT\s+[\w\s\*]+?\b(hvt_\w+)\s*\(", HEADER.read_text()))
    assert in_header == set(_trampoline.prototypes())


def test_numba_externals_follow_the_declaration():
    ext = _trampoline.external("hvt_vm_irq_line")
    assert ext.sig.return_type == types.int32
    assert ext.sig.args == (types.int32, types.uint32, types.uint32)
    assert _trampoline.external("hvt_sys_rdtsc").sig.return_type == types.uint64
    assert _trampoline.external("hvt_vcpu_create").sig.args[-1] == types.voidptr
    with pytest.raises(hvjit.errors.HvjitError):
        _trampoline.external("hvt_no_such_function")


def test_no_kernel_declares_its_own_external_function():
    """Every ExternalFunction comes from _trampoline.external, never a hand-written signature."""
    package = Path(hvjit.__file__).resolve().parent
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "_trampoline.py" and "ExternalFunction(" in p.read_text()]
    assert offenders == []
