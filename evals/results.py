"""The results layer: the only module that knows the CSV schema, case identity, sidecar files,
output locks and safe writes, and the one-line error text. Every command that writes or reads a
results file goes through it (design: "Writing results safely").

Writing:

- ``claim_output`` validates an output path before any work (a CSV ends in ``.csv``, so its JSON
  sidecar can never be the same file; no path under a regular file; no directory where a file
  goes; a place we can write), takes an exclusive lock (``filelock``, a ``<name>.lock`` file beside
  it) for the whole run, refuses to replace existing output without ``resume``, and on ``resume``
  checks the header *before* touching the file, so a file this tool did not write stays
  byte-identical.
- ``append_row`` writes one whole row in one ``write`` (flushed and fsync'ed); if the write fails
  part-way the file is cut back to its previous size, so only whole rows are ever on disk.
  ``write_text``/``write_frame`` replace a whole file through a temporary file and a rename; the
  temporary file is removed if anything fails.
- A failed write raises ``OutputError`` (one line, exit 1: the rows already written are kept);
  bad input raises ``ResultsError`` (one line, exit 2).

Reading: ``read_table`` refuses (or, for ``analyze``, drops and reports) torn rows, missing
columns, unknown statuses and non-numeric values; ``read_sidecar`` tells a missing sidecar (None)
from a corrupt one (``ResultsError``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from evals.grid import CONFIG_COLUMNS, KEY_COLUMNS
from evals.locking import LockHeld, acquire, lock_path, release


class ResultsError(ValueError):
    """Bad input about a results file or output path: one line, exit code 2."""


class OutputError(ResultsError):
    """Writing an output failed part-way (disk full, permission): one line, exit code 1."""


def one_line(err: BaseException | str, *, kind: bool = False, limit: int = 500) -> str:
    """The one-line text of an error, whitespace collapsed (``kind`` prefixes the type name)."""
    text = " ".join(str(err).split())
    if kind and isinstance(err, BaseException):
        text = f"{type(err).__name__}: {text}"
    return text[:limit]


# ----------------------------------------------------------------------------- schema

# The contract (docs/evaluation.md, "The CSV"): these columns, in this order, first.
REQUIRED_COLUMNS = (
    "run_id", "model", "device", "mode", "level", "dtype",
    "batch_size", "seq_len", "hidden_dim", "num_layers", "num_heads", "chunk_size",
    "status", "time_ms", "time_ms_p20", "time_ms_p80", "repeats", "timer",
    "peak_memory_mb", "memory_method", "flops", "params", "error",
)
# Then: the raw samples and what reproduces the row (seed, threads, every hyperparameter).
EXTRA_COLUMNS = ("samples_ms", "seed", "threads", "decode_tokens", "inject_factor", "compile", "sdpa_backend",
                 "warmup", "compile_ms") + tuple(
    c for c in CONFIG_COLUMNS if c not in REQUIRED_COLUMNS) + ("host",)
COLUMNS = REQUIRED_COLUMNS + EXTRA_COLUMNS
STATUSES = ("ok", "oom", "error", "skipped")
# ``bsbr-eval forms``: one row per (model, mode, length, form) of an op.
FORMS_COLUMNS = ("run_id", "model", "form", "mode", "seq_len", "batch_size", "hidden_dim", "num_heads",
                 "chunk_size", "dtype", "threads", "status", "time_ms", "time_ms_p20", "time_ms_p80", "repeats",
                 "timer", "samples_ms", "error", "device")
FAILED = ("oom", "error")
NUMERIC_COLUMNS = ("batch_size", "seq_len", "hidden_dim", "num_layers", "num_heads", "chunk_size",
                   "time_ms", "time_ms_p20", "time_ms_p80", "repeats", "peak_memory_mb", "flops", "params")

# KEY_COLUMNS (a case's own fields, from the grid) identify a row; ``--resume`` matches on them.
assert set(KEY_COLUMNS) <= set(COLUMNS), "every identifying column must be written"


def norm_value(v) -> str:
    """One spelling per value, so a row built in memory and the same row read back from a CSV
    (strings, empty for None, pandas floats for ints and NaN for blanks) compare equal."""
    if v is None or (isinstance(v, str) and v == ""):
        return ""
    if type(v).__name__ in ("bool", "bool_"):  # True and numpy.True_ as the CSV spells them
        return "True" if v else "False"
    try:  # 8, "8", 8.0 and "8.0" are the same value; a float keeps its repr
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return ""
    return str(int(f)) if f.is_integer() else repr(f)


def case_key(row, keys: Sequence[str] = KEY_COLUMNS) -> tuple:
    """A hashable identity of a case's row (a dict or a pandas row) over ``keys``."""
    return tuple(norm_value(row.get(k)) for k in keys)


def completed_keys(rows: Iterable[dict]) -> set:
    """Identities of the cases already in a CSV (any status): ``--resume`` measures the rest."""
    return {case_key(r) for r in rows}


def sample_stats(samples: Sequence[float]) -> dict:
    """The timing columns of a row from per-call samples in ms: median, p20, p80, count, raw."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=5, method="inclusive") if len(s) > 1 else s * 4
    return dict(time_ms=statistics.median(s), time_ms_p20=q[0], time_ms_p80=q[3], repeats=len(s),
                samples_ms=" ".join(f"{x:.6g}" for x in samples))


# ----------------------------------------------------------------------------- output paths and locks


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


def check_header(path: Path, columns: Sequence[str] = REQUIRED_COLUMNS, flag: str = "--resume",
                 exact: bool = False) -> None:
    """Refuse a file whose first line is not a results header (``exact``: exactly ``columns``, so
    that rows appended with ``columns`` line up). Reads only; never modifies it."""
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    try:
        header = next(csv.reader([first.decode("utf-8")]), [])
    except (UnicodeDecodeError, csv.Error):
        header = []
    if tuple(header[: len(columns)]) != tuple(columns):
        raise ResultsError(f"{flag}: {path} is not a bsbr-eval results file (its first line is not the header "
                           f"{','.join(columns[:4])},...); it was left untouched")
    if exact and tuple(header) != tuple(columns):
        raise ResultsError(f"{flag}: {path} was written by another version of bsbr-eval (its columns differ from "
                           f"this version's {len(columns)}); it was left untouched: start a new output")


def repair(path: Path | str) -> int:
    """Drop a torn (unterminated) last line left by a machine that died mid-write; returns the
    bytes removed. Only for a file whose header ``check_header`` accepted."""
    path = Path(path)
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


@contextmanager
def claim_output(path: Path | str, *, resume: bool = False, columns: Sequence[str] = REQUIRED_COLUMNS,
                 flag: str = "--output", can_resume: bool = True, exact: bool = False) -> Iterator[list[dict]]:
    """Everything a writing command does before its first measurement, and the lock it holds to
    the end: validate ``path``, lock it, refuse existing output unless ``resume``, and on
    ``resume`` check that the file is ours before repairing a torn last line. Yields the rows
    already in the file (empty for a new file)."""
    path = check_output(path, flag)
    with locked(path, flag):
        kept: list[dict] = []
        has_rows = path.exists() and path.stat().st_size > 0
        if has_rows and not resume:
            hint = "pass --resume to continue it, or choose another" if can_resume else "choose another"
            raise ResultsError(f"{flag}: {path} already exists; {hint} {flag}")
        if not has_rows and sidecar_path(path).exists():
            raise ResultsError(f"{flag}: {sidecar_path(path)} already exists and would be replaced by this run's "
                               f"sidecar; choose another {flag}")
        if has_rows:
            check_header(path, columns, exact=exact)
            repair(path)
            kept = read_rows(path, columns)
        yield kept


# ----------------------------------------------------------------------------- writing


def _csv_line(values: Sequence) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def append_row(path: Path | str, row: dict, columns: Sequence[str] = COLUMNS) -> None:
    """Append one whole row (the header first if the file is new or empty) in one write.

    A write that fails part-way is undone (the file is cut back), so the file holds whole rows
    only; the failure is an ``OutputError``.
    """
    unknown = set(row) - set(columns)
    if unknown:
        raise ValueError(f"row has unknown column(s) {sorted(unknown)}; valid: {', '.join(columns)}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"row status must be one of {', '.join(STATUSES)}, got {row.get('status')!r}")
    path = Path(path)
    text = _csv_line([row.get(c) for c in columns])
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        size = os.fstat(fd).st_size
        data = ((_csv_line(columns) if size == 0 else "") + text).encode("utf-8")
        try:
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write (No space left on device?)")
            os.fsync(fd)
        except OSError as e:
            with suppress(OSError):
                os.ftruncate(fd, size)
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


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


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path | str, columns: Sequence[str] = REQUIRED_COLUMNS) -> list[dict]:
    """Rows of a results CSV this tool wrote (strings), for ``--resume``; header checked."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ())[: len(columns)] != tuple(columns):
            raise ResultsError(f"{path} is not a bsbr-eval results file: its header does not start with "
                               f"{', '.join(columns)}")
        return [row for row in reader if row.get("status")]


def _number(v: str) -> Optional[float]:
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def _samples_ok(cell: str) -> bool:
    text = cell.strip().strip("[]")
    for sep in (";", ","):
        text = text.replace(sep, " ")
    return all(_number(t) is not None for t in text.split())


def row_problem(row: dict, numeric: Sequence[str]) -> Optional[str]:
    """Why a parsed row cannot be trusted, or None."""
    status = row.get("status")
    if status is not None and status.strip().lower() not in STATUSES:
        return f"unknown status {status!r} (valid: {', '.join(STATUSES)})"
    for c in numeric:
        v = row.get(c, "").strip()
        if v and _number(v) is None:
            return f"{c} {v!r} is not a number"
    if "seq_len" in row and not ((_number(row["seq_len"]) or 0) > 0):
        return f"seq_len {row['seq_len']!r} is not a positive integer"
    if status is not None and status.strip().lower() == "ok":
        if "time_ms" in row and not ((_number(row["time_ms"]) or 0) > 0):
            return f"status ok but time_ms {row['time_ms']!r} is not a positive number"
        if row.get("samples_ms", "").strip() and not _samples_ok(row["samples_ms"]):
            return f"samples_ms {row['samples_ms'][:40]!r} is not a list of numbers"
    return None


@dataclass
class Table:
    """What ``read_table`` returns: the rows it kept and the ones it dropped, with why."""

    rows: "object"                               # pandas DataFrame of the kept rows, numbers as numbers
    dropped: list = field(default_factory=list)  # dicts: source, line, model, seq_len, reason
    lines: list = field(default_factory=list)    # the line in the file of each kept row


def read_table(path: Path | str, *, required: Sequence[str] = REQUIRED_COLUMNS,
               numeric: Sequence[str] = NUMERIC_COLUMNS, what: str = "", strict: bool = True) -> Table:
    """Read a results CSV and refuse what cannot be trusted.

    A missing file, an empty file, a file that is not UTF-8 text, or one short of ``required``
    columns is always a ``ResultsError``. Each row that is torn (too few or too many fields, or
    cut off by the end of the file), has an unknown status, a non-numeric value in a ``numeric``
    column, or ``status ok`` without a positive ``time_ms`` is a ``ResultsError`` when ``strict``,
    else dropped and listed in ``Table.dropped``. A sidecar that records ``rows`` must agree.
    """
    import pandas as pd

    path = Path(path)
    name = f"{what} {path}".strip()
    if not path.is_file():
        raise ResultsError(f"{name} does not exist; give a results CSV")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ResultsError(f"{name}: not a CSV (not UTF-8 text)") from None
    except OSError as e:
        raise ResultsError(f"{name}: cannot read it: {e.strerror or e}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        records = []
        start = reader.line_num + 1
        for rec in reader:
            records.append((start, rec))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ResultsError(f"{name}: not a readable CSV ({e})") from None
    if not header:
        raise ResultsError(f"{name}: empty file (no header, no rows)")
    missing = [c for c in required if c not in header]
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise ResultsError(f"{name} lacks column(s) {shown}; it needs: {', '.join(required)}")
    numeric = [c for c in numeric if c in header]
    kept, dropped, lines = [], [], []
    for i, (line, rec) in enumerate(records):
        if not any(f.strip() for f in rec):
            continue
        problem = None
        if len(rec) != len(header):
            problem = f"torn row: {len(rec)} of {len(header)} fields"
        elif i == len(records) - 1 and not text.endswith("\n"):
            problem = "torn row: the file ends in the middle of it"
        else:
            row = dict(zip(header, rec))
            problem = row_problem(row, numeric)
        if problem:
            if strict:
                raise ResultsError(f"{name} line {line}: {problem}; refusing to use it")
            first = dict(zip(header, rec))
            dropped.append(dict(source=str(path), line=line, model=first.get("model", ""),
                                seq_len=first.get("seq_len", ""), reason=problem))
            continue
        kept.append(row)
        lines.append(line)
    sidecar = read_sidecar(path) if strict else None
    if sidecar and isinstance(sidecar.get("rows"), int) and sidecar["rows"] != len(kept):
        raise ResultsError(f"{name}: has {len(kept)} rows but its sidecar records {sidecar['rows']}; "
                           "the file was cut or appended to, refusing to use it")
    # the types pandas.read_csv would give: blanks are NaN, a column of numbers is numeric
    df = pd.DataFrame(kept, columns=header).replace("", float("nan"))
    for c in df.columns:
        with suppress(ValueError, TypeError):
            df[c] = pd.to_numeric(df[c])
    if "status" in df:
        df["status"] = df["status"].astype(str).str.strip().str.lower()
    return Table(df, dropped, lines)


# ----------------------------------------------------------------------------- the run's outcome


def outcome(rows: Sequence[dict]) -> tuple[int, str]:
    """Exit code and closing words for the rows measured by one run: 1 when none succeeded
    (with the first error), else 0 (saying how many failed, if any)."""
    if not rows:
        return 0, ""
    bad = [r for r in rows if r.get("status") != "ok"]
    if len(bad) == len(rows):
        first = next((r for r in bad if r.get("status") in FAILED), bad[0])
        label = " ".join(str(first.get(k)) for k in ("model", "mode") if first.get(k)) + f" n={first.get('seq_len')}"
        return 1, (f"no configuration succeeded ({len(rows)} of {len(rows)} not ok); first: {label}: "
                   f"{first.get('status')} {one_line(first.get('error') or '')}".rstrip())
    failed = [r for r in bad if r.get("status") in FAILED]
    return 0, f"{len(failed)} of {len(rows)} failed (see the error column)" if failed else ""


# ----------------------------------------------------------------------------- sidecar

# The facts about the machine and the code live in evals.machine; these names stay importable here.
from evals.machine import (environment, git_sha, gpu, machine, new_run_id, numerics, utc_now,  # noqa: E402,F401
                           utc_stamp)


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
