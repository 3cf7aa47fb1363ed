"""Getting the kernel ELF (vmlinux) out of a bzImage, in Python.

A bzImage's protected-mode part is a decompressor plus the compressed vmlinux (the setup
header's payload_offset/payload_length, boot protocol 2.08+). On hardware KVM the guest
decompresses itself in a blink; where KVM emulates ring 0 (PVM) that takes many minutes, so
hvjit can decompress on the host and boot the ELF through its PVH entry instead.
"""

from __future__ import annotations

import gzip
import lzma
import struct

from ..errors import LoaderError

SETUP_SECTS = 0x1F1
HEADER_MAGIC = 0x202
VERSION = 0x206
PAYLOAD_OFFSET = 0x248
PAYLOAD_LENGTH = 0x24C

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


def extract_vmlinux(image: bytes) -> bytes:
    """Decompress a bzImage's payload: the kernel's ELF image."""
    kind, data = payload(image)
    try:
        if kind == "xz":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        elif kind == "lzma":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        elif kind == "gzip":
            out = gzip.decompress(data)
        else:
            try:
                import zstandard
            except ImportError:
                raise LoaderError("this bzImage is zstd-compressed: install the 'zstandard' package") from None
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise LoaderError(f"bzImage payload ({kind}) does not decompress: {e}") from None
    if not out.startswith(b"\x7fELF"):
        raise LoaderError(f"bzImage payload ({kind}) is not an ELF kernel")
    return out
