"""The CI performance-regression guard: compare a run with a committed baseline.

A 2-core machine shared with other jobs is noisy, so only what is deterministic fails a build
outright, and a timing change has to clear two independent bars before it is called a regression
(docs/evaluation.md, "bsbr-eval regress"):

1. **Exact metrics** (``flops``, ``params``, and ``peak_memory_mb`` when it comes from a
   deterministic trace) must equal the baseline's. Any difference is a failure until the baseline
   is rewritten with ``--update`` and committed with the change that caused it.
2. **Time** is never compared in milliseconds. Each raw sample of a configuration is divided by a
   reference timed in the same process right before and after it (a fixed plain-torch MLP, see
   ``paired_samples``), so a machine that is slower today cancels out; and the time the thread
   spent pre-empted, waiting for a CPU another process held, is taken out of every sample
   (``RunqueueWait``), which on a shared 2-core box is most of the noise. A row
   regresses only when the median ratio grew by more than ``threshold`` (default 25%) *and* the
   one-sided Mann-Whitney U test (Mann & Whitney, 1947) on the raw ratio samples says the
   current samples are stochastically larger with ``p < alpha`` (default 0.01). In live mode a
   row that regresses is measured once more, and only reported if it regresses again.

The comparison (``compare_runs``) works on two DataFrames and knows nothing of clocks; the
measurement (``live_check``) goes through the harness in ``evals.measure``; ``render`` draws the
rich table. Only the CLI reads and writes files.

Axis legend for the arrays below: ``s`` timed samples of one configuration.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from evals.results import case_key

# What identifies one measured configuration: the CSV's required identity and configuration
# columns (bar run_id, which differs between any two runs by construction). Every other column of
# ``evals.grid.KEY_COLUMNS`` (ff_dim, window_size, seed, ...) that both runs have is added.
KEY_COLUMNS = ("model", "device", "mode", "level", "dtype", "batch_size", "seq_len",
               "hidden_dim", "num_layers", "num_heads", "chunk_size")
# Counted, not timed: the same code must give the same numbers.
EXACT_COLUMNS = ("flops", "params")
# Memory methods whose number is a pure function of the code, configuration and thread count
# (checked by running them twice, see tests/test_regress.py); only those are compared exactly.
# ``steady_memory`` below gives one. The harness's own ``cpu_profiler_trace`` is taken on the
# first profiled call, which in train mode also sees frees of blocks allocated before profiling
# began and varies by ~1-5% between processes, so it is shown but never fails the check.
EXACT_MEMORY_METHODS = ("cpu_profiler_trace_steady",)
DEFAULT_THRESHOLD = 0.25
DEFAULT_ALPHA = 0.01

# Verdicts, and which of them fail the check.
REGRESSION, CHANGED, MISSING = "regression", "changed", "missing"
FASTER, OK, NEW, UNTESTABLE = "faster", "ok", "new", "untestable"
TRANSIENT = "transient"  # regressed once, not when measured again (live mode): passes
FAILING = (REGRESSION, CHANGED, MISSING)


# ----------------------------------------------------------------------------- parsing


def parse_samples(cell) -> np.ndarray:
    """Raw timing samples (ms) from a CSV cell: a JSON list, or numbers split by space/;/,."""
    if isinstance(cell, (list, tuple, np.ndarray)):
        return np.asarray(cell, dtype=float)
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return np.empty(0)
    text = str(cell).strip()
    if not text:
        return np.empty(0)
    if text.startswith("["):
        return np.asarray(json.loads(text), dtype=float)
    for sep in (";", ",", " "):
        text = text.replace(sep, " ")
    return np.asarray([float(t) for t in text.split()], dtype=float)


def format_samples(samples: Iterable[float]) -> str:
    """The inverse of ``parse_samples``: a compact JSON list (what we write into a baseline)."""
    return json.dumps([float(f"{x:.6g}") for x in samples])


def config_label(row) -> str:
    """A short, readable name for one configuration, e.g. ``BSBR train n=256``."""
    extra = "" if str(row.get("level", "model")) == "model" else f" {row['level']}"
    dev = "" if str(row.get("device", "cpu")) == "cpu" else f" {row['device']}"
    return f"{row['model']} {row['mode']}{extra}{dev} n={int(row['seq_len'])}"


def check_columns(df: pd.DataFrame, what: str) -> None:
    """One-line ValueError naming the columns a run must have to be compared."""
    need = set(KEY_COLUMNS) | {"status", "samples_ms"} | set(EXACT_COLUMNS)
    missing = sorted(need - set(df.columns))
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}; a regress run needs "
                         f"{', '.join(sorted(need))} (write it with bsbr-eval regress --update)")
    if not len(df):
        raise ValueError(f"{what} has no rows")


def key_columns(*runs: pd.DataFrame) -> tuple:
    """``KEY_COLUMNS`` plus every further identifying column that all ``runs`` carry."""
    from evals.grid import KEY_COLUMNS as GRID_KEYS

    extra = [c for c in GRID_KEYS if c not in KEY_COLUMNS and all(c in df.columns for df in runs)]
    return KEY_COLUMNS + tuple(extra)


def _keyed(df: pd.DataFrame, keys: tuple = KEY_COLUMNS) -> dict:
    """``{key tuple: row}`` (the model name first); a key measured twice keeps its last row."""
    out = {}
    for _, row in df.iterrows():
        out[case_key(row, keys)] = row
    return out


# ----------------------------------------------------------------------------- the time test


def reference_column(baseline: pd.DataFrame, current: pd.DataFrame) -> str:
    """How time is normalised, best first, using what both runs have:

    - ``paired``: ``ref_samples_ms``, the reference timed around each sample (live runs);
    - ``ref_ms``: one reference time per row;
    - ``Standard``: the Standard model at the same configuration (for stored runs from
      ``bsbr-eval compare``; Standard itself is then untestable);
    - ``none``: raw milliseconds.
    """
    def both(col):
        return all(col in df.columns and df[col].notna().any() for df in (baseline, current))

    if both("ref_samples_ms"):
        return "paired"
    if both("ref_ms"):
        return "ref_ms"
    if (baseline["model"] == "Standard").any() and (current["model"] == "Standard").any():
        return "Standard"
    return "none"


METRIC_NAME = {"paired": "time/ref", "ref_ms": "time/ref", "Standard": "time/Standard", "none": "time_ms"}


def ratio_samples(df: pd.DataFrame, how: str, keys: tuple = KEY_COLUMNS) -> dict:
    """``{key: (s,) time / reference}`` for every ``ok`` row of ``df`` under the normalisation ``how``."""
    keyed = _keyed(df, keys)
    out = {}
    for key, row in keyed.items():
        if row["status"] != "ok":
            continue
        t = parse_samples(row["samples_ms"])  # (s,)
        if how == "paired":
            ref = parse_samples(row["ref_samples_ms"])  # (s,) timed around each sample
            ref = ref if len(ref) == len(t) else np.full(len(t), np.median(ref) if len(ref) else np.nan)
        elif how == "ref_ms":
            ref = np.full(len(t), float(row["ref_ms"]))
        elif how == "Standard":
            std = keyed.get(("Standard",) + key[1:])
            ok = std is not None and std["status"] == "ok"
            ref = np.full(len(t), np.median(parse_samples(std["samples_ms"])) if ok else np.nan)
        else:
            ref = np.ones(len(t))
        out[key] = t / ref
    return out


def min_p_value(n_a: int, n_b: int) -> float:
    """Smallest one-sided exact Mann-Whitney p-value reachable with these sample counts."""
    return 1.0 / math.comb(n_a + n_b, n_a) if n_a and n_b else 1.0


def time_verdict(base: np.ndarray, cur: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD,
                 alpha: float = DEFAULT_ALPHA) -> tuple[float, float, str]:
    """``(relative change of the median, one-sided p, verdict)`` for two sets of ratio samples.

    ``base``, ``cur``: (s,) time / reference, one entry per timed sample. A regression needs a
    large change *and* a small p; either alone is noise (a large change on few, overlapping
    samples) or irrelevance (a consistent 3% shift). ``faster`` is the mirror image; it never
    fails the check but is shown so the baseline can be refreshed.
    """
    base, cur = base[np.isfinite(base)], cur[np.isfinite(cur)]
    if min_p_value(len(base), len(cur)) >= alpha:
        return float("nan"), float("nan"), UNTESTABLE
    change = float(np.median(cur) / np.median(base) - 1.0)
    if change > threshold:
        p = float(mannwhitneyu(cur, base, alternative="greater").pvalue)
        return change, p, REGRESSION if p < alpha else OK
    if change < -threshold / (1 + threshold):  # the same factor, the other way round
        p = float(mannwhitneyu(cur, base, alternative="less").pvalue)
        return change, p, FASTER if p < alpha else OK
    return change, float("nan"), OK


# ----------------------------------------------------------------------------- comparison


def _exact_equal(a, b) -> bool:
    a_nan = a is None or (isinstance(a, float) and math.isnan(a))
    b_nan = b is None or (isinstance(b, float) and math.isnan(b))
    if a_nan or b_nan:
        return a_nan and b_nan
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)
    # Integers compare exactly; a float (MB) survives a CSV round trip to ~1e-15, not bit-exactly.
    return fa == fb or abs(fa - fb) <= 1e-9 * max(abs(fa), abs(fb))


def compare_runs(baseline: pd.DataFrame, current: pd.DataFrame, *, threshold: float = DEFAULT_THRESHOLD,
                 alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """Every check of ``current`` against ``baseline``, one row per (configuration, metric).

    Columns: ``config, model, mode, seq_len, metric, baseline, current, change, p_value, verdict``
    where ``change`` is relative (0.5 = 50% more) and ``verdict`` is one of ``regression,
    changed, missing`` (these fail), ``faster, ok, new, untestable``.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive fraction (0.25 = 25%), got {threshold!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    check_columns(baseline, "the baseline")
    check_columns(current, "the current run")
    how = reference_column(baseline, current)
    keys = key_columns(baseline, current)
    r_b, r_c = ratio_samples(baseline, how, keys), ratio_samples(current, how, keys)
    base, cur = _keyed(baseline, keys), _keyed(current, keys)
    rows = []

    def add(row, metric, b, c, change=float("nan"), p=float("nan"), verdict=OK):
        rows.append(dict(config=config_label(row), model=row["model"], mode=row["mode"],
                         seq_len=int(row["seq_len"]), metric=metric, baseline=b, current=c,
                         change=change, p_value=p, verdict=verdict))

    for key, b in base.items():
        if b["status"] != "ok":
            continue  # nothing to hold the current run to
        c = cur.get(key)
        if c is None or c["status"] != "ok":
            got = "not measured" if c is None else f"{c['status']}: {c.get('error', '')}".rstrip(": ")
            add(b, "status", "ok", got, verdict=MISSING)
            continue
        # 1. exact metrics
        for col in EXACT_COLUMNS:
            same = _exact_equal(b[col], c[col])
            add(b, col, b[col], c[col], _rel(b[col], c[col]), verdict=OK if same else CHANGED)
        if "peak_memory_mb" in b.index and "peak_memory_mb" in c.index:
            m_b, m_c = b.get("memory_method"), c.get("memory_method")
            if m_b != m_c:
                add(b, "memory_method", m_b, m_c, verdict=CHANGED)
            else:  # shown either way; fails only when the method is reproducible
                same = _exact_equal(b["peak_memory_mb"], c["peak_memory_mb"])
                exact = str(m_b) in EXACT_MEMORY_METHODS
                add(b, "peak_memory_mb", b["peak_memory_mb"], c["peak_memory_mb"],
                    _rel(b["peak_memory_mb"], c["peak_memory_mb"]), verdict=OK if same or not exact else CHANGED)
        # 2. time, as a ratio to the reference timed in the same run
        s_b, s_c = r_b[key], r_c[key]  # (s,) each
        if how == "Standard" and b["model"] == "Standard":
            verdict, change, p = UNTESTABLE, float("nan"), float("nan")  # its own reference
        else:
            change, p, verdict = time_verdict(s_b, s_c, threshold=threshold, alpha=alpha)
        add(b, METRIC_NAME[how], _median(s_b), _median(s_c), change, p, verdict)

    for key, c in cur.items():
        if key not in base and c["status"] == "ok":
            add(c, "status", "", "ok", verdict=NEW)
    return pd.DataFrame(rows, columns=["config", "model", "mode", "seq_len", "metric", "baseline",
                                       "current", "change", "p_value", "verdict"])


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if len(x) else float("nan")


def _rel(a, b) -> float:
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return float("nan")
    return fb / fa - 1.0 if fa else float("nan")


def failures(findings: pd.DataFrame) -> pd.DataFrame:
    """The findings that fail the check."""
    return findings[findings["verdict"].isin(FAILING)]


def regressed_keys(findings: pd.DataFrame) -> list[str]:
    """Configuration labels with a *time* regression (the only kind worth re-measuring)."""
    t = findings[(findings["verdict"] == REGRESSION)]
    return list(dict.fromkeys(t["config"]))


# ----------------------------------------------------------------------------- the table


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


def render(findings: pd.DataFrame, *, show_all: bool = False, title: str = "bsbr-eval regress",
           columns: tuple = ("baseline", "current")):
    """A rich Table of what moved and by how much (every row with ``show_all``).

    Shown by default: every verdict but ``ok``, and any time change beyond 10%, so a slow
    drift is visible long before it fails. ``columns`` names the two value columns.
    """
    from rich.table import Table

    moved = findings["verdict"] != OK
    moved |= findings["metric"].str.startswith("time") & (findings["change"].abs() > 0.1)
    shown = findings if show_all else findings[moved]
    table = Table(title=title, title_justify="left")
    for col, just in (("config", "left"), ("metric", "left"), (columns[0], "right"), (columns[1], "right"),
                      ("change", "right"), ("p", "right"), ("verdict", "left")):
        table.add_column(col, justify=just)
    for _, r in shown.iterrows():
        change = "" if pd.isna(r["change"]) else f"{r['change']:+.1%}"
        p = "" if pd.isna(r["p_value"]) else f"{r['p_value']:.2g}"
        style = _STYLE.get(r["verdict"], "")
        table.add_row(r["config"], r["metric"], _fmt(r["baseline"]), _fmt(r["current"]), change, p,
                      f"[{style}]{r['verdict']}[/]")
    return table


def summary(findings: pd.DataFrame) -> str:
    """One line: how many configurations were checked and what failed."""
    n_cfg = findings["config"].nunique()
    bad = failures(findings)
    if bad.empty:
        n_un = findings.loc[findings.verdict == UNTESTABLE, "config"].nunique()
        note = f" ({n_un} whose time could not be tested)" if n_un else ""
        return f"PASS: {n_cfg} configurations match the baseline{note}"
    parts = [f"{len(bad[bad.verdict == v])} {v}" for v in FAILING if (bad.verdict == v).any()]
    names = ", ".join(dict.fromkeys(bad["config"]))
    return f"FAIL: {'; '.join(parts)} ({names})"


# ----------------------------------------------------------------------------- live measurement

# The guard's grid: every model at three lengths in prefill and training; decoding (16 cached
# steps after a prefill); and the token-mixing layer alone, where a regression of the mixer is not
# diluted by the embedding, feed-forward and head around it (the whole model can hide a 1.5x
# slower mixer as 1.2x). Small enough that an A/B check takes a few minutes on two shared cores.
# Changing it means rewriting the baseline: delete it, then --update.
GUARD_CONFIG = dict(vocab_size=256, hidden_dim=64, num_layers=2, num_heads=4, ff_dim=128,
                    chunk_size=32, window_size=32, qk_dim=32)
GUARD_LENGTHS = (128, 256, 512)
GUARD_MODES = ("forward", "train")
GUARD_DECODE_LENGTHS = (256,)          # model level, decode mode
GUARD_LAYER_LENGTHS = (512,)           # layer level, forward and train
# One thread: on a shared 2-core box a second thread turns every barrier into a wait on whoever
# else holds the other core. Memory (per-thread buffers) depends on it, so it is pinned.
GUARD_THREADS = 1
# Timed samples per configuration, each paired with the reference (see paired_samples).
ROUNDS = 16
# The reference: a fixed two-layer MLP on fixed inputs in plain torch (no project code, so no
# change under test can move it); its matmul + elementwise mix resembles the small models'.
REF_TOKENS, REF_DIM = 256, 256


def guard_cases() -> list:
    """The cases of a fresh baseline (``--update`` with no baseline file yet), model by model."""
    from evals.grid import expand_grid
    from evals.registry import MODEL_NAMES, ModelConfig

    cfg = ModelConfig(**GUARD_CONFIG)
    out = []
    for m in MODEL_NAMES:
        out += expand_grid([m], GUARD_LENGTHS, modes=GUARD_MODES, config=cfg)
        out += expand_grid([m], GUARD_DECODE_LENGTHS, modes=["decode"], config=cfg)
        out += expand_grid([m], GUARD_LAYER_LENGTHS, modes=GUARD_MODES, level="layer", config=cfg)
    return out


def case_from_row(row) -> "Case":
    """Rebuild the ``Case`` that produced a CSV row (every ModelConfig field is a column)."""
    import typing
    from dataclasses import fields

    from evals.grid import Case
    from evals.registry import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    kw = {}
    for f in fields(ModelConfig):
        if f.name not in row.index:
            continue  # an older CSV: that field keeps its default
        v = row[f.name]
        if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
            kw[f.name] = None
            continue
        kind = typing.get_args(hints[f.name]) or (hints[f.name],)
        kw[f.name] = float(v) if float in kind else int(float(v))
    num = lambda c, d: int(float(row[c])) if c in row.index and not pd.isna(row[c]) else d  # noqa: E731
    return Case(str(row["model"]), str(row["device"]), str(row["mode"]), str(row["level"]), str(row["dtype"]),
                num("batch_size", 1), num("seq_len", 1), ModelConfig(**kw),
                decode_tokens=num("decode_tokens", 16) or 16, seed=num("seed", 0))


def steady_memory(work, device: str, threads: int) -> tuple[float, str]:
    """Peak MiB one call of a built workload adds, from the CPU profiler's allocation trace,
    in the steady state.

    The first profiled call of a workload is not reproducible (see EXACT_MEMORY_METHODS); the
    second and later are, to the byte, across processes. So: warm up, trace twice, keep the second.
    """
    import torch

    from evals.measure import peak_memory

    if not device.startswith("cpu"):
        return peak_memory(work.fn, device=device, setup=work.setup)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            if work.setup is not None:
                work.setup()
            work.fn()
        peak_memory(work.fn, device=device, setup=work.setup)
        mb, _ = peak_memory(work.fn, device=device, setup=work.setup)
        return mb, "cpu_profiler_trace_steady"
    finally:
        torch.set_num_threads(prev)


def reference_workload(device: str = "cpu") -> Callable[[], object]:
    """One call of the fixed reference: ``gelu(x @ W1) @ W2`` on fixed inputs, plain torch."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(REF_TOKENS, REF_DIM, generator=g).to(device)          # (n, D)
    w1 = torch.randn(REF_DIM, 2 * REF_DIM, generator=g).to(device) / 16  # (D, 2D)
    w2 = torch.randn(2 * REF_DIM, REF_DIM, generator=g).to(device) / 16  # (2D, D)

    def fn():
        with torch.no_grad():
            return torch.nn.functional.gelu(x @ w1) @ w2  # (n, D)

    return fn


class RunqueueWait:
    """Nanoseconds this thread has spent runnable but not running (waiting for a CPU), from
    Linux's ``/proc/thread-self/schedstat`` (second field; ``Documentation/scheduler/sched-stats``).

    On a shared machine most of a sample's noise is exactly this: another process holding the
    core. Subtracting it leaves the time the code ran plus any time it chose to sleep (the
    harness's injected slowdown burns CPU, so it is measured whole). It counts the calling thread
    only, which is why the guard pins torch to one thread (intra-op work then runs on it).
    ``available`` is False where the file does not exist (not Linux); then nothing is subtracted.
    """

    PATH = "/proc/thread-self/schedstat"

    def __init__(self):
        try:
            self.fd = os.open(self.PATH, os.O_RDONLY)
        except OSError:
            self.fd = None

    @property
    def available(self) -> bool:
        return self.fd is not None

    def __call__(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) if self.fd is not None else 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _timed_once(fn: Callable, wait: RunqueueWait, *, device: str, threads: int, setup=None,
                inject: float = 1.0) -> float:
    """One sample of ``fn`` from the harness's ``time_fn`` (per call, ms), less the runqueue wait
    from the start of its first timed call to its return (what ``time_fn`` timed, give or take a
    few microseconds), so a wait during the injected busy-wait is removed too."""
    from evals.measure import time_fn

    starts: list = []  # runqueue wait (ns) at the start of each call: the block-sizing call first

    def probed():
        starts.append(wait())
        return fn()

    # One untimed warm-up call (it also sizes the block), then one timed block of calls.
    (ms,) = time_fn(probed, device=device, threads=threads, setup=setup, inject=inject, repeats=1, warmup=1,
                    min_run_time=0.0)
    if device.startswith("cuda"):
        # CUDA events time the GPU, which runs on while this thread waits for a core: the host's
        # run-queue wait is not in the figure, so nothing is subtracted
        return ms
    waited = wait() - starts[1]
    return ms - (waited / 1e6) / (len(starts) - 1)


def paired_samples(work, device: str, threads: int, *, inject: float = 1.0,
                   rounds: int = ROUNDS) -> tuple[list[float], list[float]]:
    """``rounds`` samples of the case, each paired with the reference timed right around it.

    The order is ``ref, case, ref, case, ..., case, ref``; case sample ``k`` is paired with the
    mean of the two reference samples beside it, so a machine that is slower this minute (clock
    speed, a noisy neighbour on the memory bus) cancels in the ratio. Pre-emption, the largest
    noise on a shared box (a 2 ms call becomes 10 ms whenever another process takes the core),
    is removed from every sample by ``RunqueueWait``. Everything is timed by ``time_fn``.

    Returns ``(case_ms, ref_ms)``: (rounds,) per-call ms each.
    """
    ref = reference_workload(device)
    wait = RunqueueWait()
    opts = dict(device=device, threads=threads)
    try:
        refs, cases = [_timed_once(ref, wait, **opts)], []
        for _ in range(rounds):
            cases.append(_timed_once(work.fn, wait, setup=work.setup, inject=inject, **opts))
            refs.append(_timed_once(ref, wait, **opts))
    finally:
        wait.close()
    paired = [(a + b) / 2 for a, b in zip(refs[:-1], refs[1:])]
    return cases, paired


def measure_row(row, *, run_id: str = "") -> dict:
    """Re-measure the configuration of one baseline row.

    ``evals.measure.measure`` gives the row (status, FLOPs, parameters, every column); then the
    guard adds its reproducible memory and replaces the time with ``paired_samples``, because
    ``measure`` times a case in one block and cannot interleave a reference with it.
    """
    from evals.measure import build_workload, measure

    case = case_from_row(row)
    pinned = "threads" in row.index and not pd.isna(row["threads"])
    threads = int(float(row["threads"])) if pinned else GUARD_THREADS
    out = measure(case, repeats=1, warmup=0, min_run_time=0.0, threads=threads, run_id=run_id, memory=False)
    if out["status"] != "ok":
        return out
    try:
        work = build_workload(case)
        out["peak_memory_mb"], out["memory_method"] = steady_memory(work, case.device, threads)
        samples, refs = paired_samples(work, case.device, threads, inject=float(out.get("inject_factor", 1.0)))
    except Exception as err:  # a failing configuration is a row (status error), never a crash
        return dict(out, status="error", error=f"{type(err).__name__}: {' '.join(str(err).split())}"[:500])
    k = max(1, int(out.get("decode_tokens") or 0)) if case.mode == "decode" else 1
    samples = [x / k for x in samples]  # per token in decode mode, as the harness reports
    q20, q80 = np.quantile(samples, [0.2, 0.8])
    out.update(time_ms=float(np.median(samples)), time_ms_p20=float(q20), time_ms_p80=float(q80),
               repeats=len(samples), samples_ms=" ".join(f"{x:.6g}" for x in samples),
               ref_samples_ms=" ".join(f"{x:.6g}" for x in refs), ref_ms=float(np.median(refs)))
    return out


def measure_all(rows: pd.DataFrame, *, measure: Callable = None, run_id: str = "",
                progress: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """``measure(row)`` for every row, in order (``measure_row`` by default)."""
    measure = measure or measure_row
    out = []
    for _, row in rows.iterrows():
        if progress:
            progress(config_label(row))
        out.append(measure(row, run_id=run_id))
    return pd.DataFrame(out)


def guard_settings() -> dict:
    """How the guard measured, for the baseline's sidecar."""
    return dict(rounds=ROUNDS, threads=GUARD_THREADS,
                reference=f"gelu(x @ W1) @ W2, x ({REF_TOKENS}, {REF_DIM}), W1 ({REF_DIM}, {2 * REF_DIM}), "
                          "fp32; timed before and after every case sample (ref_samples_ms, per call)",
                memory="cpu_profiler_trace_steady: the second profiled call after two warm-up calls")


@dataclass
class LiveResult:
    current: pd.DataFrame    # the rows measured now (re-measured rows replace their first try)
    findings: pd.DataFrame   # compare_runs(baseline, current), with transient regressions marked
    remeasured: list         # configuration labels measured a second time


def live_check(baseline: pd.DataFrame, *, threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA,
               measure: Callable = measure_row, run_id: str = "",
               progress: Optional[Callable[[str], None]] = None) -> LiveResult:
    """Measure every ``ok`` configuration of ``baseline`` now, compare, and measure each time
    regression once more: it is reported only if the second measurement regresses too.

    ``measure(row, run_id=...) -> dict`` is injectable so the re-measurement logic can be tested
    without clocks; ``progress(label)`` is called before each measurement.
    """
    check_columns(baseline, "the baseline")
    todo = baseline[baseline["status"] == "ok"]
    if todo.empty:
        raise ValueError("the baseline has no row with status ok to re-measure")

    def run(rows: pd.DataFrame) -> pd.DataFrame:
        return measure_all(rows, measure=measure, run_id=run_id, progress=progress)

    current = run(todo)
    findings = compare_runs(baseline, current, threshold=threshold, alpha=alpha)
    again = regressed_keys(findings)
    if not again:
        return LiveResult(current, findings, [])
    labels = todo.apply(config_label, axis=1)
    retry = run(todo[labels.isin(again).to_numpy()])
    cur_labels = current.apply(config_label, axis=1)
    current = pd.concat([current[~cur_labels.isin(again).to_numpy()], retry], ignore_index=True)
    second = compare_runs(baseline, current, threshold=threshold, alpha=alpha)
    was = findings.set_index(["config", "metric"])["verdict"]
    first_regressed = [was.get((c, m)) == REGRESSION for c, m in zip(second["config"], second["metric"])]
    second.loc[np.asarray(first_regressed) & (second["verdict"] != REGRESSION).to_numpy(), "verdict"] = TRANSIENT
    return LiveResult(current, second, again)


def run_frame(rows) -> pd.DataFrame:
    """Rows as a DataFrame in the results CSV's column order; the guard's own columns
    (``ref_samples_ms``, ``ref_ms``) come last."""
    from evals.results import COLUMNS

    df = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows)
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
    return df[list(COLUMNS) + [c for c in cols if c not in COLUMNS]]


# ----------------------------------------------------------------------------- A/B (--against)
#
# ``bsbr-eval regress --against REF`` measures the accepted commit (side A) and the working tree
# (side B) side by side (``evals.ab``). No stored time is compared; a configuration is decided
# on its pairs of samples, A and B taken back to back:
#
# - the paired ratio is the geometric mean of b_k / a_k over the s pairs;
# - it regresses when that ratio exceeds 1 + threshold *and* the one-sided Wilcoxon signed-rank
#   test (Wilcoxon, 1945) on the log ratios log(b_k / a_k) says B is slower with p < alpha;
# - a configuration that regresses is measured once more (fresh pairs, the same workers) and
#   reported only if it regresses again; otherwise it is ``transient`` and passes.
#
# Provisional defaults (until results/regress_power/power.json records the ones chosen from the
# measured power curve, which then take their place: see ``ab_settings``).
AB_THRESHOLD = 0.2
AB_ROUNDS = 16
POWER_FILE = "results/regress_power/power.json"
AB_TIME_METRIC = "time B/A"


def ab_settings(root=None) -> dict:
    """The A/B check's threshold and rounds: those chosen from the committed power curve
    (``POWER_FILE``'s ``chosen``), else the provisional defaults; and where they came from."""
    from pathlib import Path

    path = Path(root or Path(__file__).resolve().parents[1]) / POWER_FILE
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))["chosen"]
        return dict(threshold=float(chosen["threshold"]), rounds=int(chosen["rounds"]), source=str(POWER_FILE))
    except (OSError, ValueError, KeyError, TypeError):
        return dict(threshold=AB_THRESHOLD, rounds=AB_ROUNDS, source="provisional defaults (no power curve yet)")


def min_signed_rank_p(s: int) -> float:
    """Smallest one-sided exact Wilcoxon signed-rank p-value reachable with ``s`` pairs."""
    return 0.5 ** s if s > 0 else 1.0


def paired_verdict(a: np.ndarray, b: np.ndarray, *, threshold: float = AB_THRESHOLD,
                   alpha: float = DEFAULT_ALPHA) -> tuple[float, float, str]:
    """``(geometric-mean ratio - 1, one-sided p, verdict)`` for (s,) paired samples of A and B.

    Pairs with a non-finite or non-positive sample are dropped. ``untestable`` when too few
    pairs remain for the test ever to reach ``alpha``; ``faster`` is the mirror image of
    ``regression`` (same factor, same test the other way) and passes.
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


def ab_findings(rows: pd.DataFrame, built: dict, pairs: dict, *, threshold: float = AB_THRESHOLD,
                alpha: float = DEFAULT_ALPHA) -> pd.DataFrame:
    """Every check of an A/B run, one row per (configuration, metric), as ``compare_runs`` gives.

    ``rows``: the committed configurations (their exact metrics are the reference for side B);
    ``built[side][i]``: what side A / B reported when building row ``i`` (side B with its exact
    metrics); ``pairs[i]``: ((s,), (s,)) samples of A and B. For time, ``baseline`` and
    ``current`` are the median ms of A and B and ``change`` the paired ratio - 1. An extra column
    ``i`` is the row index.
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
        exact = "params" in b  # side B was asked for its exact metrics
        for col in EXACT_COLUMNS if exact else ():  # the working tree against the committed file, to the unit
            same = _exact_equal(row[col], b.get(col))
            add(i, row, col, row[col], b.get(col), _rel(row[col], b.get(col)), verdict=OK if same else CHANGED)
        if exact and "peak_memory_mb" in row.index and b.get("memory_method") is not None:
            if row.get("memory_method") != b.get("memory_method"):
                add(i, row, "memory_method", row.get("memory_method"), b.get("memory_method"), verdict=CHANGED)
            else:
                same = _exact_equal(row["peak_memory_mb"], b["peak_memory_mb"])
                exact = str(row["memory_method"]) in EXACT_MEMORY_METHODS
                add(i, row, "peak_memory_mb", row["peak_memory_mb"], b["peak_memory_mb"],
                    _rel(row["peak_memory_mb"], b["peak_memory_mb"]), verdict=OK if same or not exact else CHANGED)
        if a["status"] != "ok":  # the accepted commit cannot build it: nothing to compare time with
            add(i, row, AB_TIME_METRIC, f"error: {a.get('error', '')}"[:80], "", verdict=NEW)
            continue
        s_a, s_b = pairs[i]
        change, p, verdict = paired_verdict(s_a, s_b, threshold=threshold, alpha=alpha)
        add(i, row, AB_TIME_METRIC, _median(s_a), _median(s_b), change, p, verdict)
    return pd.DataFrame(out, columns=["config", "model", "mode", "seq_len", "metric", "baseline", "current",
                                      "change", "p_value", "verdict", "i"])


@dataclass
class ABResult:
    findings: pd.DataFrame   # ab_findings, re-measured regressions replaced, transient ones marked
    pairs: dict              # i -> ((s,), (s,)) the samples the verdict stands on
    remeasured: list         # row indices measured a second time


def ab_check(rows: pd.DataFrame, built: dict, sample: Callable[[str, int], float], *, rounds: int = AB_ROUNDS,
             threshold: float = AB_THRESHOLD, alpha: float = DEFAULT_ALPHA,
             progress: Optional[Callable[[int], None]] = None) -> ABResult:
    """Measure every configuration both sides built (``rounds`` interleaved pairs each), decide,
    and measure each time regression once more: it stands only if it regresses again.

    ``sample(side, i) -> ms`` takes one sample ("A" or "B") of row ``i``: the workers' in a real
    run (``evals.ab.Session.sample``), a synthetic one in the tests.
    """
    from evals.ab import interleave

    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    both = [i for i in range(len(rows)) if rows.iloc[i]["status"] == "ok"
            and built["A"][i]["status"] == "ok" and built["B"][i]["status"] == "ok"]
    pairs = interleave(both, rounds, sample, progress)
    findings = ab_findings(rows, built, pairs, threshold=threshold, alpha=alpha)
    timed = findings["metric"] == AB_TIME_METRIC
    again = [int(i) for i in findings.loc[timed & (findings["verdict"] == REGRESSION), "i"]]
    if not again:
        return ABResult(findings, pairs, [])
    pairs = {**pairs, **interleave(again, rounds, sample, progress)}
    second = ab_findings(rows, built, pairs, threshold=threshold, alpha=alpha)
    was = dict(zip(zip(findings["i"], findings["metric"]), findings["verdict"]))
    first = np.array([was.get((i, m)) == REGRESSION for i, m in zip(second["i"], second["metric"])], dtype=bool)
    second.loc[first & (second["verdict"] != REGRESSION).to_numpy(), "verdict"] = TRANSIENT
    return ABResult(second, pairs, again)


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


def group_name(row) -> str:
    """The (level, mode) group a configuration belongs to, e.g. ``model decode``, ``layer train``."""
    return f"{row['level']} {row['mode']}"


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


# ----------------------------------------------------------------------------- same machine


# What must agree between two stored runs before their times may be compared at all.
FINGERPRINT = ("device_name", "cpu_model", "cpu_count", "torch_version")


def fingerprint(env: Optional[dict]) -> dict:
    """The machine fingerprint of a sidecar (or of ``evals.results.environment()``)."""
    return {k: (env or {}).get(k) for k in FINGERPRINT}


def machine_mismatch(a: Optional[dict], b: Optional[dict], *, what_a: str, what_b: str) -> Optional[str]:
    """None when the two sidecars describe the same machine, else one line saying what differs."""
    if a is None or b is None:
        missing = what_a if a is None else what_b
        return f"{missing} has no JSON sidecar, so its machine is unknown"
    fa, fb = fingerprint(a), fingerprint(b)
    diff = [f"{k} {fa[k]!r} vs {fb[k]!r}" for k in FINGERPRINT if fa[k] != fb[k]]
    return f"{what_a} and {what_b} come from different machines ({'; '.join(diff)})" if diff else None
