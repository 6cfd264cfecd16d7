"""The output layer every writing command goes through: where a run may write, how it claims the
place, and how it writes there so that nothing is lost, half-written or touched unasked.

Paths (``check_target``, before any work):
- no component longer than the file system allows, no path longer than ``PATH_MAX``;
- not a symbolic link (replacing one would write somewhere the user did not name, or nowhere:
  a link to ``/dev/full``, a loop), not a device or other special file;
- not under a regular file; a file where a file goes and a folder where a folder goes.

A run folder (``RunFolder``: recall, lm, and the commands that write a folder of files): checked,
then locked (``<folder>/<kind>.lock``) for the whole run. A new run needs a new or empty folder.
``--resume`` needs a folder holding this kind's CSV with exactly its header, and the settings the
run recorded must equal this run's; each that differs is named, and the folder is left as it
was. A run stopped before its first row leaves no file behind, and no folder it created.

Writes: whole files through a temporary file and a rename (``evals.files.write_bytes``), with the
mode the user's umask gives a new file; rows appended whole (``evals.results.append_row``).
"""

from __future__ import annotations

import os
import stat
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from evals.errors import ResultsError

PATH_MAX = 4096


def _name_max(where: Path) -> int:
    """The longest file name the file system at ``where`` (or its nearest existing parent) takes."""
    for p in [where, *where.parents]:
        with suppress(OSError):
            if p.exists():
                return os.pathconf(p, "PC_NAME_MAX")
    return 255


def check_length(path: Path, flag: str) -> None:
    """Refuse a path the operating system would refuse as too long, before anything is made."""
    limit = _name_max(path.parent)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise ResultsError(f"{flag}: a name in {_short(path)} is {len(os.fsencode(part))} bytes long; this "
                               f"file system allows at most {limit} per name")
    if len(os.fsencode(str(path.absolute()))) >= PATH_MAX:
        raise ResultsError(f"{flag}: {_short(path)} is longer than the {PATH_MAX - 1} bytes a path may have")


def _short(path: Path, keep: int = 80) -> str:
    text = str(path)
    return text if len(text) <= keep else f"{text[:keep // 2]}...{text[-keep // 2:]}"


def check_target(path: Path | str, flag: str, *, folder: bool) -> Path:
    """A place a command may write: a file (``folder=False``) or a folder. Nothing is created."""
    path = Path(path)
    check_length(path, flag)
    if path.is_symlink():
        raise ResultsError(f"{flag}: {path} is a symbolic link; give the path it should be written at, not a link")
    if path.exists():
        mode = path.stat().st_mode
        if folder and not stat.S_ISDIR(mode):
            raise ResultsError(f"{flag}: {path} is {_kind(mode)}, not a folder; give a new or empty folder")
        if not folder and stat.S_ISDIR(mode):
            raise ResultsError(f"{flag}: {path} is a folder; give a file path such as {path / ('run' + '.csv')}")
        if not folder and not stat.S_ISREG(mode):
            raise ResultsError(f"{flag}: {path} is {_kind(mode)}, not a regular file; give a file path")
    for parent in path.parents:
        if parent.is_symlink() and not parent.exists():
            raise ResultsError(f"{flag}: {parent} is a broken symbolic link, so nothing can be written under it")
        if parent.exists():
            if not parent.is_dir():
                raise ResultsError(f"{flag}: {parent} is a file, so nothing can be written under it ({path})")
            break
    return path


def check_source(path: Path | str, flag: str, *, folder: bool = False, what: str = "file") -> Path:
    """A place a command reads: it must exist and be a regular file (or a folder)."""
    path = Path(path)
    check_length(path, flag)
    if not path.exists():
        raise ResultsError(f"{flag}: {path} does not exist; give {what}")
    mode = path.stat().st_mode
    if folder and not stat.S_ISDIR(mode):
        raise ResultsError(f"{flag}: {path} is {_kind(mode)}, not a folder; give {what}")
    if not folder and not stat.S_ISREG(mode):
        raise ResultsError(f"{flag}: {path} is {_kind(mode)}, not a regular file; give {what}")
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def make_folder(path: Path, flag: str) -> list:
    """Create ``path`` and its missing parents; the folders it created, deepest last (so a run
    that stops before its first row can remove exactly those)."""
    made = [p for p in [*reversed(path.parents), path] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultsError(f"{flag}: cannot create {path}: {e.strerror or e}; choose a writable folder") from None
    return made


def remove_made(made: Sequence[Path]) -> None:
    """Remove the folders ``make_folder`` created, deepest first, where they are still empty."""
    for p in reversed(list(made)):
        with suppress(OSError):
            p.rmdir()


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
        from evals.locking import LockHeld, acquire

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
        from evals import results

        others = [p for p in self.path.iterdir() if p.name != self.lock.name]
        if [p.name for p in others] == [results.sidecar_path(self.csv).name]:
            try:
                return not results._ours(results.read_sidecar(self.csv))
            except ResultsError:
                return True
        return bool(others)

    def _claim(self) -> None:
        """Under the lock: check again, read the kept rows, prove the settings, record them."""
        from evals import results

        if not self.resume:
            if self._holds_something():
                raise ResultsError(f"{self.flag} {self.path} already exists and is not empty; pass --resume to "
                                   f"continue")
            results.write_sidecar(self.csv, dict(results.environment(), **self.header, resume_settings=self.settings))
            return
        if not self.csv.is_file():
            raise ResultsError(f"--resume: {self.path} holds no {self.csv.name}; it is not a {self.kind} run "
                               f"(left untouched)")
        self._check_header()
        meta = results.read_sidecar(self.csv)
        results.check_same_settings(meta.get("resume_settings") if isinstance(meta, dict) else None, self.settings,
                                    self.path)
        results.repair(self.csv)
        self.rows = results.read_rows(self.csv, self.columns)

    def append(self, row: dict) -> None:
        from evals.results import append_row

        append_row(self.csv, row, self.columns)

    def __exit__(self, kind, err, tb) -> None:
        self._release(clean=kind is not None)

    def _release(self, *, clean: bool) -> None:
        """Let go of the lock; a run that stopped before its first row leaves nothing behind."""
        from evals import results
        from evals.locking import release

        if clean and not self.resume and not self.csv.exists():
            with suppress(OSError):
                results.sidecar_path(self.csv).unlink()
        if self._fd is not None:
            release(self.lock, self._fd)
            self._fd = None
        if clean and not self.resume and not self.csv.exists():
            remove_made(self._made)
