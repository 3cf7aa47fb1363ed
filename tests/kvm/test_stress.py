"""10,000 sessions with a VM inside: no growth in fds, mappings or RSS."""
import os

import pytest

import hvjit

pytestmark = pytest.mark.slow


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _mappings():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ten_thousand_sessions_with_vms_leak_nothing():
    def cycle(i):
        with hvjit.Session() as s:
            vm = s.create_vm("stress", memory=1 << 20)
            vm.memory.write(0x1000, b"\xf4")
            if i % 2:
                vm.destroy()  # half destroyed by hand, half by the session's close

    for i in range(200):  # warm-up: allocator arenas, caches, the library session
        cycle(i)
    fds, maps, rss = _fds(), _mappings(), _rss()
    for i in range(10_000):
        cycle(i)
    assert _fds() == fds
    assert _mappings() <= maps + 4
    assert _rss() - rss < 16 << 20, f"RSS grew by {(_rss() - rss) >> 20} MiB"
