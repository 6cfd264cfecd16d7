"""The cost x recall frontier: what each recalled configuration costs to decode at long context.

``bsbr-eval frontier RUN_DIR`` reads a finished recall run and, for every (model, width, size) it
trained, builds the same model (vocabulary, layers, heads, feed-forward and q/k sizes from the
run's sidecar) and measures through ``compare``'s harness (``evals.compare.run_sweep``: one row
per case, appended, locked, resumable) the decode time per token at batch 1 after a prefill of
each length. It also measures the decoding cache's bytes after that prefill. The result is one
table, ``frontier.md`` / ``frontier_table.csv``: model, width, held-out accuracy (mean and minimum
over seeds at the best rate, per recall task), state bytes, and decode ms/token at each length,
with a ``status`` for every configuration that could not be measured. ``frontier.png`` plots
accuracy against decode time at the longest length, one panel per recall task, with the Pareto
front (no other configuration is both at least as fast and at least as accurate) drawn.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

CSV_NAME = "frontier.csv"          # compare rows (the harness's own CSV, resumable)
TABLE_NAME = "frontier_table.csv"  # the joined table
STATE_NAME = "frontier_state.csv"  # measured cache bytes per configuration and length
DEFAULT_LENGTHS = (4096, 16384)


@dataclass(frozen=True)
class Config:
    """One recalled architecture: everything that decides what is built (not the task)."""

    model: str
    hidden_dim: int
    size: int


def read_run(run_dir: Path) -> tuple:
    """(recall rows, sidecar) of a finished recall run; ``ResultsError`` naming what is wrong."""
    from evals import results
    from evals.recall.launch import CSV_NAME as RECALL_CSV

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise results.ResultsError(f"RUN_DIR: {run_dir} is not a folder; give a recall run's output folder "
                                   f"(it holds {RECALL_CSV} and recall.json)")
    csv = run_dir / RECALL_CSV
    side = results.read_sidecar(csv) if csv.is_file() else None
    if side is None or side.get("task") != "mqar" or "settings" not in side:
        raise results.ResultsError(f"RUN_DIR: {run_dir} holds no finished recall run ({RECALL_CSV} with its "
                                   "recall.json sidecar, as `bsbr-eval recall` writes them)")
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False).to_dict("records")
    if not rows:
        raise results.ResultsError(f"RUN_DIR: {csv} has no rows; finish the recall run first (--resume)")
    return rows, side


def model_config(side: dict, cfg: Config):
    """The ``ModelConfig`` the recall run trained for ``cfg`` (as ``RecallPreset.model_config``)."""
    from evals.registry import ModelConfig

    s = side["settings"]
    return ModelConfig(vocab_size=int(s["vocab_size"]), hidden_dim=cfg.hidden_dim, num_layers=int(s["num_layers"]),
                       num_heads=int(s["num_heads"]), ff_dim=int(s["ff_mult"]) * cfg.hidden_dim, dropout=0.0,
                       chunk_size=cfg.size, window_size=cfg.size, qk_dim=min(int(s["qk_dim"]), cfg.hidden_dim),
                       compression_factor=s.get("compression_factor"))  # absent in runs before the option


def configs_of(summary: pd.DataFrame) -> list:
    return list(dict.fromkeys(Config(str(r.model), int(r.hidden_dim), int(r.size)) for r in summary.itertuples()))


def cases_for(configs: Sequence[Config], side: dict, lengths: Sequence[int], device: str, decode_tokens: int) -> list:
    """compare's decode cases: batch 1, float32, model level, one per configuration and length."""
    from evals.grid import Case

    return [Case(c.model, device, "decode", "model", "float32", 1, int(n), model_config(side, c),
                 decode_tokens=decode_tokens) for c in configs for n in lengths]


def state_bytes(side: dict, cfg: Config, n: int, device: str = "cpu") -> tuple:
    """(bytes, status, error) of ``cfg``'s decoding cache after a prefill of ``n`` random tokens."""
    import torch

    from evals.recall.training import decoding_state_bytes
    from evals.registry import resolve_model
    from evals.results import one_line

    mc = model_config(side, cfg)
    try:
        torch.manual_seed(0)
        model = resolve_model(cfg.model).build(mc).to(device)
        tokens = torch.randint(0, mc.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        return decoding_state_bytes(model, tokens), "ok", ""
    except Exception as err:  # noqa: BLE001 - an unmeasurable configuration is a row with a status
        oom = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
        return float("nan"), "oom" if oom else "error", one_line(err, kind=True)


def pareto(points: pd.DataFrame, x: str = "time", y: str = "acc") -> pd.Series:
    """True for the points no other point dominates (x no larger and y no smaller, one strictly)."""
    keep = []
    for i, p in points.iterrows():
        dom = points[(points[x] <= p[x]) & (points[y] >= p[y]) & ((points[x] < p[x]) | (points[y] > p[y]))]
        keep.append(dom.empty)
    return pd.Series(keep, index=points.index, dtype=bool)


def frontier_table(summary: pd.DataFrame, timed: Sequence[dict], states: pd.DataFrame,
                   lengths: Sequence[int]) -> pd.DataFrame:
    """One row per recall task x configuration: accuracy, state bytes and decode ms/token per length.

    ``status``: ``ok``; ``recall_<status>`` where the recall training failed; else the first failed
    measurement's ``<length>:<status>`` (its error in ``error``). Nothing is dropped.
    """
    t = pd.DataFrame(list(timed))
    out = []
    for r in summary.itertuples():
        row = dict(model=r.model, seq_len=int(r.seq_len), num_pairs=int(r.num_pairs), hidden_dim=int(r.hidden_dim),
                   size=int(r.size), lr=r.lr, seeds=int(r.seeds), acc_mean=r.test_acc, acc_min=r.test_acc_min,
                   state_bytes_task=r.state_bytes, status="ok" if r.status == "ok" else f"recall_{r.status}",
                   error="")
        for n in lengths:
            st = states[(states["model"] == r.model) & (states["hidden_dim"] == r.hidden_dim)
                         & (states["size"] == r.size) & (states["seq_len"] == n)]
            m = t[(t["model"] == r.model) & (t["hidden_dim"].astype(int) == r.hidden_dim)
                  & (t["chunk_size"].astype(int) == r.size) & (t["seq_len"].astype(int) == n)] if len(t) else t
            row[f"state_bytes_{n}"] = float(st["state_bytes"].iloc[0]) if len(st) else float("nan")
            ok = len(m) and m["status"].iloc[0] == "ok"
            row[f"decode_ms_{n}"] = float(m["time_ms"].iloc[0]) if ok else float("nan")
            bad = (m["status"].iloc[0], m["error"].iloc[0]) if len(m) and not ok else \
                ("missing", "not measured") if not len(m) else None
            if bad is None and len(st) and st["status"].iloc[0] != "ok":
                bad = (st["status"].iloc[0], st["error"].iloc[0])
            if bad is not None and row["status"] == "ok":
                row.update(status=f"{n}:{bad[0]}", error=str(bad[1]))
        out.append(row)
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame, lengths: Sequence[int], device: str) -> str:
    """The table as GitHub markdown: one block per recall task."""
    from evals.registry import model_order

    head = ["model", "d", "size", "accuracy % (mean, min)"] + [f"state KiB @{n}" for n in lengths] + \
        [f"decode ms/token @{n} ({device})" for n in lengths] + ["status"]
    lines = []
    for (n, P), g in table.groupby(["seq_len", "num_pairs"], sort=True):
        lines += [f"**MQAR n={n}, {P} pairs**", "", "| " + " | ".join(head) + " |",
                  "|---|---:|---:|---:|" + "---:|" * (2 * len(lengths)) + "---|"]
        g = g.assign(_o=g["model"].map({m: i for i, m in enumerate(model_order(g["model"]))}))
        for r in g.sort_values(["_o", "hidden_dim"]).to_dict("records"):
            acc = "" if pd.isna(r["acc_mean"]) else f"{100 * r['acc_mean']:.1f} ({100 * r['acc_min']:.1f})"
            kib = ["" if pd.isna(r[f"state_bytes_{L}"]) else f"{r[f'state_bytes_{L}'] / 1024:,.1f}" for L in lengths]
            ms = ["" if pd.isna(r[f"decode_ms_{L}"]) else f"{r[f'decode_ms_{L}']:.3f}" for L in lengths]
            lines.append(f"| {r['model']} | {r['hidden_dim']} | {r['size']} | {acc} | " + " | ".join(kib + ms)
                         + f" | {r['status']} |")
        lines.append("")
    return "\n".join(lines)


def plot(table: pd.DataFrame, out_dir: Path, length: int, device: str) -> list:
    """Accuracy against decode ms/token at ``length``, one panel per recall task, Pareto front drawn."""
    import matplotlib.pyplot as plt

    from evals.figures import log_axes, model_palette, save
    from evals.recall.plots import RECALL_ACC_LABEL, _recall_legend, _recall_marker
    from evals.registry import model_order

    col = f"decode_ms_{length}"
    d = table[(table["status"] == "ok") & table[col].notna()]
    if d.empty:
        return []
    tasks = sorted({(int(n), int(P)) for n, P in zip(table["seq_len"], table["num_pairs"])})
    models, palette = model_order(table["model"]), model_palette(table["model"])
    widths = sorted(table["hidden_dim"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), sharey=True, squeeze=False)
    for ax, (n, P) in zip(axes[0], tasks):
        p = d[(d["seq_len"] == n) & (d["num_pairs"] == P)].assign(time=lambda x: x[col], acc=lambda x: x["acc_mean"])
        for r in p.itertuples():
            ax.plot(r.time, r.acc, ls="none", marker=_recall_marker(models, r.model), color=palette[r.model],
                    markersize=5 + 3 * widths.index(r.hidden_dim), markerfacecolor="none", markeredgewidth=1.4)
        front = p[pareto(p)].sort_values("time")
        ax.step(front["time"], front["acc"], where="post", color="black", lw=1, ls=":", label="Pareto front")
        ax.set(ylim=(-0.02, 1.02), title=f"n={n}, {P} pairs", xlabel=f"decode ms/token after {length:,} "
               f"tokens ({device}, batch 1)")
        log_axes(ax, "x")  # 1-2-5 plain labels: matplotlib's minor labels collided on a narrow range
    axes[0][0].set_ylabel(RECALL_ACC_LABEL)
    from matplotlib.lines import Line2D

    extra = [Line2D([], [], color="grey", ls="none", marker="o", markerfacecolor="none",
                    markersize=5 + 3 * i, label=f"d={int(D)}") for i, D in enumerate(widths)]
    extra.append(Line2D([], [], color="black", ls=":", label="Pareto front"))
    _recall_legend(fig, models, palette, extra)
    return [save(fig, Path(out_dir) / "frontier.png")]


def run_frontier(run_dir, *, lengths: Sequence[int] = DEFAULT_LENGTHS, device: str = "cpu", decode_tokens: int = 16,
                 repeats: int = 10, min_run_time: float = 0.2, threads: int = 1, resume: bool = False,
                 console=None) -> dict:
    """Everything ``bsbr-eval frontier`` does after parsing; returns {"table", "csv", "figures", "rows"}."""
    run_dir = Path(run_dir)
    read_run(run_dir)  # a folder that holds no recall run is refused before any lock file is made
    with _recall_lock(run_dir):  # no recall run may write the rows while they are read and joined
        return _measure(run_dir, *read_run(run_dir), lengths=lengths, device=device, decode_tokens=decode_tokens,
                        repeats=repeats, min_run_time=min_run_time, threads=threads, resume=resume, console=console)


@contextmanager
def _recall_lock(run_dir: Path):
    from evals.locking import LockHeld, holding
    from evals.recall.launch import LOCK_NAME
    from evals.results import ResultsError

    try:
        with holding(run_dir / LOCK_NAME):
            yield
    except LockHeld:
        raise ResultsError(f"RUN_DIR: a recall run is still writing {run_dir} (it holds {run_dir / LOCK_NAME}); "
                           "measure its frontier once it has finished") from None


def _measure(run_dir: Path, rows: list, side: dict, *, lengths, device, decode_tokens, repeats, min_run_time,
             threads, resume, console) -> dict:
    from evals import results
    from evals.compare import run_sweep
    from evals.recall import report

    summary = report.summarize(rows)
    configs = configs_of(summary)
    cases = cases_for(configs, side, lengths, device, decode_tokens)
    settings = dict(command="frontier", recall_run=str(run_dir), lengths=list(lengths), decode_tokens=decode_tokens,
                    device=device)
    check_claim(run_dir / CSV_NAME, settings, resume)
    timed = run_sweep(cases, run_dir / CSV_NAME, resume=resume, repeats=repeats, min_run_time=min_run_time,
                      threads=threads, inject={}, console=console, settings=settings)
    states = pd.DataFrame([dict(model=c.model, hidden_dim=c.hidden_dim, size=c.size, seq_len=int(n),
                                **dict(zip(("state_bytes", "status", "error"), state_bytes(side, c, int(n), device))))
                           for c in configs for n in lengths])
    table = frontier_table(summary, timed, states, lengths)
    results.write_frame(run_dir / STATE_NAME, states)
    results.write_frame(run_dir / TABLE_NAME, table)
    results.write_text(run_dir / "frontier.md", markdown(table, lengths, device))
    figures = plot(table, run_dir, max(lengths), device)
    return dict(table=table, csv=run_dir / TABLE_NAME, figures=figures, rows=timed)


def frontier_command(run_dir, *, lengths: Optional[Sequence[str]], device: str, decode_tokens: int, repeats: int,
                     min_run_time: float, threads: int, resume: bool) -> dict:
    """``bsbr-eval frontier`` after parsing (``lengths`` as given on the command line): the options
    checked, then ``run_frontier``. Bad input, a ``ValueError`` included, is a ``ResultsError``."""
    import torch

    from evals.options import positive_ints
    from evals.results import OutputError, ResultsError

    try:
        lens = check_lengths(positive_ints("--lengths", lengths) if lengths else None)
        for flag, v in (("--decode-tokens", decode_tokens), ("--repeats", repeats), ("--threads", threads)):
            if v <= 0:
                raise ValueError(f"{flag} must be a positive integer, got {v}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device: CUDA is not available on this machine; valid: cpu")
        return run_frontier(run_dir, lengths=lens, device=device, decode_tokens=decode_tokens, repeats=repeats,
                            min_run_time=min_run_time, threads=threads, resume=resume)
    except ValueError as e:
        if isinstance(e, (ResultsError, OutputError)):
            raise
        raise ResultsError(str(e)) from None


def check_claim(csv: Path, settings: dict, resume: bool) -> None:
    """Refuse to replace an earlier frontier run, and a --resume whose settings differ from it
    (its rows would be joined under the new settings' names). One line each, naming the way on."""
    from evals.results import ResultsError, read_sidecar

    if not csv.exists():
        return
    if not resume:
        raise ResultsError(f"RUN_DIR: {csv} already exists (an earlier frontier run); pass --resume to continue "
                           "it, or move it away to measure anew")
    old = (read_sidecar(csv) or {}).get("settings") or {}
    differ = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items()
              if k not in ("recall_run",) and old.get(k) != v]
    if differ:
        raise ResultsError(f"--resume: {csv} was measured with other settings ({'; '.join(differ)}); rerun with "
                           "those, or move the file away to measure anew")


def check_lengths(lengths: Optional[Sequence[int]]) -> tuple:
    from bsbr.checks import check_positive_int

    vals = tuple(lengths) if lengths else DEFAULT_LENGTHS
    for v in vals:
        check_positive_int("--lengths", v)
    return vals
