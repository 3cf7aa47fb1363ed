"""KVM's own counters for a vCPU, from its binary statistics file (KVM_GET_STATS_FD).

KVM counts what no exit shows: ``insn_emulation`` (instructions its emulator ran — on a PVM
host, nearly every ring-0 instruction), ``exits``, ``halt_exits``, ``io_exits``,
``mmio_exits``, ``irq_injections`` and more. The file is a header, descriptors (name, type,
size, offset) and the data; the descriptors are read once, the data on every ``read``.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

from . import _trampoline as _t

HEADER = struct.Struct("<6I")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
DESCRIPTOR = struct.Struct("<IhHII")  # flags, exponent, size (u64 elements), offset, bucket_size
MAX_DESCRIPTORS = 4096  # a corrupt header must not make us read gigabytes


class KvmStats:
    """The statistics file of one vCPU; ``close`` it (the vCPU does when released)."""

    def __init__(self, vcpu_fd: int):
        fd = _t.lib.hvt_vcpu_stats_fd(vcpu_fd)
        if fd < 0:
            raise OSError(-fd, f"KVM_GET_STATS_FD: {os.strerror(-fd)}")
        self.fd = fd
        try:
            self._fields = self._descriptors()
        except BaseException:
            self.close()
            raise

    def _descriptors(self) -> dict[str, tuple[int, int]]:
        _flags, name_size, count, _id, desc_at, data_at = HEADER.unpack(os.pread(self.fd, HEADER.size, 0))
        if count > MAX_DESCRIPTORS or name_size > 256:
            raise OSError(f"implausible KVM stats header ({count} descriptors, names of {name_size} bytes)")
        step = DESCRIPTOR.size + name_size
        raw = os.pread(self.fd, step * count, desc_at)
        fields = {}
        for i in range(count):
            _f, _exp, size, offset, _bucket = DESCRIPTOR.unpack_from(raw, i * step)
            name = raw[i * step + DESCRIPTOR.size : (i + 1) * step].split(b"\0", 1)[0].decode()
            fields[name] = (data_at + offset, size)
        return fields

    @property
    def names(self) -> list[str]:
        return list(self._fields)

    def get(self, name: str) -> Optional[int]:
        """One counter (the first element of a histogram), None if KVM has no such stat."""
        where = self._fields.get(name)
        if where is None:
            return None
        return int.from_bytes(os.pread(self.fd, 8, where[0]), "little")

    def read(self) -> dict[str, int]:
        """Every single-valued counter."""
        return {name: self.get(name) or 0 for name, (_, size) in self._fields.items() if size == 1}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
