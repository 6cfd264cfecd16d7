"""One way to stop: SIGINT and SIGTERM end every command the same way, from start-up on.

``install()`` runs first thing when ``cli`` is imported (and again in ``cli.main``), before typer,
torch or anything slow is imported. From then on both signals raise ``Interrupted`` (a ``KeyboardInterrupt``, so every ``finally`` runs:
locks released, executors and workers stopped, a run stopped before its first row cleaned up).
``cli.main`` catches it and prints one line, ``interrupted: <what was kept>``, and exits 130 for
SIGINT or 143 for SIGTERM, the shell's codes for a process those signals ended.

What the line says is the command's to set: ``hint("every finished row is in X; --resume
continues it")`` once it has claimed its output, so a stop before that point says truthfully that
nothing was written. ``hint`` may be called again as the command moves on (to the report, say).

A second signal while the clean-up runs is ignored, so the clean-up finishes instead of being
torn off half-way; a third ends the process at once (``os._exit``), for a clean-up that hangs.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

TYPE_CHECKING = False  # typing itself is not imported: this module is the first the command line loads
if TYPE_CHECKING:
    from typing import Iterator, Optional

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NOTHING_WRITTEN = "nothing was written"

_hint: list = [NOTHING_WRITTEN]
_stopping: list = [0]


class Interrupted(KeyboardInterrupt):
    """A stop by SIGINT or SIGTERM; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"signal {int(signum)}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)


_deferring: list = []  # depth of open ``deferred()`` blocks
_pending: list = []    # the signal a deferred block holds back


def _handler(signum, frame):
    _stopping[0] += 1
    if _stopping[0] == 1 and _deferring:
        _pending.append(signum)  # raised when the block ends (``deferred``)
        return
    if _stopping[0] == 1:
        raise Interrupted(signum)
    if _stopping[0] >= 3:  # the clean-up hangs: stop now, as the user insists
        os._exit(EXIT_CODES.get(signum, 130))


def install() -> None:
    """Make SIGINT and SIGTERM raise ``Interrupted`` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _stopping[0] = 0
    _hint[0] = NOTHING_WRITTEN
    _pending.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a SIGINT or SIGTERM that arrives in the block until the block ends, then raise it.

    For importing torch: parts of its import run Python from C++ (pybind11), and an exception
    raised there is not a Python exception to C++: the process aborts ("terminate called after
    throwing an instance of 'pybind11::error_already_set'") instead of ending in one line."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _pending and not _deferring:
        raise Interrupted(_pending.pop())


def exit_now(err: BaseException) -> None:
    """Stop at once, as a command stopped before it began: the one line, and the exit code."""
    import sys

    print(f"interrupted: {current_hint()}", file=sys.stderr)
    raise SystemExit(exit_code(err))


def hint(text: str) -> None:
    """What the interrupt line will say was kept (and how to go on)."""
    _hint[0] = text


def current_hint() -> str:
    return _hint[0]


def exit_code(err: BaseException) -> int:
    """130 for Ctrl-C (a plain ``KeyboardInterrupt`` too), 143 for SIGTERM."""
    return err.exit_code if isinstance(err, Interrupted) else 130


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For code run outside ``cli.main`` (a test calling a command's function directly): SIGTERM
    raises ``Interrupted`` for the block, as it does for every command run from the CLI."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old: Optional[object] = signal.signal(signal.SIGTERM, _handler)
    _stopping[0] = 0
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
