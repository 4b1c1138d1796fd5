"""Background threads that signals never land on.

The kernel delivers a process-directed signal to any thread that does not
block it. Python runs signal handlers in the main thread only, and only
when it next executes bytecode: a signal that lands on a background thread
leaves the main thread asleep in its system call (the wrapper's wait for
the command), and the handler never runs. Threads started here block every
signal, so that signals always reach the main thread and interrupt it.
"""

from __future__ import annotations

import signal
import threading


def start_without_signals(thread: threading.Thread) -> None:
    """Start ``thread`` with every signal blocked in it (it inherits the mask)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
