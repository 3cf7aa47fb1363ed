"""Threads hvjit starts, which never take Ctrl-C.

Linux hands a process-wide SIGINT to any thread that does not block it. Python runs the
handler (KeyboardInterrupt) in the main thread only, and only once that thread runs Python
code again: a main thread waiting in a join, or inside KVM_RUN, would not notice a SIGINT a
helper thread took. So every thread hvjit starts blocks SIGINT from its first instruction
(the mask is set around ``start``: a new thread inherits its creator's), and the signal goes
to a thread that wants it — the caller's.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

QUIET = {signal.SIGINT}


def start(target: Callable[..., object], name: str, args: tuple = (), *, daemon: bool = True) -> threading.Thread:
    """Start ``target(*args)`` in a new thread that blocks SIGINT; returns the thread."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=daemon)
    start_quiet(thread)
    return thread


def start_quiet(thread: threading.Thread) -> None:
    """Start ``thread`` blocking SIGINT (for a caller that must know the thread even when a
    KeyboardInterrupt comes in the middle of starting it)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, QUIET)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
