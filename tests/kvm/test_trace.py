"""Exit tracing: the ring shows exactly the exits a guest made, in order, with ports, sizes,
data, rip and who handled them; it wraps; it can be read while the guest runs; it saves and
loads; and the tracing path in the run loop passes under NUMBA_BOUNDSCHECK=1."""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hvjit import decode_buffer, trace
from hvjit.abi import VmExitCode
from hvjit.asm import assemble
from hvjit.devices.testdev import SCRATCH_PORT

from .guests import LOAD, load

PY_PORT = 0x700  # claimed by a Python handler in these tests
SINK_PORT = 0x80  # the native port sink
# (port, size, value) of each OUT, native and Python ports interleaved.
WRITES = [(SINK_PORT, 1, 0x11), (PY_PORT, 2, 0x2233), (SCRATCH_PORT, 4, 0x44556677),
          (PY_PORT + 1, 1, 0x5A), (SINK_PORT, 2, 0xBEEF), (PY_PORT, 4, 0xCAFEF00D)]
REG = {1: "%al", 2: "%ax", 4: "%eax"}
SUFFIX = {1: "b", 2: "w", 4: "l"}


def _writes_source(writes) -> str:
    lines = [".code64"]
    for port, size, value in writes:
        lines += [f"    mov ${value:#x}, %eax", f"    mov ${port:#x}, %dx", f"    out{SUFFIX[size]} {REG[size]}, %dx"]
    lines += ["    inw %dx, %ax", "    mov $7, %eax", "    outl %eax, $0xf4"]
    return "\n".join(lines) + "\n"


def _with_python_port(vm, seen):
    def handler(port, size, is_write, value):
        seen.append((port, size, is_write, value))
        return 0x1234  # what the final `inw` reads

    vm.add_port_handler(PY_PORT, handler, count=2, name="test-port")


def _port_sites(source):
    """(address, next address) of each IN/OUT instruction, from hvjit's decoder."""
    code = assemble(source, LOAD)
    return [(int(r["address"]), int(r["address"]) + int(r["length"])) for r in decode_buffer(code, 64, LOAD)
            if r["opcode_map"] == 0 and int(r["opcode"]) in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF)]


@pytest.mark.parametrize("cpl", [3, 0])
def test_trace_shows_the_port_writes_in_order(session, cpl):
    vm = session.create_vm(f"trace{cpl}", memory=2 << 20)
    source = _writes_source(WRITES)
    load(vm, source, "long", cpl)
    seen = []
    _with_python_port(vm, seen)
    vm.trace.enable(256)
    ex = vm.run(timeout=30)
    assert ex.exitcode == VmExitCode.SUSPENDED and ex.code == 7, str(ex)
    recs = vm.trace.records()
    assert len(recs) == len(WRITES) + 2 == vm.trace.written  # the writes, the IN, the power-off
    got = [(int(r["addr"]), int(r["size"]), int(r["data"])) for r in recs[: len(WRITES)]]
    assert got == WRITES
    assert all(r["is_write"] for r in recs[: len(WRITES)])
    native = [bool(r["native"]) for r in recs]
    assert native == [p != PY_PORT and p != PY_PORT + 1 for p, _, _ in WRITES] + [False, True]
    assert [c for c in recs["exitcode"]] == [VmExitCode.INOUT] * (len(WRITES) + 1) + [VmExitCode.SUSPENDED]
    inw = recs[len(WRITES)]
    assert (inw["addr"], inw["size"], inw["is_write"], inw["data"]) == (PY_PORT, 2, 0, 0x1234)
    assert [s[:2] for s in seen] == [(p, s) for p, s, _ in WRITES if p in (PY_PORT, PY_PORT + 1)] + [(PY_PORT, 2)]
    # Every exit's handler time is known, and time only moves forward.
    assert (recs["handler_tsc"] >= 0).all() and (recs["handler_ns"] >= 0).all()
    assert (np.diff(recs["tsc"]) > 0).all() and (np.diff(recs["ns"]) > 0).all()
    # A Python handler takes longer than the native switch.
    assert np.median(recs["handler_tsc"][~recs["native"].astype(bool)]) > np.median(
        recs["handler_tsc"][recs["native"].astype(bool)])
    # rip without an ioctl: the port instruction (VMX/SVM); on a PVM host the one after it
    # for a write, the instruction itself for a read (still waiting for its value).
    if recs["rip_valid"].all():
        sites = _port_sites(source)
        assert len(sites) == len(recs)
        pvm = vm.kvm.flavour == "pvm"
        for r, (at, after) in zip(recs, sites):
            expected = (after,) if pvm and r["is_write"] else (at,) if pvm else (at, after)
            assert int(r["rip"]) in expected, (hex(int(r["rip"])), hex(at), hex(after))


def test_the_ring_wraps_keeping_the_newest(session):
    vm = session.create_vm("tracewrap", memory=2 << 20)
    writes = [(SCRATCH_PORT, 4, 0x100 + i) for i in range(20)]
    load(vm, _writes_source(writes), "long", 3)
    _with_python_port(vm, [])
    vm.trace.enable(8)
    assert vm.run(timeout=30).code == 7
    recs = vm.trace.records()
    assert vm.trace.written == 22 and len(recs) == 8 and vm.trace.dropped() == 14
    assert [int(d) for d in recs["data"][:6]] == [0x100 + i for i in range(14, 20)]
    assert [int(c) for c in recs["exitcode"][6:]] == [VmExitCode.INOUT, VmExitCode.SUSPENDED]
    vm.trace.clear()
    assert len(vm.trace.records()) == 0 and vm.trace.written == 0


SPIN = """
.code64
    xor %eax, %eax
1:  inc %eax
    outl %eax, $0xe0
    jmp 1b
"""


def test_records_can_be_read_while_the_guest_runs(session):
    vm = session.create_vm("tracelive", memory=2 << 20)
    load(vm, SPIN, "long", 3)
    vm.trace.enable(64)
    done = threading.Event()
    result = {}

    def run():
        result["exit"] = vm.run(timeout=60)
        done.set()

    runner = threading.Thread(target=run)
    runner.start()
    snapshots = []
    try:
        deadline = time.monotonic() + 30
        while len(snapshots) < 20 and time.monotonic() < deadline:
            recs = vm.trace.records()
            if len(recs) > 1:
                snapshots.append(recs)
            time.sleep(0.005)
    finally:
        vm.vcpu(0).stop()
        runner.join(30)
    assert done.is_set() and result["exit"].exitcode == VmExitCode.BOGUS
    assert len(snapshots) >= 5
    for recs in snapshots:  # each copy is a run of consecutive, complete records
        data = recs["data"].astype(np.int64)
        assert (np.diff(data) == 1).all(), data
        assert (np.diff(recs["tsc"]) > 0).all()
        assert (recs["addr"] == SCRATCH_PORT).all() and (recs["native"] == 1).all()
    firsts = [int(r["data"][-1]) for r in snapshots]
    assert firsts[-1] > firsts[0]  # the guest went on while we read


def test_tracing_off_records_nothing_and_can_be_switched(session, tmp_path):
    vm = session.create_vm("traceoff", memory=2 << 20)
    writes = [(SINK_PORT, 1, i) for i in range(5)]
    load(vm, _writes_source(writes), "long", 3)
    _with_python_port(vm, [])
    assert not vm.trace.enabled
    assert vm.run(timeout=30).code == 7
    assert len(vm.trace.records()) == 0 and vm.trace.written == 0
    assert vm.vcpu(0)._run[0]["kvm_valid_regs"] == 0
    vm.trace.enable(16, rip=False)
    load(vm, _writes_source(writes), "long", 3)
    assert vm.run(timeout=30).code == 7
    recs = vm.trace.records()
    assert [int(d) for d in recs["data"][:5]] == list(range(5)) and not recs["rip_valid"].any()
    with pytest.raises(trace.TraceError):
        vm.trace.enable(0)
    vm.trace.disable()
    assert not vm.trace.enabled and len(vm.trace.records()) == 0


def test_save_and_load_npy(session, tmp_path):
    vm = session.create_vm("tracesave", memory=2 << 20)
    load(vm, _writes_source(WRITES), "long", 3)
    _with_python_port(vm, [])
    vm.trace.enable(64)
    vm.run(timeout=30)
    path = vm.trace.save(tmp_path / "t.npy")
    recs, meta = trace.load(path)
    assert np.array_equal(recs, vm.trace.records())
    assert meta["tsc_khz"] > 0 and meta["vm"] == "tracesave" and meta["dropped"] == 0
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(trace.TraceError):
        trace.load(tmp_path / "bad.npy")


def test_save_and_load_parquet(session, tmp_path):
    pytest.importorskip("pyarrow")
    vm = session.create_vm("traceparquet", memory=2 << 20)
    load(vm, _writes_source(WRITES), "long", 3)
    _with_python_port(vm, [])
    vm.trace.enable(64)
    vm.run(timeout=30)
    path = vm.trace.save(tmp_path / "t.parquet")
    recs, meta = trace.load(path)
    assert np.array_equal(recs, vm.trace.records()) and meta["vm"] == "traceparquet"


BOUNDSCHECK_SCRIPT = """
import numba
from hvjit import Session, entry
from hvjit.asm import assemble
assert numba.config.BOUNDSCHECK
with Session() as s:
    vm = s.create_vm("bc", memory=2 << 20)
    vm.memory.write(0x1000, assemble(SOURCE, 0x1000))
    entry.setup_long_mode(vm.vcpu(0), 0x1000, cpl=3)
    vm.add_port_handler(0x700, lambda p, sz, w, v: 0x1234, count=2)
    vm.trace.enable(3)  # a small ring: the writes wrap it many times
    ex = vm.run(timeout=300)
    recs = vm.trace.records()
    assert ex.code == 7 and vm.trace.written == N, (str(ex), vm.trace.written)
    assert [int(c) for c in recs["exitcode"]] == [0, 0, 14], recs
    print("ok")
"""


def test_tracing_path_under_numba_boundscheck(tmp_path):
    """Every ring index and kvm_run read of the tracing path, bounds-checked (a fresh loop
    compiled with NUMBA_BOUNDSCHECK=1 in a subprocess)."""
    writes = WRITES * 3
    script = f"SOURCE = {_writes_source(writes)!r}\nN = {len(writes) + 2}\n" + textwrap.dedent(BOUNDSCHECK_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    cache = os.environ.get("HVJIT_BOUNDSCHECK_CACHE", "/tmp/hvjit-boundscheck-cache")
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", HVJIT_CACHE_DIR=cache,
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-3000:]


def test_hvjit_run_trace_writes_a_trace_the_trace_command_reads(tmp_path):
    image, out = tmp_path / "guest.bin", tmp_path / "run.npy"
    writes = [(SINK_PORT, 1, i) for i in range(4)] + [(SCRATCH_PORT, 4, 0x12345678)]
    image.write_bytes(assemble(_writes_source(writes).replace("    inw %dx, %ax\n", ""), LOAD))
    p = subprocess.run([sys.executable, "-m", "hvjit", "run", str(image), "--cpl", "3", "--trace", str(out),
                        "--trace-size", "4"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 7, p.stderr
    assert "trace of 4 exits saved" in p.stderr and "2 older ones overwritten" in p.stderr
    recs, meta = trace.load(out)
    assert [int(d) for d in recs["data"][:3]] == [2, 3, 0x12345678] and meta["dropped"] == 2
    show = subprocess.run([sys.executable, "-m", "hvjit", "trace", "show", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert show.returncode == 0 and "4 exits on 1 vCPU" in show.stdout, show.stderr
