"""Sessions: version negotiation, ownership, teardown order, VMs, closing, GC, exit, leaks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
import warnings

import pytest

import hvjit
from hvjit import gip as gip_module
from hvjit.errors import (
    DuplicateNameError,
    InvalidHandleError,
    SessionClosedError,
    VersionMismatchError,
)
from hvjit.factory import SimpleFactory, factory_names
from hvjit.session import INTERFACE_VERSION, HandleKind, Session, negotiate_version


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- a stand-in for hvjit.vm.Vm with the same contract, so these tests need no KVM --------------


class FakeVm:
    instances: list[FakeVm] = []

    def __init__(self, session, name, *, memory=16 << 20, vcpus=1, fail=False, log=None):
        self.session, self.name, self.memory = session, name, memory
        self.destroyed = False
        self.handle = 0
        self.log = log if log is not None else []
        # Like the real VM, the vCPUs register themselves while the VM is being built.
        self.vcpu_handles = [
            session.register(f"{name}/vcpu{i}", HandleKind.VCPU, lambda i=i: self.log.append(f"vcpu{i}"))
            for i in range(vcpus)
        ]
        if fail:
            for handle in self.vcpu_handles:
                session.release_handle(handle)
            raise RuntimeError("VM construction failed")
        FakeVm.instances.append(self)

    def destroy(self):
        if self.destroyed:
            return
        self.destroyed = True
        self.log.append(f"vm {self.name}")
        self.session._forget_vm(self)


@pytest.fixture
def fake_vm(monkeypatch):
    module = types.ModuleType("hvjit.vm")
    module.Vm = FakeVm
    monkeypatch.setitem(sys.modules, "hvjit.vm", module)
    return FakeVm


# -- version negotiation -------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", (1, 0), " 1.0 "])
def test_compatible_versions_are_accepted(version):
    with Session(version) as session:
        assert session.interface_version == (1, 0)
    assert INTERFACE_VERSION == (1, 0)


@pytest.mark.parametrize("version", ["1.1", "2.0", "0.9", (3, 0)])
def test_incompatible_versions_are_refused_naming_both(version):
    with pytest.raises(VersionMismatchError) as info:
        Session(version)
    text = str(info.value)
    requested = version if isinstance(version, str) else f"{version[0]}.{version[1]}"
    assert requested in text and "1.0" in text


@pytest.mark.parametrize("version", ["1", "1.0.0", "a.b", "", "-1.0"])
def test_malformed_version_strings_are_value_errors(version):
    with pytest.raises(ValueError):
        negotiate_version(version)


@pytest.mark.parametrize("version", [1.0, (1,), (1, "0"), (1, -1), None])
def test_malformed_version_objects_are_type_errors(version):
    with pytest.raises(TypeError):
        negotiate_version(version)


# -- identity ------------------------------------------------------------------------------------


def test_session_identity_cookie_and_credentials():
    with Session() as a, Session(restricted=True) as b:
        assert a.id != b.id and a.cookie != b.cookie
        assert 0 <= a.cookie < 2**64
        assert (a.pid, a.uid, a.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert not a.restricted and b.restricted
        assert "restricted" in repr(b)


# -- handles through the session -----------------------------------------------------------------


def test_register_lookup_release():
    with Session() as session:
        calls = []
        handle = session.register("payload", "device", lambda: calls.append(1))
        assert session.lookup(handle, "device") == "payload"
        assert session.retain_handle(handle, "device") == 2
        assert session.release_handle(handle) == 1
        assert session.release_handle(handle) == 0
        assert calls == [1]
        with pytest.raises(InvalidHandleError):
            session.lookup(handle, "device")


@pytest.mark.parametrize("kind", ["vm", HandleKind.FACTORY, "object-usage", "gip"])
def test_register_refuses_session_managed_kinds(kind):
    with Session() as session:
        with pytest.raises(ValueError):
            session.register(object(), kind)
        assert session.handle_count == 0


def test_foreign_handles_are_refused():
    with Session() as mine, Session() as theirs:
        handle = theirs.register("theirs", "device")
        with pytest.raises(InvalidHandleError):
            mine.lookup(handle, "device")
        with pytest.raises(InvalidHandleError):
            mine.release_handle(handle)
        assert theirs.lookup(handle, "device") == "theirs"


# -- teardown ------------------------------------------------------------------------------------


def test_close_releases_everything_newest_first_and_is_idempotent():
    order = []
    session = Session()
    session.register("a", "device", lambda: order.append("device a"))
    session.register_object("obj", lambda obj, u1, u2: order.append("object"))
    factory = SimpleFactory("test-close-order", {})
    session.register_factory(factory)
    session.register("b", "memory", lambda: order.append("memory b"))
    session.close()
    assert order == ["memory b", "object", "device a"]
    assert "test-close-order" not in factory_names()
    assert session.closed and session.handle_count == 0
    session.close()
    assert len(order) == 3


def test_context_manager_closes_even_on_error():
    calls = []
    with pytest.raises(KeyError):
        with Session() as session:
            session.register("x", "device", lambda: calls.append(1))
            raise KeyError("boom")
    assert session.closed and calls == [1]


def test_entering_a_closed_session_is_refused():
    session = Session()
    session.close()
    with pytest.raises(SessionClosedError):
        with session:
            pass


def test_garbage_collected_open_session_warns_and_cleans_up():
    released = threading.Event()
    session = Session()
    session.register("x", "device", released.set)
    obj_owner = Session()
    shared = obj_owner.register_object("shared", None)
    shared.retain(session)
    assert shared.usage_count == 2
    with pytest.warns(ResourceWarning, match="garbage-collected while open"):
        del session
        gc.collect()
    assert released.wait(5.0), "the abandoned session's handle was never released"
    assert wait_until(lambda: shared.usage_count == 1)
    obj_owner.close()
    assert shared.destroyed


def test_closed_session_is_collected_without_warning():
    session = Session()
    session.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del session
        gc.collect()


def test_open_sessions_are_closed_at_interpreter_exit_without_warning(tmp_path):
    script = textwrap.dedent(
        """
        from hvjit.session import Session
        session = Session()
        session.register("x", "device", lambda: print("released at exit", flush=True))
        objects = [Session() for _ in range(3)]
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(hvjit.__file__))},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("released at exit") == 1
    assert "ResourceWarning" not in result.stderr


# -- the catalogue: every entry point, every wrong input, no state change ------------------------


def _closed_session():
    session = Session()
    session.close()
    return session


def _catalogue():
    """(description, call, expected error) for every public entry point and bad input."""
    live = Session()
    other = Session()
    closed = _closed_session()
    handle = live.register("payload", "device")
    stale = live.register("stale", "device")
    live.release_handle(stale)
    foreign = other.register("theirs", "device")
    obj = live.register_object("obj", None)
    foreign_uid = Session(uid=os.getuid() + 1)
    restricted = Session(restricted=True)
    factory = SimpleFactory("catalogue-factory", {uuid.UUID(int=1): lambda s: "iface"})
    live.register_factory(factory)
    vm = live.create_vm("vm0")
    cases = [
        ("lookup wrong kind", lambda: live.lookup(handle, "vcpu"), InvalidHandleError),
        ("lookup stale", lambda: live.lookup(stale, "device"), InvalidHandleError),
        ("lookup foreign", lambda: live.lookup(foreign, "device"), InvalidHandleError),
        ("lookup forged", lambda: live.lookup(handle + 7, "device"), InvalidHandleError),
        ("lookup nil", lambda: live.lookup(0, "device"), InvalidHandleError),
        ("release stale", lambda: live.release_handle(stale), InvalidHandleError),
        ("release foreign", lambda: live.release_handle(foreign), InvalidHandleError),
        ("release wrong kind", lambda: live.release_handle(handle, "vm"), InvalidHandleError),
        ("retain foreign", lambda: live.retain_handle(foreign), InvalidHandleError),
        ("destroy_vm stale", lambda: live.destroy_vm(stale), InvalidHandleError),
        ("destroy_vm wrong kind", lambda: live.destroy_vm(handle), InvalidHandleError),
        ("destroy_vm foreign vm", lambda: other.destroy_vm(vm), InvalidHandleError),
        ("create_vm duplicate", lambda: live.create_vm("vm0"), DuplicateNameError),
        ("create_vm empty name", lambda: live.create_vm(""), ValueError),
        ("register_factory duplicate", lambda: other.register_factory(SimpleFactory("catalogue-factory", {})), DuplicateNameError),
        ("register_factory oversize", lambda: live.register_factory(types.SimpleNamespace(name="x" * 33, query_interface=lambda s, u: None)), ValueError),
        ("register_factory not a factory", lambda: live.register_factory(types.SimpleNamespace(name="no-query")), TypeError),
        ("register_factory restricted", lambda: restricted.register_factory(SimpleFactory("r-factory", {})), PermissionError),
        ("deregister_factory not owner", lambda: other.deregister_factory(factory), PermissionError),
        ("query_factory missing", lambda: live.query_factory("no-such-factory", uuid.UUID(int=1)), LookupError),
        ("query_factory no interface", lambda: live.query_factory("catalogue-factory", uuid.UUID(int=2)), LookupError),
        ("query_factory bad uuid", lambda: live.query_factory("catalogue-factory", "not-a-uuid"), ValueError),
        ("query_factory oversize name", lambda: live.query_factory("x" * 33, uuid.UUID(int=1)), ValueError),
        ("object retain other uid", lambda: obj.retain(foreign_uid), PermissionError),
        ("object retain restricted", lambda: obj.retain(restricted), PermissionError),
        ("object release without usage", lambda: obj.release(other), InvalidHandleError),
        ("unmap gip never mapped", lambda: live.unmap_gip(), InvalidHandleError),
    ]
    for name, call in [
        ("register", lambda s: s.register("x", "device")),
        ("lookup", lambda s: s.lookup(handle, "device")),
        ("retain_handle", lambda s: s.retain_handle(handle)),
        ("release_handle", lambda s: s.release_handle(handle)),
        ("create_vm", lambda s: s.create_vm("vm9")),
        ("destroy_vm", lambda s: s.destroy_vm(vm)),
        ("vms", lambda s: s.vms),
        ("register_object", lambda s: s.register_object("o", None)),
        ("object retain", lambda s: obj.retain(s)),
        ("object release", lambda s: obj.release(s)),
        ("register_factory", lambda s: s.register_factory(SimpleFactory("closed-factory", {}))),
        ("deregister_factory", lambda s: s.deregister_factory(factory)),
        ("query_factory", lambda s: s.query_factory("catalogue-factory", uuid.UUID(int=1))),
        ("map_gip", lambda s: s.map_gip()),
        ("unmap_gip", lambda s: s.unmap_gip()),
    ]:
        cases.append((f"{name} on closed session", lambda call=call: call(closed), SessionClosedError))
    sessions = [live, other, closed, foreign_uid, restricted]
    return cases, sessions, (live, handle, obj, vm)


def _observable_state(sessions, obj):
    return (
        [s.handle_count for s in sessions],
        [s.closed for s in sessions],
        obj.usage_count,
        factory_names(),
        [len(s.vms) for s in sessions if not s.closed],
    )


def test_catalogue_of_wrong_calls_raise_typed_errors_and_change_nothing(fake_vm):
    cases, sessions, (live, handle, obj, vm) = _catalogue()
    try:
        for description, call, expected in cases:
            before = _observable_state(sessions, obj)
            with pytest.raises(expected):
                call()
            assert _observable_state(sessions, obj) == before, description
        # The live objects still work after all that.
        assert live.lookup(handle, "device") == "payload"
        assert live.vms == (vm,)
    finally:
        for session in sessions:
            session.close()


def test_oversize_and_empty_factory_names_are_refused():
    from hvjit.factory import InvalidNameError

    for bad in ["", "x" * 33, "tab\there", 42]:
        with pytest.raises(InvalidNameError):
            SimpleFactory(bad, {})


# -- VMs -----------------------------------------------------------------------------------------


def test_create_vm_registers_it_and_refuses_duplicates(fake_vm):
    with Session() as session:
        vm = session.create_vm("guest", memory=1 << 20, vcpus=2)
        assert vm.memory == 1 << 20 and vm.name == "guest"
        assert session.lookup(vm.handle, "vm") is vm
        assert session.vms == (vm,)
        with pytest.raises(DuplicateNameError):
            session.create_vm("guest")
        with Session() as other:
            other_vm = other.create_vm("guest")  # names are per session
            assert other_vm is not vm


def test_vm_and_its_vcpus_are_torn_down_vcpus_first(fake_vm):
    log = []
    session = Session()
    session.create_vm("a", vcpus=2, log=log)
    session.close()
    assert log == ["vcpu1", "vcpu0", "vm a"]


def test_destroy_vm_by_object_or_handle_frees_the_name(fake_vm):
    with Session() as session:
        a = session.create_vm("a")
        b = session.create_vm("b")
        session.destroy_vm(a)
        session.destroy_vm(b.handle)
        assert a.destroyed and b.destroyed and session.vms == ()
        with pytest.raises(InvalidHandleError):
            session.destroy_vm(a)
        assert session.create_vm("a").name == "a"


def test_vm_destroyed_directly_gives_back_its_handle_and_name(fake_vm):
    with Session() as session:
        vm = session.create_vm("a")
        count = session.handle_count
        vm.destroy()
        assert session.handle_count == count - 1
        assert session.vms == ()
        session.create_vm("a")


def test_failed_vm_construction_leaves_nothing_behind(fake_vm):
    with Session() as session:
        with pytest.raises(RuntimeError):
            session.create_vm("broken", vcpus=2, fail=True)
        # The VM's reserved handle and its name are gone (its vCPUs it released itself).
        assert session.handle_count == 0
        assert session.vms == ()
        assert session.create_vm("broken").name == "broken"


# -- concurrency ---------------------------------------------------------------------------------


def test_threads_sharing_a_session_keep_counts_exact():
    with Session() as session:
        destroyed = []
        lock = threading.Lock()

        def destructor():
            with lock:
                destroyed.append(1)

        def worker():
            for _ in range(1000):
                h = session.register("x", "device", destructor)
                session.retain_handle(h, "device")
                assert session.lookup(h, "device") == "x"
                session.release_handle(h, "device")
                session.release_handle(h, "device")

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(destroyed) == 6000
        assert session.handle_count == 0


def test_close_while_in_use_from_other_threads():
    session = Session()
    registered = []
    destroyed = []
    lock = threading.Lock()
    errors = []
    started = threading.Barrier(5)

    def destructor():
        with lock:
            destroyed.append(1)

    def worker():
        started.wait()
        try:
            while True:
                h = session.register("x", "device", destructor)
                with lock:
                    registered.append(h)
                session.lookup(h, "device")
        except SessionClosedError:
            pass
        except Exception as exc:  # any other error is a bug
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.05)
    session.close()
    for t in threads:
        t.join()
    assert errors == []
    assert registered and len(destroyed) == len(registered)
    assert session.handle_count == 0


# -- leak check ----------------------------------------------------------------------------------


def _resource_usage():
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as maps:
        mappings = sum(1 for _ in maps)
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return fds, mappings, rss


@pytest.fixture
def fake_process_gip():
    gip = gip_module.Gip(tsc_source=gip_module.SimulatedTsc(), calibration_ns=2_000_000)
    old = gip_module.set_process_gip(gip)
    yield gip
    gip_module.set_process_gip(old)


def _session_cycle(index, shared):
    with Session() as session:
        handle = session.register(index, "device")
        session.lookup(handle, "device")
        obj = session.register_object("stress", None, index)
        shared.retain(session)
        session.register_factory(SimpleFactory("stress-factory", {uuid.UUID(int=1): lambda s: s}))
        assert session.query_factory("stress-factory", uuid.UUID(int=1)) is session
        view = session.map_gip()
        assert view["magic"][0] != 0
    assert obj.destroyed and view["magic"][0] == 0


def test_ten_thousand_sessions_leak_no_fds_mappings_or_memory(fake_process_gip):
    with Session() as owner:
        shared = owner.register_object("shared", None)
        for i in range(300):  # warm up allocator pools and caches
            _session_cycle(i, shared)
        gc.collect()
        fds0, maps0, rss0 = _resource_usage()
        started = time.monotonic()
        for i in range(10_000):
            _session_cycle(i, shared)
        elapsed = time.monotonic() - started
        gc.collect()
        fds1, maps1, rss1 = _resource_usage()
        assert shared.usage_count == 1
    assert fake_process_gip.mapping_count == 0
    assert fds1 <= fds0, (fds0, fds1)
    assert maps1 <= maps0 + 4, (maps0, maps1)
    assert rss1 - rss0 < 8 << 20, f"RSS grew by {(rss1 - rss0) >> 10} KiB"
    assert elapsed < 20, elapsed


def test_abandoned_sessions_are_all_reclaimed(fake_process_gip):
    fds0, maps0, _ = _resource_usage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for i in range(1000):
            session = Session()
            session.map_gip()
            session.register(i, "device")
            del session
        gc.collect()
    assert wait_until(lambda: fake_process_gip.mapping_count == 0, timeout=10)
    gc.collect()
    fds1, maps1, _ = _resource_usage()
    assert fds1 <= fds0 and maps1 <= maps0 + 4, (fds0, fds1, maps0, maps1)
