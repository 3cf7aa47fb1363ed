"""Registered objects shared between sessions, after SUPDrv's ``SUPDRVOBJ`` and usage records.

An object counts its usages in total and per session. The creating session holds the first
usage; other sessions that pass :meth:`RegisteredObject.access_check` may add their own. Each
session's usages are held through one ``object-usage`` handle in that session's table, so
closing the session drops them all. The destructor runs exactly once, when the last usage goes.

Access policy (checked on every retain): the creating session always passes; a restricted
session may use only objects it created; otherwise the object's ``access_policy`` decides, and
without one the session's uid must equal the creator's.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Hashable

from hvjit.errors import (
    AccessDeniedError,
    InvalidHandleError,
    ObjectDestroyedError,
)
from hvjit.handles import HandleKind

Session = Any  # hvjit.session.Session: not imported, the session imports this module
_SessionState = Any  # hvjit.session._SessionState: not imported, the session imports this module

ObjectDestructor = Callable[["RegisteredObject", Any, Any], Any]
AccessPolicy = Callable[["RegisteredObject", "Session"], bool]


class _Usage:
    """One session's usages of one object, held through a handle in that session."""

    __slots__ = ("state", "count", "handle")

    def __init__(self, state: _SessionState, handle: int):
        self.state = state
        self.count = 0
        self.handle = handle


class RegisteredObject:
    """A reference-counted object with per-session usage records.

    ``destructor(obj, user1, user2)`` runs once, when the last usage is released (by
    :meth:`release` or by the closing of the sessions that held usages). ``user1``/``user2``
    are the caller's payload, as in SUPDrv.
    """

    def __init__(
        self,
        session: Session,
        obj_type: Hashable,
        destructor: ObjectDestructor | None,
        user1: Any = None,
        user2: Any = None,
        *,
        access_policy: AccessPolicy | None = None,
    ):
        if destructor is not None and not callable(destructor):
            raise TypeError("destructor must be callable")
        if access_policy is not None and not callable(access_policy):
            raise TypeError("access_policy must be callable")
        state = session._state
        state.check_open()
        self.obj_type = obj_type
        self.user1 = user1
        self.user2 = user2
        self.creator_session_id = state.serial
        self.creator_pid = os.getpid()
        self.creator_uid = state.uid
        self.creator_gid = state.gid
        self._destructor = destructor
        self._access_policy = access_policy
        self._lock = threading.Lock()
        self._total = 0
        self._usages: dict[int, _Usage] = {}
        self._destroyed = False
        self._add_usage(state)

    def __repr__(self) -> str:
        status = "destroyed" if self._destroyed else f"{self._total} usages"
        return f"<RegisteredObject {self.obj_type!r} {status}>"

    @property
    def usage_count(self) -> int:
        """Usages held by all sessions together."""
        return self._total

    def usage_count_of(self, session: Session) -> int:
        """Usages held by ``session``."""
        usage = self._usages.get(session._state.serial)
        return usage.count if usage is not None else 0

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def access_check(self, session: Session) -> None:
        """Raise unless ``session`` may use this object (see the module docstring)."""
        state = session._state
        state.check_open()
        if self._destroyed:
            raise ObjectDestroyedError(f"{self!r} was destroyed")
        if state.serial == self.creator_session_id:
            return
        if state.restricted:
            raise AccessDeniedError("a restricted session may use only objects it created")
        if self._access_policy is not None:
            if not self._access_policy(self, session):
                raise AccessDeniedError(f"the access policy of {self!r} refuses {session!r}")
        elif state.uid != self.creator_uid:
            raise AccessDeniedError(
                f"{self!r} belongs to uid {self.creator_uid}, not {state.uid}"
            )

    def retain(self, session: Session) -> int:
        """Add a usage by ``session`` (after the access check); returns the total count."""
        self.access_check(session)
        return self._add_usage(session._state)

    def _add_usage(self, state: _SessionState) -> int:
        with self._lock:
            if self._destroyed:
                raise ObjectDestroyedError(f"{self!r} was destroyed")
            usage = self._usages.get(state.serial)
            if usage is None:
                # Raises SessionClosedError (changing nothing) if the session closed meanwhile.
                handle = state.register(
                    self, HandleKind.OBJECT_USAGE, lambda: self._drop_usages_of(state.serial)
                )
                usage = self._usages[state.serial] = _Usage(state, handle)
            usage.count += 1
            self._total += 1
            return self._total

    def release(self, session: Session) -> int:
        """Drop one usage by ``session``; returns the total left (0: destroyed).

        Raises :class:`InvalidHandleError` if ``session`` holds no usage.
        """
        state = session._state
        state.check_open()
        with self._lock:
            usage = self._usages.get(state.serial)
            if usage is None:
                raise InvalidHandleError(f"session {state.serial} holds no usage of {self!r}")
            usage.count -= 1
            self._total -= 1
            emptied_handle = 0
            if usage.count == 0:
                del self._usages[state.serial]
                emptied_handle = usage.handle
            remaining = self._total
            destroy = self._mark_destroyed_if_unused()
        if emptied_handle:
            self._free_usage_handle(state, emptied_handle)
        if destroy:
            self._run_destructor()
        return remaining

    def _free_usage_handle(self, state: _SessionState, handle: int) -> None:
        # Its destructor finds no record left and does nothing. If the session is closing,
        # the handle is already gone, which is just as good.
        try:
            state.table.free(handle, HandleKind.OBJECT_USAGE)
        except InvalidHandleError:
            pass

    def _drop_usages_of(self, serial: int) -> None:
        """Drop every usage one session holds (its usage handle is being freed)."""
        with self._lock:
            usage = self._usages.pop(serial, None)
            if usage is None:
                return
            self._total -= usage.count
            destroy = self._mark_destroyed_if_unused()
        if destroy:
            self._run_destructor()

    def _mark_destroyed_if_unused(self) -> bool:
        """Under the lock: True exactly once, when the last usage has gone."""
        if self._total or self._destroyed:
            return False
        self._destroyed = True
        return True

    def _run_destructor(self) -> None:
        destructor, self._destructor = self._destructor, None
        if destructor is not None:
            destructor(self, self.user1, self.user2)
