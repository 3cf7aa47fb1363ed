"""The snapshot file: a zip of ``manifest.json`` and one ``.npy`` member per array.

docs/snapshot-format.md is the specification. Loading trusts nothing: the zip's CRCs, a
SHA-256 of every array in the manifest, the format name and version, and every array's dtype
and shape against what the inventory expects are checked before a single value is used, and
every failure is a :class:`~hvjit.errors.SnapshotError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .abi import (
    KVM_CLOCK_DATA_DTYPE,
    KVM_CPUID_ENTRY2_DTYPE,
    KVM_DEBUGREGS_DTYPE,
    KVM_FPU_DTYPE,
    KVM_IRQCHIP_DTYPE,
    KVM_LAPIC_STATE_DTYPE,
    KVM_MP_STATE_DTYPE,
    KVM_MSR_ENTRY_DTYPE,
    KVM_PIT_STATE2_DTYPE,
    KVM_REGS_DTYPE,
    KVM_SREGS_DTYPE,
    KVM_VCPU_EVENTS_DTYPE,
    KVM_XCRS_DTYPE,
)
from .devices import kinds
from .errors import SnapshotError
from .memory import PAGE_SIZE

FORMAT = "hvjit-snapshot"
VERSION = 1

# Per-vCPU arrays: dtype and record count (None: any). "fpu" only where XSAVE is missing.
VCPU_ARRAYS: dict[str, tuple[np.dtype, Optional[int]]] = {
    "regs": (KVM_REGS_DTYPE, 1),
    "sregs": (KVM_SREGS_DTYPE, 1),
    "xsave": (np.dtype(np.uint8), None),
    "fpu": (KVM_FPU_DTYPE, 1),
    "xcrs": (KVM_XCRS_DTYPE, 1),
    "msrs": (KVM_MSR_ENTRY_DTYPE, None),
    "debugregs": (KVM_DEBUGREGS_DTYPE, 1),
    "events": (KVM_VCPU_EVENTS_DTYPE, 1),
    "mp_state": (KVM_MP_STATE_DTYPE, 1),
    "lapic": (KVM_LAPIC_STATE_DTYPE, 1),
    "cpuid": (KVM_CPUID_ENTRY2_DTYPE, None),
}
VCPU_REQUIRED = ("regs", "sregs", "msrs", "mp_state", "cpuid")
VM_ARRAYS: dict[str, tuple[np.dtype, Optional[int]]] = {
    "irqchip": (KVM_IRQCHIP_DTYPE, 3),
    "pit2": (KVM_PIT_STATE2_DTYPE, 1),
    "clock": (KVM_CLOCK_DATA_DTYPE, 1),
    "console": (np.dtype(np.uint8), None),
}
DEVICE_ARRAYS = {"state": (np.dtype("<i8"), (kinds.STATE_WORDS,)), "buf": (np.dtype(np.uint8), (kinds.BUFFER_BYTES,))}
MANIFEST = "manifest.json"
MAX_VCPUS = 64
_NAME = re.compile(r"^(vm|vcpu(\d+)|dev(\d+)|mem(\d+))\.([a-z_0-9]+)$")


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def save(manifest: dict, arrays: dict[str, np.ndarray], path) -> None:
    manifest = dict(manifest)
    manifest["arrays"] = {name: _digest(arr) for name, arr in sorted(arrays.items())}
    tmp = Path(str(path) + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        z.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        for name, arr in sorted(arrays.items()):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
            z.writestr(f"{name}.npy", buf.getvalue())
    tmp.replace(path)  # never a half-written file under the real name


def load(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, arrays) of a snapshot file, every part checked."""
    try:
        with zipfile.ZipFile(path) as z:
            manifest = _manifest(z)
            arrays = {name: _array(z, name, digest) for name, digest in manifest.pop("arrays").items()}
    except SnapshotError:
        raise
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such snapshot file") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, ValueError, UnicodeDecodeError,
            NotImplementedError, RuntimeError) as e:
        raise SnapshotError(f"{path}: not a readable snapshot file: {e}") from None
    _check(manifest, arrays, path)
    return manifest, arrays


def _manifest(z: zipfile.ZipFile) -> dict:
    try:
        doc = json.loads(z.read(MANIFEST))
    except KeyError:
        raise SnapshotError("no manifest.json: not an hvjit snapshot") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError("manifest.json does not describe an hvjit snapshot")
    if doc.get("version") != VERSION:
        raise SnapshotError(f"snapshot format version {doc.get('version')!r}; this hvjit reads version {VERSION}")
    if not isinstance(doc.get("arrays"), dict):
        raise SnapshotError("manifest.json lists no arrays")
    return doc


def _array(z: zipfile.ZipFile, name: str, digest: Any) -> np.ndarray:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SnapshotError(f"unexpected array name {name!r}")
    arr = np.load(io.BytesIO(z.read(f"{name}.npy")), allow_pickle=False)
    if _digest(arr) != digest:
        raise SnapshotError(f"array {name!r} does not match its checksum")
    return arr


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise SnapshotError(f"malformed snapshot: {what}")


def _check(m: dict, arrays: dict[str, np.ndarray], path) -> None:
    """Every part of the manifest and every array has the type and shape restore relies on."""
    try:
        vm = m["vm"]
        _expect(isinstance(vm["name"], str) and isinstance(vm["vcpus"], int) and 1 <= vm["vcpus"] <= MAX_VCPUS,
                "vm name or vcpus")
        for key in ("irqchip", "default_devices"):
            _expect(isinstance(vm[key], bool), f"vm.{key}")
        _expect(isinstance(vm["msr_exits"], int) and 0 <= vm["msr_exits"] <= 3, "vm.msr_exits")
        _expect(isinstance(m["memory"], list) and isinstance(m["devices"], list), "memory or devices list")
        for k, seg in enumerate(m["memory"]):
            _check_segment(k, seg, arrays)
        for j, dev in enumerate(m["devices"]):
            _check_device(j, dev, arrays)
        for name, (dtype, count) in VM_ARRAYS.items():
            if f"vm.{name}" in arrays:
                _check_records(arrays, f"vm.{name}", dtype, count)
        _expect("vm.clock" in arrays and "vm.console" in arrays, "vm.clock or vm.console missing")
        _expect(("vm.irqchip" in arrays) == vm["irqchip"], "irqchip state does not match vm.irqchip")
        for i in range(vm["vcpus"]):
            for name, (dtype, count) in VCPU_ARRAYS.items():
                key = f"vcpu{i}.{name}"
                if key in arrays:
                    _check_records(arrays, key, dtype, count)
                else:
                    _expect(name not in VCPU_REQUIRED, f"{key} missing")
            _expect(f"vcpu{i}.xsave" in arrays or f"vcpu{i}.fpu" in arrays, f"vcpu{i} has no FPU state")
            _expect(vm["irqchip"] == (f"vcpu{i}.lapic" in arrays), f"vcpu{i}.lapic does not match vm.irqchip")
        known = _known_names(m)
        extra = set(arrays) - known
        _expect(not extra, f"arrays nobody asked for: {sorted(extra)[:5]}")
    except (KeyError, TypeError, AttributeError) as e:
        raise SnapshotError(f"{path}: malformed manifest: {e!r}") from None


def _known_names(m: dict) -> set[str]:
    names = {f"vm.{n}" for n in VM_ARRAYS}
    names |= {f"vcpu{i}.{n}" for i in range(m["vm"]["vcpus"]) for n in VCPU_ARRAYS}
    names |= {f"mem{k}.{n}" for k in range(len(m["memory"])) for n in ("pages", "data")}
    names |= {f"dev{j}.{n}" for j, d in enumerate(m["devices"]) if d["native"] for n in DEVICE_ARRAYS}
    return names


def _check_records(arrays, key: str, dtype: np.dtype, count) -> None:
    arr = arrays[key]
    _expect(arr.dtype == dtype and arr.ndim == 1, f"{key} has dtype {arr.dtype}, not {dtype}")
    _expect(count is None or len(arr) == count, f"{key} has {len(arr)} records, not {count}")
    if key.endswith(".xsave"):
        _expect(4096 <= len(arr) <= 1 << 20, f"{key} size {len(arr)}")


def _check_segment(k: int, seg: Any, arrays) -> None:
    _expect(isinstance(seg, dict), f"memory[{k}]")
    gpa, size = seg["gpa"], seg["size"]
    _expect(isinstance(gpa, int) and isinstance(size, int) and gpa >= 0 and 0 < size <= 1 << 40
            and gpa % PAGE_SIZE == 0 and size % PAGE_SIZE == 0, f"memory[{k}] gpa/size")
    _expect(isinstance(seg["readonly"], bool) and isinstance(seg["name"], str), f"memory[{k}] readonly/name")
    pages, data = arrays[f"mem{k}.pages"], arrays[f"mem{k}.data"]
    _expect(pages.dtype == np.dtype("<u4") and pages.ndim == 1, f"mem{k}.pages dtype")
    _expect(data.dtype == np.uint8 and data.shape == (len(pages), PAGE_SIZE), f"mem{k}.data shape")
    npages = size // PAGE_SIZE
    _expect(bool(np.all(pages < npages)) and bool(np.all(np.diff(pages.astype(np.int64)) > 0)),
            f"mem{k}.pages outside the segment or not ascending")


def _check_device(j: int, dev: Any, arrays) -> None:
    _expect(isinstance(dev, dict), f"devices[{j}]")
    _expect(isinstance(dev["factory"], str) and isinstance(dev["config"], dict) and isinstance(dev["class"], str)
            and isinstance(dev["name"], str) and isinstance(dev["native"], bool) and isinstance(dev["state"], dict),
            f"devices[{j}] fields")
    if dev["native"]:
        for name, (dtype, shape) in DEVICE_ARRAYS.items():
            arr = arrays[f"dev{j}.{name}"]
            _expect(arr.dtype == dtype and arr.shape == shape, f"dev{j}.{name} shape")
