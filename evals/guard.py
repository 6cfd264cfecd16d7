"""``bsbr-eval regress``: the command's logic, so that ``cli.py`` only parses and maps exit codes.

Two ways to guard time, one way to guard the exact metrics (docs/evaluation.md, "Performance
regression in CI"):

- ``--against REF`` (what CI runs): REF and the working tree measured side by side now
  (``evals.ab``), decided pair by pair (``evals.regress.ab_check``); ``--self-test`` and
  ``--power`` are variants of it;
- a stored baseline (``--baseline`` alone re-measures its configurations now; ``--current``
  compares a stored run) from the same machine only: the sidecars' fingerprints must match;
- ``--update`` rewrites the baseline (exact metrics and stored times) through the results layer.

Every function here returns the exit code (0 pass, 1 regression) or raises ``ResultsError``
(exit 2, one line): a bad option, a torn or short baseline, a run that is not baseline-shaped,
an unknown ref or one whose code cannot be imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
from rich.console import Console
from rich.progress import Progress

from evals import regress as rg
from evals import results
from evals.results import ResultsError


def check_options(*, against, current, update, threshold, alpha, rounds, self_test, power, power_runs) -> None:
    if threshold is not None and not threshold > 0:
        raise ResultsError(f"--threshold must be a positive fraction (0.25 = 25%), got {threshold}")
    if not 0 < alpha < 1:
        raise ResultsError(f"--alpha must lie in (0, 1), got {alpha}")
    if rounds is not None and rounds < 1:
        raise ResultsError(f"--rounds must be a positive integer, got {rounds}")
    if against is None:
        for flag, given in (("--rounds", rounds is not None), ("--self-test", self_test is not None),
                            ("--power", power is not None)):
            if given:
                raise ResultsError(f"{flag} only applies with --against REF")
    elif current is not None or update:
        raise ResultsError("--against measures both sides now; it cannot be combined with --current or --update")
    if self_test is not None and not self_test > 1:
        raise ResultsError(f"--self-test must be a slowdown factor above 1 (e.g. 1.5), got {self_test}")
    if power is not None and self_test is not None:
        raise ResultsError("--power injects its own factors; it cannot be combined with --self-test")
    if power_runs < 2:
        raise ResultsError(f"--power-runs must be at least 2 (a re-measurement pairs two runs), got {power_runs}")
    if power is not None:
        results.check_output_dir(power, "--power")
        if (Path(power) / "power.csv").exists():
            raise ResultsError(f"--power {power} already holds a power curve (power.csv); remove it or give "
                               "another folder")


def baseline_shaped(run: pd.DataFrame, path: Path) -> None:
    """``--update --current`` takes only a run the guard measured (``regress --update`` output): the
    live check needs its paired reference samples and its deterministic memory method."""
    ok = run[run["status"] == "ok"]
    if "ref_samples_ms" not in run.columns or ok["ref_samples_ms"].isna().any():
        raise ResultsError(f"--current {path} is not a baseline-shaped run: it has no paired reference samples "
                           "(ref_samples_ms), so the live check could never match it; a baseline is measured by "
                           "bsbr-eval regress --update (without --current)")
    bad = sorted(set(ok["memory_method"].dropna()) - set(rg.EXACT_MEMORY_METHODS)) if "memory_method" in ok else []
    if bad:
        raise ResultsError(f"--current {path} is not a baseline-shaped run: memory_method {', '.join(bad)}; "
                           f"a baseline's is {', '.join(rg.EXACT_MEMORY_METHODS)}")


def run_regress(console: Console, *, baseline: Path, against: Optional[str] = None, current: Optional[Path] = None,
                update: bool = False, threshold: Optional[float] = None, alpha: float = 0.01,
                rounds: Optional[int] = None, self_test: Optional[float] = None, power: Optional[Path] = None,
                power_runs: int = 10, allow_other_machine: bool = False, show_all: bool = False) -> int:
    """The whole command: check, read strictly, then the A/B check or the stored comparison."""
    check_options(against=against, current=current, update=update, threshold=threshold, alpha=alpha,
                  rounds=rounds, self_test=self_test, power=power, power_runs=power_runs)
    if not update and not baseline.is_file():
        raise ResultsError(f"no baseline at {baseline}; create it with: "
                           f"bsbr-eval regress --baseline {baseline} --update")
    need = tuple(rg.KEY_COLUMNS) + ("status", "samples_ms") + tuple(rg.EXACT_COLUMNS)
    base = results.read_table(baseline, required=need, what="baseline").rows if baseline.is_file() else None
    cur = results.read_table(current, required=need, what="current run").rows if current else None
    if update:
        results.check_output(baseline, "--baseline")
        if cur is not None:
            baseline_shaped(cur, current)
    if against is not None:
        return _against(console, base, baseline, against, threshold=threshold, alpha=alpha, rounds=rounds,
                        self_test=self_test, power=power, power_runs=power_runs, show_all=show_all)
    if not update and not allow_other_machine:  # stored times compare on one machine only
        other = results.read_sidecar(current) if current is not None else results.environment()
        why = rg.machine_mismatch(results.read_sidecar(baseline), other, what_a=f"baseline {baseline}",
                                  what_b=f"--current {current}" if current is not None else "this machine")
        if why:
            raise ResultsError(f"{why}; times do not transfer between machines: use --against REF, "
                               "or --allow-other-machine to compare anyway")
    return _stored(console, base, cur, baseline, current, update=update,
                   threshold=0.25 if threshold is None else threshold, alpha=alpha, show_all=show_all)


def _stored(console, base, cur, baseline: Path, current: Optional[Path], *, update, threshold, alpha,
            show_all) -> int:
    start = results.utc_now()
    run_id = f"regress-{start}"
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("measuring", total=None)

        def progress(label: str) -> None:
            bar.update(task, description=f"measuring {label}", advance=1)

        if update:
            if cur is None:  # re-measure the baseline's configurations (or the default grid)
                rows = base if base is not None else pd.DataFrame(
                    [dict(c.fields(), threads=rg.GUARD_THREADS) for c in rg.guard_cases()])
                bar.update(task, total=len(rows))
                new = rg.measure_all(rows, run_id=run_id, progress=progress)
            else:
                new = cur
            findings = rg.compare_runs(base, new, threshold=threshold, alpha=alpha) if base is not None else None
        elif cur is not None:
            findings = rg.compare_runs(base, cur, threshold=threshold, alpha=alpha)
        else:
            bar.update(task, total=int((base["status"] == "ok").sum()))
            findings = rg.live_check(base, threshold=threshold, alpha=alpha, run_id=run_id, progress=progress).findings
    if findings is not None:
        console.print(rg.render(findings, show_all=show_all))
    if not update:
        console.print(rg.summary(findings))
        return 1 if not rg.failures(findings).empty else 0
    broken = new[new["status"] != "ok"]
    if len(broken):  # a baseline row that is not ok would switch the guard off for it
        for _, r in broken.iterrows():
            console.print(f"{rg.config_label(r)}: {r['status']} {r.get('error', '')}")
        console.print(f"FAIL: not writing {baseline}: {len(broken)} configuration(s) did not measure ok")
        return 1
    with results.locked(baseline, "--baseline"):
        results.write_frame(baseline, rg.run_frame(new))
        results.write_sidecar(baseline, dict(results.environment(), utc_start=start, utc_end=results.utc_now(),
                                             source=str(current) if current else "measured now",
                                             guard=rg.guard_settings(), rows=len(new)))
    console.print(f"wrote baseline {baseline} ({len(new)} rows) and {results.sidecar_path(baseline)}")
    return 0


def _against(console, base, baseline, ref, *, threshold, alpha, rounds, self_test, power, power_runs,
             show_all) -> int:
    """``regress --against REF``: the A/B check, its self-test, or the power measurement."""
    from evals import ab
    from evals.measure import parse_inject
    from evals.registry import MODEL_NAMES

    settings = rg.ab_settings()
    threshold = settings["threshold"] if threshold is None else threshold
    rounds = settings["rounds"] if rounds is None else rounds
    try:
        inject = parse_inject()  # side B only: the workers never read the variable themselves
    except ValueError as e:
        raise ResultsError(str(e)) from None
    if self_test is not None:
        inject = {m: float(self_test) for m in MODEL_NAMES}
    from evals import regress_power

    todo = int((base["status"] == "ok").sum())
    def measure_power(session):
        return regress_power.measure_power(session, runs=power_runs, rounds=rounds, progress=lambda *_: None)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"A/B against {ref}", total=todo if power is None else None)
            done = ab.against(ref, base, rounds=rounds, threshold=threshold, alpha=alpha, inject=inject,
                              exact=self_test is None and power is None,
                              progress=lambda i: bar.update(task, advance=1),
                              run=measure_power if power is not None else None)
    except ab.ABError as e:
        raise ResultsError(str(e)) from None
    console.print(done.sides())
    if power is not None:
        written = regress_power.write_power(power, done.result, alpha=alpha, ref=ref, ref_sha=done.ref_sha,
                                            tree=done.tree, baseline=str(baseline))
        console.print(f"wrote {', '.join(str(p) for p in written)}")
        return 0
    findings = done.result.findings
    console.print(rg.render(findings, show_all=show_all, title=f"bsbr-eval regress --against {ref}",
                            columns=("A (ms)", "B (ms)")))
    summary = rg.ab_summary(findings, ref=f"{ref} ({done.ref_sha[:12]})", baseline=str(baseline))
    if self_test is None:
        console.print(summary)
        return 1 if not rg.failures(findings).empty else 0
    st = rg.self_test(findings, base, inject)
    console.print(rg.render_self_test(st))
    other = rg.failures(findings)
    other = other[other["metric"] != rg.AB_TIME_METRIC]
    passed = bool(st["ok"].all()) and other.empty
    missed = [f"{r.model} {r.group}" for r in st.itertuples() if not r.ok]
    console.print(f"SELF-TEST {'PASS' if passed else 'FAIL'}: {self_test:g}x injected into every model, "
                  + ("caught in every model, level and mode" if not missed else f"missed: {', '.join(missed)}")
                  + ("" if other.empty else f"; other failures: {summary}"))
    return 0 if passed else 1
