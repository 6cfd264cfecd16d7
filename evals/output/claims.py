"""Claiming an output for one run: checked, locked for the whole run, resumed only when the
settings match, and left as it was when the run is refused or stopped before its first row.

- ``claim_file``: a CSV and its JSON sidecar (``compare``, ``forms``, the frontier's timed rows);
- ``RunFolder``: a folder holding ``<kind>.csv``, its sidecar and the run's other files
  (``recall``, ``lm``);
- ``staged_folder``: a folder of results written as one step (``analyze``, ``convert``).

Every lock is an exclusive ``flock`` on a ``.lock`` file (``evals.locking``), removed when the run
ends however it ends; a second writer is refused at once with one line naming the lock.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from evals.errors import ResultsError
from evals.locking import LockHeld, acquire, lock_path, release
from evals.output.files import is_ours, read_sidecar, sidecar_is_ours, sidecar_path
from evals.output.paths import check_target, make_folder, remove_made, umask

@contextmanager
def locked(path: Path | str, flag: str = "--output", lock_file: Optional[Path | str] = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``path`` (the file ``<path>.lock``, or ``lock_file``) for the body
    and remove the lock file after it; a second writer gets a ``ResultsError`` naming the lock at
    once instead of waiting."""
    lf = Path(lock_file) if lock_file is not None else lock_path(path)
    try:
        fd = acquire(lf)
    except LockHeld:
        raise ResultsError(f"{flag}: {path} is being written by another run (lock {lf} is held); "
                           f"wait for it to finish or choose another {flag}") from None
    except OSError as e:  # the first write into the place: a read-only or full location ends here
        raise ResultsError(f"{flag}: cannot write in {lf.parent}: {e.strerror or e}") from None
    try:
        yield Path(path)
    finally:
        release(lf, fd)


@contextmanager
def claim_file(path: Path | str, *, resume: bool = False, columns: Sequence[str] = (), flag: str = "--output",
               can_resume: bool = True, exact: bool = False) -> Iterator[list[dict]]:
    """Everything a writing command does before its first measurement, and the lock it holds to
    the end: check ``path`` (a ``.csv``: its sidecar is the ``.json`` beside it), create its
    missing folders, lock it, refuse existing output unless ``resume``, and on ``resume`` check
    that the file is ours and every row whole and valid before repairing a torn last line. Yields
    the rows already in the file (empty for a new file); ``columns`` is the header it must have.

    A run stopped before its first row (Ctrl-C, SIGTERM, an error) removes the header-only CSV, the
    sidecar it wrote and the folders it created; one killed outright may leave them, and they are
    then replaced (they are provably ours and hold no row), by a rerun as by ``--resume``."""
    from evals.results import REQUIRED_COLUMNS, has_rows

    columns = columns or REQUIRED_COLUMNS
    path = check_target(path, flag, folder=False, suffix=".csv")
    made = make_folder(path.parent, flag)
    try:
        with locked(path, flag):
            kept = _claim_rows(path, resume, columns, flag, can_resume, exact)
            try:
                yield kept
            except BaseException:
                if not kept and not has_rows(path, columns):  # stopped before its first row: leave nothing
                    with suppress(FileNotFoundError):
                        path.unlink()
                    if sidecar_is_ours(path):
                        sidecar_path(path).unlink()
                raise
    except BaseException:
        if not path.exists():
            remove_made(made)
        raise


def _claim_rows(path: Path, resume: bool, columns, flag: str, can_resume: bool, exact: bool) -> list:
    """Under the lock: refuse what may not be replaced, and read the rows a resume keeps."""
    from evals.results import check_header, has_rows, read_rows, repair, resume_problem

    rows_there = has_rows(path, columns)
    side = sidecar_path(path)
    if rows_there and not resume:
        hint = "pass --resume to continue it, or choose another" if can_resume else "choose another"
        raise ResultsError(f"{flag}: {path} already exists; {hint} {flag}")
    if not rows_there and side.exists() and not sidecar_is_ours(path):
        raise ResultsError(f"{flag}: {side} already exists and would be replaced by this run's sidecar; choose "
                           f"another {flag}")
    if not rows_there:
        with suppress(FileNotFoundError):
            path.unlink()  # empty, or our header only
        return []
    check_header(path, columns, exact=exact)
    problem = resume_problem(path, columns)
    if problem:
        raise ResultsError(f"--resume: {path} {problem}; it was left untouched: fix or delete that line and "
                           f"resume, or start a new {flag}")
    repair(path)
    return read_rows(path, columns)


@dataclass
class RunFolder:
    """One run's folder: ``csv`` (rows appended whole), its sidecar, and the other files the
    command writes. Use as a context manager: entering checks, locks and reads the kept rows."""

    path: Path
    kind: str                       # "recall", "lm": the CSV is <kind>.csv, the lock <kind>.lock
    columns: Sequence[str]
    resume: bool = False
    settings: dict = field(default_factory=dict)  # what a resumed run must share with the kept rows
    flag: str = "--output-dir"
    header: dict = field(default_factory=dict)    # recorded in the sidecar from the start
    recorded: Optional[Callable] = None           # sidecar -> the settings it records (default: resume_settings)
    rows: list = field(default_factory=list)      # the rows already there (resume)
    _made: list = field(default_factory=list)
    _fd: Optional[int] = None

    @property
    def csv(self) -> Path:
        return self.path / f"{self.kind}.csv"

    @property
    def lock(self) -> Path:
        return self.path / f"{self.kind}.lock"

    def __enter__(self) -> "RunFolder":
        self.path = check_target(self.path, self.flag, folder=True)
        self._refuse_before_lock()
        self._made = make_folder(self.path, self.flag)
        try:
            self._fd = acquire(self.lock)
        except LockHeld:
            remove_made(self._made)
            raise ResultsError(f"{self.flag} {self.path} is in use: another {self.kind} run holds {self.lock}; "
                               f"wait for it or choose another folder") from None
        except OSError as e:
            remove_made(self._made)
            raise ResultsError(f"{self.flag} {self.path}: cannot lock {self.lock} ({e.strerror or e})") from None
        try:
            self._claim()
        except BaseException:
            self._release(clean=True)
            raise
        return self

    def _refuse_before_lock(self) -> None:
        """The read-only refusals, so that a folder we refuse never gets even a lock file."""
        if self.resume:
            if self.lock.exists() and not self.csv.exists():
                return  # a run is starting there: the lock says so once we try it
            if not self.csv.is_file():
                raise ResultsError(f"--resume: {self.path} holds no {self.csv.name}; it is not a {self.kind} run "
                                   f"(left untouched)")
            self._check_header()
        elif self.path.is_dir() and not self.lock.exists() and self._holds_something():
            raise ResultsError(f"{self.flag} {self.path} already exists and is not empty; pass --resume to continue "
                               f"a {self.kind} run there, or choose a new folder")

    def _check_header(self) -> None:
        from evals.results import check_header

        check_header(self.csv, self.columns, exact=True)

    def _holds_something(self) -> bool:
        """Anything but the lock and the row-less sidecar of a run killed before its first row."""
        others = [p for p in self.path.iterdir() if p.name != self.lock.name]
        if [p.name for p in others] == [sidecar_path(self.csv).name]:
            try:
                return not is_ours(read_sidecar(self.csv))
            except ResultsError:
                return True
        return bool(others)

    def _claim(self) -> None:
        """Under the lock: check again, read the kept rows, prove the settings, record them."""
        from evals import results
        from evals.machine import environment
        from evals.output.files import write_sidecar
        from evals.resume import check_same_settings

        if not self.resume:
            if self._holds_something():
                raise ResultsError(f"{self.flag} {self.path} already exists and is not empty; pass --resume to "
                                   f"continue")
            write_sidecar(self.csv, dict(environment(), **self.header, resume_settings=self.settings))
            return
        if not self.csv.is_file():
            raise ResultsError(f"--resume: {self.path} holds no {self.csv.name}; it is not a {self.kind} run "
                               f"(left untouched)")
        self._check_header()
        meta = read_sidecar(self.csv)
        old = self.recorded(meta) if self.recorded else (meta.get("resume_settings") if isinstance(meta, dict)
                                                         else None)
        check_same_settings(old, self.settings, self.path)
        results.repair(self.csv)
        self.rows = results.read_rows(self.csv, self.columns)

    def append(self, row: dict) -> None:
        from evals.results import append_row

        append_row(self.csv, row, self.columns)

    def __exit__(self, kind, err, tb) -> None:
        self._release(clean=kind is not None)

    def _release(self, *, clean: bool) -> None:
        """Let go of the lock; a run that stopped before its first row leaves nothing behind."""
        if clean and not self.resume and not self.csv.exists():
            with suppress(OSError):
                sidecar_path(self.csv).unlink()
        if self._fd is not None:
            release(self.lock, self._fd)
            self._fd = None
        if clean and not self.resume and not self.csv.exists():
            remove_made(self._made)


@contextmanager
def staged_folder(out: Path, flag: str, *, replaceable, what: str = "an earlier run of this command") -> Iterator[Path]:
    """Write a whole folder of results as one step: the body writes into a hidden folder beside
    ``out``; when it ends well, that folder becomes ``out`` (its files replace an earlier run's
    files of the same names, if ``replaceable(out)`` says ``out`` holds one); when it does not
    (an error, Ctrl-C, SIGTERM), the hidden folder is removed and ``out`` is as it was. A second
    writer is refused while the first holds the lock (``<out>.lock``, beside it)."""
    import shutil

    out = check_target(out, flag, folder=True)
    if out.is_dir() and any(out.iterdir()) and not replaceable(out):
        raise ResultsError(f"{flag}: {out} holds files that are not {what}; choose a new or empty folder")
    made = make_folder(out.parent, flag)
    lock = out.parent / f"{out.name}.lock"
    try:
        fd = acquire(lock)
    except (LockHeld, OSError) as e:
        remove_made(made)
        held = isinstance(e, LockHeld)
        raise ResultsError(f"{flag}: {out} is being written by another run (lock {lock} is held); wait for it or "
                           f"choose another folder" if held else f"{flag}: cannot write in {out.parent}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(stage, 0o777 & ~umask())
        yield stage
        if out.is_dir():
            for p in stage.iterdir():
                os.replace(p, out / p.name)
            stage.rmdir()
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if not out.exists():
            remove_made(made)
        raise
    finally:
        release(lock, fd)
