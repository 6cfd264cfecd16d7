"""The figures of ``bsbr-eval lm`` (the shared conventions are ``evals.figures``):

    plot_bpb_vs_context(summary, out_dir)           test bits per byte against context, per model
    plot_loss_by_position(table, out_dir, ..)       test bits per byte against position, log x, one
                                                    panel per context, the window and chunk marked
    plot_bpb_vs_cost(summary, cost, out_dir)        test bits per byte against decode ms/token

A model with no ok row is left out of a figure (the summary table says why), never drawn as 0.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from evals.figures import int_label, log_axes, model_markers, model_palette, plt, save
from evals.registry import model_order

BPB_LABEL = "test bits per byte"


def plot_bpb_vs_context(summary: pd.DataFrame, out_dir: Path) -> list:
    ok = summary[summary["status"] == "ok"]
    if ok.empty:
        return []
    models = model_order(ok["model"])
    pal, mk = model_palette(models), model_markers(models)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        p = ok[ok["model"] == m].sort_values("context")
        ax.errorbar(p["context"], p["test_bpb"], yerr=p["test_bpb_std"], marker=mk[m], color=pal[m], label=m,
                    markerfacecolor="none", capsize=3, lw=1.4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ok["context"].unique()), [int_label(c) for c in sorted(ok["context"].unique())])
    ax.set_xlabel("context (bytes)")
    ax.set_ylabel(BPB_LABEL)
    ax.set_title("byte-level LM: test bits per byte vs context")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return [save(fig, Path(out_dir) / "lm_bpb_vs_context.png")]


def plot_loss_by_position(table: pd.DataFrame, out_dir: Path, *, window: int, chunk: int) -> list:
    """One panel per context: mean test bits per byte in each position bucket (drawn at the
    bucket's geometric centre), log x; dashed lines at SlidingWindow's window and BSBR's chunk."""
    if table.empty:
        return []
    contexts = sorted(table["context"].unique())
    models = model_order(table["model"])
    pal = model_palette(models)
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.2), squeeze=False)
    marks = {}  # position -> what sits there (the window and the chunk may coincide)
    for at, name in ((window, "window"), (chunk, "chunk")):
        marks[at] = f"{marks[at]} = {name}" if at in marks else name
    for ax, c in zip(axes[0], contexts):
        t = table[(table["context"] == c) & (table["pos_lo"] > 0)]  # position 0 has no context: off a log axis
        drawn = {}
        for m in models:
            p = t[t["model"] == m].sort_values("pos_lo")
            x = (p["pos_lo"] * (p["pos_hi"] - 1)).clip(lower=1) ** 0.5
            y = tuple(p["bits_per_byte"])
            same = next((o for o, oy in drawn.items() if oy == y), None)  # identical numbers: say so
            ax.plot(x, p["bits_per_byte"], color=pal[m], lw=1.4, ls=":" if same else "-",
                    label=f"{m} (= {same})" if same else m)
            drawn[m] = y
        for at, name in marks.items():
            if at < c:
                ax.axvline(at, color="0.5", ls="--", lw=0.9)
                ax.text(at, 0.98, f" {name} {at}", transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                        color="0.35")
        log_axes(ax, "x")
        ax.set_xlabel("position in the window (bytes of context)")
        ax.set_ylabel(BPB_LABEL)
        ax.set_title(f"context {int_label(c)}")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle("loss by position: does each model keep improving as it reads more of the document?")
    return [save(fig, Path(out_dir) / "lm_loss_by_position.png")]


def plot_bpb_vs_cost(summary: pd.DataFrame, cost: pd.DataFrame, out_dir: Path) -> list:
    """Test bits per byte against decode ms/token (``cost``: model, context, decode_ms, length),
    one marker per model and context: quality on real text beside what a token costs to decode."""
    ok = summary[summary["status"] == "ok"].merge(cost, on=["model", "context"])
    if ok.empty:
        return []
    models = model_order(ok["model"])
    pal, mk = model_palette(models), model_markers(models)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        p = ok[ok["model"] == m].sort_values("context")
        ax.plot(p["decode_ms"], p["test_bpb"], ls=":", marker=mk[m], color=pal[m], markerfacecolor="none", label=m)
        for _, r in p.iterrows():
            ax.annotate(int_label(r["context"]), (r["decode_ms"], r["test_bpb"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
    log_axes(ax, "x")
    length = int(ok["length"].max())
    ax.set_xlabel(f"decode ms/token after {length:,} tokens (batch 1)")
    ax.set_ylabel(BPB_LABEL)
    ax.set_title("quality on real text against decode cost (labels: training context)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return [save(fig, Path(out_dir) / "lm_bpb_vs_cost.png")]
