"""The guard's baseline: its configurations and their exact metrics, and nothing timed.

``results/baselines/cpu.csv`` holds, per configuration of the guard's grid, the FLOPs (per
token in decode mode), the parameter count and the steady-state traced memory
(``cpu_alloc_trace_steady``), which ``guard --against`` holds the working tree to, to the
unit. Times are never read from it (they do not transfer between machines; a baseline from
before this rule may still carry time columns, which are ignored).

``--update`` re-measures those exact metrics now (``measure_baseline``) and writes the file
whole with a sidecar of kind ``baseline`` (``write_baseline``). It only ever replaces a file that
is a baseline (``check_replaceable``): its sidecar says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from evals.output import files
from evals.output import claims
from evals import machine
from evals.guard.findings import EXACT_COLUMNS, BASELINE_KEY, config_label
from evals.guard.timing import GUARD_THREADS, case_from_row, exact_metrics, guard_cases

KIND = "baseline"
# What reading a baseline requires: the configuration and its exact metrics.
REQUIRED = tuple(BASELINE_KEY) + ("status",) + tuple(EXACT_COLUMNS)


def sidecar_kind(meta: Optional[dict]) -> Optional[str]:
    """The kind of file a sidecar describes: its ``kind``, ``baseline`` for a guard baseline
    written before kinds were recorded (it carries ``guard``), else None."""
    if not meta:
        return None
    if meta.get("kind"):
        return str(meta["kind"])
    return KIND if "guard" in meta else None


def check_replaceable(path: Path) -> None:
    """``--update`` replaces ``path`` only when it is absent or proven a baseline by its sidecar."""
    from evals.errors import ResultsError
    from evals.output.files import read_sidecar, sidecar_path

    if not Path(path).exists():
        return
    meta = read_sidecar(path)
    kind = sidecar_kind(meta)
    if kind == KIND:
        return
    what = (f"it has no sidecar ({sidecar_path(path).name})" if meta is None else
            f"its sidecar records kind {kind!r}" if kind else
            f"its sidecar records no baseline (written by {meta.get('command', 'an unknown command')!r})")
    raise ResultsError(f"--baseline {path} is not a guard baseline: {what}; --update only replaces a baseline "
                       f"(sidecar kind {KIND!r}); give a new path or remove the file")


def exact_row(row, *, threads: int = GUARD_THREADS) -> dict:
    """One configuration's baseline row, measured now: its fields, ``status`` and exact metrics.
    A configuration that cannot be built is a row with status ``error``, never a crash."""
    import torch

    from evals.errors import one_line
    from evals.workload import build_workload

    case = case_from_row(row)
    out = dict(case.fields(), status="ok", error="", threads=threads)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out.update(exact_metrics(build_workload(case), case, threads))
    except Exception as err:  # a failing configuration is a row
        out.update(status="error", error=one_line(err, kind=True))
    finally:
        torch.set_num_threads(prev)
    return out


def default_rows(models=None) -> pd.DataFrame:
    """The guard's grid as rows (``--update`` with no baseline file yet), for ``models`` or the built-ins."""
    return pd.DataFrame([dict(c.fields(), threads=GUARD_THREADS) for c in guard_cases(models)])


def measure_baseline(rows: pd.DataFrame, *, measure: Optional[Callable] = None,
                     progress: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """``measure(row)`` (``exact_row`` by default) for every row, in order, as a baseline frame
    (identity columns first)."""
    measure = measure or exact_row
    out = []
    for _, row in rows.iterrows():
        if progress:
            progress(config_label(row))
        out.append(measure(row))
    df = pd.DataFrame(out)
    first = [c for c in ("model", "device", "mode", "level", "dtype", "status", "error") + EXACT_COLUMNS
             + ("peak_memory_mb", "memory_method") if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def settings() -> dict:
    """How the baseline was measured, for its sidecar."""
    return dict(threads=GUARD_THREADS, memory="cpu_alloc_trace_steady: after two warm-up calls, a call "
                                              "traced after a traced prior call, counting blocks "
                                              "allocated in the trace", timing="none: times are compared A/B only")


def write_baseline(path: Path, frame: pd.DataFrame, *, start: str, source: str) -> None:
    """The baseline and its sidecar (kind ``baseline``), each written whole, under the file's lock."""

    with claims.locked(path, "--baseline"):
        files.write_frame(path, frame)
        files.write_sidecar(path, dict(machine.environment(), kind=KIND, utc_start=start,
                                         utc_end=machine.utc_now(), source=source, guard=settings(),
                                         rows=len(frame)))
