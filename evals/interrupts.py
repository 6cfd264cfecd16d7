"""SIGTERM stops a long command as Ctrl-C does.

A batch scheduler, ``timeout`` or ``kill`` sends SIGTERM; by default Python dies at once, skipping
every ``finally`` (locks, executors, a half-started sidecar). Inside ``sigterm_as_interrupt()``
SIGTERM raises ``KeyboardInterrupt`` instead, so the same clean-up runs as for Ctrl-C and every
written row is kept.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

INTERRUPTED = 130  # the shell's exit code for a command stopped by SIGINT


@contextmanager
def sigterm_as_interrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
