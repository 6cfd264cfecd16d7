"""Output locks: one writer per output, and no lock file left behind.

``locked(path)`` holds an exclusive ``flock`` on ``<path>.lock`` for a block and removes the lock
file when the block ends, however it ends (an error, Ctrl-C, SIGTERM turned into an exception). A
second writer is refused at once with one line naming the lock. The lock is the same kind of lock
that the ``filelock`` package takes on Linux, so either can hold it against the other.

Why not ``filelock`` itself: on Unix it leaves ``<path>.lock`` on disk after every run. Removing
the file safely needs one more step, done here: the holder unlinks the file *before* it lets go,
and a taker that wins the lock on a file that was unlinked meanwhile (it opened the old file just
before the unlink) sees that its open file is no longer the one at the path, and tries again.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator


class LockHeld(Exception):
    """Another process holds the lock."""


def lock_path(path: Path | str) -> Path:
    return Path(str(path) + ".lock")


def acquire(lock_file: Path | str, attempts: int = 5) -> int:
    """An open descriptor holding the exclusive lock of ``lock_file`` (created if missing);
    ``LockHeld`` if another process has it; ``OSError`` if the place cannot be written."""
    lock_file = str(lock_file)
    for _ in range(attempts):
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockHeld(lock_file) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder had already removed: take the new one
    raise LockHeld(lock_file)


def release(lock_file: Path | str, fd: int) -> None:
    """Remove the lock file, then let go of the lock (in this order; see the module docstring)."""
    with suppress(OSError):
        os.unlink(lock_file)
    os.close(fd)


@contextmanager
def holding(lock_file: Path | str) -> Iterator[Path]:
    """Hold ``lock_file`` for the block, and remove it after (``LockHeld`` / ``OSError`` as ``acquire``)."""
    lf = Path(lock_file)
    fd = acquire(lf)
    try:
        yield lf
    finally:
        release(lf, fd)
