"""Where a file may be written (``check_output``: refused before any work), whole-file writes
that never leave a half-written file, and the JSON sidecar beside a CSV.

``check_output``/``check_output_dir`` refuse a path under a regular file, a directory where a
file goes, a CSV path without ``.csv`` (so its sidecar differs).

``write_bytes`` (and ``write_text``, ``write_frame``, ``write_figure`` on top of it) replaces a
file through a temporary file beside it, fsync and a rename; the temporary file is removed if
anything fails, and the failure is one ``OutputError`` line. ``read_sidecar`` tells a missing
sidecar (None) from a corrupt one (``ResultsError``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Optional

from evals.errors import OutputError, ResultsError, one_line


def sidecar_path(csv_path: Path | str) -> Path:
    """``run.csv`` -> ``run.json``. ``check_output`` guarantees the two are different files."""
    return Path(csv_path).with_suffix(".json")


def _parent_dir(path: Path, flag: str) -> None:
    """Refuse a path below a regular file; create the missing directories."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ResultsError(f"{flag}: {parent} is a file, so nothing can be written under it ({path})")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResultsError(f"{flag}: cannot create directory {path.parent}: {e.strerror or e}") from None


def check_output(path: Path | str, flag: str = "--output", suffix: str = ".csv") -> Path:
    """Validate a file to be written, before any work: the right suffix (so the data file and its
    ``.json`` sidecar differ), not a directory, not under a file. Creates missing parents."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ResultsError(f"{flag}: {path} must end in {suffix} (its JSON sidecar "
                           f"{path.with_suffix('.json').name} is written beside it)")
    if path.is_dir():
        raise ResultsError(f"{flag}: {path} is a directory; give a file path such as {path / ('run' + suffix)}")
    _parent_dir(path, flag)
    return path


def check_output_dir(path: Path | str, flag: str = "--output-dir") -> Path:
    """Validate a directory to be written: not a file, not under a file; created if missing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ResultsError(f"{flag}: {path} is a file, not a directory")
    _parent_dir(path / "x", flag)
    return path


def write_text(path: Path | str, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically, as ``write_bytes``."""
    return write_bytes(path, text.encode("utf-8"))


def write_frame(path: Path | str, df, float_format: Optional[str] = None) -> Path:
    """A DataFrame as a whole CSV file, atomically."""
    return write_text(path, df.to_csv(index=False, float_format=float_format, lineterminator="\n"))


def write_figure(fig, path: Path | str, **kwargs) -> Path:
    """A matplotlib figure, atomically (rendered to memory, then ``write_bytes``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return write_bytes(path, buf.getvalue())


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically: a temporary file beside it, fsync, rename.
    Nothing is left behind if it fails (``OutputError``)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def write_sidecar(csv_path: Path | str, info: dict) -> Path:
    """Write ``info`` as the CSV's JSON sidecar, atomically."""
    return write_text(sidecar_path(csv_path), json.dumps(info, indent=2, default=str) + "\n")


def read_sidecar(csv_path: Path | str) -> Optional[dict]:
    """The sidecar's contents; None when there is none; ``ResultsError`` when it is corrupt."""
    path = sidecar_path(csv_path)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"sidecar {path} is corrupt: {one_line(e)}") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"sidecar {path} is corrupt: it holds a JSON {type(meta).__name__}, not an object")
    return meta
