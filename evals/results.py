"""Results I/O: the tidy CSV (one row per measured configuration) and its JSON sidecar.

The CSV is written one whole row at a time (a single ``write`` of a complete line, flushed and
fsync'ed), so an interrupted sweep leaves only complete rows; ``repair`` drops a torn last line
should the machine itself die mid-write. The sidecar is written to a temporary file and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

from evals.grid import CONFIG_COLUMNS, KEY_COLUMNS, case_key

# The contract (design/evaluation.md): these columns, in this order, first.
REQUIRED_COLUMNS = (
    "run_id", "model", "device", "mode", "level", "dtype",
    "batch_size", "seq_len", "hidden_dim", "num_layers", "num_heads", "chunk_size",
    "status", "time_ms", "time_ms_p20", "time_ms_p80", "repeats", "timer",
    "peak_memory_mb", "memory_method", "flops", "params", "error",
)
# Then: the raw samples and what reproduces the row (seed, threads, every hyperparameter).
EXTRA_COLUMNS = ("samples_ms", "seed", "threads", "decode_tokens", "inject_factor") + tuple(
    c for c in CONFIG_COLUMNS if c not in REQUIRED_COLUMNS)
COLUMNS = REQUIRED_COLUMNS + EXTRA_COLUMNS
STATUSES = ("ok", "oom", "error", "skipped")

assert set(KEY_COLUMNS) <= set(COLUMNS), "every identifying column must be written"


def _line(row: dict) -> str:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"row has unknown column(s) {sorted(unknown)}; valid: {', '.join(COLUMNS)}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"row status must be one of {', '.join(STATUSES)}, got {row.get('status')!r}")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if row.get(c) is None else row.get(c, "") for c in COLUMNS])
    return buf.getvalue()


def append_row(path: Path | str, row: dict) -> None:
    """Append one complete row (writing the header first if the file is new or empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _line(row)
    if not path.exists() or path.stat().st_size == 0:
        text = ",".join(COLUMNS) + "\n" + text
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(text)  # one write of whole lines
        f.flush()
        os.fsync(f.fileno())


def repair(path: Path | str) -> int:
    """Drop a torn (unterminated) last line left by a crash mid-write; returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data[: data.rfind(b"\n") + 1]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(keep)
    os.replace(tmp, path)
    return len(data) - len(keep)


def read_rows(path: Path | str) -> list[dict]:
    """Rows of a results CSV as dicts of strings; checks the header carries the required columns."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if header[: len(REQUIRED_COLUMNS)] != REQUIRED_COLUMNS:
            raise ValueError(f"{path} is not a bsbr-eval results CSV: its header does not start with "
                             f"{', '.join(REQUIRED_COLUMNS)}")
        return [row for row in reader if row.get("status")]


def completed_keys(rows: Iterable[dict]) -> set:
    """Identities of the cases already in a CSV (any status): ``--resume`` measures the rest."""
    return {case_key(r) for r in rows}


# ----------------------------------------------------------------------------- sidecar


def sidecar_path(csv_path: Path | str) -> Path:
    return Path(csv_path).with_suffix(".json")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_PERF_ENV_PREFIXES = ("MALLOC_", "LD_PRELOAD", "OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "TORCH_", "THP_", "C10_")


def environment() -> dict:
    """Software, machine and code facts for the sidecar."""
    import torch

    sha = _git("rev-parse", "HEAD")
    cuda = torch.cuda.is_available()
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "git_sha": sha or None,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if sha else None,
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
        # settings outside the command line that change CPU timings (allocator, thread pools)
        "perf_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_PERF_ENV_PREFIXES)},
    }


def write_sidecar(csv_path: Path | str, info: dict) -> Path:
    """Write ``info`` as the CSV's JSON sidecar (temp file + rename, never half-written)."""
    path = sidecar_path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_sidecar(csv_path: Path | str) -> Optional[dict]:
    path = sidecar_path(csv_path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
