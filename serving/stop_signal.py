"""Ending a model's requests as soon as its server is told to stop.

Triton answers SIGTERM by waiting, up to its exit timeout, for in-flight requests to finish before it
unloads the models, and a decoupled model's stream is in flight until its last response: a long
answer outlives the timeout, Triton exits "immediately" with the stub still sending (2.51 then aborts
on a corrupted heap) and the client's stream dies without a word. So the launcher signals the engine
model's stub first, and the model ends every request with "server is shutting down" (UNAVAILABLE: retry
elsewhere) before Triton starts waiting.

The stub ignores SIGTERM and its main thread waits in C++, where a Python signal handler would not
run until the next request: Python's C-level handler writes the signal to a wakeup pipe at once, and
a thread of ours reads it.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable


def on_sigterm(callback: Callable[[], None]) -> bool:
    """Run ``callback`` on a thread of its own when this process receives SIGTERM (once). Returns False,
    doing nothing, off the main thread (signal handlers can only be installed there)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the wakeup pipe carries it; this only replaces SIG_IGN
    signal.siginterrupt(signal.SIGTERM, False)  # the stub's own waits restart instead of failing
    signal.set_wakeup_fd(write_fd)

    def wait() -> None:
        while signal.SIGTERM not in os.read(read_fd, 64):
            pass
        callback()

    threading.Thread(target=wait, name="sigterm", daemon=True).start()
    return True
