"""Debian's stock kernel and busybox for end-to-end tests, fetched with apt-get and cached
outside git; and a newc initramfs builder (what the kernel unpacks into its rootfs)."""

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("HVJIT_CACHE_DIR") or Path.home() / ".cache" / "hvjit") / "debian"

# What /init of the test initramfs prints; the shell computes part of it, so the kernel's
# own command line or an echo of the script cannot fake it.
SHELL_MARKER = "HVJIT-SHELL-MARKER-42"
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "HVJIT-SHELL-MARKER-$((6*7)) pid $$ kernel $(/bin/busybox uname -r)"
/bin/busybox poweroff -f
"""


def kernel_package() -> str:
    """linux-image-amd64 is a metapackage: the image package it depends on."""
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0 or "Depends:" not in out.stdout:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                             text=True, timeout=120, check=True)
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"cannot find the kernel package behind linux-image-amd64:\n{out.stdout}")


def _fetch(package: str, wanted, target_name) -> Path:
    """Download ``package`` once and keep the first file whose path ``wanted`` accepts."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("apt-get/dpkg-deb not found: Debian packages cannot be fetched here")
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", package], cwd=CACHE, check=True, capture_output=True, timeout=900)
    deb = next(CACHE.glob(f"{package}_*.deb"))
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                               capture_output=True, timeout=300).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        member = next(m for m in tar.getmembers() if m.isfile() and wanted(Path(m.name)))
        target = CACHE / target_name(Path(member.name))
        tmp = target.with_suffix(".part")
        tmp.write_bytes(tar.extractfile(member).read())
        tmp.replace(target)
    deb.unlink()
    return target


def debian_kernel() -> Path:
    """Path to a cached vmlinuz from Debian's linux-image-amd64 (downloads it once)."""
    existing = sorted(CACHE.glob("vmlinuz-*"))
    if existing:
        return existing[-1]
    return _fetch(kernel_package(), lambda p: p.name.startswith("vmlinuz-"), lambda p: p.name)


def debian_busybox() -> Path:
    """Path to a cached static busybox from Debian's busybox-static (downloads it once)."""
    target = CACHE / "busybox-static"
    if target.exists():
        return target
    return _fetch("busybox-static", lambda p: p.as_posix().endswith("bin/busybox"), lambda p: target.name)


def newc_archive(files: dict) -> bytes:
    """A cpio "newc" archive: ``{path: bytes}`` are executable files, ``{path: None}``
    directories. The kernel unpacks it as an initramfs (uncompressed is fine)."""

    def entry(ino: int, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> bytes:
        name_b = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        out = b"070701" + "".join(f"{v:08X}" for v in fields).encode() + name_b
        out += b"\0" * (-len(out) % 4) + data
        return out + b"\0" * (-len(out) % 4)

    parts = []
    for ino, (path, data) in enumerate(sorted(files.items()), start=1):
        if data is None:
            parts.append(entry(ino, path, stat.S_IFDIR | 0o755, nlink=2))
        else:
            parts.append(entry(ino, path, stat.S_IFREG | 0o755, data))
    parts.append(entry(0, "TRAILER!!!", 0))
    blob = b"".join(parts)
    return blob + b"\0" * (-len(blob) % 512)


def shell_initramfs(script: str = INIT_SCRIPT) -> bytes:
    """busybox as /bin/busybox and ``script`` as /init."""
    busybox = debian_busybox().read_bytes()
    return newc_archive({"bin": None, "dev": None, "proc": None, "bin/busybox": busybox,
                         "init": script.encode()})
