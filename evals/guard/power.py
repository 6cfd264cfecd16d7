"""The power curve of the A/B guard (``bsbr-eval guard --against REF --power DIR``).

How often does the guard catch a slowdown of a given size, and how often does it fail unchanged
code? Both are measured, on the machine the guard runs on, with the guard's own workers:

- ``runs`` rounds of trials; each round runs one clean trial (nothing injected) and one trial
  per factor in ``FACTORS`` with every model on side B slowed by that factor, in that order, so a
  change of the machine's load over the hour hits every factor alike. A trial is the A/B
  measurement of every configuration, ``collect`` interleaved pairs each; the raw pairs are kept.
- every (threshold, sample count) in ``THRESHOLDS`` x ``ROUND_CHOICES`` is then decided offline
  on those pairs by the guard's own decision function (``evals.guard.rule.paired_verdict``, the
  one the live check calls: no second copy of the rule), using the first
  ``s`` pairs. The second look (``evals.guard.rule.looks_again``) is simulated with the next trial of the same factor (run ``j`` is looked at again with run
  ``j + 1``, cyclically): an independent measurement of the same configuration, which is what
  the live re-measurement is.
- ``choose``: the settings that failed no clean run (and re-measured at most ``FIRST_PASS_MAX`` of them) and
  caught 1.5x in every model, level and mode on every run; among those, the smallest threshold
  (most power at 1.1-1.3x), then the fewest pairs (fastest). ``evals.guard.findings.ab_settings``
  reads the choice back.

The injection burns ``(f - 1)`` times each call's duration of CPU inside the timed region
(``evals.measure._injected``). The table records the measured paired ratio (``ratio_median``)
next to the injected factor, so a curve can be read against what was actually seen.

Axis legend: ``s`` paired samples of one configuration.
"""

from __future__ import annotations

from evals.output import files
from evals import machine
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

FACTORS = (1.1, 1.2, 1.3, 1.5)
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
ROUND_CHOICES = (8, 12, 16, 20, 24)
COLLECT = 24  # pairs kept per configuration and trial: enough to evaluate every ROUND_CHOICES
FIRST_PASS_MAX = 0.1  # clean runs that may need the re-measurement (``choose``)


def measure_power(session, *, runs: int, rounds: int = COLLECT, factors=FACTORS,
                  progress: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """Raw pairs of every trial: one row per (run, factor, configuration, pair).

    ``session``: an ``evals.guard.runner.Session`` (both sides built); side B's injection is set per trial.
    Columns: ``run, factor, i, model, level, mode, seq_len, pair, a_ms, b_ms`` (``i``: the row of
    the baseline file).
    """
    from evals.guard.sampling import interleave

    collect = max(int(rounds), COLLECT)
    idx = session.testable()
    rows = session.rows
    out = []
    try:
        for run in range(runs):
            for f in (1.0,) + tuple(factors):
                session.set_inject({m: f for m in dict.fromkeys(rows["model"])} if f > 1 else {})
                if progress:
                    progress(f"run {run + 1}/{runs}, factor {f:g}")
                for i, (a, b) in interleave(idx, collect, session.sample).items():
                    r = rows.iloc[i]
                    for k in range(collect):
                        out.append(dict(run=run, factor=f, i=i, model=r["model"],
                                        level=r["level"], mode=r["mode"], seq_len=int(r["seq_len"]), pair=k,
                                        a_ms=float(a[k]), b_ms=float(b[k])))
    finally:
        session.set_inject({})
    return pd.DataFrame(out)


def decisions(samples: pd.DataFrame, *, alpha: float, thresholds=THRESHOLDS, round_choices=ROUND_CHOICES) -> pd.DataFrame:
    """The guard's verdicts for every (threshold, s, run, factor, configuration), first pass and final.

    Columns: ``threshold, rounds, run, factor, i, model, group, ratio, p, flagged, confirmed``;
    ``flagged`` is ``paired_verdict(...) == regression`` on the first ``s`` pairs, ``ratio`` the
    paired ratio (NaN when untestable), ``p`` the one-sided p the verdict used (NaN when none was
    needed). ``confirmed``: the final verdict is ``regression`` after the second look the live
    check takes (``evals.guard.rule.looks_again``: the fresh pairs decide), with the next run of the
    same factor (cyclically) as the fresh measurement.
    """
    from evals.guard.rule import REGRESSION, looks_again, paired_verdict

    have = int(samples["pair"].max()) + 1 if len(samples) else 0
    cells = {}
    for (run, f, i), g in samples.groupby(["run", "factor", "i"], sort=True):
        g = g.sort_values("pair")
        cells[(run, f, i)] = (g["a_ms"].to_numpy(), g["b_ms"].to_numpy(),  # (s,) each
                              dict(run=run, factor=f, i=i, model=g["model"].iat[0],
                                   group=f"{g['level'].iat[0]} {g['mode'].iat[0]}"))
    runs = sorted({k[0] for k in cells})
    nxt = {r: runs[(k + 1) % len(runs)] for k, r in enumerate(runs)}
    out = []
    for (run, f, i), (a, b, cell) in cells.items():
        later = cells.get((nxt[run], f, i))
        for s in (c for c in round_choices if c <= have):
            for t in thresholds:
                change, p, verdict = paired_verdict(a[:s], b[:s], threshold=t, alpha=alpha)
                confirmed = False
                if later is not None and looks_again(change, verdict, threshold=t):
                    confirmed = paired_verdict(later[0][:s], later[1][:s], threshold=t, alpha=alpha)[2] == REGRESSION
                out.append(dict(cell, threshold=t, rounds=s, ratio=change + 1, p=p, flagged=verdict == REGRESSION,
                                confirmed=confirmed))
    cols = ["threshold", "rounds", "run", "factor", "i", "model", "group", "ratio", "p", "flagged", "confirmed"]
    return pd.DataFrame(out, columns=cols)


def power_table(dec: pd.DataFrame) -> pd.DataFrame:
    """Rates per (threshold, rounds, factor, model, group), and per model over all its groups
    (``group = "all"``), and over the whole run (``model = "any"``).

    ``rate``: the share of runs in which at least one configuration of that cell was flagged and
    confirmed by the re-measurement: the detection rate for an injected factor, the false-alarm
    rate for factor 1. ``first_pass``: the same without the re-measurement. ``ratio_median``: the
    median measured paired ratio of the cell's configurations (the effective injected factor).
    """
    d = dec
    out = []
    for cells, by in ((["model", "group"], None), (["model"], "all"), ([], "any")):
        keys = ["threshold", "rounds", "factor"] + cells
        per_run = d.groupby(keys + ["run"], sort=True).agg(hit=("confirmed", "any"), first=("flagged", "any"),
                                                           ratio=("ratio", "median")).reset_index()
        t = per_run.groupby(keys, sort=True).agg(rate=("hit", "mean"), first_pass=("first", "mean"),
                                                 ratio_median=("ratio", "median"), runs=("run", "nunique"))
        t = t.reset_index()
        if by == "all":
            t["group"] = "all"
        elif by == "any":
            t["model"], t["group"] = "any", "all"
        out.append(t)
    cols = ["threshold", "rounds", "factor", "model", "group", "rate", "first_pass", "ratio_median", "runs"]
    return pd.concat(out, ignore_index=True)[cols]


def choose(table: pd.DataFrame) -> dict:
    """The settings the guard should use, by the rule in the module docstring, and why."""
    cand = []
    for (t, s), g in table.groupby(["threshold", "rounds"], sort=True):
        clean = g[(g["factor"] == 1.0) & (g["model"] == "any")]
        cells = g[(g["factor"] == max(g["factor"])) & ~g["model"].isin(["any"]) & (g["group"] != "all")]
        false_alarm = float(clean["rate"].iloc[0]) if len(clean) else float("nan")
        first = float(clean["first_pass"].iloc[0]) if len(clean) else float("nan")
        worst_top = float(cells["rate"].min()) if len(cells) else float("nan")
        cand.append(dict(threshold=float(t), rounds=int(s), false_alarm=false_alarm, false_alarm_first_pass=first,
                         worst_detection_top=worst_top))
    c = pd.DataFrame(cand)
    # Few false alarms even before the re-measurement: 0 of 10 confirmed only bounds a rate below
    # ~26% (95%), and the re-measurement squares that; picking the smallest threshold that happened
    # to pass the confirmed rate alone would select for luck. Zero first-pass alarms is too strict
    # on a shared 2-core machine (one noisy configuration in ten runs flagged at every threshold
    # up to 0.3 in the committed curve), so one clean run in ten may need its re-measurement.
    good = c[(c["false_alarm"] == 0) & (c["false_alarm_first_pass"] <= FIRST_PASS_MAX)
             & (c["worst_detection_top"] == 1)]
    if len(good):
        pick = good.sort_values(["threshold", "rounds"]).iloc[0]
        why = (f"the smallest threshold, then the fewest pairs, with no clean run failed, at most "
               f"{FIRST_PASS_MAX:.0%} of clean runs needing the re-measurement, and every model, level and mode "
               "caught at the largest factor on every run")
    else:  # nothing met both: fewest false alarms, then most detection, then smallest threshold
        pick = c.sort_values(["false_alarm", "worst_detection_top", "threshold", "rounds"],
                             ascending=[True, False, True, True]).iloc[0]
        why = "no setting met both targets; this one had the fewest false alarms, then the most detection"
    return dict(threshold=float(pick["threshold"]), rounds=int(pick["rounds"]), false_alarm=float(pick["false_alarm"]),
                false_alarm_first_pass=float(pick["false_alarm_first_pass"]),
                worst_detection_top=float(pick["worst_detection_top"]), rule=why)


def write_power(out_dir, samples: pd.DataFrame, *, alpha: float, ref: str, ref_sha: str, tree: dict,
                baseline: str) -> list:
    """Analyse ``samples`` and write, under ``out_dir``: ``samples.csv.gz`` (every raw pair; 50
    trials of the guard's grid are ~75k rows, so it is compressed),
    ``power.csv`` (``power_table``), ``power.json`` (its sidecar: the machine, the code, the
    command and ``chosen``, which ``guard --against`` then uses) and ``power.png``.
    Each file is written to a temporary name and renamed; returns the paths."""
    import gzip

    from evals.guard.figure import plot_power

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dec = decisions(samples, alpha=alpha)
    table = power_table(dec)
    chosen = choose(table)
    written = []
    written.append(files.write_bytes(out / "samples.csv.gz",
                                       gzip.compress(samples.to_csv(index=False).encode("utf-8"))))
    written.append(files.write_frame(out / "power.csv", table))
    info = dict(machine.environment(), ref=ref, ref_sha=ref_sha, working_tree=tree, baseline=baseline, alpha=alpha,
                factors=list(FACTORS), thresholds=list(THRESHOLDS), round_choices=list(ROUND_CHOICES),
                runs=int(samples["run"].nunique()) if len(samples) else 0, chosen=chosen)
    written.append(files.write_sidecar(out / "power.csv", info))
    written.extend(plot_power(table, chosen, out))
    return written


def reanalyse(out_dir) -> list:
    """Decide the kept raw pairs (``samples.csv.gz``) again with the current rule and rewrite
    ``power.csv``, ``power.png`` and the sidecar's ``chosen``, keeping the sidecar's record of the
    measurement (machine, code, command). For a change of the decision rule, not of the data."""
    import json

    from evals.guard.figure import plot_power

    out = Path(out_dir)
    samples = pd.read_csv(out / "samples.csv.gz")
    info = json.loads((out / "power.json").read_text(encoding="utf-8"))
    table = power_table(decisions(samples, alpha=float(info["alpha"])))
    info["chosen"] = choose(table)
    info["reanalysed_utc"] = machine.utc_now()
    written = [files.write_frame(out / "power.csv", table), files.write_sidecar(out / "power.csv", info)]
    return written + list(plot_power(table, info["chosen"], out))
