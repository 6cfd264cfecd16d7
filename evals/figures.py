"""The suite's shared figure conventions, for every command that draws (``evals.analyze.plots``,
``evals.recall.plots``, ``evals.frontier.recall``, ``evals.lm.plots``, ``evals.convert.plots``,
``evals.guard.figure``).

- matplotlib with the Agg backend (files only: no display on CI machines or cluster nodes), and
  ``plt``/``sns`` for the drawing modules;
- a fixed colour (``model_palette``) and open marker (``model_markers``) per model, by registry
  order (``evals.registry.model_order``), so a model looks the same in every figure;
- ``FAILURE_MARKERS``: how a failed (oom / error / skipped) row is marked, never drawn as a value;
- ``log_axes``: log axes with plain 1-2-5 tick labels; ``int_label``: ``64`` rather than ``64.0``;
- the common axis labels (``LENGTH_LABEL``, ``METRIC_LABELS``);
- ``save``: through the results layer, so a PNG appears whole or not at all.

Conventions for a new ``plot_*`` function (in the command's own ``plots`` module): take
DataFrames, not paths; colour and order models with ``model_palette`` / ``model_order``; label
both axes with units; save with ``save`` and return the paths written, in a stable order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on CI machines or cluster nodes

import matplotlib.pyplot as plt  # noqa: E402,F401 (the drawing modules' pyplot)
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from evals.registry import MODEL_NAMES, model_order  # noqa: E402
from evals.output.files import write_figure

METRIC_LABELS = {"time_ms": "time (ms, median of repeats)", "peak_memory_mb": "peak memory (MB)"}
LENGTH_LABEL = "sequence length n (tokens)"
FAILURE_MARKERS = {"oom": "X", "error": "P", "skipped": "v", "unsupported": "1"}
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


MAX_LENGTH_LABELS = 6  # a sweep's lengths labelled on one log x axis, at most (wider ones collide)


def log_axes(ax, axes: str = "xy", *, at: Iterable = ()) -> None:
    """Log axes with plain tick labels (20, 50, 100 rather than 2x10^1). Call after drawing.

    ``at``: the values an x axis is labelled at (a sweep's lengths: 128, 256, 512 on a
    128-512 sweep, where 1-2-5 ticks labelled only 200 and 500); past ``MAX_LENGTH_LABELS`` of
    them, every k-th is labelled and the others keep a bare tick. Otherwise the ticks follow the
    span of the data: 1-2-3-5 under one decade and a half (0.3 to 4.6 ms gets 0.3, 0.5, 1, 2, 3,
    5, where 1-2-5 labelled only 1 and 2), 1-2-5 up to the room the labels have side by side (x:
    2 decades; y, whose labels stack and are short: 4), and powers of ten beyond, so the labels
    of a wide range never run into each other.
    """
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for name in axes:
        axis = getattr(ax, f"{name}axis")
        getattr(ax, f"set_{name}scale")("log")
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        values = sorted({float(v) for v in at if float(v) > 0}) if name == "x" else []
        if values:
            # at most MAX_LENGTH_LABELS labelled (every k-th length); the rest keep an unlabelled tick
            labelled = values[::-(-len(values) // MAX_LENGTH_LABELS)]
            axis.set_major_locator(matplotlib.ticker.FixedLocator(labelled))
            axis.set_major_formatter(plain)
            axis.set_minor_locator(matplotlib.ticker.FixedLocator([v for v in values if v not in labelled]))
            continue
        lo, hi = (float(v) for v in axis.get_data_interval())
        span = np.log10(hi / lo) if lo > 0 and np.isfinite(hi / lo) else 0.0
        subs = (1.0,) if span > (2 if name == "x" else 4) else (1.0, 2.0, 5.0) if span > 1.5 else (1.0, 2.0, 3.0, 5.0)
        axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
        axis.set_major_formatter(plain)


def save(fig, path: Path) -> Path:
    """Through the results layer: the PNG appears whole or not at all."""
    try:
        return write_figure(fig, path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


def int_label(v) -> str:
    """A tick or title label: ``64`` for 64.0, the value as it is when it is not a finite number."""
    return str(int(v)) if isinstance(v, (int, float, np.number)) and np.isfinite(v) else str(v)
