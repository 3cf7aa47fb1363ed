"""Sessions: the owner of everything a user creates, after VirtualBox's SUPDrv sessions.

A :class:`Session` negotiates the interface version, carries a random cookie, the creator's
pid/uid/gid and a restricted/unrestricted mode, and owns a :class:`~hvjit.handles.HandleTable`.
Every resource the library hands out (VMs, vCPUs, memory, devices, factory registrations,
usages of shared objects, the GIP mapping) is registered in that table with a destructor, so
closing the session tears everything down in reverse creation order. A session is closed by
``close()``, by leaving its ``with`` block, at interpreter exit, or, with a
:class:`ResourceWarning`, when it is garbage-collected while still open.

Everything the teardown needs lives in a :class:`_SessionState` that never refers back to the
:class:`Session`, so an abandoned session can be collected and its state closed afterwards.
Objects that keep their session alive (for example a VM holding ``vm.session``) keep it open
until they are released or the interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import queue
import secrets
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Hashable

from hvjit import helper_threads
from hvjit.errors import (
    DuplicateNameError,
    InvalidHandleError,
    ObjectDestroyedError,
    SessionClosedError,
    VersionMismatchError,
)
from hvjit.handles import DEFAULT_MAX_HANDLES, HandleKind, HandleTable
from hvjit.vcpu_lifecycle import ACTING_SESSION

if TYPE_CHECKING:
    import uuid

    import numpy as np

    from hvjit.factory import Factory
    from hvjit.objects import RegisteredObject
    from hvjit.vm import Vm

INTERFACE_VERSION = (1, 0)

_log = logging.getLogger(__name__)


# Kinds only the session itself creates: register() refuses them so that, e.g., session.vms
# only ever lists real VMs.
_SESSION_MANAGED_KINDS = frozenset(
    {HandleKind.VM, HandleKind.FACTORY, HandleKind.OBJECT_USAGE, HandleKind.GIP}
)


def parse_version(version: str | tuple[int, int]) -> tuple[int, int]:
    """``"1.0"`` or ``(1, 0)`` as a ``(major, minor)`` tuple of non-negative ints."""
    if isinstance(version, str):
        parts = version.strip().split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"interface version must look like 'major.minor', not {version!r}")
        return int(parts[0]), int(parts[1])
    if (
        isinstance(version, tuple)
        and len(version) == 2
        and all(type(p) is int and p >= 0 for p in version)
    ):
        return version
    raise TypeError(f"interface version must be a 'major.minor' string or a (major, minor) tuple, not {version!r}")


def negotiate_version(requested: str | tuple[int, int]) -> tuple[int, int]:
    """Accept ``requested`` if this library can serve it, as SUPDrv's cookie exchange does.

    The major must match; the minor may be at most the library's (older clients are served,
    newer ones refused).
    """
    major, minor = parse_version(requested)
    lib_major, lib_minor = INTERFACE_VERSION
    if major != lib_major or minor > lib_minor:
        raise VersionMismatchError(
            f"interface version {major}.{minor} requested, "
            f"but this library provides {lib_major}.{lib_minor}"
        )
    return major, minor


_session_serials = itertools.count(1)
# Open sessions' states, closed at interpreter exit. States never refer to their Session.
_open_states: dict[int, _SessionState] = {}


class _SessionState:
    """What a session owns and needs for its teardown (no reference to the Session)."""

    def __init__(self, interface_version, restricted, uid, gid, max_handles):
        self.serial = next(_session_serials)
        self.cookie = secrets.randbits(64)
        self.interface_version = interface_version
        self.restricted = restricted
        self.pid = os.getpid()
        self.uid = uid
        self.gid = gid
        self.table = HandleTable(max_handles)
        # Re-entrant: a VM's constructor registers its vCPUs while create_vm holds the lock.
        self.lock = threading.RLock()
        self.closed = False
        self.vm_handles: dict[str, int] = {}
        self.gip_handle = 0
        self.gip_view = None

    def check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"session {self.serial} is closed")

    def register(self, obj: Any, kind: Hashable, destructor: Callable[[], Any] | None) -> int:
        """Insert into the table, atomically with respect to close()."""
        with self.lock:
            self.check_open()
            return self.table.insert(obj, kind, destructor)

    def translate_closed(self, exc: Exception) -> Exception:
        """A lookup refused because the session closed meanwhile reads as SessionClosedError."""
        if self.closed:
            return SessionClosedError(f"session {self.serial} is closed")
        return exc

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        _open_states.pop(self.serial, None)
        # Outside the lock: destructors may call back into the session (and get
        # SessionClosedError), and other threads blocked on the lock can see it closed.
        self.table.close()


# -- teardown of abandoned sessions ------------------------------------------------------------
#
# A garbage-collected session's finalizer may run inside any allocation, even one made while
# this thread holds a lock that the teardown needs. So the finalizer only warns and queues the
# state (SimpleQueue.put is documented re-entrant, safe in finalizers); a daemon thread closes it.

_abandoned: queue.SimpleQueue[_SessionState | None] = queue.SimpleQueue()  # None: stop
_reaper_lock = threading.Lock()
_reaper_thread: threading.Thread | None = None


def _reap_abandoned_forever() -> None:
    while True:
        state = _abandoned.get()
        if state is None:
            return
        try:
            state.close()
        except Exception:
            _log.exception("closing abandoned hvjit session %d failed", state.serial)


def _ensure_reaper() -> None:
    global _reaper_thread
    if _reaper_thread is not None:
        return
    with _reaper_lock:
        if _reaper_thread is None:
            _reaper_thread = helper_threads.start(_reap_abandoned_forever, "hvjit-session-reaper")


def stop_reaper() -> None:
    """End the reaper thread (the next session starts another; states queued meanwhile wait
    for it). For a process about to fork (`hvjit serve`): a child gets only the forking thread."""
    global _reaper_thread
    with _reaper_lock:
        thread, _reaper_thread = _reaper_thread, None
    if thread is not None:
        _abandoned.put(None)
        thread.join()


def _forget_reaper_in_child() -> None:
    global _reaper_thread
    _reaper_thread = None


os.register_at_fork(after_in_child=_forget_reaper_in_child)


def _on_abandoned(state: _SessionState) -> None:
    if state.closed:
        return
    warnings.warn(
        f"hvjit session {state.serial} was garbage-collected while open; closing it",
        ResourceWarning,
        stacklevel=2,
    )
    _abandoned.put(state)


@atexit.register
def _close_open_sessions_at_exit() -> None:
    for serial in sorted(_open_states, reverse=True):
        state = _open_states.get(serial)
        if state is None:
            continue
        try:
            state.close()
        except Exception:
            _log.exception("closing hvjit session %d at exit failed", serial)


class Session:
    """A client's connection to hvjit; owns and tears down everything made through it.

    ``version`` is the interface version the client was written for (``"major.minor"`` or a
    tuple); an incompatible one raises :class:`VersionMismatchError`. A ``restricted``
    session can use only objects it created itself and cannot register component factories.
    ``uid``/``gid`` default to the process's credentials (a server acting for another user
    may pass theirs). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        version: str | tuple[int, int] = "1.0",
        *,
        restricted: bool = False,
        max_handles: int = DEFAULT_MAX_HANDLES,
        uid: int | None = None,
        gid: int | None = None,
    ):
        interface_version = negotiate_version(version)
        self._state = _SessionState(
            interface_version,
            bool(restricted),
            os.getuid() if uid is None else uid,
            os.getgid() if gid is None else gid,
            max_handles,
        )
        self._acting_tokens: list = []  # `with session:` makes it the acting session
        _ensure_reaper()
        _open_states[self._state.serial] = self._state
        self._finalizer = weakref.finalize(self, _on_abandoned, self._state)
        # Exit-time teardown is _close_open_sessions_at_exit's job, and warns about nothing.
        self._finalizer.atexit = False

    # -- identity ----------------------------------------------------------------------------

    @property
    def id(self) -> int:
        """A process-unique serial number (never reused)."""
        return self._state.serial

    @property
    def cookie(self) -> int:
        """A random 64-bit value identifying this session."""
        return self._state.cookie

    @property
    def interface_version(self) -> tuple[int, int]:
        """The interface version negotiated at creation."""
        return self._state.interface_version

    @property
    def restricted(self) -> bool:
        return self._state.restricted

    @property
    def pid(self) -> int:
        return self._state.pid

    @property
    def uid(self) -> int:
        return self._state.uid

    @property
    def gid(self) -> int:
        return self._state.gid

    @property
    def closed(self) -> bool:
        return self._state.closed

    @property
    def handle_count(self) -> int:
        """How many live handles the session holds (of every kind)."""
        return len(self._state.table)

    def __repr__(self) -> str:
        mode = "restricted" if self.restricted else "unrestricted"
        status = "closed" if self.closed else f"{self.handle_count} handles"
        return f"<hvjit.Session {self.id} {mode} uid={self.uid} {status}>"

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything the session owns, newest first. Idempotent."""
        self._finalizer.detach()
        self._state.close()

    def __enter__(self) -> Session:
        self._state.check_open()
        self._acting_tokens.append(ACTING_SESSION.set(self))
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.close()
        finally:
            if self._acting_tokens:
                ACTING_SESSION.reset(self._acting_tokens.pop())

    @contextlib.contextmanager
    def acting(self):
        """Act for this session without closing it afterwards: inside, a restricted session
        may use the control plane (run, pause, step, inject, ...) only on its own VMs."""
        self._state.check_open()
        token = ACTING_SESSION.set(self)
        try:
            yield self
        finally:
            ACTING_SESSION.reset(token)

    # -- handles -----------------------------------------------------------------------------

    def register(
        self, obj: Any, kind: Hashable, destructor: Callable[[], Any] | None = None
    ) -> int:
        """Make the session own ``obj``: returns a handle of ``kind``.

        ``destructor`` (no arguments) runs when the handle is released or the session
        closes. Kinds the session manages itself (``vm``, ``factory``, ``object-usage``,
        ``gip``) are refused: use the dedicated methods.
        """
        if kind in _SESSION_MANAGED_KINDS:
            raise ValueError(f"handles of kind {kind!r} are made by the session itself")
        return self._state.register(obj, kind, destructor)

    def lookup(self, handle: int, kind: Hashable) -> Any:
        """The object ``handle`` names; raises :class:`InvalidHandleError` unless of ``kind``."""
        state = self._state
        state.check_open()
        try:
            return state.table.lookup(handle, kind)
        except (InvalidHandleError, ObjectDestroyedError) as exc:
            raise state.translate_closed(exc) from None

    def retain_handle(self, handle: int, kind: Hashable | None = None) -> int:
        """Add a reference to ``handle``; returns the new count."""
        state = self._state
        state.check_open()
        try:
            return state.table.retain(handle, kind)
        except (InvalidHandleError, ObjectDestroyedError) as exc:
            raise state.translate_closed(exc) from None

    def release_handle(self, handle: int, kind: Hashable | None = None) -> int:
        """Drop a reference to ``handle``; the last one frees it and runs its destructor.

        Returns the remaining count (0 once freed).
        """
        state = self._state
        state.check_open()
        try:
            return state.table.release(handle, kind)
        except (InvalidHandleError, ObjectDestroyedError) as exc:
            raise state.translate_closed(exc) from None

    # -- VMs ---------------------------------------------------------------------------------

    def create_vm(self, name: str, *, memory: int | None = None, vcpus: int = 1, **kwargs) -> Vm:
        """Create a VM owned by this session (``hvjit.vm.Vm``), unique by name in the session.

        ``memory`` (bytes) is passed on when given, as are further keyword arguments. The VM
        gets ``vm.handle`` (kind ``"vm"``) and is destroyed when the session closes.
        """
        from hvjit.vm import Vm

        if not isinstance(name, str) or not name:
            raise ValueError(f"a VM name is a non-empty string, not {name!r}")
        if memory is not None:
            kwargs["memory"] = memory
        state = self._state
        with state.lock:
            state.check_open()
            if name in state.vm_handles:
                raise DuplicateNameError(f"session {state.serial} already has a VM named {name!r}")
            # Reserve the handle first so that what the VM registers while it is being built
            # (vCPUs, memory) is newer than the VM and is torn down before it.
            handle = state.table.insert(None, HandleKind.VM)
            try:
                vm = Vm(self, name, vcpus=vcpus, **kwargs)
            except BaseException:
                state.table.free(handle, HandleKind.VM)
                raise
            state.table.set_object(handle, HandleKind.VM, vm, self._vm_destructor(name, handle, vm))
            vm.handle = handle
            state.vm_handles[name] = handle
            return vm

    def _vm_destructor(self, name: str, handle: int, vm: Vm) -> Callable[[], None]:
        vm_handles = self._state.vm_handles

        def destroy() -> None:
            if vm_handles.get(name) == handle:
                del vm_handles[name]
            vm.destroy()

        return destroy

    def _forget_vm(self, vm: Vm) -> None:
        """Called by ``vm.destroy()``: free the handle of a VM destroyed directly by the user."""
        state = self._state
        handle = getattr(vm, "handle", 0)
        try:
            if state.table.lookup(handle, HandleKind.VM) is vm:
                state.table.free(handle, HandleKind.VM)  # its destructor's destroy() is a no-op
        except (InvalidHandleError, ObjectDestroyedError):
            pass  # already freed: destroy() came from this handle's destructor or from close()

    @property
    def vms(self) -> tuple[Vm, ...]:
        """The session's live VMs, oldest first."""
        state = self._state
        state.check_open()
        return tuple(
            vm
            for _, vm in state.table.items(HandleKind.VM)
            if vm is not None and not vm.destroyed
        )

    def destroy_vm(self, vm_or_handle: Vm | int) -> None:
        """Destroy one of this session's VMs, given the VM or its handle."""
        state = self._state
        state.check_open()
        if isinstance(vm_or_handle, int):
            handle = vm_or_handle
        else:
            found = getattr(vm_or_handle, "handle", None)
            if type(found) is not int:
                raise InvalidHandleError(f"{vm_or_handle!r} is not a VM of this session")
            handle = found
        try:
            vm = state.table.lookup(handle, HandleKind.VM)
            if vm is None:
                raise InvalidHandleError("that VM is still being created")
            if not isinstance(vm_or_handle, int) and vm is not vm_or_handle:
                raise InvalidHandleError(f"{vm_or_handle!r} is not a VM of this session")
            state.table.free(handle, HandleKind.VM)
        except (InvalidHandleError, ObjectDestroyedError) as exc:
            raise state.translate_closed(exc) from None

    # -- shared objects, factories, GIP (implemented in their own modules) --------------------

    def register_object(
        self,
        obj_type: Hashable,
        destructor: Callable[[RegisteredObject, Any, Any], Any] | None,
        user1: Any = None,
        user2: Any = None,
        *,
        access_policy: Callable[[RegisteredObject, Session], bool] | None = None,
    ) -> RegisteredObject:
        """Create a :class:`~hvjit.objects.RegisteredObject` with one usage by this session."""
        from hvjit.objects import RegisteredObject

        return RegisteredObject(
            self, obj_type, destructor, user1, user2, access_policy=access_policy
        )

    def register_factory(self, factory: Factory) -> int:
        """Publish ``factory`` process-wide until deregistered or this session closes."""
        from hvjit import factory as _factory

        return _factory.register_factory(self, factory)

    def deregister_factory(self, factory: Factory) -> None:
        """Withdraw a factory this session registered."""
        from hvjit import factory as _factory

        _factory.deregister_factory(self, factory)

    def query_factory(self, name: str, interface_uuid: uuid.UUID | str) -> Any:
        """Ask the factory called ``name`` for the interface ``interface_uuid``."""
        from hvjit import factory as _factory

        return _factory.query_factory(self, name, interface_uuid)

    def device_class(self, name: str) -> type:
        """The device class the factory ``name`` provides (``Vm.add_device`` asks this first)."""
        from hvjit import factory as _factory

        return _factory.query_factory(self, name, _factory.DEVICE_INTERFACE_UUID)

    def map_gip(self) -> np.ndarray:
        """A read-only view of the global info page (shape ``(1,)``, ``GIP_DTYPE``).

        Mapping again returns the same view. Unmapping (or closing the session) zeroes the
        view, so readers see ``magic == 0`` instead of stale times.
        """
        from hvjit import gip as _gip

        return _gip.map_into_session(self)

    def unmap_gip(self) -> None:
        """Unmap the session's GIP view (see :meth:`map_gip`)."""
        from hvjit import gip as _gip

        _gip.unmap_from_session(self)
