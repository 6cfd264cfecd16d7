"""The guard's one timing rule: the paired A/B verdict, and the names of every verdict.

The accepted commit (side A) and the working tree (side B) are timed back to back, ``s`` pairs
per configuration; a configuration is decided on its pairs alone (docs/guard.md):

- the paired ratio is the geometric mean of ``b_k / a_k`` over the pairs;
- ``regression`` when that ratio exceeds ``1 + threshold`` *and* the one-sided Wilcoxon
  signed-rank test (Wilcoxon, 1945) on the log ratios says B is slower with ``p < alpha``;
  ``faster`` is the mirror image (same factor, same test the other way) and passes;
- a second look (``looks_again``): every configuration whose first-pass ratio is over the
  threshold is measured again, and the fresh pairs alone decide it. A first-pass regression
  stands only if it regresses again (else ``transient``); an *unsettled* one (over the
  threshold, its test short of ``alpha``) fails only if the fresh pass is a regression. On a
  shared machine a burst of load on side A can hide a real slowdown in one pass of 16 pairs (in
  CI a 1.5x injection read +23.6%, p = 0.012); a fresh pass sees it. Pooling the two passes
  instead would make a 1.1x slowdown in heavy noise cross a 0.2 threshold (32 pairs, selected for
  a high first pass), which the threshold says is no regression.

``paired_verdict`` and ``looks_again`` are the only functions that decide time: the live check
(``evals.guard.findings``) and the power curve (``evals.guard.power``) both call them.

Axis legend: ``s`` paired samples of one configuration.
"""

from __future__ import annotations

import math

import numpy as np

# Verdicts, and which of them fail the check.
REGRESSION, CHANGED, MISSING = "regression", "changed", "missing"
FASTER, OK, NEW, UNTESTABLE = "faster", "ok", "new", "untestable"
TRANSIENT = "transient"  # regressed once, not when measured again: passes
FAILING = (REGRESSION, CHANGED, MISSING)
VERDICTS = (REGRESSION, CHANGED, MISSING, TRANSIENT, FASTER, OK, NEW, UNTESTABLE)

DEFAULT_ALPHA = 0.01
# Provisional defaults, until results/guard/power/power.json records the ones chosen from the
# measured power curve (``evals.guard.findings.ab_settings``).
AB_THRESHOLD = 0.2
AB_ROUNDS = 16


def min_signed_rank_p(s: int) -> float:
    """Smallest one-sided exact Wilcoxon signed-rank p-value reachable with ``s`` pairs."""
    return 0.5 ** s if s > 0 else 1.0


def paired_verdict(a, b, *, threshold: float = AB_THRESHOLD,
                   alpha: float = DEFAULT_ALPHA) -> tuple[float, float, str]:
    """``(geometric-mean ratio - 1, one-sided p, verdict)`` for (s,) paired samples of A and B.

    Pairs with a non-finite or non-positive sample are dropped. ``untestable`` when too few
    pairs remain for the test ever to reach ``alpha``. ``p`` is NaN when the ratio is within
    the threshold either way (no test is needed to pass it).
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    r = np.log(b[keep] / a[keep])  # (s,) log ratios
    if min_signed_rank_p(len(r)) >= alpha:
        return float("nan"), float("nan"), UNTESTABLE
    ratio = float(np.exp(r.mean()))
    if ratio > 1 + threshold:
        p = float(wilcoxon(r, alternative="greater").pvalue)
        return ratio - 1, p, REGRESSION if p < alpha else OK
    if ratio < 1 / (1 + threshold):
        p = float(wilcoxon(r, alternative="less").pvalue)
        return ratio - 1, p, FASTER if p < alpha else OK
    return ratio - 1, float("nan"), OK


def looks_again(change: float, verdict: str, *, threshold: float = AB_THRESHOLD) -> bool:
    """Whether a first-pass verdict is measured a second time, the fresh pairs alone then deciding
    it: every ``regression`` (to confirm it), and every ``ok`` whose ratio is over
    ``1 + threshold`` (its test fell short of alpha: unsettled)."""
    return verdict == REGRESSION or (verdict == OK and math.isfinite(change) and change > threshold)


def finite_number(flag: str, value, *, above: float = 0.0) -> float:
    """``value`` as a float when it is finite and ``> above``, else a ValueError naming ``flag``.

    A local stand-in for ``evals.options.check_finite`` (issue 23), to be folded into it.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > above):
        raise ValueError(f"{flag} must be a finite number > {above:g}, got {value!r}")
    return v


def ratio_interval(a, b, *, level: float = 0.95) -> tuple[float, float]:
    """A ``level`` confidence interval of the paired ratio (the geometric mean of ``b_k / a_k``):
    Student's t on the mean log ratio, exponentiated. NaN, NaN with fewer than two usable pairs.
    Shown beside the verdict; the verdict itself is ``paired_verdict``'s."""
    from scipy.stats import t as student

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    r = np.log(b[keep] / a[keep])  # (s,) log ratios
    if len(r) < 2:
        return float("nan"), float("nan")
    half = float(student.ppf(0.5 + level / 2, len(r) - 1) * r.std(ddof=1) / math.sqrt(len(r)))
    return float(np.exp(r.mean() - half)), float(np.exp(r.mean() + half))
