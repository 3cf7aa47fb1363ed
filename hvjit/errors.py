"""The hvjit exception hierarchy.

errno stays at the bottom (the trampoline returns ``-errno``); the layers above turn it into
these types, each carrying what a user needs to act: the operation, the errno, the object.
"""

from __future__ import annotations

import errno as _errno
import os


class HvjitError(Exception):
    """Base of every error hvjit raises on purpose."""


class KvmUnavailableError(HvjitError):
    """``/dev/kvm`` cannot be used (missing, no permission, wrong API version)."""


class KvmError(HvjitError, OSError):
    """A KVM ioctl failed: carries the operation name and the errno."""

    def __init__(self, op: str, err: int, detail: str = ""):
        self.op = op
        msg = f"{op} failed: {_errno.errorcode.get(err, err)} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        OSError.__init__(self, err, msg)

    def __str__(self) -> str:
        return self.strerror or ""


class CapabilityError(HvjitError):
    """The host's KVM lacks a capability the requested feature needs."""


class UnsupportedError(CapabilityError, NotImplementedError):
    """This host cannot provide a control: ``what`` names it, ``flavour`` the host's KVM
    (``vmx``, ``svm``, ``pvm``, ...), ``detail`` why."""

    def __init__(self, what: str, flavour: str, detail: str = ""):
        self.what, self.flavour, self.detail = what, flavour, detail
        super().__init__(f"{what} is not available on this {flavour} KVM host" + (f": {detail}" if detail else ""))


class MemoryMapError(HvjitError, ValueError):
    """Overlapping, misaligned or otherwise invalid guest memory layout."""


class GuestMemoryError(HvjitError, IndexError):
    """A guest-physical (or guest-linear) access outside guest memory."""


class GuestFault(GuestMemoryError):
    """A guest-linear access hit a translation fault (what the guest would see as #PF).

    ``translation`` is the page walk's result: faulting address, status and error code.
    """

    def __init__(self, translation):
        self.translation = translation
        t = translation
        super().__init__(f"{t.status.name} at guest-linear {t.gla:#x} (error code {t.error_code:#x})")


class RegisterError(HvjitError, KeyError):
    """An unknown register name or an invalid register value."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ObjectDestroyedError(HvjitError):
    """The VM, vCPU or device was destroyed and can no longer be used."""


class SessionClosedError(ObjectDestroyedError):
    """The session was closed."""


class InvalidHandleError(HvjitError, LookupError):
    """A handle is nil, stale, forged, of the wrong kind or from another session."""


class AccessDeniedError(HvjitError, PermissionError):
    """The session may not do this (restricted session, foreign object)."""


class HostMsrUnavailableError(HvjitError):
    """``/dev/cpu/N/msr`` is absent (no msr driver, not exposed, no such CPU)."""


class VersionMismatchError(HvjitError):
    """The requested interface version is incompatible with this library."""


class DuplicateNameError(HvjitError, ValueError):
    """A name (factory, VM) is already registered."""


class InvalidNameError(HvjitError, ValueError):
    """A name (factory, device) is empty, too long, not printable or not a string."""


class FactoryNotFoundError(HvjitError, LookupError):
    """No factory is registered under that name (or that factory is not registered)."""


class InterfaceNotFoundError(HvjitError, LookupError):
    """The factory exists but does not provide the requested interface."""


class LoaderError(HvjitError, ValueError):
    """A guest image is malformed or does not fit the guest."""


class DecodeError(HvjitError, ValueError):
    """Bytes could not be decoded as an x86 instruction."""


class EmulationError(HvjitError):
    """KVM could not run an instruction and hvjit could not emulate it.

    ``report`` is an :class:`hvjit.exits.EmulationReport` with rip, mode, bytes and the
    decoded text.
    """

    def __init__(self, report):
        self.report = report
        super().__init__(str(report))


class GuestTimeoutError(HvjitError, TimeoutError):
    """The guest ran past the user's timeout (the watchdog kicked it out)."""


class SnapshotError(HvjitError):
    """A snapshot cannot be taken, read or restored: a corrupt, truncated or foreign file, a
    version this hvjit does not read, a VM that does not match, or state KVM refuses."""


class InjectionError(HvjitError, ValueError):
    """An event cannot be injected: an invalid vector or error code, an event the vCPU
    cannot take now, or a way of injecting that the VM's configuration excludes."""


class CpuidError(HvjitError, ValueError):
    """An unknown CPUID feature name, one KVM derives itself, or a leaf the vCPU lacks."""


class MsrTrapError(HvjitError, ValueError):
    """An MSR that cannot be trapped (x2APIC range, not 32-bit) or too many filter ranges."""
