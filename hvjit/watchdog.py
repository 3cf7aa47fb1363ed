"""One timer thread for every watchdog in the process.

A ``threading.Timer`` per run costs a thread start (0.3-1.5 ms here) — more than many whole
guest runs. Instead every armed deadline goes into one heap served by one daemon thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable

from . import helper_threads


class _Scheduler:
    def __init__(self):
        self._heap: list[tuple[float, int]] = []
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread = None

    def arm(self, delay: float, callback: Callable[[], None]) -> int:
        """Call ``callback`` (on the timer thread) after ``delay`` seconds unless cancelled."""
        token = next(self._ids)
        with self._cond:
            self._callbacks[token] = callback
            heapq.heappush(self._heap, (time.monotonic() + delay, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = helper_threads.start(self._serve, "hvjit-watchdog")
            self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._callbacks.pop(token, None)  # its heap entry is skipped when it comes up

    def stop(self) -> None:
        """End the timer thread; the next :meth:`arm` starts another (deadlines still armed
        wait for it). For a process about to fork (`hvjit serve`): a child gets only the
        forking thread, and a lock another thread held stays locked in it."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                while self._thread is me and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._thread is not me:
                    return
                _, token = heapq.heappop(self._heap)
                callback = self._callbacks.pop(token, None)
            if callback is not None:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - a failing kick must not kill the timer thread
                    pass


_scheduler = _Scheduler()
arm = _scheduler.arm
cancel = _scheduler.cancel
stop = _scheduler.stop
