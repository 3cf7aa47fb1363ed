import os

import pytest

from tests.conftest import kvm_unusable_reason  # noqa: F401  (shared skip logic)


@pytest.fixture(scope="session")
def kvm_session():
    reason = kvm_unusable_reason()
    if reason:
        pytest.skip(reason)
    from hvjit import Session

    with Session() as s:
        yield s


def pytest_report_header(config):
    return f"hvjit benchmarks (HVJIT_CACHE_DIR={os.environ.get('HVJIT_CACHE_DIR', 'default')})"
