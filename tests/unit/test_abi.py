"""Every size and offset in hvjit.abi, checked against the kernel's own header by a C compiler."""

import shutil
import subprocess

import numpy as np
import pytest

from hvjit import abi

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to read linux/kvm.h")


def _leaf_fields(dtype, prefix=""):
    """(python path, C path, offset) for every field, nested records flattened."""
    for name, (sub, offset, *_) in dtype.fields.items():
        path = f"{prefix}{name}"
        yield path, offset, sub
        if sub.fields:
            for p, o, s in _leaf_fields(sub, f"{path}."):
                yield p, offset + o, s


def _c_layout(tmp_path, queries):
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "hvt.h"', "int main(void) {"]
    for struct, member in queries:
        expr = f"sizeof(struct {struct})" if member is None else f"offsetof(struct {struct}, {member})"
        lines.append(f'  printf("%zu\\n", (size_t)({expr}));')
    lines += ["  return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    import hvjit

    include = (
        __import__("pathlib").Path(hvjit.__file__).resolve().parent.parent / "trampoline" / "include"
    )
    subprocess.run(["cc", "-I", str(include), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def test_every_struct_matches_linux_kvm_h(tmp_path):
    queries, expected = [], []
    for struct, dtype in abi.C_STRUCTS.items():
        queries.append((struct, None))
        expected.append((struct, "sizeof", dtype.itemsize))
        c_names = abi.C_NAMES.get(struct, {})
        for path, offset, _ in _leaf_fields(dtype):
            if "padding" in path or path.endswith("pad") or path.endswith("pad1") or path.endswith("pad2"):
                continue
            head, dot, rest = path.partition(".")
            member = c_names.get(head, head) + dot + rest
            if struct == "kvm_guest_debug" and path == "debugreg":
                member = "arch.debugreg"
            queries.append((struct, member))
            expected.append((struct, member, offset))
    got = _c_layout(tmp_path, queries)
    mismatches = [(e, g) for e, g in zip(expected, got) if e[2] != g]
    assert not mismatches, f"layout differs from linux/kvm.h: {mismatches[:10]}"
    assert len(got) == len(expected) > 100


def test_run_record_views_a_page():
    page = np.zeros(4096, np.uint8)
    run = page[: abi.KVM_RUN_SIZE].view(abi.KVM_RUN_DTYPE)
    page[8:12] = np.frombuffer(np.uint32(abi.KvmExit.IO).tobytes(), np.uint8)
    page[34:36] = [0xF8, 0x03]
    assert run[0]["exit_reason"] == abi.KvmExit.IO
    assert run[0]["io_port"] == 0x3F8
