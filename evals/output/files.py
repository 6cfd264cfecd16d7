"""Whole-file writes that never leave a half-written file, and the JSON sidecar beside a CSV.

``write_bytes`` (and ``write_text``, ``write_frame``, ``write_figure`` on top of it) replaces a
file through a temporary file beside it, fsync and a rename, with the mode the user's umask
gives a new file (a temporary file is made 0600, which a colleague on a shared cluster could not
read); missing parent directories are created. The temporary file is removed if anything fails,
and the failure is one ``OutputError`` line. ``read_sidecar`` tells a missing sidecar (None) from
a corrupt one (``ResultsError``), and says so on one line naming the file.
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
    """``run.csv`` -> ``run.json``. ``evals.output.paths.check_target`` (``suffix=".csv"``) guarantees the two are different files."""
    return Path(csv_path).with_suffix(".json")


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
    from evals.output.paths import umask

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~umask())
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


def is_ours(meta) -> bool:
    """Whether a parsed sidecar was written by this tool (it records a run id, the software and the
    command), so a run that wrote no row may replace it."""
    return isinstance(meta, dict) and "run_id" in meta and "torch_version" in meta and "command" in meta


def sidecar_is_ours(csv_path: Path | str) -> bool:
    try:
        return is_ours(read_sidecar(csv_path))
    except ResultsError:
        return False
