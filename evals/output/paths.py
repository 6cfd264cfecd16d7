"""Where a command may write and what it may read, checked before any work, and the folders a
run creates (so that a run stopped before its first row can remove exactly those).

- no component longer than the file system allows, no path longer than ``PATH_MAX``;
- an output is not a symbolic link (replacing one would write somewhere the user did not name, or
  nowhere: a link to ``/dev/full``, a loop), not a device or other special file;
- not under a regular file; a file where a file goes and a directory where a directory goes;
- an input exists and is a regular file (or a directory): ``analyze /dev/null`` says it is a
  device, not that it does not exist.

Nothing here creates anything but ``make_folder``.
"""

from __future__ import annotations

import os
import stat
from contextlib import suppress
from pathlib import Path
from typing import Sequence

from evals.errors import ResultsError

PATH_MAX = 4096


def umask() -> int:
    """The process's umask (read without changing it for longer than the read)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def check_target(path: Path | str, flag: str, *, folder: bool, suffix: str = "") -> Path:
    """A place a command may write: a file (``folder=False``; with ``suffix``, a name ending in it)
    or a folder. Nothing is created."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        side = f" (its JSON sidecar {path.with_suffix('.json').name} is written beside it)" if suffix == ".csv" else ""
        raise ResultsError(f"{flag}: {path} must end in {suffix}{side}")
    check_length(path, flag)
    if path.is_symlink():
        raise ResultsError(f"{flag}: {path} is a symbolic link; give the path it should be written at, not a link")
    if path.exists():
        mode = path.stat().st_mode
        if folder and not stat.S_ISDIR(mode):
            raise ResultsError(f"{flag}: {path} is {_kind(mode)}, not a directory; give a new or empty directory")
        if not folder and stat.S_ISDIR(mode):
            raise ResultsError(f"{flag}: {path} is a directory; give a file path such as "
                               f"{path / ('run' + (suffix or '.csv'))}")
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
        raise ResultsError(f"{flag}: {path} is {_kind(mode)}, not a directory; give {what}")
    if not folder and not stat.S_ISREG(mode):
        raise ResultsError(f"{flag}: {path} is {_kind(mode)}, not a regular file; give {what}")
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"), (stat.S_ISCHR, "a device"),
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
