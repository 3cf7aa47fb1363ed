"""Debian's stock kernel for end-to-end tests, fetched with apt-get and cached outside git."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("HVJIT_CACHE_DIR") or Path.home() / ".cache" / "hvjit") / "debian"


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


def debian_kernel() -> Path:
    """Path to a cached vmlinuz from Debian's linux-image-amd64 (downloads it once)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("apt-get/dpkg-deb not found: the Debian kernel cannot be fetched here")
    CACHE.mkdir(parents=True, exist_ok=True)
    existing = sorted(CACHE.glob("vmlinuz-*"))
    if existing:
        return existing[-1]
    package = kernel_package()
    subprocess.run(["apt-get", "download", package], cwd=CACHE, check=True, capture_output=True, timeout=900)
    deb = next(CACHE.glob(f"{package}_*.deb"))
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                               capture_output=True, timeout=300).stdout
    import io

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        member = next(m for m in tar.getmembers() if Path(m.name).name.startswith("vmlinuz-"))
        target = CACHE / Path(member.name).name
        tmp = target.with_suffix(".part")
        tmp.write_bytes(tar.extractfile(member).read())
        tmp.replace(target)
    deb.unlink()
    return target
