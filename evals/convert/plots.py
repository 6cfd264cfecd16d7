"""The figure of ``bsbr-eval convert`` (``plot_conversion``; the shared conventions are
``evals.figures``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.ticker
import pandas as pd

from evals.figures import LENGTH_LABEL, METRIC_LABELS, int_label, log_axes, plt, save, sns


def plot_conversion(agree: pd.DataFrame, speed: pd.DataFrame, out_dir: Path, stem: str = "convert") -> list:
    """GPT-2 vs its BSBR conversions (``evals.convert``): one figure, three panels.

    1. held-out perplexity vs chunk size: the conversions without training (line), the original
       (dashed), and, where present, the fine-tuned conversion (star) and the original fine-tuned
       for the same steps (dotted, the control);
    2. agreement with the original vs chunk size: top-1 agreement and mean KL(GPT-2 || BSBR);
    3. forward time vs length, log-log, one line per variant (p20-p80 band), when ``speed`` has rows.
    """
    a = agree.copy()
    a["chunk_size"] = pd.to_numeric(a["chunk_size"], errors="coerce")
    ft = a["finetuned"].astype(str).str.lower().isin(["true", "1"])
    conv = a[~ft & a["chunk_size"].notna()].sort_values("chunk_size")
    orig = a[~ft & (a["variant"] == "original")]
    ncols = 3 if len(speed) else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.0))
    _perplexity_panel(axes[0], a, ft, conv, orig)
    _agreement_panel(axes[1], conv)
    if len(speed):
        _time_panel(axes[2], speed)
    fig.tight_layout()
    return [save(fig, Path(out_dir) / f"{stem}.png")]


def _perplexity_panel(ax, a: pd.DataFrame, ft: pd.Series, conv: pd.DataFrame, orig: pd.DataFrame) -> None:
    """Held-out perplexity vs chunk size: conversions, the original, the fine-tuned rows (``ft``)."""
    sns.lineplot(data=conv, x="chunk_size", y="ppl", marker="o", ax=ax, color="C0", label="converted, no training")
    if len(orig):
        ax.axhline(float(orig["ppl"].iloc[0]), color="black", ls="--", lw=1, label="original GPT-2")
    for _, r in a[ft].iterrows():
        if pd.notna(r["chunk_size"]):
            ax.plot(r["chunk_size"], r["ppl"], "*", color="C3", markersize=13,
                    label=f"converted + {int_label(r['finetune_steps'])} fine-tune steps")
        else:
            ax.axhline(float(r["ppl"]), color="C2", ls=":", lw=1.5,
                       label=f"original + {int_label(r['finetune_steps'])} steps (control)")
    ax.set(xscale="log", xlabel="BSBR chunk size c (tokens)", ylabel="held-out perplexity (per token)",
           title="Perplexity")
    ax.set_xticks(conv["chunk_size"].unique(), [int_label(c) for c in conv["chunk_size"].unique()])
    ax.minorticks_off()
    ax.legend(fontsize=8, frameon=False)


def _agreement_panel(ax, conv: pd.DataFrame) -> None:
    """Top-1 agreement and mean KL(GPT-2 || BSBR) vs chunk size, the conversions without training."""
    sns.lineplot(data=conv, x="chunk_size", y="top1_agreement", marker="o", ax=ax, color="C0",
                 label="top-1 agreement")
    ax.set(xscale="log", xlabel="BSBR chunk size c (tokens)", ylabel="top-1 agreement with GPT-2 (fraction)",
           title="Agreement with the original (no training)")
    ax.set_xticks(conv["chunk_size"].unique(), [int_label(c) for c in conv["chunk_size"].unique()])
    ax.minorticks_off()
    ax2 = ax.twinx()
    sns.lineplot(data=conv, x="chunk_size", y="kl", marker="s", ax=ax2, color="C1", label="KL(GPT-2 || BSBR)")
    ax2.set_ylabel("mean KL per token (nats)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax2.get_legend().remove()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, frameon=False, loc="center right")


def _time_panel(ax, speed: pd.DataFrame) -> None:
    """Forward time vs length, log-log, one line per variant with its p20-p80 band."""
    order = ["original"] + [v for v in speed["variant"].unique() if v != "original"]
    sns.lineplot(data=speed, x="seq_len", y="time_ms", hue="variant", hue_order=order, marker="o", ax=ax,
                 errorbar=None)
    for i, v in enumerate(order):
        s = speed[speed["variant"] == v].sort_values("seq_len")
        ax.fill_between(s["seq_len"], s["time_ms_p20"], s["time_ms_p80"], alpha=0.15,
                        color=sns.color_palette()[i % 10])
    ax.set(xlabel=LENGTH_LABEL, ylabel=METRIC_LABELS["time_ms"], title="Forward time (batch 1, no grad)")
    log_axes(ax, "y")  # plain 1-2-5 labels: a range under one decade still gets numbers
    ax.set_xscale("log")
    ax.set_xticks(sorted(speed["seq_len"].unique()), [int_label(n) for n in sorted(speed["seq_len"].unique())])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8, frameon=False)
