"""Component factories: registration, interface queries, ownership, names, teardown."""

from __future__ import annotations

import threading
import uuid

import pytest

from hvjit.errors import AccessDeniedError, DuplicateNameError, SessionClosedError
from hvjit.factory import (
    DEVICE_INTERFACE_UUID,
    FACTORY_NAME_MAX,
    Factory,
    FactoryNotFoundError,
    InterfaceNotFoundError,
    InvalidNameError,
    SimpleFactory,
    factory_names,
)
from hvjit.session import Session

IFACE_A = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
IFACE_B = uuid.UUID("11111111-2222-3333-4444-555555555555")


@pytest.fixture
def session():
    with Session() as s:
        yield s


def test_device_interface_uuid_is_the_documented_uuid5():
    assert DEVICE_INTERFACE_UUID == uuid.uuid5(uuid.NAMESPACE_URL, "urn:hvjit:interface:device-model:1")
    assert DEVICE_INTERFACE_UUID.version == 5


def test_registered_factory_answers_queries_from_every_session(session):
    made_for = []

    def make(s):
        made_for.append(s)
        return ("device", s.id)

    session.register_factory(SimpleFactory("uart-x", {IFACE_A: make}))
    assert "uart-x" in factory_names()
    with Session() as other:
        assert other.query_factory("uart-x", IFACE_A) == ("device", other.id)
        assert other.query_factory("uart-x", str(IFACE_A).upper()) == ("device", other.id)
    assert session.query_factory("uart-x", IFACE_A) == ("device", session.id)
    assert made_for[-1] is session


def test_unknown_factory_and_unknown_interface_are_distinct_errors(session):
    session.register_factory(SimpleFactory("only-a", {str(IFACE_A): lambda s: "a"}))
    with pytest.raises(FactoryNotFoundError, match="no-such"):
        session.query_factory("no-such", IFACE_A)
    with pytest.raises(InterfaceNotFoundError, match=str(IFACE_B)):
        session.query_factory("only-a", IFACE_B)
    with pytest.raises(ValueError):
        session.query_factory("only-a", "not a uuid")
    with pytest.raises(TypeError):
        session.query_factory("only-a", 12345)


def test_subclassed_factory_gets_session_and_uuid(session):
    class DeviceFactory(Factory):
        def query_interface(self, s, interface_uuid):
            if interface_uuid == DEVICE_INTERFACE_UUID:
                return {"session": s, "model": "my-device"}
            return None

    session.register_factory(DeviceFactory("my-device"))
    answer = session.query_factory("my-device", DEVICE_INTERFACE_UUID)
    assert answer == {"session": session, "model": "my-device"}
    with pytest.raises(InterfaceNotFoundError):
        session.query_factory("my-device", IFACE_A)


def test_duplicate_names_are_refused_across_sessions(session):
    first = SimpleFactory("dup", {})
    session.register_factory(first)
    with pytest.raises(DuplicateNameError):
        session.register_factory(first)
    with Session() as other:
        with pytest.raises(DuplicateNameError):
            other.register_factory(SimpleFactory("dup", {IFACE_A: lambda s: "impostor"}))
        assert other.handle_count == 0
    assert factory_names().count("dup") == 1


@pytest.mark.parametrize(
    "name",
    ["", "x" * (FACTORY_NAME_MAX + 1), "bad\nname", "nul\x00", None, 7],
    ids=["empty", "oversize", "newline", "nul", "none", "int"],
)
def test_invalid_names_are_refused(session, name):
    before = factory_names()
    with pytest.raises(InvalidNameError):
        SimpleFactory(name, {})
    impostor = type("F", (), {"name": name, "query_interface": lambda self, s, u: None})()
    with pytest.raises(InvalidNameError):
        session.register_factory(impostor)
    with pytest.raises(InvalidNameError):
        session.query_factory(name, IFACE_A)
    assert factory_names() == before and session.handle_count == 0


def test_longest_name_is_accepted(session):
    name = "n" * FACTORY_NAME_MAX
    session.register_factory(SimpleFactory(name, {IFACE_A: lambda s: 1}))
    assert session.query_factory(name, IFACE_A) == 1


def test_only_the_owner_may_deregister(session):
    factory = SimpleFactory("owned", {IFACE_A: lambda s: 1})
    session.register_factory(factory)
    with Session() as other:
        with pytest.raises(AccessDeniedError):
            other.deregister_factory(factory)
    assert "owned" in factory_names()
    count = session.handle_count
    session.deregister_factory(factory)
    assert "owned" not in factory_names() and session.handle_count == count - 1
    with pytest.raises(FactoryNotFoundError):
        session.deregister_factory(factory)


def test_deregistering_an_impostor_with_the_same_name_is_refused(session):
    session.register_factory(SimpleFactory("real", {}))
    with pytest.raises(FactoryNotFoundError):
        session.deregister_factory(SimpleFactory("real", {}))
    assert "real" in factory_names()


def test_factories_go_when_their_session_closes():
    owner = Session()
    owner.register_factory(SimpleFactory("ephemeral", {IFACE_A: lambda s: 1}))
    with Session() as other:
        assert other.query_factory("ephemeral", IFACE_A) == 1
        owner.close()
        with pytest.raises(FactoryNotFoundError):
            other.query_factory("ephemeral", IFACE_A)
        other.register_factory(SimpleFactory("ephemeral", {}))  # the name is free again


def test_restricted_sessions_query_but_cannot_register(session):
    session.register_factory(SimpleFactory("public", {IFACE_A: lambda s: "ok"}))
    with Session(restricted=True) as restricted:
        assert restricted.query_factory("public", IFACE_A) == "ok"
        with pytest.raises(AccessDeniedError):
            restricted.register_factory(SimpleFactory("mine", {}))
    assert "mine" not in factory_names()


def test_closed_session_cannot_use_factories():
    closed = Session()
    closed.close()
    with pytest.raises(SessionClosedError):
        closed.register_factory(SimpleFactory("late", {}))
    with pytest.raises(SessionClosedError):
        closed.query_factory("late", IFACE_A)
    assert "late" not in factory_names()


def test_simple_factory_needs_callable_constructors():
    with pytest.raises(TypeError):
        SimpleFactory("bad-table", {IFACE_A: "not callable"})
    assert SimpleFactory("good", {str(IFACE_A): lambda s: 1}).interfaces == {IFACE_A}


def test_concurrent_registration_of_one_name_admits_exactly_one():
    sessions = [Session() for _ in range(8)]
    barrier = threading.Barrier(len(sessions))
    outcomes = []

    def contend(s):
        barrier.wait()
        try:
            s.register_factory(SimpleFactory("contended", {}))
            outcomes.append("won")
        except DuplicateNameError:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    assert sum(s.handle_count for s in sessions) == 1
    for s in sessions:
        s.close()
    assert "contended" not in factory_names()
