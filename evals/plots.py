"""Every figure of the evaluation suite: the one module that draws (matplotlib Agg, seaborn).

Public API: each ``plot_*`` function takes long-form DataFrames (one row per observation, as
``compare`` and ``evals.analysis`` produce them) and an output folder, writes PNGs there and
returns the paths it wrote, in a stable order.

    plot_scaling(df, fits, out_dir)   time and memory vs length, log-log, measured points with
                                      their p20-p80 band and the fitted curve; faceted device x mode
    plot_speedup(rel, out_dir)        speedup and memory ratio against Standard vs length
    plot_params(df, out_dir)          parameter count per model
    plot_recall_task(df, out_dir, ..) MQAR accuracy vs length and vs pairs, per model
    plot_recall_state(df, out_dir)    MQAR accuracy vs measured decoding-state size, per model

Conventions for a new ``plot_*`` function: take DataFrames, not paths; colour and order models
with ``model_palette`` / ``model_order``; label both axes with units; save with ``_save``; never
draw a failed (oom / error / skipped) row as a value (``_mark_failures`` marks them instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on CI machines or cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from evals.analysis import UNDERDETERMINED, evaluate_class, model_order, ok_rows  # noqa: E402
from evals.registry import MODEL_NAMES  # noqa: E402
from evals.results import write_figure  # noqa: E402

METRIC_LABELS = {"time_ms": "time (ms, median of repeats)", "peak_memory_mb": "peak memory (MB)"}
METRIC_TITLES = {"time_ms": "Time", "peak_memory_mb": "Peak memory"}
LENGTH_LABEL = "sequence length n (tokens)"
# Facets: one panel per device (columns) and mode (rows). The rest of the configuration is fixed
# within one figure; a CSV with several such configurations gives one figure each.
CONFIG_KEYS = ("level", "dtype", "batch_size", "hidden_dim", "num_layers", "num_heads")
FAILURE_MARKERS = {"oom": "X", "error": "P", "skipped": "v"}
DPI = 120


def model_palette(models: Iterable[str] = ()) -> dict:
    """A fixed colour per model: registry order picks the colour, so it is the same in every figure."""
    names = list(MODEL_NAMES) + [m for m in model_order(models) if m not in MODEL_NAMES]
    colours = sns.color_palette("tab10", max(10, len(names)))
    return {m: colours[i] for i, m in enumerate(names)}


# Open markers, one shape per model in registry order, so that models with equal values (Hopfield with
# one update step is Standard attention) stay visible on top of each other. The failure markers
# (FAILURE_MARKERS) are left out so the two never read alike.
MODEL_MARKERS = ("o", "s", "^", "D", "<", ">", "h", "p", "*", "d")


def model_markers(models: Iterable[str] = ()) -> dict:
    """A fixed marker per model, by registry order like ``model_palette``."""
    names = list(MODEL_NAMES) + [m for m in model_order(models) if m not in MODEL_NAMES]
    return {m: MODEL_MARKERS[i % len(MODEL_MARKERS)] for i, m in enumerate(names)}


def _log_axes(ax, axes: str = "xy") -> None:
    """Log axes with plain tick labels (20, 50, 100 rather than 2x10^1). Call after drawing.

    1-2-5 ticks, so a narrow range still gets several labels; powers of ten only when the data
    span more decades than the labels have room for side by side (x: 2; y, whose labels stack and
    are short: 4), so the labels of a wide range never run into each other.
    """
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for name in axes:
        axis = getattr(ax, f"{name}axis")
        getattr(ax, f"set_{name}scale")("log")
        lo, hi = (float(v) for v in axis.get_data_interval())
        wide = lo > 0 and np.isfinite(hi / lo) and np.log10(hi / lo) > (2 if name == "x" else 4)
        axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, path: Path) -> Path:
    """Through the results layer: the PNG appears whole or not at all."""
    try:
        return write_figure(fig, path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


def _config_groups(df: pd.DataFrame):
    """Yield (file-name suffix, title fragment, rows) per fixed configuration.

    The suffix is just the level when each level has one configuration, as it usually does.
    """
    keys = [k for k in CONFIG_KEYS if k in df.columns]
    groups = list(df.groupby(keys, sort=True, dropna=False))
    per_level = pd.Series([k[0] for k, _ in groups]).value_counts()
    for key, sub in groups:
        c = dict(zip(keys, key))
        title = (f"level={c['level']}, {c['dtype']}, batch {_i(c['batch_size'])}, d={_i(c['hidden_dim'])}, "
                 f"{_i(c['num_layers'])} layer(s), {_i(c['num_heads'])} head(s)")
        suffix = str(c["level"])
        if per_level[c["level"]] > 1:
            suffix += (f"_{c['dtype']}_b{_i(c['batch_size'])}_d{_i(c['hidden_dim'])}"
                       f"_L{_i(c['num_layers'])}_h{_i(c['num_heads'])}")
        yield suffix, title, sub


def _i(v) -> str:
    return str(int(v)) if isinstance(v, (int, float, np.number)) and np.isfinite(v) else str(v)


def _grid(data: pd.DataFrame, height: float = 3.6) -> sns.FacetGrid:
    return sns.FacetGrid(data, row="mode", col="device", height=height, aspect=1.35, sharex=True, sharey=False,
                         margin_titles=True, row_order=sorted(data["mode"].unique()),
                         col_order=sorted(data["device"].unique()), despine=False)


def _mark_failures(ax, failed: pd.DataFrame, palette: dict) -> None:
    """Failed rows as markers on the axis floor (x = length), so a failure never reads as a value."""
    for _, r in failed.iterrows():
        ax.plot(r["seq_len"], 0.03, transform=ax.get_xaxis_transform(), marker=FAILURE_MARKERS[r["status"]],
                color=palette[r["model"]], markersize=8, linestyle="none", clip_on=False)


def _legend(fig, models: list, palette: dict, extra: list) -> None:
    markers = model_markers(models)
    handles = [Line2D([], [], color=palette[m], marker=markers[m], markerfacecolor="none", markeredgewidth=1.3,
                      label=m) for m in models] + extra
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)


def plot_scaling(df: pd.DataFrame, fits: pd.DataFrame, out_dir: Path) -> list:
    """Time and memory vs length on log-log axes, with fitted curves, faceted by device and mode.

    Points are medians; vertical bars span p20-p80 of the timing samples. The curve is the AICc-best
    class (solid) or, where the fit is underdetermined, the log-log power law (dotted).
    """
    out_dir = Path(out_dir)
    palette = model_palette(df["model"])
    written = []
    for metric in ("time_ms", "peak_memory_mb"):
        for suffix, title, sub in _config_groups(df):
            ok = ok_rows(sub, metric)
            if ok.empty:
                continue
            failed = sub[sub["status"] != "ok"]
            models = model_order(sub["model"])
            markers = model_markers(models)
            # the fits of this metric and this configuration
            fits_here = fits[fits["metric"] == metric].merge(sub[list(CONFIG_KEYS)].drop_duplicates(), on=list(CONFIG_KEYS))
            g = _grid(sub)
            for (mode, device), ax in g.axes_dict.items():
                pts = ok[(ok["mode"] == mode) & (ok["device"] == device)]
                for m, p in pts.groupby("model"):
                    ax.scatter(p["seq_len"], p[metric], marker=markers[m], s=42, facecolors="none",
                               edgecolors=[palette[m]], linewidths=1.3, zorder=3)
                if metric == "time_ms":
                    lo = (pts["time_ms"] - pts["time_ms_p20"]).clip(lower=0)
                    hi = (pts["time_ms_p80"] - pts["time_ms"]).clip(lower=0)
                    for m, p in pts.groupby("model"):
                        ax.errorbar(p["seq_len"], p["time_ms"], yerr=[lo[p.index], hi[p.index]], fmt="none",
                                    ecolor=palette[m], elinewidth=1, capsize=2, zorder=2)
                f = fits_here[(fits_here["mode"] == mode) & (fits_here["device"] == device)]
                for _, r in f.iterrows():
                    if r["model"] not in models or not np.isfinite(r["min_len"]):
                        continue
                    n = np.geomspace(r["min_len"], r["max_len"], 64)
                    if r["best_class"] == UNDERDETERMINED:
                        if np.isfinite(r["slope"]):
                            ax.plot(n, np.exp(r["intercept"]) * n ** r["slope"], ":", color=palette[r["model"]])
                    else:
                        ax.plot(n, evaluate_class(r.to_dict(), n), "-", color=palette[r["model"]], lw=1.3)
                _mark_failures(ax, failed[(failed["mode"] == mode) & (failed["device"] == device)], palette)
                _log_axes(ax)
            g.set_axis_labels(LENGTH_LABEL, METRIC_LABELS[metric])
            g.set_titles(row_template="mode: {row_name}", col_template="device: {col_name}")
            g.figure.suptitle(f"{METRIC_TITLES[metric]} vs length ({title})", y=1.02)
            under = fits_here["best_class"] == UNDERDETERMINED
            extra = ([Line2D([], [], color="grey", ls="-", label="fit: best class (AICc)")] if (~under).any() else [])
            extra += [Line2D([], [], color="grey", ls=":", label="fit: power law (underdetermined)")] if under.any() else []
            if metric == "time_ms":
                extra.append(Line2D([], [], color="grey", marker="|", ls="none", markersize=10, label="p20–p80 of samples"))
            extra += [Line2D([], [], color="grey", marker=mk, ls="none", label=f"{st} (not measured)")
                      for st, mk in FAILURE_MARKERS.items() if (failed["status"] == st).any()]
            _legend(g.figure, models, palette, extra)
            written.append(_save(g.figure, out_dir / f"{metric}_{suffix}.png"))
    return written


def plot_speedup(rel: pd.DataFrame, out_dir: Path) -> list:
    """Speedup (t_Standard / t) and memory ratio (mem / mem_Standard) vs length, per device and mode."""
    out_dir = Path(out_dir)
    written = []
    if rel.empty:
        return written
    palette = model_palette(rel["model"])
    specs = [("speedup", "speedup vs Standard (x, higher is faster)", "Speedup over Standard"),
             ("memory_ratio", "memory / Standard's (x, lower is leaner)", "Peak memory relative to Standard")]
    for col, ylabel, name in specs:
        for suffix, title, sub in _config_groups(rel):
            sub = sub[np.isfinite(sub[col].astype(float)) & (sub["model"] != "Standard")]
            if sub.empty:
                continue
            models = model_order(sub["model"])
            g = _grid(sub)
            markers = model_markers(models)
            for (mode, device), ax in g.axes_dict.items():
                ax.axhline(1.0, color="black", lw=0.8, ls="--")
                here = sub[(sub["mode"] == mode) & (sub["device"] == device)]
                for m, p in here.groupby("model"):
                    p = p.groupby("seq_len")[col].median()          # replicated rows: their median
                    ax.plot(p.index, p.values, "-", marker=markers[m], color=palette[m], markerfacecolor="none",
                            markeredgewidth=1.3, lw=1.4)
                v = here[col].astype(float)
                # keep 1 inside with a margin, or equal ratios would sit on a degenerate log axis
                lo, hi = min(v.min(), 1.0) if len(v) else 1.0, max(v.max(), 1.0) if len(v) else 1.0
                _log_axes(ax)
                ax.set(ylim=(lo / 1.5, hi * 1.5))
            g.set_axis_labels(LENGTH_LABEL, ylabel)
            g.set_titles(row_template="mode: {row_name}", col_template="device: {col_name}")
            g.figure.suptitle(f"{name} ({title})", y=1.02)
            _legend(g.figure, models, palette, [Line2D([], [], color="black", ls="--", label="Standard (= 1)")])
            written.append(_save(g.figure, out_dir / f"{col}_{suffix}.png"))
    return written


def plot_params(df: pd.DataFrame, out_dir: Path) -> list:
    """Parameter count per model, one panel per level (the op level has none and is left out)."""
    d = df[np.isfinite(df["params"]) & (df["params"] > 0)]
    if d.empty:
        return []
    # params depend on the shape, not on the length; one value per model and configuration
    keys = ["model", "level", "hidden_dim", "num_layers", "num_heads"]
    d = d.groupby(keys, as_index=False)["params"].max()
    d["config"] = ("d=" + d["hidden_dim"].map(_i) + ", " + d["num_layers"].map(_i) + " layer(s), "
                   + d["num_heads"].map(_i) + " head(s)")
    d["params_m"] = d["params"] / 1e6
    models = model_order(d["model"])
    g = sns.catplot(data=d, kind="bar", y="model", x="params_m", hue="model", order=models, hue_order=models,
                    palette=model_palette(models), col="level", row="config" if d["config"].nunique() > 1 else None,
                    legend=False, height=3.2, aspect=1.4, sharex=False)
    for ax in g.axes.flat:
        for c in ax.containers:
            ax.bar_label(c, fmt="%.3g", padding=2, fontsize=8)
    g.set_axis_labels("parameters (millions)", "")
    g.set_titles(col_template="level: {col_name}", row_template="{row_name}")
    g.figure.suptitle(f"Parameter count ({d['config'].iloc[0]})" if d["config"].nunique() == 1
                      else "Parameter count", y=1.03)
    return [_save(g.figure, Path(out_dir) / "params.png")]


# ----------------------------------------------------------------------------- GPT-2 -> BSBR conversion


def plot_conversion(agree: pd.DataFrame, speed: pd.DataFrame, out_dir: Path, stem: str = "convert") -> list:
    """GPT-2 vs its BSBR conversions (``evals.convert_experiment``): one figure, three panels.

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
    ax = axes[0]
    sns.lineplot(data=conv, x="chunk_size", y="ppl", marker="o", ax=ax, color="C0", label="converted, no training")
    if len(orig):
        ax.axhline(float(orig["ppl"].iloc[0]), color="black", ls="--", lw=1, label="original GPT-2")
    for _, r in a[ft].iterrows():
        if pd.notna(r["chunk_size"]):
            ax.plot(r["chunk_size"], r["ppl"], "*", color="C3", markersize=13,
                    label=f"converted + {_i(r['finetune_steps'])} fine-tune steps")
        else:
            ax.axhline(float(r["ppl"]), color="C2", ls=":", lw=1.5,
                       label=f"original + {_i(r['finetune_steps'])} steps (control)")
    ax.set(xscale="log", xlabel="BSBR chunk size c (tokens)", ylabel="held-out perplexity (per token)",
           title="Perplexity")
    ax.set_xticks(conv["chunk_size"].unique(), [_i(c) for c in conv["chunk_size"].unique()])
    ax.minorticks_off()
    ax.legend(fontsize=8, frameon=False)

    ax = axes[1]
    sns.lineplot(data=conv, x="chunk_size", y="top1_agreement", marker="o", ax=ax, color="C0",
                 label="top-1 agreement")
    ax.set(xscale="log", xlabel="BSBR chunk size c (tokens)", ylabel="top-1 agreement with GPT-2 (fraction)",
           title="Agreement with the original (no training)")
    ax.set_xticks(conv["chunk_size"].unique(), [_i(c) for c in conv["chunk_size"].unique()])
    ax.minorticks_off()
    ax2 = ax.twinx()
    sns.lineplot(data=conv, x="chunk_size", y="kl", marker="s", ax=ax2, color="C1", label="KL(GPT-2 || BSBR)")
    ax2.set_ylabel("mean KL per token (nats)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax2.get_legend().remove()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, frameon=False, loc="center right")

    if len(speed):
        ax = axes[2]
        order = ["original"] + [v for v in speed["variant"].unique() if v != "original"]
        sns.lineplot(data=speed, x="seq_len", y="time_ms", hue="variant", hue_order=order, marker="o", ax=ax,
                     errorbar=None)
        for i, v in enumerate(order):
            s = speed[speed["variant"] == v].sort_values("seq_len")
            ax.fill_between(s["seq_len"], s["time_ms_p20"], s["time_ms_p80"], alpha=0.15,
                            color=sns.color_palette()[i % 10])
        ax.set(xlabel=LENGTH_LABEL, ylabel=METRIC_LABELS["time_ms"], title="Forward time (batch 1, no grad)")
        _log_axes(ax, "y")  # plain 1-2-5 labels: a range under one decade still gets numbers
        ax.set_xscale("log")
        ax.set_xticks(sorted(speed["seq_len"].unique()), [_i(n) for n in sorted(speed["seq_len"].unique())])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return [_save(fig, Path(out_dir) / f"{stem}.png")]


# ----------------------------------------------------------------------------- MQAR recall


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
    panels = [("seq_len", df[df["num_pairs"] == base_num_pairs], LENGTH_LABEL, f"{_i(base_num_pairs)} pairs"),
              ("num_pairs", df[df["seq_len"] == base_seq_len], "key-value pairs P (each queried once)",
               f"n = {_i(base_seq_len)} tokens")]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
    for ax, (x, sub, xlabel, title) in zip(axes, panels):
        _recall_lines(ax, sub, x, models, palette)
        ax.axhline(target, color="black", lw=0.8, ls="--")
        xs = sorted(sub[x].unique())
        ax.set(xscale="log", ylim=(-0.02, 1.02), title=f"accuracy vs {x.replace('_', ' ')} ({title})", xlabel=xlabel)
        ax.set_xticks(xs, [_i(v) for v in xs])
        ax.minorticks_off()
    axes[0].set_ylabel(RECALL_ACC_LABEL)
    r = df.iloc[0]
    fig.suptitle(f"MQAR recall (d={_i(r['hidden_dim'])}, {_i(r['num_layers'])} layers, chunk/window "
                 f"{_i(r['size'])}, vocab {_i(r['vocab_size'])}, trained from scratch)", y=1.02)
    extra = [Line2D([], [], color="black", ls="--", label=f"target {target:g}")]
    extra += [Line2D([], [], color="grey", marker="P", ls="none", label="error (not trained)")] \
        if (df["status"] != "ok").any() else []
    _recall_legend(fig, models, palette, extra)
    return [_save(fig, Path(out_dir) / f"{stem}_vs_task.png")]


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
    ax.set_title(f"MQAR recall vs state size (n={_i(r['seq_len'])}, {_i(r['num_pairs'])} pairs)")
    widths = sorted(d["hidden_dim"].unique())
    extra = [Line2D([], [], color="grey", ls="none", marker="o", markerfacecolor="none",
                    markersize=8 if D == max(widths) else 5, label=f"d={_i(D)}") for D in widths]
    extra.append(Line2D([], [], color="black", ls="--", label=f"target {target:g}"))
    _recall_legend(fig, models, palette, extra)
    return [_save(fig, Path(out_dir) / f"{stem}_vs_state.png")]
