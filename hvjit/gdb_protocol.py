"""The GDB Remote Serial Protocol's framing: packets, acknowledgements, escapes, numbers.

Pure byte handling, no sockets and no VM, so every hostile input can be tested without a
guest. A packet is ``$payload#cc`` (``cc``: the payload's byte sum modulo 256, in hex); the
receiver answers ``+`` (taken) or ``-`` (send again) until no-ack mode is agreed. A lone
0x03 byte between packets is the debugger's interrupt (Ctrl-C).

Everything is bounded: :class:`PacketReader` never holds more than ``limit`` payload bytes
(a longer packet is read to its end and reported as :attr:`Event.TOO_LONG`), and numbers
have at most as many digits as their width allows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from .errors import HvjitError

PACKET_SIZE = 0x4000  # the largest payload we accept; advertised as qSupported's PacketSize
INTERRUPT = 0x03
ESCAPE = 0x7D  # '}': the next byte is XORed with 0x20 (binary data)
_MUST_ESCAPE = frozenset(b"#$}*")  # '*' too: GDB reads it as run-length encoding
_HEX = frozenset(b"0123456789abcdefABCDEF")

# Error replies (``E`` and two hex digits; by convention the errno).
E_INVALID = b"E16"  # EINVAL: a malformed or oversized request
E_FAULT = b"E0e"  # EFAULT: guest memory that cannot be read or written
E_NO_THREAD = b"E03"  # ESRCH: no such thread (vCPU)
E_NO_SPACE = b"E1c"  # ENOSPC: every debug register is in use
E_UNSUPPORTED = b"E5f"  # EOPNOTSUPP: this host (or x86) cannot do it
E_BUSY = b"E10"  # EBUSY: the vCPU is running elsewhere


class GdbProtocolError(HvjitError, ValueError):
    """A request whose contents are malformed (bad hex, a number too wide, a bad length)."""


class Event(enum.Enum):
    """What arrived besides a well-formed packet."""

    ACK = "+"
    NAK = "-"
    INTERRUPT = "interrupt"
    BAD_CHECKSUM = "bad checksum"
    TOO_LONG = "too long"


@dataclass(frozen=True)
class Packet:
    payload: bytes


Received = Union[Packet, Event]


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cc`` (the payload must already be escaped where it carries binary data)."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    out = bytearray()
    for c in data:
        if c in _MUST_ESCAPE:
            out += bytes((ESCAPE, c ^ 0x20))
        else:
            out.append(c)
    return bytes(out)


def unescape_binary(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for c in it:
        if c == ESCAPE:
            nxt = next(it, None)
            if nxt is None:
                raise GdbProtocolError("binary data ends inside an escape")
            out.append(nxt ^ 0x20)
        else:
            out.append(c)
    return bytes(out)


def to_hex(data: bytes) -> bytes:
    return data.hex().encode()


def from_hex(text: bytes) -> bytes:
    if len(text) % 2 or not _HEX.issuperset(text):
        raise GdbProtocolError(f"not hex bytes: {text[:32]!r}")
    return bytes.fromhex(text.decode())


def parse_int(text: bytes, bits: int = 64) -> int:
    """A hex number of at most ``bits`` bits (leading zeros allowed up to twice the width)."""
    if not text or len(text) > bits // 2 or not _HEX.issuperset(text):
        raise GdbProtocolError(f"not a {bits}-bit hex number: {text[:32]!r}")
    value = int(text, 16)
    if value >> bits:
        raise GdbProtocolError(f"{text[:32]!r} does not fit {bits} bits")
    return value


def parse_thread(text: bytes) -> int:
    """A thread id: -1 (all), 0 (any) or a positive hex number; ``pP.T`` takes T."""
    if text.startswith(b"p") and b"." in text:
        text = text.split(b".", 1)[1]
    if text == b"-1":
        return -1
    return parse_int(text, 32)


def split_address_length(text: bytes) -> tuple[int, int]:
    """``addr,length`` as two hex numbers."""
    addr, sep, length = text.partition(b",")
    if not sep:
        raise GdbProtocolError(f"expected addr,length: {text[:32]!r}")
    return parse_int(addr), parse_int(length, 32)


class PacketReader:
    """Turns the byte stream from the debugger into packets and events, keeping at most
    ``limit`` payload bytes. Feed it whatever ``recv`` returned."""

    _IDLE, _PAYLOAD, _SUM1, _SUM2 = range(4)

    def __init__(self, limit: int = PACKET_SIZE):
        self.limit = limit
        self._state = self._IDLE
        self._payload = bytearray()
        self._sum = 0
        self._overflow = False
        self._given = 0  # the checksum digits received so far

    @property
    def in_packet(self) -> bool:
        """Is a packet started but not finished (to time out a client that stalls)?"""
        return self._state != self._IDLE

    def reset(self) -> None:
        self._state = self._IDLE
        self._payload.clear()
        self._sum = 0
        self._overflow = False

    def feed(self, data: bytes) -> list[Received]:
        out: list[Received] = []
        i, n = 0, len(data)
        while i < n:
            c = data[i]
            if self._state == self._IDLE:
                i += 1
                if c == ord("$"):
                    self.reset()
                    self._state = self._PAYLOAD
                elif c == ord("+"):
                    out.append(Event.ACK)
                elif c == ord("-"):
                    out.append(Event.NAK)
                elif c == INTERRUPT:
                    out.append(Event.INTERRUPT)
                # Anything else between packets is line noise: ignored, as GDB's stubs do.
            elif self._state == self._PAYLOAD:
                # Take the run up to the next '#' or '$' in one piece.
                end = n
                for stop in (data.find(b"#", i), data.find(b"$", i)):
                    if 0 <= stop < end:
                        end = stop
                chunk = data[i:end]
                self._sum = (self._sum + sum(chunk)) & 0xFF
                room = self.limit - len(self._payload)
                if len(chunk) > room:
                    self._overflow = True
                    chunk = chunk[:max(room, 0)]
                self._payload += chunk
                i = end
                if i < n:
                    i += 1
                    if data[i - 1] == ord("$"):  # a new packet inside the old one: start over
                        self.reset()
                        self._state = self._PAYLOAD
                    else:
                        self._state = self._SUM1
            else:
                i += 1
                if c not in _HEX:
                    self.reset()
                    out.append(Event.BAD_CHECKSUM)
                    continue
                if self._state == self._SUM1:
                    self._given = int(chr(c), 16) << 4
                    self._state = self._SUM2
                    continue
                given = self._given | int(chr(c), 16)
                if self._overflow:
                    out.append(Event.TOO_LONG)
                elif given != self._sum:
                    out.append(Event.BAD_CHECKSUM)
                else:
                    out.append(Packet(bytes(self._payload)))
                self.reset()
        return out
