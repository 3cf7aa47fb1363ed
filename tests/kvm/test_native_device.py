"""A native device defined only here, added as docs/architecture.md says: one module-level
Numba handler, one PortDevice subclass, one registration line. Its port IO is handled inside
the run loop (no exit reaches Python), like hvjit's own devices."""

import numpy as np
import pytest

from hvjit import entry, run_loop
from hvjit._jit import kernel
from hvjit.asm import assemble
from hvjit.devices import catalog, kinds
from hvjit.devices.bus import PortDevice

pytestmark = pytest.mark.kvm

ADDER_PORT = 0x6E0


@kernel
def adder_io(state, offset, size, is_write, value):
    """Writes add to an accumulator; reads return it."""
    if is_write:
        state[1] += value
        return np.int64(0), kinds.ACT_CONTINUE
    return state[1], kinds.ACT_CONTINUE


@kernel
def odd_io(state, register, value):
    """A handler asking for an argument the run loop does not have."""
    return np.int64(0), kinds.ACT_CONTINUE


class Adder(PortDevice):
    port_io = adder_io
    port_count = 4

    def __init__(self, port: int = ADDER_PORT, name: str = "adder"):
        super().__init__(port, name)

    @property
    def total(self) -> int:
        return int(self.bus.state(self.slot)[1])


catalog.register("test-adder", Adder)  # the one registration line


def test_a_native_device_from_outside_hvjit(session):
    vm = session.create_vm("adder", memory=2 << 20)
    dev = vm.add_device("test-adder")
    code = assemble(f"""
.code64
    mov ${ADDER_PORT:#x}, %dx
    mov $1000, %ecx
1:  mov $3, %eax
    outl %eax, %dx
    dec %ecx
    jnz 1b
    inl %dx, %eax
    outl %eax, $0xf4
""", 0x1000)
    vm.memory.write(0x1000, code)
    entry.setup_long_mode(vm.vcpu(0), 0x1000, cpl=3)
    result = vm.run(timeout=30)
    assert result.code == 3000 and dev.total == 3000
    stats = result.vcpu_stats[0]
    assert stats["pio"] >= 1000 and stats["escalated"] == 0  # all handled in the native loop
    # The generated loop dispatches the new kind to the handler defined in this file.
    assert Adder in kinds.native_classes()
    assert "adder_io" in run_loop.generate_source(kinds.native_classes())


def test_a_handler_that_cannot_be_imported_is_refused():
    def make():
        @kernel
        def local_io(state, offset, size, is_write, value):
            return np.int64(0), kinds.ACT_CONTINUE

        return local_io

    class Local(PortDevice):
        port_io = make()

    with pytest.raises(TypeError, match="module-level"):
        run_loop.generate_source((Local,))

    class Unknown(PortDevice):
        port_io = odd_io

    with pytest.raises(TypeError, match="register"):
        run_loop.generate_source((Unknown,))
