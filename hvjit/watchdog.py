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
                self._thread = threading.Thread(target=self._serve, name="hvjit-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._callbacks.pop(token, None)  # its heap entry is skipped when it comes up

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
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
