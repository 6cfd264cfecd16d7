"""``bsbr-eval forms``: an op's parallel form against its token-by-token recurrence.

A recurrent architecture can be trained by running its recurrence one token at a time, which is
sequential in ``n``; its chunkwise-parallel form computes the same outputs with batched matrix
products (for DeltaNet: Yang et al., 2024). This command times both forms on the same per-head
inputs (op level: the projections are made beforehand and not timed), in ``forward`` (no grad) or
``train`` (forward plus backward of the sum of the outputs) mode, and reports how much faster the
parallel form is. Tests pin that the two forms give the same numbers.

Which models have a recurrent op is derived from their mixers (``ModelSpec.forms``: a mixer with
``op_recurrent(*op_inputs, mask=None)`` has one).

The CSV has one row per (model, mode, length, form) with the timing columns of ``compare``. The
whole file is rewritten atomically after every row (temp file + rename), so an interrupted run
keeps every row it finished and no file is ever half-written. A JSON sidecar records the
environment as for ``compare``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from evals.measure import _one_line, op_call, sample_stats, time_fn
from evals.registry import REGISTRY, ModelConfig
from evals.results import environment, utc_now, write_sidecar

FORMS = ("parallel", "recurrent")
FORM_MODES = ("forward", "train")
COLUMNS = ("run_id", "model", "form", "mode", "seq_len", "batch_size", "hidden_dim", "num_heads", "chunk_size",
           "dtype", "threads", "status", "time_ms", "time_ms_p20", "time_ms_p80", "repeats", "timer",
           "samples_ms", "error")


def models_with_recurrence() -> tuple:
    """Registry models whose op also has a token-by-token recurrent form."""
    return tuple(name for name, spec in REGISTRY.items() if "recurrent" in spec.forms)


def build(model: str, form: str, mode: str, n: int, config: ModelConfig, batch_size: int = 1,
          seed: int = 0):
    """The untimed set-up: a seeded mixer, its op inputs for ``n`` tokens, and the call to time."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    if mode not in FORM_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(FORM_MODES)}")
    if form not in REGISTRY[model].forms:
        raise ValueError(f"{model} has no {form} form; models with one: {', '.join(models_with_recurrence())}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mixer = REGISTRY[model].build_mixer(config).eval()
    op = mixer.op if form == "parallel" else mixer.op_recurrent
    x = torch.randn(batch_size, n, config.hidden_dim, generator=g)
    return op_call(mixer, op, x, train=mode == "train")


def _write_atomic(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(models: Sequence[str], seq_lengths: Sequence[int], modes: Sequence[str], output: Path | str, *,
        config: ModelConfig, batch_size: int = 1, threads: int = 1, repeats: int = 3, min_run_time: float = 0.0,
        seed: int = 0, run_id: str = "", settings: Optional[dict] = None, progress=None) -> list[dict]:
    """Time both forms of every (model, mode, length); returns the rows (also written to ``output``).

    Lengths run ascending with the parallel form first, so the slow recurrent runs come last in
    each group. A failure is an ``error`` row with the message, never a crash.
    """
    output = Path(output)
    if output.exists() and output.stat().st_size > 0:
        raise ValueError(f"{output} already exists; choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    info = dict(environment(), run_id=run_id, started_utc=utc_now(), settings=settings or {})
    write_sidecar(output, info)
    rows: list[dict] = []
    for model in models:
        for mode in modes:
            for n in sorted(set(seq_lengths)):
                for form in FORMS:
                    if progress:
                        progress(model, mode, n, form)
                    row = dict(run_id=run_id, model=model, form=form, mode=mode, seq_len=n, batch_size=batch_size,
                               hidden_dim=config.hidden_dim, num_heads=config.num_heads,
                               chunk_size=config.chunk_size, dtype="float32", threads=threads, timer="cpu_wall",
                               error="")
                    try:
                        fn = build(model, form, mode, n, config, batch_size, seed)
                        samples = time_fn(fn, repeats=repeats, min_run_time=min_run_time, threads=threads)
                    except Exception as err:  # a failing configuration is a row, never a crash
                        row.update(status="error", error=_one_line(err))
                    else:
                        row.update(sample_stats(samples), status="ok")
                    rows.append(row)
                    _write_atomic(output, rows)
    write_sidecar(output, dict(info, ended_utc=utc_now()))
    return rows


def speedups(rows: Sequence[dict]) -> list[dict]:
    """Per (model, mode, length): both medians and recurrent / parallel (how much faster parallel is)."""
    by = {}
    for r in rows:
        if r.get("status") == "ok":
            by.setdefault((r["model"], r["mode"], int(r["seq_len"])), {})[r["form"]] = float(r["time_ms"])
    out = []
    for (model, mode, n), t in by.items():
        if len(t) == 2:
            out.append(dict(model=model, mode=mode, seq_len=n, parallel_ms=t["parallel"],
                            recurrent_ms=t["recurrent"], speedup=t["recurrent"] / t["parallel"]))
    return out
