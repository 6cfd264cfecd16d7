"""What the guard finds: every check of an A/B run, one row per (configuration, metric).

Two kinds of check, and nothing else (docs/guard.md):

1. **Exact metrics** (``flops``, ``params``, and ``peak_memory_mb`` when it comes from a
   deterministic trace) of the working tree must equal the committed baseline's, to the unit.
   Any difference is a failure until the baseline is rewritten with ``--update`` and committed
   with the change that caused it.
2. **Time** is decided by the paired A/B rule alone (``evals.guard.rule.paired_verdict``) on
   samples of the accepted commit and the working tree taken back to back now. No stored time
   is ever compared. A configuration that regresses is measured once more (fresh pairs, on two
   newly started workers) and reported only if it regresses again; otherwise it is ``transient``. One
   whose ratio is over the threshold but not significant is measured once more too, and the
   fresh pairs decide it (``evals.guard.rule.looks_again``).

``ab_check`` measures and decides; ``ab_findings`` decides given the samples; ``self_test``
says whether an injected slowdown was caught everywhere it was put. Nothing here reads a clock
or a file, bar ``ab_settings`` (the committed power curve's choice).

Axis legend: ``s`` paired samples of one configuration.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from evals.guard.rule import (AB_ROUNDS, AB_THRESHOLD, CHANGED, DEFAULT_ALPHA, FAILING, MISSING, NEW, OK,
                              REGRESSION, TRANSIENT, UNTESTABLE, looks_again, paired_verdict)
from evals.guard.sampling import interleave

# What identifies one configuration of the baseline (its CSV columns; a compare row is identified by
# more: evals.grid.KEY_COLUMNS).
BASELINE_KEY = ("model", "device", "mode", "level", "dtype", "batch_size", "seq_len",
               "hidden_dim", "num_layers", "num_heads", "chunk_size")
# Counted, not timed: the same code must give the same numbers.
EXACT_COLUMNS = ("flops", "params")
# Memory methods whose number is a pure function of the code, configuration and thread count
# (every guard configuration, five fresh processes: tests/evals/guard/test_exact_memory.py); only those are
# compared exactly. Any other method (the first call's ``cpu_alloc_trace``, or a baseline from
# an older harness) is shown and never fails the check.
EXACT_MEMORY_METHODS = ("cpu_alloc_trace_steady",)
AB_TIME_METRIC = "time B/A"
POWER_FILE = "results/guard/power/power.json"
FINDING_COLUMNS = ["config", "model", "mode", "seq_len", "metric", "baseline", "current", "change", "p_value",
                   "verdict", "i"]


def exactness(rows: pd.DataFrame) -> str:
    """One line saying which of the baseline's metrics are held to the unit and which are only
    shown (a memory method that is not reproducible, e.g. from an older harness)."""
    methods = sorted({str(m) for m in rows.get("memory_method", pd.Series(dtype=str)).dropna()})
    exact = [m for m in methods if m in EXACT_MEMORY_METHODS]
    shown = [m for m in methods if m not in EXACT_MEMORY_METHODS]
    line = "exact to the unit: " + ", ".join(EXACT_COLUMNS)
    if exact:
        line += f", peak_memory_mb ({', '.join(exact)})"
    if shown:
        line += f"; shown, never failing: peak_memory_mb ({', '.join(shown)})"
    return line + "; time: paired A/B against the ref, never a stored time"


def config_label(row) -> str:
    """A short, readable name for one configuration, e.g. ``BSBR train n=256``."""
    extra = "" if str(row.get("level", "model")) == "model" else f" {row['level']}"
    dev = "" if str(row.get("device", "cpu")) == "cpu" else f" {row['device']}"
    return f"{row['model']} {row['mode']}{extra}{dev} n={int(row['seq_len'])}"


def group_name(row) -> str:
    """The (level, mode) group a configuration belongs to, e.g. ``model decode``, ``layer train``."""
    return f"{row['level']} {row['mode']}"


def ab_settings(root=None) -> dict:
    """The A/B check's threshold and rounds: those chosen from the committed power curve
    (``POWER_FILE``'s ``chosen``), else the provisional defaults; and where they came from."""
    path = Path(root or Path(__file__).resolve().parents[2]) / POWER_FILE
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))["chosen"]
        return dict(threshold=float(chosen["threshold"]), rounds=int(chosen["rounds"]), source=str(POWER_FILE))
    except (OSError, ValueError, KeyError, TypeError):
        return dict(threshold=AB_THRESHOLD, rounds=AB_ROUNDS, source="provisional defaults (no power curve yet)")


# ----------------------------------------------------------------------------- exact metrics


def exact_equal(a, b) -> bool:
    """Equal to the unit (integers exactly; a float survives a CSV round trip to ~1e-15)."""
    a_nan = a is None or (isinstance(a, float) and math.isnan(a))
    b_nan = b is None or (isinstance(b, float) and math.isnan(b))
    if a_nan or b_nan:
        return a_nan and b_nan
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)
    return fa == fb or abs(fa - fb) <= 1e-9 * max(abs(fa), abs(fb))


def _rel(a, b) -> float:
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return float("nan")
    return fb / fa - 1.0 if fa else float("nan")


def _median(x) -> float:
    return float(np.median(x)) if len(x) else float("nan")


def exact_checks(row, got: dict) -> list:
    """``[(metric, baseline, current, change, verdict)]``: ``got``'s exact metrics against ``row``'s."""
    out = []
    for col in EXACT_COLUMNS:
        same = exact_equal(row[col], got.get(col))
        out.append((col, row[col], got.get(col), _rel(row[col], got.get(col)), OK if same else CHANGED))
    if "peak_memory_mb" in row.index and got.get("memory_method") is not None:
        if row.get("memory_method") != got.get("memory_method"):
            out.append(("memory_method", row.get("memory_method"), got.get("memory_method"), float("nan"), CHANGED))
        else:  # shown either way; fails only when the method is reproducible
            same = exact_equal(row["peak_memory_mb"], got["peak_memory_mb"])
            exact = str(row["memory_method"]) in EXACT_MEMORY_METHODS
            out.append(("peak_memory_mb", row["peak_memory_mb"], got["peak_memory_mb"],
                        _rel(row["peak_memory_mb"], got["peak_memory_mb"]), OK if same or not exact else CHANGED))
    return out


# ----------------------------------------------------------------------------- the A/B findings


def ab_findings(rows: pd.DataFrame, built: dict, pairs: dict, *, threshold: float = AB_THRESHOLD,
                alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """Every check of an A/B run, one row per (configuration, metric).

    ``rows``: the committed configurations (their exact metrics are the reference for side B);
    ``built[side][i]``: what side A / B reported when building row ``i`` (side B with its exact
    metrics when they were asked for); ``pairs[i]``: ((s,), (s,)) samples of A and B. For time,
    ``baseline`` and ``current`` are the median ms of A and B and ``change`` the paired ratio - 1.
    Column ``i`` is the row index; ``verdict`` is one of ``evals.guard.rule.VERDICTS``.
    """
    out = []

    def add(i, row, metric, b, c, change=float("nan"), p=float("nan"), verdict=OK):
        out.append(dict(config=config_label(row), model=row["model"], mode=row["mode"], seq_len=int(row["seq_len"]),
                        metric=metric, baseline=b, current=c, change=change, p_value=p, verdict=verdict, i=i))

    for i, (_, row) in enumerate(rows.iterrows()):
        if row["status"] != "ok":
            continue
        a, b = built["A"][i], built["B"][i]
        if b["status"] != "ok":
            add(i, row, "status", "ok", f"error: {b.get('error', '')}", verdict=MISSING)
            continue
        if "params" in b:  # side B was asked for its exact metrics: held to the committed file
            for metric, base, cur, change, verdict in exact_checks(row, b):
                add(i, row, metric, base, cur, change, verdict=verdict)
        if a["status"] != "ok":  # the accepted commit cannot build it: nothing to compare time with
            add(i, row, AB_TIME_METRIC, f"error: {a.get('error', '')}"[:80], "", verdict=NEW)
            continue
        s_a, s_b = pairs[i]
        change, p, verdict = paired_verdict(s_a, s_b, threshold=threshold, alpha=alpha)
        add(i, row, AB_TIME_METRIC, _median(s_a), _median(s_b), change, p, verdict)
    return pd.DataFrame(out, columns=FINDING_COLUMNS)


def failures(findings: pd.DataFrame) -> pd.DataFrame:
    """The findings that fail the check."""
    return findings[findings["verdict"].isin(FAILING)]


@dataclass
class ABResult:
    findings: pd.DataFrame   # ab_findings, re-measured regressions replaced, transient ones marked
    pairs: dict              # i -> ((s,), (s,)) the samples the verdict stands on
    remeasured: list         # row indices measured a second time


def ab_check(rows: pd.DataFrame, built: dict, sample: Callable[[str, int], float], *, rounds: int = AB_ROUNDS,
             threshold: float = AB_THRESHOLD, alpha: float = DEFAULT_ALPHA,
             progress: Optional[Callable[[int], None]] = None,
             fresh: Optional[Callable[[list], Callable[[str, int], float]]] = None) -> ABResult:
    """Measure every configuration both sides built (``rounds`` interleaved pairs each), decide,
    and measure each time regression once more (it stands only if it regresses again) and each
    unsettled ratio once more (the fresh pairs decide it).

    ``sample(side, i) -> ms`` takes one sample ("A" or "B") of row ``i``: the workers' in a real
    run (``evals.guard.runner.Session.sample``), a synthetic one in the tests. ``fresh(indices)``,
    when given, returns the sampler of the second look: in a real run, two newly started workers
    with only those configurations built, so a bias that belongs to one worker process (where its
    heap put the buffers) is drawn anew rather than measured twice.
    """
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    both = [i for i in range(len(rows)) if rows.iloc[i]["status"] == "ok"
            and built["A"][i]["status"] == "ok" and built["B"][i]["status"] == "ok"]
    pairs = interleave(both, rounds, sample, progress)
    findings = ab_findings(rows, built, pairs, threshold=threshold, alpha=alpha)
    t = findings[findings["metric"] == AB_TIME_METRIC]
    first = {int(i): v for i, c, v in zip(t["i"], t["change"], t["verdict"]) if looks_again(c, v, threshold=threshold)}
    if not first:
        return ABResult(findings, pairs, [])
    again = fresh(list(first)) if fresh is not None else sample
    pairs = {**pairs, **interleave(list(first), rounds, again, progress)}
    second = ab_findings(rows, built, pairs, threshold=threshold, alpha=alpha)
    was_regression = second["i"].map(lambda i: first.get(int(i)) == REGRESSION) & (second["metric"] == AB_TIME_METRIC)
    second.loc[was_regression & (second["verdict"] != REGRESSION), "verdict"] = TRANSIENT
    return ABResult(second, pairs, list(first))


def ab_summary(findings: pd.DataFrame, *, ref: str, baseline: str) -> str:
    """One line: how many configurations were compared with what, and what failed."""
    n_cfg = findings["config"].nunique()
    bad = failures(findings)
    if bad.empty:
        n_un = findings.loc[findings.verdict.isin([UNTESTABLE, NEW]), "config"].nunique()
        note = f" ({n_un} whose time could not be compared)" if n_un else ""
        return (f"PASS: {n_cfg} configurations: exact metrics match {baseline}, "
                f"no time regression against {ref}{note}")
    parts = [f"{len(bad[bad.verdict == v])} {v}" for v in FAILING if (bad.verdict == v).any()]
    return f"FAIL: {'; '.join(parts)} ({', '.join(dict.fromkeys(bad['config']))})"


def self_test(findings: pd.DataFrame, rows: pd.DataFrame, injected: dict) -> pd.DataFrame:
    """Did the guard catch an injected slowdown everywhere it was put, and nowhere else?

    One row per (model, group) of ``rows``: ``injected`` (the factor or 1), ``caught`` (how many
    of its configurations ended as ``regression``), ``of`` (how many had a time verdict), and
    ``ok``: an injected group needs at least one caught configuration, an uninjected one none.
    """
    t = findings[findings["metric"] == AB_TIME_METRIC]
    verdict = dict(zip(t["i"], t["verdict"]))
    out = []
    for (model, group), g in rows.assign(_g=rows.apply(group_name, axis=1), _i=range(len(rows))).groupby(
            ["model", "_g"], sort=False):
        got = [verdict[i] for i in g["_i"] if i in verdict]
        caught = sum(v == REGRESSION for v in got)
        f = float(injected.get(model, 1.0))
        out.append(dict(model=model, group=group, injected=f, caught=caught, of=len(got),
                        ok=caught > 0 if f > 1 else caught == 0))
    return pd.DataFrame(out, columns=["model", "group", "injected", "caught", "of", "ok"])
