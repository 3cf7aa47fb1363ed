import os
import shutil
import subprocess
from pathlib import Path

import pytest

APT_PACKAGES = Path(__file__).resolve().parent.parent / ".ci" / "apt-packages"


def _missing_debian_packages() -> list[str]:
    if not APT_PACKAGES.exists() or shutil.which("dpkg-query") is None:
        return []
    wanted = [line.strip() for line in APT_PACKAGES.read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    missing = []
    for name in wanted:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
        if "install ok installed" not in out.stdout:
            missing.append(name)
    return missing


def pytest_sessionstart(session):
    """Install the Debian peers the tests use (QEMU, gdb, binutils) where we may: the test
    command must work on a fresh machine. Elsewhere the tests that need them say what is missing."""
    missing = _missing_debian_packages()
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False, timeout=1200,
                   stdout=subprocess.DEVNULL)


def kvm_unusable_reason():
    """Why /dev/kvm cannot be used here, or None when it can."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no read/write permission on /dev/kvm"
    try:
        from hvjit.system import Kvm

        Kvm.instance()
    except Exception as e:  # noqa: BLE001 - any failure means "unusable", with its reason
        return f"/dev/kvm unusable: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        path = str(item.fspath)
        # The directories carry the markers, so `-m "not kvm"` or `-m "not slow"` selects by them.
        if "/tests/kvm/" in path or "/tests/e2e/" in path:
            item.add_marker(pytest.mark.kvm)
        if "/tests/e2e/" in path:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
        if "kvm" in item.keywords:
            if not checked:
                reason, checked = kvm_unusable_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def session():
    from hvjit import Session

    with Session() as s:
        yield s
