"""What ``bsbr-eval analyze`` hands back: CSV tables, figures, a Markdown report, terminal tables.

``write_analysis`` is the one entry point that writes (into the folder the CLI was given);
``render_markdown`` and ``terminal_tables`` are pure renderings of an
``evals.analyze.analysis.Analysis``.
The report is meant to be read on its own: it says what was measured, on which machine (from
each CSV's JSON sidecar), with which commands, how the fits were made, and shows the tables and
figures.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from evals.analyze import plots
from evals.analyze.analysis import (CLASSES, MATERIAL, MIN_LENGTHS, MIN_SPAN, NOISY_SPREAD, PAR_TOLERANCE,
                                    REFERENCE_MODEL, UNDERDETERMINED, Analysis)
from evals.errors import ResultsError
from evals.output.files import sidecar_path, write_frame, write_text
from evals.registry import model_order
from evals.results import STATUSES

# Columns of the per-configuration key shown in the tables (the rest is in the report's header).
_WHERE = ["device", "mode", "level"]


# ---- formatting helpers ----

def _num(v, fmt: str = "{:.3g}", integers: bool = True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if integers and (isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15)):
        return f"{int(v)}"
    return fmt.format(v)


def _slope(r, prefix: str = "") -> str:
    s, lo, hi = r[f"{prefix}slope"], r[f"{prefix}slope_ci_low"], r[f"{prefix}slope_ci_high"]
    if not np.isfinite(s):
        return "–"
    # the t-interval is symmetric, so "slope ± half-width" says it all
    return f"{s:.2f} ± {(hi - lo) / 2:.2f}" if np.isfinite(lo) else f"{s:.2f}"


def md_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of already-formatted cells (no extra dependency)."""
    if df.empty:
        return "_(none)_\n"
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def fits_display(fits: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The complexity-fit table as shown to people: one metric, formatted."""
    f = fits[fits["metric"] == metric]
    return pd.DataFrame({
        "model": f["model"], **{k: f[k] for k in _WHERE},
        "lengths": [f"{int(r.n_lengths)} ({_num(r.min_len)}–{_num(r.max_len)})" for r in f.itertuples()],
        "slope ± 95% CI": [_slope(r) for _, r in f.iterrows()],
        "upper-half slope": [_slope(r, "upper_") for _, r in f.iterrows()],
        "best class": f["best_class"],
        "ΔAICc to next": [("" if not np.isfinite(d) else f"{d:.1f} ({n})") for d, n in zip(f["delta_aicc"], f["runner_up"])],
        **({"p20–p80 spread": f["p20_p80_spread"].map(lambda v: "–" if not np.isfinite(v) else f"{100 * v:.0f}%")}
           if metric == "time_ms" else {}),
    })


def pivot_by_length(rel: pd.DataFrame, col: str, fmt: str = "{:.2f}") -> pd.DataFrame:
    """Rows: device, mode, level, n; columns: models (registry order); cells: ``col``."""
    d = rel[rel["model"] != REFERENCE_MODEL]
    if d.empty:
        return pd.DataFrame()
    p = d.pivot_table(index=[*_WHERE, "seq_len"], columns="model", values=col, aggfunc="median")
    p = p[model_order(p.columns)].reset_index()
    for c in p.columns[len(_WHERE) + 1:]:
        p[c] = p[c].map(lambda v: _num(v, fmt, integers=False))
    p["seq_len"] = p["seq_len"].map(_num)
    return p.rename(columns={"seq_len": "n"})


def crossover_display(cross: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "model": cross["model"], **{k: cross[k] for k in _WHERE}, "verdict": cross["verdict"],
        "crossover n (interp.)": cross["crossover_len"].map(lambda v: _num(v, "{:.0f}")),
        "faster from n": cross["first_faster_len"].map(_num),
        "longest n": cross["max_len"].map(_num), "speedup there": cross["speedup_at_max"].map(lambda v: f"{v:.2f}"),
    })


def flops_display(rows: pd.DataFrame) -> pd.DataFrame:
    """Achieved GFLOP/s per model and length, with the fraction of the matmul calibration when known."""
    d = rows[np.isfinite(rows["achieved_gflops"])]
    if d.empty:
        return pd.DataFrame()
    g = d.groupby(["model", *_WHERE, "seq_len"], as_index=False)[["achieved_gflops", "flop_fraction"]].median()
    frac = g["flop_fraction"].map(lambda v: "" if not np.isfinite(v) else f" ({100 * v:.0f}%)")
    g["GFLOP/s (% of matmul)"] = g["achieved_gflops"].map(lambda v: f"{v:.3g}") + frac
    p = g.pivot_table(index=[*_WHERE, "seq_len"], columns="model", values="GFLOP/s (% of matmul)", aggfunc="first")
    p = p[model_order(p.columns)].reset_index().fillna("–")
    p["seq_len"] = p["seq_len"].map(_num)
    return p.rename(columns={"seq_len": "n"})


# ---- Markdown ----

def _measured_summary(rows: pd.DataFrame) -> list:
    u = lambda c: ", ".join(map(str, model_order(rows[c]) if c == "model" else sorted(rows[c].dropna().unique())))  # noqa: E731
    lengths = " ".join(_num(v) for v in sorted(rows["seq_len"].unique()))
    counts = rows["status"].value_counts()
    status = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    return [
        f"- **models**: {u('model')}",
        f"- **devices**: {u('device')}; **modes**: {u('mode')}; **levels**: {u('level')}; **dtype**: {u('dtype')}",
        f"- **sequence lengths**: {lengths}",
        f"- **shape**: batch {u('batch_size')}, hidden {u('hidden_dim')}, layers {u('num_layers')}, "
        f"heads {u('num_heads')}, chunk {u('chunk_size')}",
        f"- **rows**: {len(rows)} ({status}); **timed samples** per configuration: "
        f"{_num(rows['repeats'].min())}–{_num(rows['repeats'].max())}",
        f"- **timer**: {u('timer')}; **memory method**: {u('memory_method')}",
        f"- **runs**: {u('run_id')}",
    ]


def _flatten(meta, prefix: str = "") -> dict:
    """Nested sidecar fields as ``a.b`` / ``a[0].b`` keys, so any sidecar layout reads as a table."""
    out = {}
    items = meta.items() if isinstance(meta, dict) else ((f"[{i}]", v) for i, v in enumerate(meta))
    for k, v in items:
        key = f"{prefix}{k}" if str(k).startswith("[") or not prefix else f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in v):
            out.update(_flatten(list(v), key))
        elif isinstance(v, (list, tuple)):
            out[key] = " ".join(map(str, v))
        else:
            out[key] = v
    return out


# shown first, in this order, when present; every other field follows
_SIDECAR_FIRST = ("device_name", "cpu_model", "cpu_count", "torch_num_threads", "threads", "torch_version",
                  "cuda_version", "python_version", "hostname", "git_sha", "git_dirty", "run_id", "command",
                  "started_utc", "ended_utc")


def _machine_section(sources: Sequence[str], sidecars: dict) -> list:
    lines = []
    for src in sources:
        meta = sidecars.get(src)
        lines.append(f"**{Path(src).name}** — sidecar `{sidecar_path(src).name}`")
        lines.append("")
        if isinstance(meta, ResultsError):
            lines += [f"_The JSON sidecar is corrupt ({meta}): machine, software and command are unknown, "
                      "and the FLOP-rate fraction is left blank._", ""]
            continue
        if meta is None:
            lines += ["_No JSON sidecar beside this CSV: machine, software and command are unknown, and the "
                      "FLOP-rate fraction is left blank._", ""]
            continue
        flat = _flatten(meta)
        keys = [k for k in _SIDECAR_FIRST if k in flat] + [k for k in flat if k not in _SIDECAR_FIRST]
        lines.append(md_table(pd.DataFrame({"field": keys, "value": [f"`{flat[k]}`" if k.endswith("command")
                                                                     else flat[k] for k in keys]})))
    return lines


METHOD_TEXT = f"""\
- **slope**: ordinary least squares of log(y) on log(n) with a 95% Student-t interval; the
  *upper-half slope* uses only the upper half of the lengths, where fixed overhead no longer
  flattens the curve. A slope of 1 is linear growth, 2 quadratic.
- **best class**: each of {", ".join(f"`{c}`" for c in CLASSES)} plus a constant overhead
  term, fitted with non-negative coefficients (NNLS) on relative residuals (y - ŷ)/y, and ranked
  by AICc; a class whose growth term adds under {100 * MATERIAL:.0f}% of its fit at the longest length
  is not ranked (flat decode times are `1`, not `n^2` with a 1e-11 coefficient); of the classes within 2 of the lowest AICc the one with the fewest coefficients is
  chosen. *ΔAICc to next* is AICc(runner-up) - AICc(chosen); under 2 means the data do not
  clearly tell the two apart. A class with p coefficients is ranked only with at least p + 2 points.
- **{UNDERDETERMINED}**: fewer than {MIN_LENGTHS} distinct lengths or a span under
  {MIN_SPAN:g}x; the dotted line in the figures is then the power law, not a class.
- Only rows with status `ok` enter fits, ratios and figures; `oom` / `error` / `skipped` rows
  are listed below and drawn as markers on the axis floor, never as a value.
- **p20–p80 spread**: the median over lengths of (p80 - p20) / median of the timing samples;
  above {int(100 * NOISY_SPREAD)}% the time fits describe the machine's noise as much as the model
  (the notes in fits.csv say so), and a re-run on a quiet machine is needed before trusting them.
- **speedup** = t({REFERENCE_MODEL}) / t(model) at equal shape and length (> 1: faster than
  {REFERENCE_MODEL}); **memory ratio** = peak memory(model) / peak memory({REFERENCE_MODEL}).
  The *crossover* is where the speedup crosses 1 for good, interpolated in log-log between the
  two measured lengths that bracket it; a model within {100 * PAR_TOLERANCE:.0f}% of Standard at every
  length is *on par*, not crossing."""


def render_markdown(an: Analysis, figures: Sequence[Path], out_dir: Path, command: Optional[str] = None) -> str:
    """The whole report; figure links are relative to ``out_dir``, where report.md is written."""
    rows = an.rows
    sources = list(dict.fromkeys(rows["source"]))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"{REPORT_TITLE} {', '.join(Path(s).name for s in sources)}", "",
          f"Generated {now}" + (f" by `{command}`" if command else "") + ".", "",
          "Input: " + ", ".join(f"`{s}`" for s in sources), "",
          "## What was measured", "", *_measured_summary(rows), "",
          "## Machine, software and the measuring command (from the JSON sidecars)", "",
          *_machine_section(sources, an.sidecars or {}), "",
          "## How to read the fits", "", METHOD_TEXT, ""]
    for metric, name in (("time_ms", "time"), ("peak_memory_mb", "peak memory")):
        md += [f"## Complexity fits: {name}", "", md_table(fits_display(an.fits, metric))]
    md += ["## Speedup over Standard", "",
           "t(Standard) / t(model) at each length; > 1 means faster than Standard.", "",
           md_table(pivot_by_length(an.relative, "speedup")),
           "## Crossover", "", md_table(crossover_display(an.crossover)),
           "## Peak memory relative to Standard", "",
           "peak memory(model) / peak memory(Standard); < 1 means leaner.", "",
           md_table(pivot_by_length(an.relative, "memory_ratio")),
           "## Achieved FLOP rate", "",
           "flops (FlopCounterMode) / median time, and in brackets its share of the run's matmul "
           "calibration on that device (`calibration_matmul_gflops` in the sidecar) where that is recorded. "
           "Above 100% means the timing is noisier than the calibration, not a faster-than-matmul model.", "",
           md_table(flops_display(rows)),
           "## Not measured", "", md_table(an.failures),
          "## Rows left out of the analysis", "",
          "Rows of the input that could not be used, and why; everything above counts only the rows used.", "",
          md_table(an.dropped) if an.dropped is not None and len(an.dropped) else "None.", "",
          "## Figures", ""]
    for f in figures:
        rel = Path(f).relative_to(out_dir) if Path(f).is_relative_to(out_dir) else Path(f)
        md += [f"![{rel.stem}]({rel.as_posix()})", ""]
    return "\n".join(md)


# ---- the files ----

def write_analysis(an: Analysis, out_dir: Path, command: Optional[str] = None) -> dict:
    """Write fits.csv, relative.csv, crossover.csv, the figures and report.md; return name -> path."""
    out_dir = Path(out_dir)
    written = {}
    for name, table in (("fits", an.fits), ("relative", an.relative), ("crossover", an.crossover)):
        written[name] = write_frame(out_dir / f"{name}.csv", table)
    figures = (plots.plot_scaling(an.rows, an.fits, out_dir) + plots.plot_speedup(an.relative, out_dir)
               + plots.plot_params(an.rows, out_dir))
    for f in figures:
        written[Path(f).stem] = Path(f)
    written["report"] = write_text(out_dir / "report.md", render_markdown(an, figures, out_dir, command))
    return written


REPORT_TITLE = "# bsbr-eval analysis:"


def is_earlier_analysis(folder: Path) -> bool:
    """Whether ``folder`` holds an analysis this command wrote (its report.md), which a new one may
    replace file by file."""
    report = Path(folder) / "report.md"
    return report.is_file() and report.read_text(encoding="utf-8", errors="replace").startswith(REPORT_TITLE)


# ---- the terminal ----

def sidecar_warnings(an: Analysis) -> list:
    """One line per input whose sidecar could not be read (it is left out of the report's machine section)."""
    return [f"warning: {meta}" for meta in (an.sidecars or {}).values() if isinstance(meta, ResultsError)]


def _rich(df: pd.DataFrame, title: str) -> tuple:
    """(title, columns, rows) of one terminal table (``evals.console.table`` prints it)."""
    return title, [str(c) for c in df.columns], [tuple(map(str, row)) for row in df.itertuples(index=False)]


def _compact(df: pd.DataFrame, drop: Sequence[str] = ()) -> pd.DataFrame:
    """Narrower for a terminal: device / mode / level in one column."""
    df = df.drop(columns=[c for c in drop if c in df.columns])
    where = df["device"].astype(str) + "/" + df["mode"].astype(str) + "/" + df["level"].astype(str)
    return df.drop(columns=_WHERE).assign(where=where.values)[["model", "where", *df.columns[4:]]] \
        if list(df.columns[:4]) == ["model", *_WHERE] else df


def terminal_tables(an: Analysis) -> list:
    """The terminal's tables, as (title, columns, rows): the time and memory fits, the crossover,
    the failures, the rows left out."""
    out = [_rich(_compact(fits_display(an.fits, m), ["ΔAICc to next"]), f"Complexity fit: {name}")
           for m, name in (("time_ms", "time (ms)"), ("peak_memory_mb", "peak memory (MB)"))
           if (an.fits["metric"] == m).any()]
    if not an.crossover.empty:
        out.append(_rich(_compact(crossover_display(an.crossover)), f"Speedup over {REFERENCE_MODEL}: crossover"))
    if not an.failures.empty:
        out.append(_rich(_compact(an.failures.drop(columns="error")), "Not measured (see report.md for errors)"))
    if an.dropped is not None and len(an.dropped):
        out.append(_rich(an.dropped.astype(str), f"{len(an.dropped)} row(s) left out of the analysis"))
    return out
