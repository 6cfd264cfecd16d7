"""The CSV contract: the only module that knows the result rows' schema, case identity, how a
row is appended and how a results file is read back.

- ``append_row`` writes one whole row in one ``write`` (flushed and fsync'ed); if the write fails
  part-way the file is cut back to its previous size, so only whole rows are ever on disk (a
  failure is an ``OutputError``: one line, exit 1, the rows already written kept).
- ``check_header``, ``resume_problem``, ``repair`` and ``read_rows`` are what a resume checks and
  reads before it touches a file (``evals.output.claims``), so a file this tool did not write,
  or a torn one, stays byte-identical.
- ``read_table`` refuses (or, for ``analyze``, drops and reports) torn rows, missing columns,
  unknown statuses, non-numeric or out-of-range values (``VALUE_RANGES``).

Where files may be written, whole-file writes and sidecars are ``evals.output``; errors
``evals.errors``; machine facts ``evals.machine``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from evals.errors import OutputError, ResultsError, one_line
from evals.grid import CONFIG_COLUMNS, KEY_COLUMNS
from evals.output.files import read_sidecar


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
STATUSES = ("ok", "oom", "error", "skipped", "unsupported")
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


def _first_line(path: Path) -> list[str]:
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    try:
        return next(csv.reader([first.decode("utf-8")]), [])
    except (UnicodeDecodeError, csv.Error):
        return []


def check_header(path: Path, columns: Sequence[str] = REQUIRED_COLUMNS, flag: str = "--resume",
                 exact: bool = False) -> None:
    """Refuse a file whose first line is not a results header (``exact``: exactly ``columns``, so
    that rows appended with ``columns`` line up). A results file of an older version (the required
    columns, other ones after them) is told apart from a foreign file. Reads only."""
    header = tuple(_first_line(path))
    columns = tuple(columns)
    older = columns[:len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS and header[:len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS
    if header[: len(columns)] != columns and not older:
        raise ResultsError(f"{flag}: {path} is not a bsbr-eval results file (its first line is not the header "
                           f"{','.join(columns[:4])},...); it was left untouched")
    if (exact or older) and header != columns:
        lacks = [c for c in columns if c not in header]
        what = f"it lacks {', '.join(lacks[:4])}" + (f" (+{len(lacks) - 4} more)" if len(lacks) > 4 else "") \
            if lacks else f"its {len(header)} columns are not this version's {len(columns)}"
        raise ResultsError(f"{flag}: {path} was written by an older or other version of bsbr-eval ({what}), so "
                           f"rows cannot be appended to it; it was left untouched: start a new output (analyze "
                           f"reads both files together)")


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


def has_rows(path: Path, columns: Sequence[str]) -> bool:
    """Whether ``path`` holds anything but (at most) this tool's header line: a file that is only
    our header is a run that was stopped before its first row, and holds nothing to lose."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.readline(1 << 16)
        rest = f.read(1)
    return bool(rest) or tuple(_first_line(path)[: len(columns)]) != tuple(columns)


def resume_problem(path: Path, columns: Sequence[str]) -> Optional[str]:
    """The first row of a file being resumed that cannot be kept as it is, as ``line N: why``; None
    if every row is whole and valid. An unterminated last line is not a problem: ``repair`` cuts
    it (a crash mid-append). Reads only."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        numeric = [c for c in NUMERIC_COLUMNS if c in header]
        start = reader.line_num + 1
        for rec in reader:
            if any(f.strip() for f in rec):
                problem = (f"torn row: {len(rec)} of {len(header)} fields" if len(rec) != len(header)
                           else row_problem(dict(zip(header, rec)), numeric))
                if problem:
                    return f"line {start}: {problem}"
            start = reader.line_num + 1
    except csv.Error as e:
        return f"line {reader.line_num}: not readable as CSV ({e})"
    return None


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
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
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


# What a value in a results row may be: (lowest, highest, must be an integer, lowest excluded).
# The highest values are far beyond any real measurement (a time of 1e10 ms is 116 days); they keep
# a typo or a corrupt cell such as 1e308 from overflowing the fits' squares.
TIME_MAX_MS, MEMORY_MAX_MB, COUNT_MAX = 1e10, 1e9, 1e30
VALUE_RANGES = {
    "batch_size": (1, 2**31 - 1, True, False), "seq_len": (1, 2**31 - 1, True, False),
    "hidden_dim": (1, 2**31 - 1, True, False), "num_layers": (0, 2**31 - 1, True, False),
    "num_heads": (1, 2**31 - 1, True, False), "chunk_size": (1, 2**31 - 1, True, False),
    "repeats": (0, 2**31 - 1, True, False), "params": (0, COUNT_MAX, True, False),
    "flops": (0, COUNT_MAX, False, False), "peak_memory_mb": (0, MEMORY_MAX_MB, False, False),
    "time_ms": (0, TIME_MAX_MS, False, True), "time_ms_p20": (0, TIME_MAX_MS, False, False),
    "time_ms_p80": (0, TIME_MAX_MS, False, False),
}


def value_problem(column: str, text: str) -> Optional[str]:
    """Why ``text`` cannot be the value of ``column`` (not a number, or out of its range), or None."""
    v = _number(text)
    if v is None:
        try:
            float(text)
        except ValueError:
            return f"{column} {text!r} is not a number"
        return f"{column} {text!r} is not a finite number"
    low, high, integer, low_open = VALUE_RANGES.get(column, (-COUNT_MAX, COUNT_MAX, False, False))
    if integer and not v.is_integer():
        return f"{column} {text!r} is not an integer"
    if v < low or (low_open and v == low) or v > high:
        return f"{column} {text!r} is out of range ({'>' if low_open else '>='} {low:g}, <= {high:g})"
    return None


def row_problem(row: dict, numeric: Sequence[str]) -> Optional[str]:
    """Why a parsed row cannot be trusted, or None: an unknown status, a value that is not a number
    or out of its column's range (``VALUE_RANGES``), a missing length, ``ok`` without a time."""
    status = row.get("status")
    if status is not None and status.strip().lower() not in STATUSES:
        return f"unknown status {status!r} (valid: {', '.join(STATUSES)})"
    for c in numeric:
        v = (row.get(c) or "").strip()
        if v and (problem := value_problem(c, v)):
            return problem
    if "seq_len" in row and not (row["seq_len"] or "").strip():
        return "seq_len is empty"
    if status is not None and status.strip().lower() == "ok":
        if "time_ms" in row and not (row["time_ms"] or "").strip():
            return "status ok but time_ms is empty"
        if (row.get("samples_ms") or "").strip() and not _samples_ok(row["samples_ms"]):
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
    text, header, records = _read_records(path, name)
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


def _read_records(path: Path, name: str) -> tuple[str, Optional[list], list]:
    """The file's text, its header (None when empty) and its records as ``(line, fields)``;
    ``ResultsError`` for a folder, a missing file, one that is not UTF-8 text or not a CSV."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.csv"))[:3]
        raise ResultsError(f"{name} is a folder; give a results CSV" + (f", e.g. {path / inside[0]}" if inside else ""))
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
    return text, header, records


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
