"""The GDB stub's pure parts: packet framing under hostile input, binary escapes, bounded
numbers, the target descriptions GDB insists on, and the register file's conversions."""

import random
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from hvjit.abi import KVM_REGS_DTYPE, KVM_SREGS_DTYPE
from hvjit.gdb_protocol import (
    Event,
    GdbProtocolError,
    Packet,
    PacketReader,
    checksum,
    escape_binary,
    frame,
    from_hex,
    parse_int,
    parse_thread,
    split_address_length,
    unescape_binary,
)
from hvjit.gdb_registers import AMD64, I386, RegisterFile, abridged_tag, full_tag_word
from hvjit.gdbstub import GdbStubError, parse_listen_address


def test_frames_and_checksums_as_gdb_sends_them():
    assert frame(b"?") == b"$?#3f"
    assert frame(b"g") == b"$g#67"
    assert frame(b"vMustReplyEmpty") == b"$vMustReplyEmpty#3a"
    assert checksum(b"") == 0


def test_reader_splits_acks_interrupts_and_packets_fed_byte_by_byte():
    reader = PacketReader()
    stream = b"+" + frame(b"m1000,4") + b"-\x03noise" + frame(b"qSupported:swbreak+")
    got = [item for b in stream for item in reader.feed(bytes([b]))]
    assert got == [Event.ACK, Packet(b"m1000,4"), Event.NAK, Event.INTERRUPT, Packet(b"qSupported:swbreak+")]
    assert not reader.in_packet


def test_reader_refuses_bad_checksums_and_restarts_on_a_new_dollar():
    reader = PacketReader()
    assert reader.feed(b"$g#00") == [Event.BAD_CHECKSUM]
    assert reader.feed(b"$g#zz") == [Event.BAD_CHECKSUM]
    assert reader.feed(b"$m10$?#3f") == [Packet(b"?")]
    assert reader.feed(b"$g#6") == [] and reader.in_packet
    assert reader.feed(b"7") == [Packet(b"g")]


def test_reader_never_holds_more_than_its_limit():
    reader = PacketReader(limit=64)
    rng = random.Random(1)
    huge = b"X0,1:" + bytes(rng.choice(b"abc}*\x03+-") for _ in range(10_000))
    got = reader.feed(b"$" + huge + b"#" + b"%02x" % checksum(huge))
    assert got == [Event.TOO_LONG]
    assert len(reader._payload) == 0  # cleared after the end
    assert reader.feed(frame(b"g")) == [Packet(b"g")]  # and the next packet is read normally


def test_random_streams_never_crash_the_reader():
    rng = random.Random(7)
    reader = PacketReader(limit=128)
    for _ in range(2000):
        chunk = bytes(rng.choice(b"$#+-\x03}*0123456789abcdefgm,:") for _ in range(rng.randint(0, 64)))
        for item in reader.feed(chunk):
            assert isinstance(item, (Packet, Event))
            if isinstance(item, Packet):
                assert len(item.payload) <= 128


def test_binary_escapes_round_trip_every_byte():
    data = bytes(range(256)) * 2
    escaped = escape_binary(data)
    assert not set(escaped) & set(b"#$*") and unescape_binary(escaped) == data
    with pytest.raises(GdbProtocolError):
        unescape_binary(b"ab}")


@pytest.mark.parametrize("text,bits,value", [(b"0", 64, 0), (b"ffffffffffffffff", 64, (1 << 64) - 1),
                                             (b"00000000000000000000000000000001", 64, 1), (b"7f", 8, 0x7F)])
def test_numbers_in_range(text, bits, value):
    assert parse_int(text, bits) == value


@pytest.mark.parametrize("text,bits", [(b"", 64), (b"1" * 33, 64), (b"g", 64), (b"1ff", 8), (b"-1", 64),
                                       (b"10000000000000000", 64)])
def test_numbers_out_of_range_or_malformed(text, bits):
    with pytest.raises(GdbProtocolError):
        parse_int(text, bits)


def test_threads_addresses_and_hex():
    assert [parse_thread(t) for t in (b"-1", b"0", b"1a", b"p1.2")] == [-1, 0, 0x1A, 2]
    assert split_address_length(b"200000,40") == (0x200000, 0x40)
    with pytest.raises(GdbProtocolError):
        split_address_length(b"200000")
    with pytest.raises(GdbProtocolError):
        from_hex(b"abc")
    assert from_hex(b"00ff") == b"\x00\xff"


def test_listen_addresses():
    assert parse_listen_address("1234") == ("127.0.0.1", 1234)
    assert parse_listen_address("localhost:0") == ("localhost", 0)
    assert parse_listen_address("[::1]:99") == ("::1", 99)
    for bad in ("x", "1:70000", "host:"):
        with pytest.raises(GdbStubError):
            parse_listen_address(bad)


# ---- target descriptions --------------------------------------------------------------------

AMD64_CORE = (["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
              + ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"] + [f"st{i}" for i in range(8)]
              + ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"])
I386_CORE = (["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags",
              "cs", "ss", "ds", "es", "fs", "gs"] + AMD64_CORE[24:])


@pytest.mark.parametrize("target,arch,core,xmms", [(AMD64, "i386:x86-64", AMD64_CORE, 16), (I386, "i386", I386_CORE, 8)])
def test_descriptions_have_the_names_and_order_gdb_requires(target, arch, core, xmms):
    root = ET.fromstring(target.xml())
    assert root.find("architecture").text == arch
    features = {f.get("name"): [r.get("name") for r in f.findall("reg")] for f in root.findall("feature")}
    assert features["org.gnu.gdb.i386.core"] == core
    assert features["org.gnu.gdb.i386.sse"] == [f"xmm{i}" for i in range(xmms)] + ["mxcsr"]
    numbers = [int(r.get("regnum")) for r in root.iter("reg")]
    assert numbers == list(range(len(target.registers)))
    sizes = {r.get("name"): int(r.get("bitsize")) for r in root.iter("reg")}
    assert sizes["st0"] == 80 and sizes["xmm0"] == 128 and sizes[core[0]] == target.bits


# ---- the register file ----------------------------------------------------------------------

class FakeVcpu:
    """Just the register ioctls, on numpy records."""

    def __init__(self):
        self.regs = np.zeros(1, KVM_REGS_DTYPE)
        self.sregs = np.zeros(1, KVM_SREGS_DTYPE)
        self.xsave = np.zeros(4096, np.uint8)
        self.xsave[0:2] = [0x7F, 0x03]  # FCW after FNINIT
        self.xsave[24:28] = [0x80, 0x1F, 0, 0]  # MXCSR

    def get_regs(self):
        return self.regs.copy()[0]

    def set_regs(self, value):
        self.regs[0] = value

    def get_sregs(self):
        return self.sregs.copy()[0]

    def set_sregs(self, value):
        self.sregs[0] = value

    def get_xsave(self):
        return self.xsave.copy()

    def set_xsave(self, area):
        self.xsave[:] = area


def _index(target, name):
    return [r.name for r in target.registers].index(name)


def test_register_file_reads_and_writes_back_only_what_changed():
    vcpu = FakeVcpu()
    vcpu.regs[0]["rax"] = 0x1122334455667788
    vcpu.sregs[0]["cs"]["selector"] = 0x23
    vcpu.sregs[0]["fs"]["base"] = 0x7000
    regs = RegisterFile(vcpu, I386)
    assert regs.read(_index(I386, "eax")) == (0x55667788).to_bytes(4, "little")
    assert regs.read(_index(I386, "cs")) == (0x23).to_bytes(4, "little")
    assert regs.read(_index(I386, "fs_base")) == (0x7000).to_bytes(4, "little")
    assert regs.read(_index(I386, "fctrl")) == (0x37F).to_bytes(4, "little")
    regs.write(_index(I386, "eax"), (0xAABBCCDD).to_bytes(4, "little"))
    regs.commit(vcpu)
    assert int(vcpu.regs[0]["rax"]) == 0x11223344AABBCCDD  # a 32-bit write keeps the upper half
    with pytest.raises(GdbProtocolError):
        regs.write(_index(I386, "cs"), (0x10000).to_bytes(4, "little"))
    with pytest.raises(GdbProtocolError):
        regs.write(_index(I386, "eax"), b"\x00")


def test_g_and_G_round_trip_and_xx_leaves_a_register():
    vcpu = FakeVcpu()
    vcpu.regs[0]["rip"] = 0x200011
    regs = RegisterFile(vcpu, AMD64)
    text = regs.to_hex()
    assert len(text) == 2 * sum(r.bits // 8 for r in AMD64.registers)
    rip = _index(AMD64, "rip")
    offset = 2 * sum(r.bits // 8 for r in AMD64.registers[:rip])
    rax = (0x42).to_bytes(8, "little").hex().encode()
    changed = rax + text[16:offset] + b"xx" * 8 + text[offset + 16:]
    regs.from_hex(changed)
    regs.commit(vcpu)
    assert int(vcpu.regs[0]["rax"]) == 0x42 and int(vcpu.regs[0]["rip"]) == 0x200011
    with pytest.raises(GdbProtocolError):
        regs.from_hex(text + b"00")


def test_x87_and_sse_writes_mark_the_xsave_components_present():
    vcpu = FakeVcpu()
    regs = RegisterFile(vcpu, AMD64)
    regs.write(_index(AMD64, "xmm3"), bytes(range(16)))
    regs.commit(vcpu)
    assert bytes(vcpu.xsave[160 + 48:160 + 64]) == bytes(range(16))
    assert int.from_bytes(bytes(vcpu.xsave[512:520]), "little") & 3 == 3


def test_unavailable_x87_state_is_sent_as_xx():
    class NoXsave(FakeVcpu):
        def get_xsave(self):
            from hvjit.errors import KvmError

            raise KvmError("KVM_GET_XSAVE", 22, "not here")

    regs = RegisterFile(NoXsave(), AMD64)
    assert regs.read(_index(AMD64, "st0")) is None
    assert b"x" * 20 in regs.to_hex()


def test_tag_words_between_fxsave_and_gdb():
    fx = bytearray(512)
    fx[2:4] = (7 << 11).to_bytes(2, "little")  # TOP = 7: ST(0) is physical register 7
    fx[32:42] = (0x3FFF8000000000000000).to_bytes(10, "little")  # ST(0) = 1.0
    fx[4] = 0x80
    assert full_tag_word(bytes(fx)) == 0x3FFF  # physical 7 valid, the rest empty
    fx[32:42] = bytes(10)  # ST(0) = +0.0
    assert full_tag_word(bytes(fx)) == 0x7FFF  # zero
    assert abridged_tag(0x3FFF) == 0x80 and abridged_tag(0xFFFF) == 0


# ---- stop replies -----------------------------------------------------------------------------

def _exit(exitcode, **fields):
    from hvjit.exits import VmExit

    return VmExit(exitcode=exitcode, rip=fields.pop("rip", 0x1000), kvm_reason=-1, **fields)


def test_stop_replies_name_what_stopped_the_guest():
    from hvjit.abi import SuspendHow, VmExitCode
    from hvjit.gdbstub import stop_reply

    hw = {(1, 0x2000, 1): ({0: 0}, 1), (2, 0x5000, 4): ({0: 1}, 1), (4, 0x6000, 8): ({0: 2}, 1)}
    cases = [
        (_exit(VmExitCode.BPT), {0x1000: None}, b"T05swbreak:;thread:02;"),
        (_exit(VmExitCode.BPT, rip=0x2000), {}, b"T05hwbreak:;thread:02;"),
        (_exit(VmExitCode.BPT, rip=0x3000), {}, b"T05thread:02;"),
        (_exit(VmExitCode.DB, info=(1, 0x5000, 0x2)), {}, b"T05watch:5000;thread:02;"),
        (_exit(VmExitCode.DB, info=(2, 0x6000, 0x4)), {}, b"T05awatch:6000;thread:02;"),
        (_exit(VmExitCode.MTRAP), {}, b"T05thread:02;"),
        (_exit(VmExitCode.BOGUS), {}, b"T02thread:02;"),
        (_exit(VmExitCode.TIMEOUT), {}, b"T0ethread:02;"),
        (_exit(VmExitCode.SUSPENDED, how=SuspendHow.POWEROFF, code=0x106), {}, b"W06"),
        (_exit(VmExitCode.SUSPENDED, how=SuspendHow.TRIPLEFAULT), {}, b"T0bthread:02;"),
        (_exit(VmExitCode.EMULATION_FAILURE), {}, b"T04thread:02;"),
        (_exit(VmExitCode.HLT), {}, b"T05thread:02;"),
    ]
    for ex, breakpoints, expected in cases:
        reply, message = stop_reply(ex, 2, True, breakpoints, hw)
        assert reply == expected, ex
        # Stops the debugger asked for need no words; the others say what happened.
        assert bool(message) == (ex.exitcode in (VmExitCode.TIMEOUT, VmExitCode.EMULATION_FAILURE, VmExitCode.HLT)
                                 or ex.how == SuspendHow.TRIPLEFAULT), ex
