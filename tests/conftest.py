import os

import pytest


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
