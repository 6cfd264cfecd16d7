"""Analysis of ``bsbr-eval compare`` results: pure functions on pandas DataFrames.

Nothing here draws, prints or writes files (plots live in ``evals.analyze.plots``, the report in
``evals.analyze.report``); every function takes a DataFrame and returns a new one.

Legend of the quantities used below

    n       sequence length (``seq_len``)
    y       a cost measured at n: ``time_ms`` or ``peak_memory_mb``
    m       number of ok points in one fit (rows, so replicates count)
    k       number of distinct lengths in one fit
    p       number of non-negative coefficients of a candidate class

What is computed (docs/evaluation.md, "bsbr-eval analyze"):

* **Log-log slope** ``log y = a + s log n`` by ordinary least squares with a 95% confidence
  interval from Student's t with m - 2 degrees of freedom, over the whole range and over the upper
  half of the lengths, because fixed overhead flattens the low end.
* **Best complexity class** among ``1, n, n log n, n^2, n + n^2``. Every class carries a constant
  term for the fixed overhead, so class ``n^2`` is ``y = c0 + c2 n^2``. Coefficients are
  non-negative (Lawson & Hanson's NNLS, ``scipy.optimize.nnls``) and fitted on *relative*
  residuals ``(y - y_hat) / y``, i.e. least squares weighted by 1/y, so that the long lengths
  do not drown the short ones. Classes are ranked by the small-sample corrected Akaike criterion
  (AICc; Hurvich & Tsai, 1989; Burnham & Anderson, 2002):
  ``AICc = m ln(RSS/m) + 2K + 2K(K+1)/(m-K-1)`` with ``K = p`` (see ``aicc`` for why not p + 1);
  a class needs ``m > K + 1`` points to be ranked at all, and each of its growth terms must add at
  least 5% of its fitted value at the longest length (else it is a simpler class in disguise). Of
  the classes within 2 of the lowest AICc, the one with the fewest coefficients is chosen.
* **Underdetermined**: fewer than 5 distinct lengths, or a span max/min under 8x, and the fit
  says so instead of naming a class.
* **Relative figures** against ``Standard`` (Vaswani et al., 2017) at equal configuration and
  length: speedup ``t_Standard / t_model`` and memory ratio ``mem_model / mem_Standard``; and the
  crossover length at which a model becomes, and stays, faster than Standard.
* **Achieved FLOP rate** ``flops / time`` as a fraction of the run's matmul calibration for
  that device (``calibration_matmul_gflops`` or ``matmul_gflops`` in the JSON sidecar beside
  each CSV; NaN when the sidecar lacks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from evals.registry import model_order
from evals.results import REQUIRED_COLUMNS, read_table
from evals.errors import ResultsError
from evals.output.files import read_sidecar

# The CSV contract (schema, statuses, which columns are numbers) lives in evals.results.
METRICS: tuple = ("time_ms", "peak_memory_mb")
REFERENCE_MODEL = "Standard"

# A fit is made over seq_len with everything else in the configuration held fixed.
FIT_KEYS: tuple = ("model", "device", "mode", "level", "dtype", "batch_size", "hidden_dim", "num_layers",
                   "num_heads", "chunk_size", "compile", "sdpa_backend")
# A model is compared with Standard at the same shape; chunk_size is BSBR's knob, not Standard's.
MATCH_KEYS: tuple = ("device", "mode", "level", "dtype", "batch_size", "hidden_dim", "num_layers", "num_heads",
                     "compile", "sdpa_backend", "seq_len")
# Columns added to the CSV after runs were committed, with the value those older runs had.
LATER_COLUMNS = {"compile": False, "sdpa_backend": "auto"}

MIN_LENGTHS = 5      # distinct lengths a fit needs ...
MIN_SPAN = 8.0       # ... and the factor max/min they must span
CLASSES: tuple = ("1", "n", "n log n", "n^2", "n + n^2")
MATERIAL = 0.05  # a class's every growth term must add >= 5% of its fitted value at the longest length
UNDERDETERMINED = "underdetermined"
PAR_TOLERANCE = 0.05  # speedups within 5% of 1 at every length: on par with Standard, no crossover
NOISY_SPREAD = 0.25  # a fit's note flags timings whose p20-p80 spread exceeds this share of the median


class AnalysisInputError(ResultsError):
    """Bad input to ``analyze``: a missing file, a CSV without the required columns, no rows."""


# ---- loading ----

def calibration_gflops(meta: dict, device: str, dtype: str = "float32") -> float:
    """The run's matmul calibration for ``device`` and ``dtype`` in GFLOP/s, NaN if the sidecar has none.

    Accepts ``matmul_gflops`` or ``calibration_matmul_gflops`` (what ``compare`` writes), each either
    one number or a mapping with keys "cpu", "cuda" (fp32) and "cuda/bfloat16" etc.; "cuda:1" falls
    back to "cuda". Another dtype never falls back to the fp32 rate: a bf16 row's fraction of an
    fp32 product would mean nothing.
    """
    for key in ("matmul_gflops", "calibration_matmul_gflops"):
        v = meta.get(key)
        if isinstance(v, dict):
            devs = (device, device.split(":")[0])
            names = devs if dtype == "float32" else tuple(f"{d}/{dtype}" for d in devs)
            v = next((v[n] for n in names if n in v), None)
        elif dtype != "float32":
            v = None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return np.nan


def load(paths: Sequence[Path | str]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Read and concatenate CSVs (whole runs or ``--shard i/N`` slices of one).

    Returns ``(rows, dropped, sidecars)``: the rows that can be used, with ``source`` (the file)
    and ``matmul_gflops`` (from that file's sidecar, else NaN) added; every row left out, with its
    file, line and why (torn, unknown status, a non-number where a number belongs, ``ok`` without
    a time, or a verbatim repeat of a row already read, e.g. a shard given twice); and each file's
    sidecar (a dict, None when there is none, or the ``ResultsError`` saying it is corrupt).
    A missing or empty file, one short of the required columns, or nothing usable at all is an
    ``AnalysisInputError``.
    """
    if not paths:
        raise AnalysisInputError("no CSV given")
    frames, dropped, sidecars = [], [], {}
    for p in map(Path, paths):
        try:
            table = read_table(p, strict=False)
        except ResultsError as e:
            raise AnalysisInputError(str(e)) from None
        df = with_later_columns(table.rows)
        df["_line"] = table.lines
        dropped += table.dropped
        try:
            meta = sidecars[str(p)] = read_sidecar(p)
        except ResultsError as e:
            meta, sidecars[str(p)] = None, e
        df["matmul_gflops"] = [calibration_gflops(meta or {}, d, t)
                               for d, t in zip(df["device"].astype(str), df["dtype"].astype(str))]
        df["source"] = str(p)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    cols = [c for c in out.columns if c not in ("source", "_line")]
    repeat = out.duplicated(subset=cols)
    for _, r in out[repeat].iterrows():
        dropped.append(dict(source=r["source"], line=r["_line"], model=r["model"], seq_len=r["seq_len"],
                            reason="repeats a row already read (same values)"))
    out = out[~repeat].drop(columns="_line").reset_index(drop=True)
    if out.empty:
        raise AnalysisInputError(f"{', '.join(map(str, paths))}: no usable rows"
                                 + (f" ({len(dropped)} dropped, first: line {dropped[0]['line']}: "
                                    f"{dropped[0]['reason']})" if dropped else " (the CSV has a header only)"))
    return out, pd.DataFrame(dropped, columns=DROPPED_COLUMNS), sidecars


DROPPED_COLUMNS = ["source", "line", "model", "seq_len", "reason"]


def load_results(paths: Sequence[Path | str]) -> pd.DataFrame:
    """The usable rows of ``load`` (see there)."""
    return load(paths)[0]


def newest_results_csv(root: Path | str = "results") -> Optional[Path]:
    """The most recently modified results CSV under ``root`` (recursively), or None.

    Only files whose header has the required columns count, so this never picks an analysis's own
    fits.csv or relative.csv.
    """
    best = None
    for p in Path(root).rglob("*.csv"):
        try:
            with p.open() as fh:
                header = {h.strip() for h in fh.readline().strip().split(",")}
        except (OSError, UnicodeDecodeError):
            continue
        if set(REQUIRED_COLUMNS) <= header and (best is None or p.stat().st_mtime > best.stat().st_mtime):
            best = p
    return best


def default_output_dir(csv_path: Path | str) -> Path:
    """``results/run.csv`` -> ``results/run_analysis/``."""
    p = Path(csv_path)
    return p.parent / f"{p.stem}_analysis"


def with_later_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every ``LATER_COLUMNS`` column, filled with what runs before it meant."""
    missing = {c: v for c, v in LATER_COLUMNS.items() if c not in df.columns}
    return df.assign(**missing) if missing else df


def ok_rows(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows that measured ``metric``: status ok and a finite positive value (logs need y > 0)."""
    df = with_later_columns(df)
    y = df[metric]
    return df[(df["status"] == "ok") & np.isfinite(y) & (y > 0)]


# ---- the fits ----

def loglog_slope(n: np.ndarray, y: np.ndarray) -> dict:
    """OLS of log y on log n: slope, intercept (natural log) and the slope's 95% t-interval."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    out = dict(slope=np.nan, slope_ci_low=np.nan, slope_ci_high=np.nan, intercept=np.nan)
    if len(np.unique(n)) < 2:
        return out
    r = stats.linregress(np.log(n), np.log(y))
    out.update(slope=r.slope, intercept=r.intercept)
    dof = len(n) - 2
    if dof >= 1:
        # a constant y (e.g. a fixed-size decode cache) makes linregress's stderr NaN; the fit is exact
        se = 0.0 if np.ptp(np.log(y)) == 0 else r.stderr
        half = stats.t.ppf(0.975, dof) * se
        out.update(slope_ci_low=r.slope - half, slope_ci_high=r.slope + half)
    return out


def upper_half(n: np.ndarray) -> np.ndarray:
    """Mask of the points whose length is in the upper half of the distinct lengths (median included)."""
    n = np.asarray(n, float)
    lengths = np.unique(n)
    return n >= lengths[(len(lengths) - 1) // 2 + (len(lengths) % 2 == 0)]


def class_basis(cls: str, n: np.ndarray) -> np.ndarray:
    """Design matrix (m, p) of a candidate class; column 0 is the constant overhead."""
    n = np.asarray(n, float)
    one = np.ones_like(n)
    cols = {"1": [one], "n": [one, n], "n log n": [one, n * np.log(n)], "n^2": [one, n * n],
            "n + n^2": [one, n, n * n]}[cls]
    return np.stack(cols, axis=1)


# names of the coefficient columns in fits.csv, in class_basis order
_COEF_NAMES = {"1": ("coef_1",), "n": ("coef_1", "coef_n"), "n log n": ("coef_1", "coef_nlogn"),
               "n^2": ("coef_1", "coef_n2"), "n + n^2": ("coef_1", "coef_n", "coef_n2")}
COEF_COLUMNS: tuple = ("coef_1", "coef_n", "coef_nlogn", "coef_n2")


def fit_class(cls: str, n: np.ndarray, y: np.ndarray) -> tuple:
    """Non-negative relative least squares of ``y`` on the class basis: (coefficients, relative RSS).

    Minimising sum(((y - A c) / y)^2) is NNLS of (A / y) c against a vector of ones. Columns are
    scaled to unit maximum first, since n^2 at n = 65536 is 4e9 and would swamp the constant.
    """
    A = class_basis(cls, n)
    y = np.asarray(y, float)
    W = A / y[:, None]                       # (m, p) rows weighted by 1/y
    scale = np.abs(W).max(axis=0)
    scale[scale == 0] = 1.0
    c, _ = optimize.nnls(W / scale, np.ones_like(y))
    c = c / scale
    rss = float(np.sum((1.0 - W @ c) ** 2))
    return c, rss


def aicc(rss: float, m: int, p: int) -> float:
    """AICc of a least-squares fit with K = p coefficients; inf when m <= K + 1 (not rankable).

    K counts the coefficients only. Counting the residual variance as well (K = p + 1) is the
    textbook convention, but at the 5 lengths of the default sweep its small-sample term
    (2K(K+1)/(m-K-1): 6 for ``1`` vs 24 for ``n``) lets nothing but the constant win unless the
    fit is near-perfect, which on a noisy 2-core machine picked ``1`` for clearly growing times.
    """
    K = p
    if m <= K + 1:
        return math.inf
    # floor: an exact fit (synthetic, noise-free data) would give log(0); the penalty then decides
    s2 = max(rss / m, 1e-14)
    return m * math.log(s2) + 2 * K + 2 * K * (K + 1) / (m - K - 1)


def evaluate_class(coefs: dict, n: np.ndarray) -> np.ndarray:
    """The fitted curve c0 + c_n n + c_nlogn n ln n + c_n2 n^2 from a fits.csv row's coefficients."""
    n = np.asarray(n, float)
    g = lambda k: 0.0 if k not in coefs or not np.isfinite(coefs[k]) else float(coefs[k])  # noqa: E731
    return g("coef_1") + g("coef_n") * n + g("coef_nlogn") * n * np.log(n) + g("coef_n2") * n * n


def fit_one(n: np.ndarray, y: np.ndarray) -> dict:
    """Every figure of one complexity fit over the points (n, y); all y must be > 0."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    lengths = np.unique(n)
    k = len(lengths)
    span = float(lengths.max() / lengths.min()) if k else np.nan
    row = dict(n_points=len(n), n_lengths=k, min_len=lengths.min() if k else np.nan,
               max_len=lengths.max() if k else np.nan, span=span)
    row.update(loglog_slope(n, y))
    up = upper_half(n) if k else np.zeros(0, bool)
    u = loglog_slope(n[up], y[up]) if len(np.unique(n[up])) >= 3 else {}
    row.update(upper_slope=u.get("slope", np.nan), upper_slope_ci_low=u.get("slope_ci_low", np.nan),
               upper_slope_ci_high=u.get("slope_ci_high", np.nan))
    row.update({c: np.nan for c in COEF_COLUMNS})
    scores = {}
    if k >= 1:
        for cls in CLASSES:
            c, rss = fit_class(cls, n, y)
            scores[cls] = (aicc(rss, len(n), len(c)), c, rss)
    row.update({f"aicc[{cls}]": scores[cls][0] if cls in scores else np.nan for cls in CLASSES})
    if k < MIN_LENGTHS or span < MIN_SPAN:
        row.update(best_class=UNDERDETERMINED, runner_up="", delta_aicc=np.nan, rel_rmse=np.nan,
                   note=f"{k} length(s) spanning {span:.3g}x; need >= {MIN_LENGTHS} spanning >= {MIN_SPAN:g}x")
        return row
    # materiality: a class whose growth term adds under MATERIAL of the fitted value at the longest
    # length is its simpler nested class in disguise (c n^2 with c ~ 1e-11 on a flat decode time)
    top = np.array([lengths.max()])
    material = {cls: all(cj * class_basis(cls, top)[0, j] >= MATERIAL * float(class_basis(cls, top)[0] @ c)
                         for j, cj in enumerate(c) if j > 0)
                for cls, (_, c, _) in scores.items()}
    ranked = sorted((s[0], CLASSES.index(cls), cls) for cls, s in scores.items()
                    if np.isfinite(s[0]) and material[cls])
    # parsimony: of the classes within 2 AICc of the minimum (equally supported, Burnham & Anderson),
    # take the one with the fewest coefficients, so a nested extra term (n + n^2 over n) must earn its place
    close = [r for r in ranked if r[0] - ranked[0][0] < 2]
    best = min(close, key=lambda r: (len(_COEF_NAMES[r[2]]), r[0]))[2]
    others = [r for r in ranked if r[2] != best]
    c, rss = scores[best][1], scores[best][2]
    row.update(dict(zip(_COEF_NAMES[best], c)))
    row.update(best_class=best, runner_up=others[0][2] if others else "",
               delta_aicc=others[0][0] - scores[best][0] if others else np.nan,
               rel_rmse=math.sqrt(rss / len(n)), note="")
    if row["delta_aicc"] < 2:
        row["note"] = f"{best} and {row['runner_up']} are within 2 AICc: not clearly distinguished"
    return row


FIT_COLUMNS: tuple = (FIT_KEYS + ("metric", "slope", "slope_ci_low", "slope_ci_high", "upper_slope",
                                  "upper_slope_ci_low", "upper_slope_ci_high", "best_class", "runner_up",
                                  "delta_aicc", "rel_rmse", "n_lengths", "n_points", "min_len", "max_len", "span",
                                  "intercept") + COEF_COLUMNS + tuple(f"aicc[{c}]" for c in CLASSES)
               + ("p20_p80_spread", "note"))


def complexity_fits(df: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """One row per model x device x mode x level (x the rest of the configuration) x metric.

    Only ok rows with a positive value enter a fit; a group with none gives no row.
    """
    rows = []
    for metric in metrics:
        d = ok_rows(df, metric)
        for key, g in d.groupby(list(FIT_KEYS), sort=False, dropna=False):
            r = dict(zip(FIT_KEYS, key), metric=metric)
            r.update(fit_one(g["seq_len"].to_numpy(), g[metric].to_numpy()))
            if metric == "time_ms":
                # how far the timing samples scatter: a fit is no steadier than the points it is fit to
                spread = float(np.nanmedian((g["time_ms_p80"] - g["time_ms_p20"]) / g["time_ms"]))
                r["p20_p80_spread"] = spread
                if spread > NOISY_SPREAD:
                    r["note"] = "; ".join(filter(None, [r["note"], f"noisy timings: median p20-p80 spread "
                                                                   f"{100 * spread:.0f}% of the median"]))
            rows.append(r)
    fits = pd.DataFrame(rows, columns=list(FIT_COLUMNS))
    return _sort_models(fits, ["metric", "device", "mode", "level"])


# ---- relative figures ----

def _median_by_config(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Median of replicated rows (shards or resumed runs may repeat a configuration)."""
    d = ok_rows(df, metric)
    return d.groupby(["model", *MATCH_KEYS], dropna=False, as_index=False)[metric].median()


def relative_to_standard(df: pd.DataFrame, reference: str = REFERENCE_MODEL) -> pd.DataFrame:
    """Per model and length: ``speedup = t_ref / t`` and ``memory_ratio = mem / mem_ref``.

    Matched on the configuration in ``MATCH_KEYS``; NaN where either side did not measure.
    Empty when the reference model was not run.
    """
    t = _median_by_config(df, "time_ms")
    m = _median_by_config(df, "peak_memory_mb")
    both = t.merge(m, on=["model", *MATCH_KEYS], how="outer")
    ref = both[both["model"] == reference].drop(columns="model").rename(
        columns={"time_ms": "ref_time_ms", "peak_memory_mb": "ref_peak_memory_mb"})
    cols = ["model", *MATCH_KEYS, "time_ms", "ref_time_ms", "speedup", "peak_memory_mb", "ref_peak_memory_mb",
            "memory_ratio"]
    if ref.empty:
        return pd.DataFrame(columns=cols)
    out = both.merge(ref, on=list(MATCH_KEYS), how="inner")
    out["speedup"] = out["ref_time_ms"] / out["time_ms"]
    out["memory_ratio"] = out["peak_memory_mb"] / out["ref_peak_memory_mb"]
    return _sort_models(out[cols], ["device", "mode", "level", "seq_len"])


def crossover(rel: pd.DataFrame, reference: str = REFERENCE_MODEL) -> pd.DataFrame:
    """Length at which each model becomes, and stays, faster than the reference.

    ``first_faster_len`` is the shortest measured length from which every longer measured length
    has speedup > 1. ``crossover_len`` interpolates log(speedup) linearly in log(n) between that
    length and the one before it, i.e. where the speedup crosses 1. ``verdict`` says which case
    held: faster throughout, crosses, never faster in the measured range, or on par (every speedup
    within ``PAR_TOLERANCE`` of 1, where a "crossing" would be timing noise).
    """
    keys = [k for k in MATCH_KEYS if k != "seq_len"]
    rows = []
    d = rel[(rel["model"] != reference) & np.isfinite(rel["speedup"].astype(float))]
    for key, g in d.groupby(["model", *keys], sort=False, dropna=False):
        g = g.sort_values("seq_len")
        n, s = g["seq_len"].to_numpy(float), g["speedup"].to_numpy(float)
        faster = s > 1
        r = dict(zip(["model", *keys], key), min_len=n[0], max_len=n[-1], speedup_at_max=s[-1],
                 first_faster_len=np.nan, crossover_len=np.nan)
        if (np.abs(np.log(s)) < np.log(1 + PAR_TOLERANCE)).all():
            r.update(verdict=f"on par (within {100 * PAR_TOLERANCE:.0f}% throughout)")
        elif faster.all():
            r.update(verdict="faster throughout", first_faster_len=n[0])
        elif not faster[-1]:
            r.update(verdict="never faster" if not faster.any() else "slower at the longest length")
        else:
            i = int(np.flatnonzero(~faster)[-1]) + 1     # first index of the final faster run
            x0, x1, y0, y1 = np.log(n[i - 1]), np.log(n[i]), np.log(s[i - 1]), np.log(s[i])
            r.update(verdict="crosses", first_faster_len=n[i],
                     crossover_len=float(np.exp(x0 + (0 - y0) * (x1 - x0) / (y1 - y0))))
        rows.append(r)
    cols = ["model", *keys, "verdict", "crossover_len", "first_faster_len", "speedup_at_max", "min_len", "max_len"]
    return _sort_models(pd.DataFrame(rows, columns=cols), ["device", "mode", "level"])


# ---- per-row derived figures ----

def flop_rate(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``achieved_gflops = flops / time`` and ``flop_fraction`` of the run's matmul calibration.

    Both are per row as measured: in ``decode`` mode they are only meaningful if ``flops`` and
    ``time_ms`` count the same unit of work, which is ``compare``'s contract to keep.
    """
    out = df.copy()
    ok = (out["status"] == "ok") & (out["time_ms"] > 0) & (out["flops"] > 0)
    out["achieved_gflops"] = np.where(ok, out["flops"] / (out["time_ms"] * 1e-3) / 1e9, np.nan)
    cal = out["matmul_gflops"] if "matmul_gflops" in out else np.nan
    out["flop_fraction"] = out["achieved_gflops"] / cal
    return out


def status_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that were not measured (oom / error / skipped), with their lengths and first error."""
    bad = df[df["status"] != "ok"]
    cols = ["model", "device", "mode", "level", "status", "lengths", "error"]
    if bad.empty:
        return pd.DataFrame(columns=cols)
    g = bad.groupby(["model", "device", "mode", "level", "status"], sort=False, dropna=False)
    out = g.agg(lengths=("seq_len", lambda s: " ".join(str(int(v)) for v in sorted(set(s)))),
                error=("error", lambda s: next((str(v) for v in s if isinstance(v, str) and v.strip()), ""))
                ).reset_index()
    return _sort_models(out[cols], ["device", "mode", "level"])


def _sort_models(df: pd.DataFrame, then: list) -> pd.DataFrame:
    """Sort by the given columns, then by registry model order; stable for ties."""
    if df.empty:
        return df.reset_index(drop=True)
    order = {m: i for i, m in enumerate(model_order(df["model"]))}
    by = [c for c in then if c in df.columns]
    return (df.assign(_o=df["model"].map(order)).sort_values([*by, "_o"], kind="stable")
            .drop(columns="_o").reset_index(drop=True))


# ---- everything at once ----

@dataclass
class Analysis:
    """The tables ``analyze`` prints and reports, all long-form DataFrames."""

    rows: pd.DataFrame        # the input rows + achieved_gflops, flop_fraction
    fits: pd.DataFrame        # complexity_fits
    relative: pd.DataFrame    # relative_to_standard
    crossover: pd.DataFrame   # crossover
    failures: pd.DataFrame    # status_summary
    dropped: pd.DataFrame = None  # rows of the input left out, and why (``load``)
    sidecars: dict = None         # source -> sidecar dict, None (none) or the ResultsError (corrupt)


def analyze(df: pd.DataFrame, dropped: Optional[pd.DataFrame] = None, sidecars: Optional[dict] = None) -> Analysis:
    rel = relative_to_standard(df)
    return Analysis(rows=flop_rate(df), fits=complexity_fits(df), relative=rel, crossover=crossover(rel),
                    failures=status_summary(df),
                    dropped=dropped if dropped is not None else pd.DataFrame(columns=DROPPED_COLUMNS),
                    sidecars=sidecars if sidecars is not None else {})
