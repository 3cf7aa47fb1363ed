"""Native device handlers and the run loop's exit decoding, driven directly (no KVM)."""

import numpy as np
import pytest

from hvjit import run_loop
from hvjit.abi import (
    KVM_RUN_DTYPE,
    KVM_RUN_SIZE,
    VM_EXIT_DTYPE,
    KvmExit,
    SuspendHow,
    VmExitCode,
)
from hvjit.devices import kinds, testdev
from hvjit.devices import uart16550 as u
from hvjit.devices.bus import BusConflictError, IoBus
from hvjit.devices.debug_exit import DebugExit, debug_exit_io
from hvjit.devices.testdev import TestDev
from hvjit.devices.uart16550 import Uart16550, uart_io
from hvjit.errors import MemoryMapError

dispatch = run_loop.compiled()  # the generated loop, with the native device switch


@pytest.fixture
def bus():
    b = IoBus()
    return b


def test_uart_transmit_goes_to_the_ring_and_drains(bus):
    uart = Uart16550()
    uart.attach(bus)
    state, buf = bus.state(uart.slot), bus.buffer(uart.slot)
    for ch in b"hi!":
        value, act = uart_io(state, buf, u.RBR_THR_DLL, True, ch)
        assert act == kinds.ACT_CONTINUE
    assert uart.pending() == 3
    assert uart.drain() == b"hi!"
    assert uart.pending() == 0 and uart.drain() == b""


def test_uart_registers(bus):
    uart = Uart16550()
    uart.attach(bus)
    state, buf = bus.state(uart.slot), bus.buffer(uart.slot)
    lsr, _ = uart_io(state, buf, u.LSR, False, 0)
    assert lsr & (u.LSR_THRE | u.LSR_TEMT) and not lsr & u.LSR_DR
    # Divisor latch: DLAB set, write DLL/DLM, read them back, clear DLAB.
    uart_io(state, buf, u.LCR, True, 0x83)
    uart_io(state, buf, u.RBR_THR_DLL, True, 0x01)
    uart_io(state, buf, u.IER_DLM, True, 0x00)
    assert uart_io(state, buf, u.RBR_THR_DLL, False, 0)[0] == 1
    uart_io(state, buf, u.LCR, True, 0x03)
    assert uart.pending() == 0  # the DLL write did not transmit
    uart_io(state, buf, u.SCR, True, 0x5A)
    assert uart_io(state, buf, u.SCR, False, 0)[0] == 0x5A
    # Receive: fed bytes appear with LSR.DR and an RDA interrupt when enabled.
    assert uart.feed(b"ok") == 2
    uart_io(state, buf, u.IER_DLM, True, u.IER_RDA)
    assert uart_io(state, buf, u.IIR_FCR, False, 0)[0] & 0x0F == u.IIR_RDA
    assert uart_io(state, buf, u.LSR, False, 0)[0] & u.LSR_DR
    assert bytes([uart_io(state, buf, 0, False, 0)[0], uart_io(state, buf, 0, False, 0)[0]]) == b"ok"
    assert not uart_io(state, buf, u.LSR, False, 0)[0] & u.LSR_DR
    assert uart_io(state, buf, 0, False, 0)[0] == 0  # empty FIFO reads 0, no over-read


def test_uart_asks_for_a_drain_before_the_ring_overflows(bus):
    uart = Uart16550()
    uart.attach(bus)
    state, buf = bus.state(uart.slot), bus.buffer(uart.slot)
    acts = [uart_io(state, buf, 0, True, 65)[1] for _ in range(u.TX_DRAIN_THRESHOLD)]
    assert acts[-1] == kinds.ACT_DRAIN and set(acts[:-1]) == {kinds.ACT_CONTINUE}
    assert len(uart.drain()) == u.TX_DRAIN_THRESHOLD


def test_uart_receive_fifo_is_bounded(bus):
    uart = Uart16550()
    uart.attach(bus)
    assert uart.feed(bytes(100)) == u.RX_FIFO_SIZE


def test_debug_exit_and_testdev(bus):
    state = np.zeros(kinds.STATE_WORDS, np.int64)
    assert debug_exit_io(state, 0, 4, True, 0x1_0000_0042) == (0, kinds.ACT_POWEROFF)
    assert state[kinds.STATE_EXIT_CODE] == 0x42  # 4-byte write keeps 32 bits
    testdev.testdev_pio(state, 0, 4, True, 0xAABBCCDD)
    assert testdev.testdev_pio(state, 1, 1, False, 0)[0] == 0xCC
    testdev.testdev_pio(state, 2, 2, True, 0x1122)
    assert testdev.testdev_pio(state, 0, 4, False, 0)[0] == 0x1122CCDD
    buf = np.zeros(kinds.BUFFER_BYTES, np.uint8)
    data = np.array([1, 2, 3, 4, 0, 0, 0, 0], np.uint8)
    assert testdev.testdev_mmio(buf, 8, 4, True, data) == kinds.ACT_CONTINUE
    out = np.zeros(8, np.uint8)
    testdev.testdev_mmio(buf, 8, 4, False, out)
    assert list(out[:4]) == [1, 2, 3, 4]
    # Past the end of the scratch RAM: refused, nothing written.
    assert testdev.testdev_mmio(buf, kinds.BUFFER_BYTES - 2, 4, True, data) == kinds.ACT_PYTHON


def test_bus_refuses_conflicts_and_frees_slots(bus):
    Uart16550().attach(bus)
    with pytest.raises(BusConflictError, match="com1"):
        DebugExit(port=0x3FC).attach(bus)
    assert len(bus.slots) == 1  # the failed attach left nothing behind
    td = TestDev()
    td.attach(bus)
    with pytest.raises(BusConflictError):
        bus.add_mmio_handler(td.iomem_gpa + 0x100, 0x10, lambda *a: 0)
    slot = bus.add_port_handler(0x500, 2, lambda *a: 0)
    assert bus.port_handler(0x501) is not None
    bus.remove_slot(slot)
    assert bus.port_handler(0x501) is None and bus.port_map[0x500] == 0
    with pytest.raises(BusConflictError):
        bus.claim_ports(slot, 0xFFFF, 2)


def test_mmio_range_over_ram_is_refused(bus):
    class Seg:
        gpa, end = 0, 0x100000

    class Mem:
        segments = [Seg()]

    with pytest.raises(MemoryMapError):
        bus.add_mmio_handler(0x1000, 0x1000, lambda *a: 0, memory=Mem())


def _run_page(reason):
    page = np.zeros(4096, np.uint8)
    run = page[:KVM_RUN_SIZE].view(KVM_RUN_DTYPE)
    run[0]["exit_reason"] = reason
    return page, run


def test_fill_exit_decodes_synthetic_pages():
    out = np.zeros(1, VM_EXIT_DTYPE)
    page, run = _run_page(KvmExit.IO)
    r = run[0]
    r["io_direction"], r["io_size"], r["io_port"], r["io_count"], r["io_data_offset"] = 1, 2, 0x1F0, 1, 3000
    page[3000:3002] = [0x34, 0x12]
    dispatch.fill_exit(run, page, out)
    assert out[0]["exitcode"] == VmExitCode.INOUT
    assert (out[0]["port"], out[0]["bytes"], out[0]["is_in"], out[0]["data"]) == (0x1F0, 2, 0, 0x1234)

    page, run = _run_page(KvmExit.IO)
    run[0]["io_data_offset"], run[0]["io_size"], run[0]["io_direction"] = 4095, 4, 1  # past the page
    dispatch.fill_exit(run, page, out)
    assert out[0]["data"] == 0  # not read out of bounds

    page, run = _run_page(KvmExit.SHUTDOWN)
    dispatch.fill_exit(run, page, out)
    assert (out[0]["exitcode"], out[0]["how"]) == (VmExitCode.SUSPENDED, SuspendHow.TRIPLEFAULT)
    assert out[0]["port"] == 0  # fields of the previous exit were cleared

    page, run = _run_page(KvmExit.INTERNAL_ERROR)
    run[0]["internal_suberror"], run[0]["internal_ndata"] = 1, 200  # ndata larger than the array
    run[0]["internal_data"][:] = np.arange(16)
    dispatch.fill_exit(run, page, out)
    assert out[0]["exitcode"] == VmExitCode.EMULATION_FAILURE and out[0]["ndata"] == 16

    page, run = _run_page(KvmExit.MMIO)
    run[0]["mmio_phys_addr"], run[0]["mmio_len"], run[0]["mmio_is_write"] = 0xFEE00000, 4, 1
    run[0]["mmio_data"][:4] = [0xEF, 0xBE, 0xAD, 0xDE]
    dispatch.fill_exit(run, page, out)
    assert (out[0]["exitcode"], out[0]["gpa"], out[0]["data"]) == (VmExitCode.INST_EMUL, 0xFEE00000, 0xDEADBEEF)

    page, run = _run_page(99)
    dispatch.fill_exit(run, page, out)
    assert out[0]["exitcode"] == VmExitCode.UNKNOWN and out[0]["kvm_reason"] == 99


def test_native_pio_dispatch_checks_the_data_area(bus):
    uart = Uart16550()
    uart.attach(bus)
    counters = np.zeros(dispatch.N_COUNTERS + dispatch.N_REASONS, np.int64)
    page, run = _run_page(KvmExit.IO)
    r = run[0]
    r["io_direction"], r["io_size"], r["io_port"], r["io_count"], r["io_data_offset"] = 1, 1, 0x3F8, 3, 4000
    page[4000:4003] = list(b"abc")
    act = dispatch._handle_pio(-1, run, page, bus.port_map, bus.dev_kind, bus.dev_base, bus.dev_state,
                               bus.dev_buf, counters)
    assert act == kinds.ACT_CONTINUE and uart.drain() == b"abc"
    r["io_count"] = 1000  # would run past the page: refused, nothing read
    act = dispatch._handle_pio(-1, run, page, bus.port_map, bus.dev_kind, bus.dev_base, bus.dev_state,
                               bus.dev_buf, counters)
    assert act == kinds.ACT_PYTHON and uart.drain() == b""
    r["io_count"], r["io_port"] = 1, 0x999  # nobody's port
    act = dispatch._handle_pio(-1, run, page, bus.port_map, bus.dev_kind, bus.dev_base, bus.dev_state,
                               bus.dev_buf, counters)
    assert act == kinds.ACT_PYTHON


def test_uart_hands_each_finished_line_to_python(bus):
    """The console streams line by line instead of waiting for the ring to fill."""
    uart = Uart16550()
    uart.attach(bus)
    state, buf = bus.state(uart.slot), bus.buffer(uart.slot)
    acts = [uart_io(state, buf, 0, True, ch)[1] for ch in b"ok\n"]
    assert acts == [kinds.ACT_CONTINUE, kinds.ACT_CONTINUE, kinds.ACT_DRAIN]
