"""What the guard shows and hands on: the terminal tables, the Markdown summary (for
``$GITHUB_STEP_SUMMARY`` and ``--summary FILE``) and the machine-readable verdicts (``--json FILE``).

The JSON (``verdicts``) has one entry per configuration with its paired ratio B/A, the ratio's
95% interval, the one-sided p, the verdict and the machine; ``exit_code`` is the command's.
Exit codes (``EXIT_CODES``): 0 pass, 1 a failing verdict (or a missed self-test), 2 the check
could not run (bad input, unknown ref, a side whose code cannot be imported), 143 SIGTERM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from evals.output import files
from evals import errors
from evals.guard.findings import AB_TIME_METRIC, failures
from evals.guard.rule import (CHANGED, FAILING, FASTER, MISSING, NEW, OK, REGRESSION, TRANSIENT, UNTESTABLE,
                              ratio_interval)

EXIT_CODES = {0: "pass: no failing verdict", 1: "fail: a regression, a changed exact metric or a missing "
              "configuration (with --self-test: an injected slowdown went uncaught)",
              2: "the check could not run: bad input, unknown ref, a side whose code cannot be imported",
              143: "stopped by SIGTERM (the temporary worktree and the workers are cleaned up)"}
JSON_VERSION = 1
_STYLE = {TRANSIENT: "yellow", REGRESSION: "bold red", CHANGED: "bold red", MISSING: "bold red", FASTER: "green",
          NEW: "cyan", UNTESTABLE: "yellow", OK: "dim"}


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return str(v)


def _moved(findings: pd.DataFrame) -> pd.Series:
    """Every verdict but ``ok``, and any time change beyond 10%, so a slow drift is seen early."""
    return (findings["verdict"] != OK) | ((findings["metric"] == AB_TIME_METRIC) & (findings["change"].abs() > 0.1))


def render(findings: pd.DataFrame, *, show_all: bool = False, title: str = "bsbr-eval guard",
           columns: tuple = ("A (ms)", "B (ms)")):
    """A rich Table of what moved and by how much (every row with ``show_all``)."""
    from rich.table import Table

    shown = findings if show_all else findings[_moved(findings)]
    table = Table(title=title, title_justify="left")
    for col, just in (("config", "left"), ("metric", "left"), (columns[0], "right"), (columns[1], "right"),
                      ("change", "right"), ("p", "right"), ("verdict", "left")):
        table.add_column(col, justify=just)
    for _, r in shown.iterrows():
        change = "" if pd.isna(r["change"]) else f"{r['change']:+.1%}"
        p = "" if pd.isna(r["p_value"]) else f"{r['p_value']:.2g}"
        table.add_row(r["config"], r["metric"], _fmt(r["baseline"]), _fmt(r["current"]), change, p,
                      f"[{_STYLE.get(r['verdict'], '')}]{r['verdict']}[/]")
    return table


def render_self_test(table: pd.DataFrame):
    """A rich Table of ``self_test``: per model and group, how many configurations were caught."""
    from rich.table import Table

    out = Table(title="self-test: was each injected slowdown caught?", title_justify="left")
    for col in ("model", "group", "injected", "caught", "verdict"):
        out.add_column(col)
    for r in table.itertuples():
        out.add_row(r.model, r.group, f"{r.injected:g}x", f"{r.caught} of {r.of}",
                    "[dim]ok[/]" if r.ok else ("[bold red]missed[/]" if r.injected > 1 else "[bold red]false alarm[/]"))
    return out


# ----------------------------------------------------------------------------- machine-readable


def _num(v):
    """A JSON number or null (NaN, inf and non-numbers are null)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _value(v):
    n = _num(v)
    return n if n is not None else (None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


def machine_name(env: dict) -> str:
    """One line for the machine: CPU model, cores, torch build."""
    return f"{env.get('cpu_model')} ({env.get('cpu_count')} cores), torch {env.get('torch_version')}"


def configurations(findings: pd.DataFrame, rows: pd.DataFrame, pairs: dict, machine: str) -> list:
    """One dict per configuration: its ratio, interval, p and verdict (a failing exact metric or
    status outranks the time verdict; ``time_verdict`` keeps the latter), and its exact checks."""
    out = []
    for i, g in findings.groupby("i", sort=True):
        row = rows.iloc[int(i)]
        t = g[g["metric"] == AB_TIME_METRIC]
        bad = g[g["verdict"].isin(FAILING)]
        time_verdict = str(t["verdict"].iat[0]) if len(t) else None
        verdict = time_verdict if bad.empty or time_verdict == REGRESSION else str(bad["verdict"].iat[0])
        lo, hi = ratio_interval(*pairs[int(i)]) if int(i) in pairs else (float("nan"), float("nan"))
        change = _num(t["change"].iat[0]) if len(t) else None
        out.append(dict(
            config=str(g["config"].iat[0]), i=int(i), model=str(row["model"]), level=str(row["level"]),
            mode=str(row["mode"]), seq_len=int(row["seq_len"]),
            ratio=None if change is None else change + 1, interval=[_num(lo), _num(hi)],
            p=_num(t["p_value"].iat[0]) if len(t) else None, verdict=verdict or str(g["verdict"].iat[0]),
            time_verdict=time_verdict, a_ms=_num(t["baseline"].iat[0]) if len(t) else None,
            b_ms=_num(t["current"].iat[0]) if len(t) else None,
            pairs=len(pairs[int(i)][0]) if int(i) in pairs else 0, machine=machine,
            checks=[dict(metric=str(r.metric), baseline=_value(r.baseline), current=_value(r.current),
                         verdict=str(r.verdict)) for r in g[g["metric"] != AB_TIME_METRIC].itertuples()]))
    return out


def verdicts(findings: pd.DataFrame, rows: pd.DataFrame, pairs: dict, *, env: dict, header: dict,
             exit_code: int, summary: str) -> dict:
    """The whole machine-readable report (``--json FILE``)."""
    machine = machine_name(env)
    return dict(version=JSON_VERSION, passed=exit_code == 0, exit_code=exit_code,
                exit_codes={str(k): v for k, v in EXIT_CODES.items()}, summary=summary, **header,
                machine=dict(name=machine, **{k: env.get(k) for k in ("cpu_model", "cpu_count", "torch_version",
                                                                        "python_version", "hostname")}),
                configurations=configurations(findings, rows, pairs, machine))


# ----------------------------------------------------------------------------- Markdown


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_rows(confs: list) -> list:
    lines = ["| configuration | ratio B/A | 95% interval | p | verdict |", "|---|---:|---|---:|---|"]
    for c in confs:
        ratio = "" if c["ratio"] is None else f"{c['ratio']:.3f}"
        lo, hi = c["interval"]
        iv = "" if lo is None else f"{lo:.3f} – {hi:.3f}"
        p = "" if c["p"] is None else f"{c['p']:.2g}"
        v = c["verdict"] if c["verdict"] not in FAILING else f"**{c['verdict']}**"
        lines.append(f"| {_md_cell(c['config'])} | {ratio} | {iv} | {p} | {v} |")
    return lines


def markdown(report: dict) -> str:
    """The summary for a CI page: the outcome, who was compared, what moved, then every configuration."""
    confs = report["configurations"]
    moved = [c for c in confs if c["verdict"] != OK or (c["ratio"] is not None and abs(c["ratio"] - 1) > 0.1)]
    icon = "✅" if report["passed"] else "❌"
    out = [f"## {icon} bsbr-eval guard: {'PASS' if report['passed'] else 'FAIL'} (exit {report['exit_code']})",
           "", _md_cell(report["summary"]), "", f"- {_md_cell(report.get('sides', ''))}",
           f"- machine: {_md_cell(report['machine']['name'])}", ""]
    if moved:
        out += ["### What moved", ""] + _md_rows(moved) + [""]
    else:
        out += ["Nothing moved by more than 10%.", ""]
    out += ["<details><summary>All configurations</summary>", ""] + _md_rows(confs) + ["", "</details>", ""]
    return "\n".join(out)


def check_report_path(path, flag: str, suffix: str) -> Path:
    """Validate ``--json`` / ``--summary`` before anything is measured (one line, exit 2)."""
    from evals.errors import ResultsError
    from evals.output.paths import check_target

    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ResultsError(f"{flag}: {path} must end in {suffix}")
    return check_target(path, flag, folder=False)


def write_reports(report: dict, *, json_path=None, summary_path=None, step_summary=None) -> list:
    """Write the JSON and the Markdown where asked (each file whole, atomically); append the
    Markdown to ``step_summary`` (``$GITHUB_STEP_SUMMARY``: GitHub's per-step file, appended to by
    design, in one write). Returns the paths written."""

    done = []
    if json_path is not None:
        done.append(files.write_text(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n"))
    text = markdown(report)
    if summary_path is not None:
        done.append(files.write_text(summary_path, text))
    if step_summary:
        try:
            with open(step_summary, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            raise errors.OutputError(f"cannot append to $GITHUB_STEP_SUMMARY ({step_summary}): "
                                      f"{e.strerror or e}") from None
        done.append(Path(step_summary))
    return done
