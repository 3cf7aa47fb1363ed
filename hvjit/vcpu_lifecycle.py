"""A vCPU's lifecycle: who runs it, and the requests other threads make of that run.

One :class:`RunControl` per vCPU (bhyve's per-vCPU activate/suspend state). A run registers
its thread here before it first enters the guest and unregisters after it last leaves; other
threads ask it to stop, pause or suspend and kick it out of ``KVM_RUN``. The rules that make
this safe:

- Requests are set under the lock, then the thread is kicked (``immediate_exit`` plus a
  signal). The run clears ``immediate_exit`` *before* it reads the requests, so a kick either
  lands in the requests it reads or in the ``immediate_exit`` the next ``KVM_RUN`` sees:
  no stop is lost.
- A thread is only signalled while it is registered, and it unregisters under the same lock,
  so no signal goes to a thread that has left (or exited).
- Teardown waits until no run is registered; the vCPU's fd and ``kvm_run`` page (and the
  VM's memory) are released only then. A teardown requested from inside the run's own
  thread (a Python handler destroying its VM) is deferred to the end of that run.
"""

from __future__ import annotations

import contextvars
import enum
import threading
import time
from typing import Any, Callable, Optional

from . import _trampoline as _t
from .abi import SuspendHow
from .errors import AccessDeniedError, HvjitError

# The session the current code acts for (set by ``with session:`` / ``session.acting()``).
# A restricted session may drive only its own VMs; see :func:`authorize`.
ACTING_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar("hvjit_acting_session", default=None)


def authorize(vm, what: str) -> None:
    """Refuse a control-plane call on ``vm`` made for a restricted session that does not own it."""
    acting = ACTING_SESSION.get()
    if acting is None or not getattr(acting, "restricted", False):
        return
    if vm._session is not acting:
        raise AccessDeniedError(f"{what}: a restricted session may control only its own VMs "
                                f"(VM {vm.name!r} belongs to another session)")

# How often a waiting teardown or pause kicks again (a signal can land just before KVM_RUN
# re-enters; immediate_exit covers that, this covers a run stuck in a slow Python handler).
KICK_INTERVAL = 0.01

_kick_signal_ready = False
_kick_signal_lock = threading.Lock()


def ensure_kick_signal() -> None:
    """Install the no-op handler of the signal that kicks a thread out of KVM_RUN (once)."""
    global _kick_signal_ready
    with _kick_signal_lock:
        if not _kick_signal_ready:
            _t.check(_t.lib.hvt_sys_init_kick_signal(), "sigaction(kick signal)")
            _kick_signal_ready = True


class VcpuState(str, enum.Enum):
    """What a vCPU is doing, as another thread sees it."""

    STOPPED = "stopped"  # no run is active
    RUNNING = "running"  # a run is active and not parked
    PAUSED = "paused"  # paused: a run is parked, or the next run will park at once


class VcpuBusyError(HvjitError, RuntimeError):
    """The vCPU is running in another thread: pause or stop it first."""


class Request(enum.IntEnum):
    """What a run must do next, most urgent first (the value orders them)."""

    NONE = 0
    PAUSE = 1
    STOP = 2
    SUSPEND = 3
    TEARDOWN = 4


class RunControl:
    """The lock, the requests and the running thread of one vCPU."""

    def __init__(self, run_page: Callable[[], object]):
        # The kvm_run pointer (ffi), read under the lock each time: NULL once released.
        self._run_page = run_page
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.thread: Optional[int] = None  # ident of the thread inside run()
        self.parked = False
        self.pause_requested = False
        self.stop_requested = False
        self.suspend_how: Optional[SuspendHow] = None
        self.teardown_requested = False
        self.on_last_exit: Optional[Callable[[], None]] = None  # deferred teardown

    # ---- the running thread's side -------------------------------------------------------

    def enter(self) -> None:
        """Register the calling thread as the one running this vCPU."""
        with self.lock:
            if self.teardown_requested:
                raise HvjitError("the vCPU is being destroyed")
            if self.thread is not None:
                raise VcpuBusyError("this vCPU is already running in another thread")
            self.thread = threading.get_ident()
            self.stop_requested = False  # a stop asks the *current* run to end

    def leave(self) -> None:
        """Unregister; runs a deferred teardown when one was asked for meanwhile."""
        with self.lock:
            self.thread = None
            self.parked = False
            deferred, self.on_last_exit = self.on_last_exit, None
            self.changed.notify_all()
        if deferred is not None:
            deferred()

    def pending(self, vm_request: Request = Request.NONE) -> Request:
        """The most urgent request for the current run (``vm_request``: the VM's own)."""
        with self.lock:
            mine = (Request.TEARDOWN if self.teardown_requested else
                    Request.SUSPEND if self.suspend_how is not None else
                    Request.STOP if self.stop_requested else
                    Request.PAUSE if self.pause_requested else Request.NONE)
        return max(mine, vm_request)

    def park(self, still_paused: Callable[[], bool], deadline: Optional[float]) -> None:
        """Wait while paused (until resumed, a stronger request, or ``deadline``)."""
        with self.lock:
            self.parked = True
            self.changed.notify_all()
            try:
                while still_paused() and not (self.stop_requested or self.teardown_requested
                                              or self.suspend_how is not None):
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        return
                    self.changed.wait(wait if wait is None else min(wait, 0.5))
            finally:
                self.parked = False
                self.changed.notify_all()

    # ---- other threads' side -------------------------------------------------------------

    def kick_locked(self) -> None:
        """Make the registered thread leave KVM_RUN now (call with the lock held)."""
        run = self._run_page()
        if self.thread is not None and run != _t.ffi.NULL:
            _t.lib.hvt_vcpu_kick(self.thread, run)
        self.changed.notify_all()  # a parked run re-reads its requests

    def request(self, what: Request, how: Optional[SuspendHow] = None) -> bool:
        """Ask the current run (if any) to stop/suspend/pause/tear down; True if one runs."""
        with self.lock:
            if what == Request.PAUSE:
                self.pause_requested = True
            elif what == Request.STOP:
                if self.thread is None:
                    return False  # nothing to stop; a later run is not affected
                self.stop_requested = True
            elif what == Request.SUSPEND:
                self.suspend_how = how
            elif what == Request.TEARDOWN:
                self.teardown_requested = True
            self.kick_locked()
            return self.thread is not None

    def resume(self) -> None:
        with self.lock:
            self.pause_requested = False
            self.changed.notify_all()

    def _kick_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Kick the run every KICK_INTERVAL until ``done()`` (lock held); False on timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.kick_locked()
            self.changed.wait(min(left, KICK_INTERVAL))
        return True

    def wait_parked_or_idle(self, timeout: float) -> bool:
        """After a pause request: wait until the run parks (or no run is active)."""
        with self.lock:
            return self._kick_until(lambda: self.thread is None or self.parked, timeout)

    def release_when_idle(self, release: Callable[[], None], timeout: float) -> bool:
        """Call ``release`` once no run is active: now (True) or, if a run is still active
        after ``timeout`` or is the caller itself, when that run leaves (False)."""
        me = threading.get_ident()
        with self.lock:
            self._kick_until(lambda: self.thread is None or self.thread == me, timeout)
            if self.thread is not None:
                self.on_last_exit = release
                return False
        release()
        return True

    def state(self) -> VcpuState:
        with self.lock:
            if self.pause_requested and (self.parked or self.thread is None):
                return VcpuState.PAUSED
            if self.thread is not None:
                return VcpuState.PAUSED if self.parked else VcpuState.RUNNING
            return VcpuState.STOPPED

    def check_state_access(self) -> None:
        """State ioctls from another thread would block until the guest exits: refuse them
        while a run is active and not parked."""
        with self.lock:
            if self.thread is not None and self.thread != threading.get_ident() and not self.parked:
                raise VcpuBusyError("the vCPU is running in another thread: pause() it before "
                                    "reading or changing its state")
