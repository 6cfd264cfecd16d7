"""The frontier of a recall run: what each recalled configuration costs to decode at long context.

For every (model, width, size) a recall run trained, the same model (vocabulary, layers, heads,
feed-forward and q/k sizes from the run's sidecar) is measured by ``evals.frontier.measure``. The
result is one table, ``frontier.md`` / ``frontier_table.csv``: model, width, held-out accuracy
(mean and minimum over seeds at the best rate, per recall task), state bytes, and decode
ms/token at each length, with a ``status`` for every configuration that could not be measured.
``frontier.png`` plots accuracy against decode time at the longest length, one panel per recall
task, with the Pareto front (no other configuration is both at least as fast and at least as
accurate) drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd


def summary_targets(rows: list, side: dict) -> list:
    from evals.recall import report as recall_report

    return targets_of(recall_report.summarize(rows), side)


def target(side: dict, model: str, hidden_dim: int, size: int):
    """The configuration the recall run trained (as ``RecallPreset.model_config``) as a ``Target``."""
    from evals.frontier.measure import Target
    from evals.registry import ModelConfig

    s = side["settings"]
    return Target(model, ModelConfig(vocab_size=int(s["vocab_size"]), hidden_dim=hidden_dim,
                                     num_layers=int(s["num_layers"]), num_heads=int(s["num_heads"]),
                                     ff_dim=int(s["ff_mult"]) * hidden_dim, dropout=0.0, chunk_size=size,
                                     window_size=size, qk_dim=min(int(s["qk_dim"]), hidden_dim),
                                     compression_factor=s.get("compression_factor")))  # absent in older runs


def targets_of(summary: pd.DataFrame, side: dict) -> list:
    return list(dict.fromkeys(target(side, str(r.model), int(r.hidden_dim), int(r.size)) for r in summary.itertuples()))


def pareto(points: pd.DataFrame, x: str = "time", y: str = "acc") -> pd.Series:
    """True for the points no other point dominates (x no larger and y no smaller, one strictly)."""
    keep = []
    for i, p in points.iterrows():
        dom = points[(points[x] <= p[x]) & (points[y] >= p[y]) & ((points[x] < p[x]) | (points[y] > p[y]))]
        keep.append(dom.empty)
    return pd.Series(keep, index=points.index, dtype=bool)


def frontier_table(summary: pd.DataFrame, side: dict, timed: pd.DataFrame, states: pd.DataFrame,
                   lengths: Sequence[int]) -> pd.DataFrame:
    """One row per recall task x configuration: accuracy, state bytes and decode ms/token per length.

    ``status``: ``ok``; ``recall_<status>`` where the recall training failed; else the first failed
    measurement's ``<length>:<status>`` (its error in ``error``). Nothing is dropped.
    """
    from evals.frontier.measure import measured_at

    out = []
    for r in summary.itertuples():
        t = target(side, str(r.model), int(r.hidden_dim), int(r.size))
        row = dict(model=r.model, seq_len=int(r.seq_len), num_pairs=int(r.num_pairs), hidden_dim=int(r.hidden_dim),
                   size=int(r.size), lr=r.lr, seeds=int(r.seeds), acc_mean=r.test_acc, acc_min=r.test_acc_min,
                   state_bytes_task=r.state_bytes, status="ok" if r.status == "ok" else f"recall_{r.status}",
                   error="")
        for n in lengths:
            row[f"decode_ms_{n}"], row[f"state_bytes_{n}"], bad = measured_at(timed, states, t, n)
            if bad is not None and row["status"] == "ok":
                row.update(status=f"{n}:{bad[0]}", error=str(bad[1]))
        out.append(row)
    return pd.DataFrame(out)


def report(run_dir: Path, rows: list, side: dict, timed: pd.DataFrame, states: pd.DataFrame, lengths, device) -> dict:
    """The joined table, its Markdown and the figure, written into ``run_dir``."""
    from evals.output.files import write_frame, write_text
    from evals.frontier.measure import STATE_NAME, TABLE_NAME
    from evals.recall import report as recall_report

    table = frontier_table(recall_report.summarize(rows), side, timed, states, lengths)
    write_frame(run_dir / STATE_NAME, states)
    write_frame(run_dir / TABLE_NAME, table)
    write_text(run_dir / "frontier.md", markdown(table, lengths, device))
    return dict(table=table, csv=run_dir / TABLE_NAME, figures=plot(table, run_dir, max(lengths), device))


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


