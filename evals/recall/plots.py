"""The figures of ``bsbr-eval recall`` (the shared conventions are ``evals.figures``):

    plot_recall_task(df, out_dir, ..) MQAR accuracy vs length and vs pairs, per model
    plot_recall_state(df, out_dir)    MQAR accuracy vs measured decoding-state size, per model

and the recall markers and legend the frontier figure (``evals.frontier.recall``) shares. A failed
run is a marker on the floor, never an accuracy of 0.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.ticker
import pandas as pd
from matplotlib.lines import Line2D

from evals.figures import FAILURE_MARKERS, LENGTH_LABEL, int_label, model_palette, plt, save
from evals.registry import model_order

RECALL_ACC_LABEL = "held-out query accuracy (fraction)"


RECALL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _recall_marker(models: list, m: str) -> str:
    # open markers, one shape per model: models with equal accuracy (Hopfield with one update
    # step is Standard attention) stay visible on top of each other
    return RECALL_MARKERS[models.index(m) % len(RECALL_MARKERS)]


def _recall_lines(ax, data: pd.DataFrame, x: str, models: list, palette: dict) -> None:
    ok = data[data["status"] == "ok"].sort_values(x)
    for m in models:
        p = ok[ok["model"] == m]
        if len(p):
            ax.plot(p[x], p["test_acc"], "-", marker=_recall_marker(models, m), color=palette[m], lw=1.4,
                    markersize=7, markerfacecolor="none", markeredgewidth=1.4)
    failed = data[data["status"] != "ok"]
    for _, r in failed.iterrows():  # a failed run is a marker on the floor, never an accuracy of 0
        ax.plot(r[x], 0.03, transform=ax.get_xaxis_transform(), marker=FAILURE_MARKERS.get(r["status"], "P"),
                color=palette[r["model"]], markersize=8, linestyle="none", clip_on=False)


def _recall_legend(fig, models: list, palette: dict, extra: list) -> None:
    handles = [Line2D([], [], color=palette[m], marker=_recall_marker(models, m), markerfacecolor="none", label=m)
               for m in models] + extra
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)


def plot_recall_task(df: pd.DataFrame, out_dir: Path, base_seq_len: int, base_num_pairs: int,
                     target: float = 0.99, stem: str = "recall") -> list:
    """MQAR accuracy per model: vs sequence length (at ``base_num_pairs``) and vs number of
    key-value pairs (at ``base_seq_len``), two panels through the sweep's base point.

    ``df``: rows of ``evals.recall`` at one model width and one chunk/window size.
    """
    if df.empty:
        return []
    palette = model_palette(df["model"])
    models = model_order(df["model"])
    panels = [("seq_len", df[df["num_pairs"] == base_num_pairs], LENGTH_LABEL, f"{int_label(base_num_pairs)} pairs"),
              ("num_pairs", df[df["seq_len"] == base_seq_len], "key-value pairs P (each queried once)",
               f"n = {int_label(base_seq_len)} tokens")]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
    for ax, (x, sub, xlabel, title) in zip(axes, panels):
        _recall_lines(ax, sub, x, models, palette)
        ax.axhline(target, color="black", lw=0.8, ls="--")
        xs = sorted(sub[x].unique())
        ax.set(xscale="log", ylim=(-0.02, 1.02), title=f"accuracy vs {x.replace('_', ' ')} ({title})", xlabel=xlabel)
        ax.set_xticks(xs, [int_label(v) for v in xs])
        ax.minorticks_off()
    axes[0].set_ylabel(RECALL_ACC_LABEL)
    r = df.iloc[0]
    fig.suptitle(f"MQAR recall (d={int_label(r['hidden_dim'])}, {int_label(r['num_layers'])} layers, chunk/window "
                 f"{int_label(r['size'])}, vocab {int_label(r['vocab_size'])}, trained from scratch)", y=1.02)
    extra = [Line2D([], [], color="black", ls="--", label=f"target {target:g}")]
    extra += [Line2D([], [], color="grey", marker="P", ls="none", label="error (not trained)")] \
        if (df["status"] != "ok").any() else []
    _recall_legend(fig, models, palette, extra)
    return [save(fig, Path(out_dir) / f"{stem}_vs_task.png")]


def plot_recall_state(df: pd.DataFrame, out_dir: Path, target: float = 0.99, stem: str = "recall") -> list:
    """MQAR accuracy vs measured decoding-state size (bytes of the cache after one sequence), per model.

    ``df``: rows of ``evals.recall`` at one task (sequence length, pairs) over widths and
    chunk/window sizes; each point is one trained model, annotated with its width d.
    """
    ok = df[(df["status"] == "ok") & (df["state_bytes"] > 0)] if len(df) else df
    if ok.empty:
        return []
    palette = model_palette(df["model"])
    models = model_order(df["model"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    d = ok.assign(state_kb=ok["state_bytes"] / 1024)
    for m in models:
        p = d[d["model"] == m].sort_values("state_kb")
        if p.empty:
            continue
        ax.plot(p["state_kb"], p["test_acc"], "-", color=palette[m], lw=1, alpha=0.6)
        for D, q in p.groupby("hidden_dim"):
            ax.plot(q["state_kb"], q["test_acc"], linestyle="none", color=palette[m], marker=_recall_marker(models, m),
                    markersize=8 if D == d["hidden_dim"].max() else 5, markerfacecolor="none", markeredgewidth=1.4)
    ax.axhline(target, color="black", lw=0.8, ls="--")
    ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="decoding state after one sequence (KiB, measured cache)",
           ylabel=RECALL_ACC_LABEL)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    r = df.iloc[0]
    ax.set_title(f"MQAR recall vs state size (n={int_label(r['seq_len'])}, {int_label(r['num_pairs'])} pairs)")
    widths = sorted(d["hidden_dim"].unique())
    extra = [Line2D([], [], color="grey", ls="none", marker="o", markerfacecolor="none",
                    markersize=8 if D == max(widths) else 5, label=f"d={int_label(D)}") for D in widths]
    extra.append(Line2D([], [], color="black", ls="--", label=f"target {target:g}"))
    _recall_legend(fig, models, palette, extra)
    return [save(fig, Path(out_dir) / f"{stem}_vs_state.png")]
