"""Registered objects: usage counts, access policy, destructor exactly once, session teardown."""

from __future__ import annotations

import os
import threading

import pytest

from hvjit.errors import (
    AccessDeniedError,
    InvalidHandleError,
    ObjectDestroyedError,
    SessionClosedError,
)
from hvjit.objects import RegisteredObject
from hvjit.session import Session


@pytest.fixture
def sessions():
    opened = []

    def open_session(**kwargs):
        session = Session(**kwargs)
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()


def recorder():
    calls = []
    return calls, lambda obj, user1, user2: calls.append((obj, user1, user2))


def test_creation_gives_the_creator_one_usage(sessions):
    session = sessions()
    calls, destructor = recorder()
    obj = session.register_object("buffer", destructor, "u1", "u2")
    assert isinstance(obj, RegisteredObject)
    assert obj.usage_count == 1 and obj.usage_count_of(session) == 1
    assert (obj.creator_uid, obj.creator_gid, obj.creator_pid) == (os.getuid(), os.getgid(), os.getpid())
    assert obj.creator_session_id == session.id
    assert (obj.obj_type, obj.user1, obj.user2) == ("buffer", "u1", "u2")
    assert calls == []


def test_destructor_runs_exactly_once_with_the_user_arguments(sessions):
    session = sessions()
    calls, destructor = recorder()
    obj = session.register_object("buffer", destructor, 1, 2)
    obj.retain(session)
    assert obj.release(session) == 1
    assert calls == []
    assert obj.release(session) == 0
    assert calls == [(obj, 1, 2)] and obj.destroyed
    with pytest.raises(InvalidHandleError):
        obj.release(session)
    with pytest.raises(ObjectDestroyedError):
        obj.retain(session)
    assert len(calls) == 1


def test_same_uid_sessions_share_and_the_last_user_destroys(sessions):
    creator, user = sessions(), sessions()
    calls, destructor = recorder()
    obj = creator.register_object("shared", destructor)
    assert obj.retain(user) == 2
    assert obj.usage_count_of(user) == 1
    creator.close()  # the creator's usage goes; the object lives on
    assert obj.usage_count == 1 and calls == []
    assert obj.release(user) == 0
    assert len(calls) == 1


def test_closing_a_session_drops_all_its_usages(sessions):
    creator, user = sessions(), sessions()
    calls, destructor = recorder()
    obj = creator.register_object("shared", destructor)
    for _ in range(5):
        obj.retain(user)
    handles_before = user.handle_count
    assert handles_before == 1  # one usage handle however many usages
    user.close()
    assert obj.usage_count == 1 and calls == []
    creator.close()
    assert len(calls) == 1


def test_releasing_the_last_usage_frees_the_usage_handle(sessions):
    creator, user = sessions(), sessions()
    obj = creator.register_object("shared", None)
    obj.retain(user)
    obj.retain(user)
    obj.release(user)
    assert user.handle_count == 1
    obj.release(user)
    assert user.handle_count == 0 and obj.usage_count_of(user) == 0


def test_other_uid_is_refused_by_default(sessions):
    creator, stranger = sessions(), sessions(uid=os.getuid() + 1)
    obj = creator.register_object("private", None)
    with pytest.raises(AccessDeniedError, match="uid"):
        obj.retain(stranger)
    with pytest.raises(AccessDeniedError):
        obj.access_check(stranger)
    assert obj.usage_count == 1 and stranger.handle_count == 0


def test_restricted_session_sees_only_its_own_objects(sessions):
    unrestricted, restricted = sessions(), sessions(restricted=True)
    theirs = unrestricted.register_object("theirs", None)
    with pytest.raises(AccessDeniedError, match="restricted"):
        theirs.retain(restricted)
    own = restricted.register_object("own", None)
    assert own.retain(restricted) == 2
    # Its objects are still shareable with unrestricted sessions of the same uid.
    assert own.retain(unrestricted) == 3


def test_access_policy_overrides_the_uid_rule(sessions):
    creator = sessions()
    allowed, refused = sessions(uid=os.getuid() + 1), sessions()
    obj = creator.register_object(
        "policy", None, access_policy=lambda o, session: session is allowed
    )
    assert obj.retain(allowed) == 2
    with pytest.raises(AccessDeniedError, match="policy"):
        obj.retain(refused)
    assert obj.usage_count == 2


def test_closed_sessions_are_refused(sessions):
    creator, closed = sessions(), sessions()
    obj = creator.register_object("o", None)
    closed.close()
    with pytest.raises(SessionClosedError):
        obj.retain(closed)
    with pytest.raises(SessionClosedError):
        closed.register_object("o", None)
    assert obj.usage_count == 1


@pytest.mark.parametrize("bad", [{"destructor": 5}, {"access_policy": "yes"}])
def test_non_callable_destructor_or_policy_is_refused(sessions, bad):
    session = sessions()
    arguments = {"destructor": None, **bad}
    with pytest.raises(TypeError):
        session.register_object("o", **arguments)
    assert session.handle_count == 0


def test_failing_destructor_raises_once_and_object_stays_destroyed(sessions):
    session = sessions()
    calls = []

    def destructor(obj, u1, u2):
        calls.append(1)
        raise RuntimeError("destructor failed")

    obj = session.register_object("o", destructor)
    with pytest.raises(RuntimeError):
        obj.release(session)
    assert obj.destroyed and calls == [1]
    session.close()
    assert calls == [1]


def test_concurrent_retain_release_from_many_sessions_keeps_counts_exact(sessions):
    creator = sessions()
    calls, destructor = recorder()
    obj = creator.register_object("hot", destructor)
    workers = [sessions() for _ in range(6)]
    barrier = threading.Barrier(len(workers))

    def hammer(session):
        barrier.wait()
        for _ in range(1000):
            obj.retain(session)
            obj.retain(session)
            obj.release(session)
        for _ in range(500):
            obj.release(session)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each worker keeps 500 usages.
    assert obj.usage_count == 1 + 6 * 500
    assert [obj.usage_count_of(s) for s in workers] == [500] * 6
    for s in workers:
        s.close()
    assert obj.usage_count == 1 and calls == []
    creator.close()
    assert len(calls) == 1


def test_closing_sessions_concurrently_with_releases_runs_destructor_once(sessions):
    for _ in range(50):
        creator = sessions()
        calls, destructor = recorder()
        obj = creator.register_object("racy", destructor)
        others = [sessions() for _ in range(3)]
        for s in others:
            obj.retain(s)
        obj.release(creator)
        threads = [threading.Thread(target=s.close) for s in others]
        threads.append(threading.Thread(target=creator.close))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(calls) == 1 and obj.usage_count == 0
