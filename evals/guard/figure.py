"""The guard's one figure: its power curve (``guard --against REF --power DIR``).

Drawn with the suite's shared figure conventions (``evals.figures``: a colour and a marker per
model, the PNG written whole through the results layer).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from evals.figures import model_markers, model_palette, plt, save, sns
from evals.registry import model_order


def plot_power(table: pd.DataFrame, chosen: dict, out_dir: Path, stem: str = "power") -> list:
    """The regression guard's power curve (``evals.guard.power.power_table``).

    Left: at the chosen threshold and pair count, the share of runs in which each model's
    injected slowdown was caught (confirmed by the re-measurement), against the injected factor;
    factor 1 is the clean runs, where the line for "any" is the false-alarm rate of a whole run.
    Right: for each pair count, the false-alarm rate (dashed) and the worst model's detection of
    the largest factor (solid) against the threshold, which is where the choice is read from.
    """
    t, s = chosen["threshold"], chosen["rounds"]
    here = table[(table["threshold"] == t) & (table["rounds"] == s) & (table["group"] == "all")]
    models = model_order([m for m in here["model"].unique() if m != "any"])
    palette = dict(model_palette(models), any="black")
    markers = dict(model_markers(models), any="x")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in models + ["any"]:
        d = here[here["model"] == m].sort_values("factor")
        left.plot(d["factor"], d["rate"], marker=markers[m], color=palette[m], markerfacecolor="none",
                  label=m if m != "any" else "any model (run level)")
    left.set(xlabel="injected slowdown factor (1 = clean runs)", ylabel="share of runs flagged",
             title=f"threshold {t:g}, {s} pairs per configuration", ylim=(-0.03, 1.03))
    left.legend(frameon=False, fontsize=8)
    top = table["factor"].max()
    rounds = sorted(table["rounds"].unique())
    colours = sns.color_palette("viridis", len(rounds))
    for colour, r in zip(colours, rounds):
        g = table[table["rounds"] == r]
        fa = g[(g["factor"] == 1.0) & (g["model"] == "any")].sort_values("threshold")
        det = (g[(g["factor"] == top) & (g["model"] != "any") & (g["group"] != "all")]
               .groupby("threshold")["rate"].min().reset_index())
        right.plot(fa["threshold"], fa["rate"], linestyle="--", color=colour)
        right.plot(det["threshold"], det["rate"], linestyle="-", marker="o", color=colour, label=f"{r} pairs")
    right.axvline(t, color="grey", linewidth=0.8)
    right.set(xlabel="threshold (ratio - 1)", ylabel="rate", ylim=(-0.03, 1.03),
              title=f"solid: worst model/group caught at {top:g}x; dashed: false alarms per clean run")
    right.legend(frameon=False, fontsize=8)
    return [save(fig, Path(out_dir) / f"{stem}.png")]
