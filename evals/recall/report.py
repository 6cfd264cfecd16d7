"""Reading a recall run: each configuration at its best learning rate (mean, standard deviation
and minimum over seeds), the sanity check on Standard, the table and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from evals.recall.sweep import RecallPreset, best_lr

GROUP = ["model", "seq_len", "num_pairs", "hidden_dim", "size"]
# Standard (softmax attention) solves MQAR at these scales (Arora et al., 2023); below this mean
# held-out accuracy at its best rate, the run itself (data, trainer, budget) is suspect.
BROKEN_BELOW = 0.9


def summarize(rows: Sequence[dict]) -> pd.DataFrame:
    """One row per configuration: the rate chosen on the tune rows (best validation accuracy), the
    seeds run at it and their held-out accuracy (mean, std, min), the measured state size.

    A configuration whose tune runs all failed appears with ``status`` ``error`` and no accuracy.
    """
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=GROUP + ["status", "lr", "seeds", "test_acc", "test_acc_std",
                                             "test_acc_min", "state_bytes", "vocab_size", "num_layers"])
    for c in ("seq_len", "num_pairs", "hidden_dim", "size", "seed", "steps", "vocab_size", "num_layers"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in ("lr", "test_acc", "val_acc", "state_bytes"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    out = []
    for key, g in df.groupby(GROUP, sort=False):
        first = g.iloc[0]
        lr = best_lr(g[g["phase"] == "tune"].to_dict("records"))
        base = dict(zip(GROUP, key), vocab_size=first["vocab_size"], num_layers=first["num_layers"])
        if lr is None:
            out.append(dict(base, status="error", lr=float("nan"), seeds=0, test_acc=float("nan"),
                            test_acc_std=float("nan"), test_acc_min=float("nan"), state_bytes=float("nan")))
            continue
        at = g[(g["lr"] == lr) & (g["status"] == "ok")]
        acc = at["test_acc"]
        out.append(dict(base, status="ok", lr=lr, seeds=len(at), test_acc=acc.mean(),
                        test_acc_std=acc.std(ddof=1) if len(at) > 1 else float("nan"),
                        test_acc_min=acc.min(), state_bytes=at["state_bytes"].iloc[0]))
    return pd.DataFrame(out)


def broken_configs(summary: pd.DataFrame) -> list:
    """Configurations in which Standard, the sanity anchor, failed to learn (or failed to run)."""
    std = summary[summary["model"] == "Standard"]
    bad = std[(std["status"] != "ok") | (std["test_acc"] < BROKEN_BELOW)]
    return [f"n={r.seq_len} P={r.num_pairs} d={r.hidden_dim} size={r.size}" for r in bad.itertuples()]


def summary_rows(summary: pd.DataFrame) -> tuple:
    """(columns, rows) of the terminal table: one row per model, one column per configuration;
    each cell the held-out accuracy (%) at the best rate, mean ± std over seeds, and the minimum."""
    from evals.registry import model_order

    cfg = ("n" + summary["seq_len"].astype(str) + " P" + summary["num_pairs"].astype(str) + " d"
           + summary["hidden_dim"].astype(str) + " s" + summary["size"].astype(str))
    s = summary.assign(config=cfg)
    configs = list(dict.fromkeys(s["config"]))
    rows = []
    for m in model_order(s["model"]):
        cells = []
        for c in configs:
            r = s[(s["model"] == m) & (s["config"] == c)]
            cells.append("" if r.empty else format_cell(r.iloc[0]))
        rows.append((m, *cells))
    return ("model", *configs), rows


def format_cell(r) -> str:
    """``mean ± std (min min) @lr`` in %, or ``error``."""
    if r["status"] != "ok":
        return "error"
    std = "" if pd.isna(r["test_acc_std"]) else f" ± {100 * r['test_acc_std']:.1f}"
    return f"{100 * r['test_acc']:.1f}{std} (min {100 * r['test_acc_min']:.1f}) @{r['lr']:.0e}"


def markdown_table(summary: pd.DataFrame) -> str:
    """The same table as GitHub markdown, for the README and the committed run."""
    from evals.registry import model_order

    cfg = ("n=" + summary["seq_len"].astype(str) + " P=" + summary["num_pairs"].astype(str) + " d="
           + summary["hidden_dim"].astype(str))
    s = summary.assign(config=cfg)
    configs = list(dict.fromkeys(s["config"]))
    lines = ["| model | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
    for m in model_order(s["model"]):
        cells = [format_cell(s[(s["model"] == m) & (s["config"] == c)].iloc[0])
                 if not s[(s["model"] == m) & (s["config"] == c)].empty else "" for c in configs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_run(summary: pd.DataFrame, preset: RecallPreset, out_dir, stem: str = "recall") -> list:
    """The figures, through the plotting module: accuracy vs task at the base width and size, and
    accuracy vs measured state size, one figure per task point (zoology's figure)."""
    from evals.recall import plots

    if summary.empty:
        return []
    target = preset.train.target_acc
    s = summary.assign(status=summary["status"].astype(str))
    paths = plots.plot_recall_task(s[(s["hidden_dim"] == preset.base_hidden_dim) & (s["size"] == preset.base_size)],
                                   Path(out_dir), preset.base_seq_len, preset.base_num_pairs, target=target,
                                   stem=stem)
    for (n, P), sub in s.groupby(["seq_len", "num_pairs"], sort=True):
        if sub["hidden_dim"].nunique() * sub["size"].nunique() > 1:
            paths += plots.plot_recall_state(sub, Path(out_dir), target=target, stem=f"{stem}_n{n}_P{P}")
    return paths
