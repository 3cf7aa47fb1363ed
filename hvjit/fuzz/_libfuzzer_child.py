"""libFuzzer, through atheris, as hvjit's mutation engine: run as a child process.

    python _libfuzzer_child.py READ_FD WRITE_FD FEATURES [libFuzzer flags and corpus dirs]

libFuzzer owns this process (``atheris.Fuzz()`` never returns), so it runs apart from the
VM. For each input libFuzzer wants run, this sends ``u32 length + bytes`` on WRITE_FD and
reads back ``u32 n_features, u32 n_comparisons``, the features (u32 ids below FEATURES) and
the comparisons (three u64 each: operand size | site << 8, a, b), and hands them to libFuzzer
as coverage counters and compare traces: libFuzzer keeps inputs that reach new features and
splices logged operands into its mutations. End of file on READ_FD ends the process.

A comparison of 2 or more bytes goes in as a memcmp of the operands' bytes (libFuzzer finds
the input's bytes and puts the other operand in their place); a 1-byte one as an integer
comparison, whose value profile (bits still differing, per site) lets libFuzzer close in.

Only the standard library and atheris are imported: this file runs by path, not as part of
the hvjit package.
"""

import os
import signal
import struct
import sys
from array import array

EQ = 2  # atheris's compare-op id for ==
SITE_PC = 0x10000  # fake "program counters" of comparison sites: SITE_PC + site id


def _read(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            os._exit(0)  # the parent is done (or gone): nothing to save here
        out += chunk
    return bytes(out)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:
            os._exit(0)  # the parent is gone: not a crash for libFuzzer to report


def main(argv: list) -> None:
    read_fd, write_fd, features = int(argv[1]), int(argv[2]), int(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import atheris

    counters = [atheris._reserve_counter() for _ in range(features)]
    hooks: dict = {}

    def one_input(data: bytes) -> None:
        _write(write_fd, struct.pack("<I", len(data)) + data)
        n_features, n_cmps = struct.unpack("<II", _read(read_fd, 8))
        body = _read(read_fd, 4 * n_features + 24 * n_cmps)
        if not hooks:
            # Fuzz() swaps in the tracing functions of the libFuzzer it loaded: bind them now.
            hooks.update(branch=atheris._trace_branch, cmp=atheris._trace_cmp)
        trace_branch, trace_cmp = hooks["branch"], hooks["cmp"]
        ids = array("I")
        ids.frombytes(body[: 4 * n_features])
        for f in ids:
            if f < features:
                trace_branch(counters[f])
        ops = array("Q")
        ops.frombytes(body[4 * n_features:])
        for i in range(0, len(ops), 3):
            size, site = ops[i] & 0xFF, SITE_PC + ((ops[i] >> 8) & 0xFFFFFF)
            if 2 <= size <= 8:
                trace_cmp(ops[i + 1].to_bytes(8, "little")[:size], ops[i + 2].to_bytes(8, "little")[:size],
                          EQ, site, False)
            elif size == 1:
                trace_cmp(ops[i + 1] & 0xFF, ops[i + 2] & 0xFF, EQ, site, False)

    atheris.Setup([argv[0], *argv[4:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
