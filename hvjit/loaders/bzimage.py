"""Getting the kernel ELF (vmlinux) out of a bzImage, in Python.

A bzImage's protected-mode part is a decompressor plus the compressed vmlinux (the setup
header's payload_offset/payload_length, boot protocol 2.08+). On hardware KVM the guest
decompresses itself in a blink; where KVM emulates ring 0 (PVM) that takes many minutes, so
hvjit can decompress on the host and boot the ELF through its PVH entry instead.

The payload is untrusted input: decompression is streamed and stops at ``max_size`` bytes (the
guest's RAM, where the caller has one), so a small bomb cannot take the host's memory, and every
way it can fail ends in :class:`~hvjit.errors.LoaderError`.
"""

from __future__ import annotations

import io
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator

from ..errors import LoaderError

SETUP_SECTS = 0x1F1
HEADER_MAGIC = 0x202
VERSION = 0x206
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C

DEFAULT_MAX_VMLINUX = 256 << 20  # hvjit's default Linux guest RAM; real vmlinux files are far smaller
OUTPUT_STEP = 1 << 18  # output produced per decompressor call: about what is held beyond the cap
INPUT_STEP = 1 << 16  # input fed per call: keeps zlib's unconsumed tail (a copy) small
# liblzma allocates the dictionary the header asks for (up to 4 GiB) before any output; the
# kernel's own are at most 64 MiB (lzma -9; xz uses 32 MiB).
LZMA_MEMLIMIT = 128 << 20

_MAGICS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
)


def payload(image: bytes) -> tuple[str, bytes]:
    """(compression name, compressed payload) of a bzImage."""
    if len(image) < 0x250 or image[HEADER_MAGIC:HEADER_MAGIC + 4] != b"HdrS":
        raise LoaderError("not a bzImage: no 'HdrS' setup header at 0x202")
    version = struct.unpack_from("<H", image, VERSION)[0]
    if version < 0x208:
        raise LoaderError(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields (need 2.08+)")
    setup_sects = image[SETUP_SECTS] or 4
    pm_start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET)
    start = pm_start + offset
    if length == 0 or start + length > len(image):
        raise LoaderError(f"bzImage payload {start:#x}+{length:#x} lies outside the {len(image):#x}-byte file")
    data = image[start:start + length]
    for magic, name in _MAGICS:
        if data.startswith(magic):
            return name, data
    raise LoaderError(f"bzImage payload has an unknown compression (starts {data[:6].hex()})")


class _Truncated(Exception):
    """The compressed stream ended before its end marker."""


# Each decoder yields output pieces of at most ``room()`` bytes (never more than OUTPUT_STEP)
# and raises _Truncated if the input runs out before the stream's end.

def _pieces(data: bytes, step: int) -> Iterator[memoryview]:
    view = memoryview(data)
    for at in range(0, len(view), step):
        yield view[at:at + step]


def _inflate_gzip(data: bytes, room: Callable[[], int]) -> Iterator[bytes]:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer (CRC, size)
    for piece in _pieces(data, INPUT_STEP):
        while piece and not d.eof:
            yield d.decompress(piece, room())
            piece = d.unconsumed_tail
        if d.eof:
            return  # what follows the stream (alignment, an appended size) is not ours
    while not d.eof:  # input consumed; output may still be pending inside zlib
        out = d.decompress(b"", room())
        if not out:
            raise _Truncated
        yield out


def _inflate_lzma(data: bytes, room: Callable[[], int], fmt: int) -> Iterator[bytes]:
    d = lzma.LZMADecompressor(format=fmt, memlimit=LZMA_MEMLIMIT)
    for piece in _pieces(data, INPUT_STEP):
        yield d.decompress(piece, room())
        while not d.eof and not d.needs_input:  # output left over from this piece
            yield d.decompress(b"", room())
        if d.eof:
            return
    raise _Truncated


def _inflate_zstd(data: bytes, room: Callable[[], int]) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:
        raise LoaderError("this bzImage is zstd-compressed: install the 'zstandard' package") from None
    # read_to_iter bounds each piece (OUTPUT_STEP) and stops at the end of the first frame:
    # the kernel appends its size after it, which is not ours to decode. A truncated frame
    # yields nothing more and raises nothing: that is a truncation.
    # (The extractor checks the cap after every piece, so ``room`` is not needed here.)
    del room
    produced = 0
    try:
        for out in zstandard.ZstdDecompressor().read_to_iter(data, write_size=OUTPUT_STEP):
            produced += len(out)
            yield out
    except zstandard.ZstdError as e:
        raise LoaderError(f"bzImage payload (zstd) does not decompress: {e}") from None
    try:
        expected = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        expected = -1  # no usable header: the decoder above already said what it could
    if expected > 0 and produced < expected:
        raise _Truncated


def extract_vmlinux(image: bytes, *, max_size: int = DEFAULT_MAX_VMLINUX) -> bytes:
    """Decompress a bzImage's payload: the kernel's ELF image, at most ``max_size`` bytes.

    Pass the guest's RAM size as ``max_size``: a kernel larger than that cannot boot anyway.
    Memory held stays near ``max_size`` (plus one step of output) whatever the payload claims.
    """
    if max_size <= 0:
        raise LoaderError(f"max_size must be positive, not {max_size}")
    kind, data = payload(image)
    out = io.BytesIO()  # getvalue() hands over its buffer without a copy

    def room() -> int:
        # One byte past the cap, so that "more than max_size" is seen without producing more.
        return max(1, min(OUTPUT_STEP, max_size + 1 - out.tell()))

    if kind == "gzip":
        decoder = _inflate_gzip(data, room)
    elif kind == "xz":
        decoder = _inflate_lzma(data, room, lzma.FORMAT_XZ)
    elif kind == "lzma":
        decoder = _inflate_lzma(data, room, lzma.FORMAT_ALONE)
    else:
        decoder = _inflate_zstd(data, room)
    head = b""  # the first bytes, to reject a non-ELF payload before decompressing it all
    try:
        for piece in decoder:
            out.write(piece)
            if out.tell() > max_size:
                raise LoaderError(f"bzImage payload ({kind}, {len(data):#x} bytes) decompresses to more "
                                  f"than {max_size:#x} bytes, the limit (the guest's RAM): refusing it")
            if len(head) < 4:
                head += piece[:4 - len(head)]
                if len(head) == 4 and head != b"\x7fELF":
                    raise LoaderError(f"bzImage payload ({kind}) is not an ELF kernel "
                                      f"(it starts {head.hex()})")
    except _Truncated:
        raise LoaderError(f"bzImage payload ({kind}) is truncated: the compressed stream ends "
                          f"after {len(data):#x} bytes without its end marker") from None
    except (zlib.error, lzma.LZMAError, EOFError) as e:
        raise LoaderError(f"bzImage payload ({kind}) does not decompress: {e}") from None
    except MemoryError:
        raise LoaderError(f"bzImage payload ({kind}): the host has not enough memory to decompress "
                          f"it (limit {max_size:#x} bytes)") from None
    finally:
        decoder.close()
    if out.tell() < 4:
        raise LoaderError(f"bzImage payload ({kind}) is not an ELF kernel "
                          f"(it decompresses to {out.tell()} bytes)")
    return out.getvalue()
