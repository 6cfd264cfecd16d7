"""What an ``lm`` run reports: per model and context, test bits per byte at the best rate (mean,
standard deviation and worst over seeds), and the test loss by position as a table with one row
per architecture, context and position bucket (means over the same seeds).

The rate is chosen per (model, context) by validation bits per byte on the first seed
(``evals.lm.sweep.best_lr``); every row at that rate, whatever its seed, is in the mean.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from evals.lm.sweep import best_lr
from evals.lm.training import parse_positions
from evals.registry import model_order

SUMMARY_COLUMNS = ["model", "context", "lr", "seeds", "test_bpb", "test_bpb_std", "test_bpb_max", "val_bpb",
                   "params", "tokens_seen", "tokens_per_s", "train_time_s", "status"]


def _best_rows(rows: Sequence[dict]) -> dict:
    """``{(model, context): (lr, [ok rows at lr])}``; a configuration with no ok row maps to (None, [its rows])."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((str(r["model"]), int(r["context"])), []).append(r)
    out = {}
    for key, rs in groups.items():
        first = min(int(r["seed"]) for r in rs)
        lr = best_lr([r for r in rs if int(r["seed"]) == first])
        chosen = [r for r in rs if lr is not None and float(r["lr"]) == lr and r.get("status") == "ok"]
        out[key] = (lr, chosen or rs)
    return out


def summarize(rows: Sequence[dict]) -> pd.DataFrame:
    """One row per (model, context): the best rate's test bits per byte over seeds."""
    out = []
    for (model, context), (lr, rs) in _best_rows(rows).items():
        if lr is None:
            out.append(dict(model=model, context=context, status=str(rs[0].get("status", "error")), seeds=0))
            continue
        t = pd.Series([float(r["test_bpb"]) for r in rs])
        out.append(dict(model=model, context=context, lr=lr, seeds=len(rs), test_bpb=t.mean(),
                        test_bpb_std=t.std(ddof=1) if len(t) > 1 else 0.0, test_bpb_max=t.max(),
                        val_bpb=pd.Series([float(r["val_bpb"]) for r in rs]).mean(),
                        params=int(float(rs[0]["params"])), tokens_seen=int(float(rs[0]["tokens_seen"])),
                        tokens_per_s=pd.Series([float(r["tokens_per_s"]) for r in rs]).mean(),
                        train_time_s=pd.Series([float(r["train_time_s"]) for r in rs]).mean(), status="ok"))
    df = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    order = {m: i for i, m in enumerate(model_order(df["model"]))}
    return df.sort_values(["context", "model"], key=lambda s: s.map(order) if s.name == "model" else s,
                          ignore_index=True)


def positions_table(rows: Sequence[dict]) -> pd.DataFrame:
    """One row per (model, context, position bucket): mean test bits per byte over the seeds at the
    best rate, with the bucket's bounds ``[pos_lo, pos_hi)``."""
    out = []
    for (model, context), (lr, rs) in _best_rows(rows).items():
        if lr is None:
            continue
        per_seed = [parse_positions(r["test_loss_by_position"], context) for r in rs]
        per_seed = [p for p in per_seed if p is not None]
        for i, (lo, hi, _) in enumerate(per_seed[0] if per_seed else ()):
            vals = pd.Series([p[i][2] for p in per_seed])
            out.append(dict(model=model, context=context, pos_lo=lo, pos_hi=hi, bits_per_byte=round(vals.mean(), 5),
                            std=round(vals.std(ddof=1), 5) if len(vals) > 1 else 0.0, seeds=len(vals)))
    return pd.DataFrame(out, columns=["model", "context", "pos_lo", "pos_hi", "bits_per_byte", "std", "seeds"])


def markdown(summary: pd.DataFrame, corpus: dict) -> str:
    """The summary as a Markdown table, with the corpus's unigram entropy as the floor to beat."""
    contexts = sorted(summary["context"].unique())
    head = "| model | params | " + " | ".join(f"test bpb @ {c} (rate)" for c in contexts) + " |"
    lines = [f"Test bits per byte on {corpus['name']} (sha256 {corpus['sha256'][:12]}...), mean ± std (worst) "
             f"over seeds at the rate with the best validation bits per byte. Unigram byte entropy of the corpus: "
             f"{corpus['unigram_bits_per_byte']:.3f} bits.", "", head,
             "| --- | ---: | " + " | ".join("---:" for _ in contexts) + " |"]
    for model in model_order(summary["model"]):
        part = summary[summary["model"] == model]
        cells = []
        for c in contexts:
            r = part[part["context"] == c]
            if r.empty:
                cells.append("")
            elif r.iloc[0]["status"] != "ok":
                cells.append(str(r.iloc[0]["status"]))
            else:
                r = r.iloc[0]
                cells.append(f"{r.test_bpb:.3f} ± {r.test_bpb_std:.3f} ({r.test_bpb_max:.3f}) @{r.lr:g}")
        params = part["params"].dropna()
        lines.append(f"| {model} | {int(params.iloc[0]):,} | " + " | ".join(cells) + " |" if len(params) else
                     f"| {model} | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
