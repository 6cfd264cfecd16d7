"""``bsbr-eval guard``'s work, after ``evals.guard.command`` has checked its options (its
docstring and docs/guard.md describe the method): ``--against``, ``--self-test``, ``--power``
and ``--update``, each a function that returns the exit code (0 pass, 1 fail) or raises
``ResultsError`` (exit 2, one line): a torn or short baseline, a file that is not a baseline,
an unknown ref or one whose code cannot be imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from evals.output import files
from evals.output.paths import check_target
from evals.registry import select
from evals import machine
from evals import results
from evals.guard import baseline as bl
from evals.guard import findings as fd
from evals.guard import report
from evals.errors import ResultsError

STEP_SUMMARY = "GITHUB_STEP_SUMMARY"


def run_guard(console: Console, o) -> int:
    """The whole command after the options are checked: read the baseline strictly, then the A/B
    check or the update."""
    if not o.update and not o.baseline.is_file():
        raise ResultsError(f"no baseline at {o.baseline}; create it with: "
                           f"bsbr-eval guard --baseline {o.baseline} --update")
    base = results.read_table(o.baseline, required=bl.REQUIRED, what="baseline").rows if o.baseline.is_file() else None
    models = select("--models", o.models) if o.models else None
    if o.update:
        check_target(o.baseline, "--baseline", folder=False, suffix=".csv")
        bl.check_replaceable(o.baseline)
        if base is None or not models:
            return _update(console, base if base is not None else bl.default_rows(models), o.baseline)
        theirs = base[base["model"].isin(models)]  # re-measured (or the grid, for models new to it) ...
        keep = base[~base["model"].isin(models)]   # ... and every other row kept as it is
        return _update(console, theirs if len(theirs) else bl.default_rows(models), o.baseline, keep=keep)
    if models:
        base = base[base["model"].isin(models)].reset_index(drop=True)
        if base.empty:
            raise ResultsError(f"--models: {o.baseline} holds no configuration of {', '.join(models)}")
    return _against(console, base, o)


def _update(console: Console, rows, path: Path, keep=None) -> int:
    """Measure ``rows``' exact metrics and write the baseline: those rows, after ``keep`` (rows
    of other models, kept as they are) when given."""
    import pandas as pd

    start = machine.utc_now()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("measuring exact metrics", total=len(rows))
        new = bl.measure_baseline(rows, progress=lambda label: bar.update(task, description=label, advance=1))
    broken = new[new["status"] != "ok"]
    if len(broken):  # a baseline row that is not ok would switch the guard off for it
        for _, r in broken.iterrows():
            console.print(f"{fd.config_label(r)}: {r['status']} {r.get('error', '')}")
        console.print(f"FAIL: not writing {path}: {len(broken)} configuration(s) did not measure ok")
        return 1
    if keep is not None and len(keep):
        new = pd.concat([keep, new[[c for c in keep.columns if c in new.columns]]], ignore_index=True)
    bl.write_baseline(path, new, start=start, source="measured now")
    console.print(f"wrote baseline {path} ({len(new)} rows) and {files.sidecar_path(path)}")
    return 0


def _inject(o, base) -> dict:
    from evals.measure import parse_inject

    if o.self_test is not None:  # every model of the baseline, plugins included
        return {m: float(o.self_test) for m in dict.fromkeys(base["model"])}
    try:
        return parse_inject()  # side B only: the workers never read the variable themselves
    except ValueError as e:
        raise ResultsError(str(e)) from None


def _against(console: Console, base, o) -> int:
    """``guard --against REF``: the A/B check, its self-test, or the power measurement."""
    from evals.guard import power as pw
    from evals.guard import runner

    settings = fd.ab_settings()
    threshold = settings["threshold"] if o.threshold is None else o.threshold
    rounds = settings["rounds"] if o.rounds is None else o.rounds
    inject = _inject(o, base)
    todo = int((base["status"] == "ok").sum())

    def measure_power(session):
        return pw.measure_power(session, runs=o.power_runs, rounds=rounds, progress=lambda *_: None)

    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"A/B against {o.against}", total=todo if o.power is None else None)
            plan = runner.ABPlan(rounds, threshold, o.alpha, inject, exact=o.self_test is None and o.power is None)
            done = runner.against(o.against, base, plan, progress=lambda i: bar.update(task, advance=1),
                                  run=measure_power if o.power is not None else None)
    except runner.ABError as e:
        raise ResultsError(str(e)) from None
    console.print(done.sides())
    console.print(fd.exactness(base))
    if o.power is not None:
        written = pw.write_power(o.power, done.result, alpha=o.alpha, ref=o.against, ref_sha=done.ref_sha,
                                 tree=done.tree, baseline=str(o.baseline))
        console.print(f"wrote {', '.join(str(p) for p in written)}")
        return 0
    return _verdict(console, base, o, done)


def _verdict(console: Console, base, o, done) -> int:
    """Show the findings, decide the exit code, and hand the verdicts on (JSON, Markdown)."""
    findings = done.result.findings
    console.print(report.render(findings, show_all=o.show_all, title=f"bsbr-eval guard --against {o.against}"))
    summary = fd.ab_summary(findings, ref=f"{o.against} ({done.ref_sha[:12]})", baseline=str(o.baseline))
    if o.self_test is None:
        code = 1 if not fd.failures(findings).empty else 0
        line = summary
    else:
        st = fd.self_test(findings, base, done.inject)
        console.print(report.render_self_test(st))
        other = fd.failures(findings)
        other = other[other["metric"] != fd.AB_TIME_METRIC]
        code = 0 if bool(st["ok"].all()) and other.empty else 1
        missed = [f"{r.model} {r.group}" for r in st.itertuples() if not r.ok]
        line = (f"SELF-TEST {'PASS' if code == 0 else 'FAIL'}: {o.self_test:g}x injected into every model, "
                + ("caught in every model, level and mode" if not missed else f"missed: {', '.join(missed)}")
                + ("" if other.empty else f"; other failures: {summary}"))
    console.print(line)
    step = os.environ.get(STEP_SUMMARY) or None
    if o.json_path or o.summary_path or step:
        header = dict(command="guard", ref=o.against, ref_sha=done.ref_sha, tree=done.tree, rounds=done.rounds,
                      threshold=done.threshold, alpha=done.alpha, self_test=o.self_test, inject=done.inject,
                      sides=done.sides(), baseline=str(o.baseline))
        rep = report.verdicts(findings, base, done.result.pairs, env=machine.machine(), header=header,
                              exit_code=code, summary=line)
        for p in report.write_reports(rep, json_path=o.json_path, summary_path=o.summary_path, step_summary=step):
            console.print(f"wrote {p}")
    return code
