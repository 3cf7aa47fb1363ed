"""/dev/kvm problems become KvmUnavailableError with the reason; kernels survive bounds checks."""

import os
import subprocess
import sys

import pytest

from hvjit.errors import KvmUnavailableError
from hvjit.system import Kvm, detect_flavour


def test_missing_device_says_so(tmp_path):
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))


def test_a_device_that_is_not_kvm_is_refused(tmp_path):
    # /dev/null opens but answers no KVM ioctl.
    with pytest.raises(KvmUnavailableError, match="/dev/null"):
        Kvm("/dev/null")


def test_permission_problem_is_named(tmp_path):
    if os.geteuid() == 0:
        # root ignores file modes: drop to nobody (after importing) instead.
        script = (
            "import os, sys\n"
            "from hvjit.system import Kvm\n"
            "from hvjit.errors import KvmUnavailableError\n"
            "os.setuid(65534)\n"
            "try:\n    Kvm('/dev/kvm')\nexcept KvmUnavailableError as e:\n    print(e); sys.exit(0)\n"
            "sys.exit(1)\n"
        )
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "permission denied" in p.stdout
    else:
        with pytest.raises(KvmUnavailableError):
            Kvm("/dev/kvm") if not os.access("/dev/kvm", os.W_OK) else Kvm("/nonexistent/kvm")


def test_flavour_is_one_of_the_known_names():
    assert detect_flavour() in ("pvm", "vmx", "svm", "unknown")


def test_device_and_dispatch_tests_pass_with_numba_boundscheck(tmp_path):
    """Numba does no bounds checks by default; with NUMBA_BOUNDSCHECK=1 any out-of-range
    index in the device handlers or exit decoding raises instead of reading stray memory."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", HVJIT_CACHE_DIR=str(tmp_path / "cache"))
    here = os.path.dirname(__file__)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(here, "test_devices.py")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " passed" in p.stdout
