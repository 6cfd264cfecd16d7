"""The figures of ``bsbr-eval analyze`` (matplotlib Agg, seaborn; the shared conventions, palette,
markers and saving are ``evals.figures``).

Public API: each ``plot_*`` function takes long-form DataFrames (one row per observation, as
``compare`` and ``evals.analyze.analysis`` produce them) and an output folder, writes PNGs there
and returns the paths it wrote, in a stable order.

    plot_scaling(df, fits, out_dir)   time and memory vs length, log-log, measured points with
                                      their p20-p80 band and the fitted curve; faceted device x mode
    plot_speedup(rel, out_dir)        speedup and memory ratio against Standard vs length
    plot_params(df, out_dir)          parameter count per model

Never draw a failed (oom / error / skipped) row as a value (``_mark_failures`` marks them instead).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from evals.analyze.analysis import UNDERDETERMINED, evaluate_class, ok_rows
from evals.figures import (FAILURE_MARKERS, LENGTH_LABEL, METRIC_LABELS, int_label, log_axes, model_markers,
                           model_palette, save, sns)
from evals.registry import model_order

METRIC_TITLES = {"time_ms": "Time", "peak_memory_mb": "Peak memory"}
# Facets: one panel per device (columns) and mode (rows). The rest of the configuration is fixed
# within one figure; a CSV with several such configurations gives one figure each.
CONFIG_KEYS = ("level", "dtype", "batch_size", "hidden_dim", "num_layers", "num_heads")


def _config_groups(df: pd.DataFrame):
    """Yield (file-name suffix, title fragment, rows) per fixed configuration.

    The suffix is just the level when each level has one configuration, as it usually does.
    """
    keys = [k for k in CONFIG_KEYS if k in df.columns]
    groups = list(df.groupby(keys, sort=True, dropna=False))
    per_level = pd.Series([k[0] for k, _ in groups]).value_counts()
    for key, sub in groups:
        c = dict(zip(keys, key))
        title = (f"level={c['level']}, {c['dtype']}, batch {int_label(c['batch_size'])}, d={int_label(c['hidden_dim'])}, "
                 f"{int_label(c['num_layers'])} layer(s), {int_label(c['num_heads'])} head(s)")
        suffix = str(c["level"])
        if per_level[c["level"]] > 1:
            suffix += (f"_{c['dtype']}_b{int_label(c['batch_size'])}_d{int_label(c['hidden_dim'])}"
                       f"_L{int_label(c['num_layers'])}_h{int_label(c['num_heads'])}")
        yield suffix, title, sub


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
                log_axes(ax, at=sorted(sub["seq_len"].unique()))
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
            written.append(save(g.figure, out_dir / f"{metric}_{suffix}.png"))
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
                log_axes(ax, at=sorted(sub["seq_len"].unique()))
                ax.set(ylim=(lo / 1.5, hi * 1.5))
            g.set_axis_labels(LENGTH_LABEL, ylabel)
            g.set_titles(row_template="mode: {row_name}", col_template="device: {col_name}")
            g.figure.suptitle(f"{name} ({title})", y=1.02)
            _legend(g.figure, models, palette, [Line2D([], [], color="black", ls="--", label="Standard (= 1)")])
            written.append(save(g.figure, out_dir / f"{col}_{suffix}.png"))
    return written


def plot_params(df: pd.DataFrame, out_dir: Path) -> list:
    """Parameter count per model, one panel per level (the op level has none and is left out)."""
    d = df[np.isfinite(df["params"]) & (df["params"] > 0)]
    if d.empty:
        return []
    # params depend on the shape, not on the length; one value per model and configuration
    keys = ["model", "level", "hidden_dim", "num_layers", "num_heads"]
    d = d.groupby(keys, as_index=False)["params"].max()
    d["config"] = ("d=" + d["hidden_dim"].map(int_label) + ", " + d["num_layers"].map(int_label) + " layer(s), "
                   + d["num_heads"].map(int_label) + " head(s)")
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
    return [save(g.figure, Path(out_dir) / "params.png")]
