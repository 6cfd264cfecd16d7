"""``bsbr-eval guard``, the performance guard: its ``Options``, their checks, and ``main``.

One timing method (docs/guard.md):

- ``--against REF`` (what CI runs): REF and the working tree measured side by side now
  (``evals.guard.runner``), decided pair by pair (``evals.guard.findings.ab_check``), the
  working tree's exact metrics held to the baseline; ``--self-test`` and ``--power`` are
  variants of it; ``--json FILE``, ``--summary FILE`` and ``$GITHUB_STEP_SUMMARY`` receive
  the verdicts (``evals.guard.report``);
- ``--update`` rewrites the baseline's exact metrics (``evals.guard.baseline``).

``main`` returns the exit code (0 pass, 1 fail) or raises ``ResultsError`` (exit 2, one line):
a bad option, a torn or short baseline, a file that is not a baseline, an unknown ref or one
whose code cannot be imported. The work itself is ``evals.guard.run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.errors import ResultsError
from evals.options import models_option, option


@dataclass(frozen=True)
class Options:
    """Guard performance: exit 0 pass, 1 regression, 2 the check could not run, 143 SIGTERM.

    With --against REF (what CI runs): the accepted commit and the working tree are timed side by
    side, interleaved; a configuration whose paired ratio exceeds 1 + --threshold is measured again,
    and regresses if the fresh pairs exceed it too with Wilcoxon p < --alpha. FLOPs, parameters and
    the traced memory must match --baseline exactly. No stored time is ever compared. A baseline
    with a torn row, missing columns or a non-numeric value is refused (exit 2), never passed."""

    baseline: Path = option(Path("results/baselines/cpu.csv"), "The committed baseline CSV (its JSON sidecar sits "
                            "beside it): the guard's configurations and their exact metrics (FLOPs, parameters, "
                            "traced memory).")
    against: Optional[str] = option(None, "A git ref (e.g. $(cat results/baselines/ref), or a pull request's merge "
                                    "base): measure it and the working tree side by side now, interleaved, and "
                                    "compare their times pair by pair.", flags=("--against",), show_default=False)
    update: bool = option(False, "Rewrite the baseline's exact metrics, measured now, and exit 0 (only a file "
                          "whose sidecar says it is a baseline is replaced). With no baseline file yet, measures "
                          "the guard's default grid.", flags=("--update",))
    threshold: Optional[float] = option(None, "Smallest slowdown that can count as a regression (0.2 = 20%). "
                                        "Default: the one chosen from results/guard/power/ (0.2 until it "
                                        "exists).", show_default=False)
    alpha: float = option(0.01, "Significance level of the one-sided Wilcoxon signed-rank test on the paired log "
                          "ratios.")
    rounds: Optional[int] = option(None, "With --against: interleaved A/B pairs per configuration. Default: chosen "
                                   "from results/guard/power/ (16 until it exists).", show_default=False)
    self_test: Optional[float] = option(None, "With --against: make every model FACTOR times slower on the "
                                        "working-tree side; exit 0 only if every model is caught in every level "
                                        "and mode of the grid.", flags=("--self-test",), show_default=False)
    power: Optional[Path] = option(None, "With --against: measure the guard's power curve (detection of 1.1x-1.5x "
                                   "injected, false alarms on clean runs) and write it to this folder.",
                                   flags=("--power",), show_default=False)
    power_runs: int = option(10, "With --power: runs per injected factor, and clean runs.")
    json_path: Optional[Path] = option(None, "With --against: write the verdicts as JSON (per configuration: ratio "
                                       "B/A, its 95% interval, p, verdict, machine; and the exit code).",
                                       flags=("--json",), show_default=False)
    summary_path: Optional[Path] = option(None, "With --against: write a Markdown summary (also appended to "
                                          "$GITHUB_STEP_SUMMARY when that is set).", flags=("--summary",),
                                          show_default=False)
    show_all: bool = option(False, "Show every check, not only what moved.", flags=("--all",))
    models: Optional[tuple] = models_option("Only these models' configurations (names or import paths). With "
                                            "--update and no baseline file yet: the guard's grid for these models, "
                                            "plugins included. Default: every model of the baseline.")


def _finite(flag: str, value, above: float = 0.0) -> None:
    from evals.guard.rule import finite_number

    try:
        finite_number(flag, value, above=above)
    except ValueError as e:
        raise ResultsError(str(e)) from None


def check(o: Options) -> None:
    """Every option, before anything is read or measured: one line naming what is wrong."""
    from evals.guard import report
    from evals.output.paths import check_target

    if o.threshold is not None:
        _finite("--threshold", o.threshold)
    if not (0 < o.alpha < 1):
        raise ResultsError(f"--alpha must lie in (0, 1), got {o.alpha}")
    if o.rounds is not None and o.rounds < 1:
        raise ResultsError(f"--rounds must be a positive integer, got {o.rounds}")
    if o.against is None:
        for flag, given in (("--rounds", o.rounds is not None), ("--self-test", o.self_test is not None),
                            ("--power", o.power is not None), ("--json", o.json_path is not None),
                            ("--summary", o.summary_path is not None)):
            if given:
                raise ResultsError(f"{flag} only applies with --against REF")
        if not o.update:
            raise ResultsError("guard needs --against REF (the A/B check, e.g. --against $(cat "
                               "results/baselines/ref)) or --update (rewrite the baseline's exact metrics)")
    elif o.update:
        raise ResultsError("--against measures both sides now; it cannot be combined with --update")
    if o.self_test is not None:
        _finite("--self-test", o.self_test, above=1.0)
    if o.power is not None and o.self_test is not None:
        raise ResultsError("--power injects its own factors; it cannot be combined with --self-test")
    if o.power_runs < 2:
        raise ResultsError(f"--power-runs must be at least 2 (a re-measurement pairs two runs), got {o.power_runs}")
    if o.power is not None:
        check_target(o.power, "--power", folder=True)
        if (Path(o.power) / "power.csv").exists():
            raise ResultsError(f"--power {o.power} already holds a power curve (power.csv); remove it or give "
                               "another folder")
    if o.json_path is not None:
        report.check_report_path(o.json_path, "--json", ".json")
    if o.summary_path is not None:
        report.check_report_path(o.summary_path, "--summary", ".md")




def main(o: Options) -> int:
    from evals.console import out
    from evals.guard.run import run_guard

    check(o)
    return run_guard(out(), o)
