"""The frontier of an ``lm`` run: test bits per byte beside what each model costs to decode.

Every (model, context) an lm run trained was built with one configuration per model (the
feed-forward width matched to the parameter budget does not depend on the context), so each model
is measured once and its decode cost stands beside its bits per byte at every context.
``frontier_table.csv`` / ``frontier.md``: model, context, parameters, test bits per byte (mean and
worst over seeds at the best rate), state bytes and decode ms/token at each length;
``lm_bpb_vs_cost.png`` (``evals.lm.plots``) plots bits per byte against decode time at the
longest length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd


def target(row: dict):
    """The configuration an lm row was trained with, as a ``Target``."""
    from evals.frontier.measure import Target
    from evals.lm.sweep import VOCAB
    from evals.registry import ModelConfig

    i = lambda k: int(float(row[k]))  # noqa: E731
    return Target(str(row["model"]), ModelConfig(vocab_size=VOCAB, hidden_dim=i("hidden_dim"),
                                                 num_layers=i("num_layers"), num_heads=i("num_heads"),
                                                 ff_dim=i("ff_dim"), dropout=0.0, chunk_size=i("chunk_size"),
                                                 window_size=i("window_size"), qk_dim=i("qk_dim")))


def summary_targets(rows: list, side: dict) -> list:
    return list(dict.fromkeys(target(r) for r in rows if r.get("status") == "ok"))


def frontier_table(rows: list, timed: pd.DataFrame, states: pd.DataFrame, lengths: Sequence[int]) -> pd.DataFrame:
    """One row per (model, context): bits per byte at the best rate, state bytes and decode cost."""
    from evals.frontier.measure import measured_at
    from evals.lm.report import summarize

    summary = summarize(rows)
    by_model = {str(r["model"]): target(r) for r in rows if r.get("status") == "ok"}
    out = []
    for r in summary.to_dict("records"):
        row = dict(model=r["model"], context=int(r["context"]), params=r["params"], lr=r["lr"], seeds=r["seeds"],
                   test_bpb=r["test_bpb"], test_bpb_max=r["test_bpb_max"],
                   status="ok" if r["status"] == "ok" else f"lm_{r['status']}", error="")
        t = by_model.get(r["model"])
        for n in lengths:
            ms, nbytes, bad = measured_at(timed, states, t, n) if t else (float("nan"), float("nan"),
                                                                        ("missing", "no ok training"))
            row[f"decode_ms_{n}"], row[f"state_bytes_{n}"] = ms, nbytes
            if bad is not None and row["status"] == "ok":
                row.update(status=f"{n}:{bad[0]}", error=str(bad[1]))
        out.append(row)
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame, lengths: Sequence[int], device: str) -> str:
    from evals.registry import model_order

    head = ["model", "context", "params", "test bpb (worst)"] + [f"state KiB @{n}" for n in lengths] + \
        [f"decode ms/token @{n} ({device})" for n in lengths] + ["status"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|" + "---:|" * (2 * len(lengths)) + "---|"]
    order = {m: i for i, m in enumerate(model_order(table["model"]))}
    for r in table.assign(_o=table["model"].map(order)).sort_values(["_o", "context"]).to_dict("records"):
        bpb = "" if pd.isna(r["test_bpb"]) else f"{r['test_bpb']:.3f} ({r['test_bpb_max']:.3f})"
        kib = ["" if pd.isna(r[f"state_bytes_{n}"]) else f"{r[f'state_bytes_{n}'] / 1024:,.1f}" for n in lengths]
        ms = ["" if pd.isna(r[f"decode_ms_{n}"]) else f"{r[f'decode_ms_{n}']:.3f}" for n in lengths]
        params = "" if pd.isna(r["params"]) else f"{int(r['params']):,}"
        lines.append(f"| {r['model']} | {r['context']} | {params} | {bpb} | " + " | ".join(kib + ms)
                     + f" | {r['status']} |")
    return "\n".join(lines) + "\n"


def report(run_dir: Path, rows: list, side: dict, timed: pd.DataFrame, states: pd.DataFrame, lengths, device) -> dict:
    from evals.output.files import write_frame, write_text
    from evals.frontier.measure import STATE_NAME, TABLE_NAME
    from evals.lm import plots
    from evals.lm.report import summarize

    table = frontier_table(rows, timed, states, lengths)
    write_frame(run_dir / STATE_NAME, states)
    write_frame(run_dir / TABLE_NAME, table)
    write_text(run_dir / "frontier.md", markdown(table, lengths, device))
    n = max(lengths)
    cost = table[["model", "context", f"decode_ms_{n}"]].rename(columns={f"decode_ms_{n}": "decode_ms"}).assign(length=n)
    figures = plots.plot_bpb_vs_cost(summarize(rows), cost, run_dir)
    return dict(table=table, csv=run_dir / TABLE_NAME, figures=figures)
