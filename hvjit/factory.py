"""Component factories, after SUPDrv's ``SUPDRVFACTORY``.

A factory has a ``name`` and answers interface queries by UUID
(``query_interface(session, uuid) -> object or None``). Factories live in one process-wide
registry, so every session can query every factory, but each registration belongs to the
session that made it: only that session may withdraw it, and it is withdrawn when that session
closes. hvjit's own device models are published this way; a user adds a device by registering a
factory that answers :data:`DEVICE_INTERFACE_UUID`.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from hvjit.errors import (  # noqa: F401  (the lookup errors are part of this module's API)
    AccessDeniedError,
    DuplicateNameError,
    FactoryNotFoundError,
    HvjitError,
    InterfaceNotFoundError,
    InvalidHandleError,
    InvalidNameError,
)
from hvjit.handles import HandleKind

Session = Any  # hvjit.session.Session: not imported, the session imports this module

FACTORY_NAME_MAX = 32

# "A device model that can be attached to a VM":
# uuid5(NAMESPACE_URL, "urn:hvjit:interface:device-model:1"), fixed here so it never changes.
DEVICE_INTERFACE_UUID = uuid.UUID("26137597-34f0-56b5-9ecf-954de5dc2730")


class Factory:
    """Base class for component factories: override :meth:`query_interface`."""

    def __init__(self, name: str):
        validate_factory_name(name)
        self.name = name

    def query_interface(self, session: Session, interface_uuid: uuid.UUID) -> Any:
        """The object implementing ``interface_uuid`` for ``session``, or None."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class SimpleFactory(Factory):
    """A factory built from a table ``{interface uuid: constructor(session) -> object}``."""

    def __init__(self, name: str, interfaces: Mapping[uuid.UUID | str, Callable[[Session], Any]]):
        super().__init__(name)
        self._interfaces = {as_uuid(key): make for key, make in interfaces.items()}
        for key, make in self._interfaces.items():
            if not callable(make):
                raise TypeError(f"the constructor for interface {key} is not callable")

    @property
    def interfaces(self) -> frozenset[uuid.UUID]:
        """The interface UUIDs this factory answers."""
        return frozenset(self._interfaces)

    def query_interface(self, session: Session, interface_uuid: uuid.UUID) -> Any:
        make = self._interfaces.get(interface_uuid)
        return make(session) if make is not None else None


def validate_factory_name(name: object) -> None:
    """Raise :class:`InvalidNameError` unless ``name`` is 1..32 printable characters."""
    if not isinstance(name, str):
        raise InvalidNameError(f"a factory name is a string, not {type(name).__name__}")
    if not name:
        raise InvalidNameError("a factory name cannot be empty")
    if len(name) > FACTORY_NAME_MAX:
        raise InvalidNameError(
            f"factory name {name[:40]!r}... is {len(name)} characters, at most {FACTORY_NAME_MAX}"
        )
    if not name.isprintable():
        raise InvalidNameError(f"factory name {name!r} has unprintable characters")


def as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    """``value`` as a :class:`uuid.UUID` (strings in any form ``uuid.UUID`` accepts)."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        return uuid.UUID(value)
    raise TypeError(f"an interface id is a uuid.UUID or a string, not {type(value).__name__}")


@dataclass(frozen=True)
class _Registration:
    factory: Any
    owner_session_id: int
    handle: int


_registry: dict[str, _Registration] = {}
_registry_lock = threading.Lock()


def factory_names() -> list[str]:
    """Names of all registered factories, sorted."""
    with _registry_lock:
        return sorted(_registry)


def register_factory(session: Session, factory: Any) -> int:
    """Publish ``factory`` under ``factory.name``; returns its handle in ``session``.

    Restricted sessions cannot register (the registry is visible to every session).
    """
    state = session._state
    state.check_open()
    if state.restricted:
        raise AccessDeniedError("a restricted session cannot register factories")
    name = getattr(factory, "name", None)
    validate_factory_name(name)
    assert isinstance(name, str)  # validate_factory_name raised otherwise
    if not callable(getattr(factory, "query_interface", None)):
        raise TypeError(f"{factory!r} has no query_interface(session, uuid) method")
    with _registry_lock:
        if name in _registry:
            raise DuplicateNameError(f"a factory named {name!r} is already registered")
        handle = state.register(
            factory, HandleKind.FACTORY, lambda: _withdraw(name, factory)
        )
        _registry[name] = _Registration(factory, state.serial, handle)
    return handle


def _withdraw(name: str, factory: Any) -> None:
    """Remove ``factory``'s registration if it is still the one under ``name``."""
    with _registry_lock:
        registration = _registry.get(name)
        if registration is not None and registration.factory is factory:
            del _registry[name]


def deregister_factory(session: Session, factory: Any) -> None:
    """Withdraw ``factory``; only the session that registered it may."""
    state = session._state
    state.check_open()
    name = getattr(factory, "name", None)
    if not isinstance(name, str):
        raise FactoryNotFoundError(f"{factory!r} is not registered")
    with _registry_lock:
        registration = _registry.get(name)
        if registration is None or registration.factory is not factory:
            raise FactoryNotFoundError(f"{factory!r} is not registered")
        if registration.owner_session_id != state.serial:
            raise AccessDeniedError(
                f"{factory!r} was registered by session {registration.owner_session_id}, "
                f"not {state.serial}"
            )
        del _registry[name]
    # The destructor finds the registration already gone. If the session closed meanwhile,
    # its teardown has freed the handle already.
    try:
        state.table.free(registration.handle, HandleKind.FACTORY)
    except InvalidHandleError:
        if not state.closed:
            raise


def query_factory(session: Session, name: str, interface_uuid: uuid.UUID | str) -> Any:
    """The object the factory ``name`` returns for ``interface_uuid``.

    Raises :class:`FactoryNotFoundError` or :class:`InterfaceNotFoundError`.
    """
    session._state.check_open()
    validate_factory_name(name)
    interface_uuid = as_uuid(interface_uuid)
    with _registry_lock:
        registration = _registry.get(name)
    if registration is None:
        raise FactoryNotFoundError(f"no factory named {name!r}")
    # Outside the lock: a factory may itself query other factories.
    interface = registration.factory.query_interface(session, interface_uuid)
    if interface is None:
        raise InterfaceNotFoundError(f"factory {name!r} does not provide interface {interface_uuid}")
    return interface
