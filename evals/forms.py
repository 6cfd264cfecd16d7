"""``bsbr-eval forms``: an op's parallel form against its token-by-token recurrence.

A recurrent architecture can be trained by running its recurrence one token at a time, which is
sequential in ``n``; its chunkwise-parallel form computes the same outputs with batched matrix
products (for DeltaNet: Yang et al., 2024). This command times both forms on the same per-head
inputs (op level: the projections are made beforehand and not timed), in ``forward`` (no grad) or
``train`` (forward plus backward of the sum of the outputs) mode, and reports how much faster the
parallel form is. Tests pin that the two forms give the same numbers.

Which models have a recurrent op is derived from their mixers (``ModelSpec.forms``: a mixer with
``op_recurrent(*op_inputs, mask=None)`` has one).

The CSV (``evals.results.FORMS_COLUMNS``) has one row per (model, mode, length, form) with the
timing columns of ``compare``. The output is claimed, locked and appended to one whole row at a
time through ``evals.results``, as for ``compare``; a JSON sidecar records the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from evals.grid import DEVICES, DTYPES as DTYPE_NAMES
from evals.measure import DTYPES, op_call, time_fn
from evals.interrupts import sigterm_as_interrupt
from evals.options import check_fraction, check_positive, check_seed, choose, positive_ints
from evals.registry import REGISTRY, ModelConfig
from evals.results import (FORMS_COLUMNS as COLUMNS, ResultsError, append_row, check_output, claim_output, environment, new_run_id,
                           one_line, outcome, sample_stats, sidecar_path, utc_now, utc_stamp,
                           write_sidecar)

FORMS = ("parallel", "recurrent")
FORM_MODES = ("forward", "train")


def models_with_recurrence() -> tuple:
    """Registry models whose op also has a token-by-token recurrent form."""
    return tuple(name for name, spec in REGISTRY.items() if "recurrent" in spec.forms)


def build(model: str, form: str, mode: str, n: int, config: ModelConfig, batch_size: int = 1,
          seed: int = 0, device: str = "cpu", dtype: str = "float32"):
    """The untimed set-up: a seeded mixer, its op inputs for ``n`` tokens, and the call to time."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    if mode not in FORM_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(FORM_MODES)}")
    if form not in REGISTRY[model].forms:
        raise ValueError(f"{model} has no {form} form; models with one: {', '.join(models_with_recurrence())}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mixer = REGISTRY[model].build_mixer(config).eval().to(device=device, dtype=DTYPES[dtype])
    op = mixer.op if form == "parallel" else mixer.op_recurrent
    x = torch.randn(batch_size, n, config.hidden_dim, generator=g).to(device=device, dtype=DTYPES[dtype])
    return op_call(mixer, op, x, train=mode == "train")


def run(models: Sequence[str], seq_lengths: Sequence[int], modes: Sequence[str], output: Path | str, *,
        config: ModelConfig, batch_size: int = 1, threads: int = 1, repeats: int = 3, min_run_time: float = 0.0,
        seed: int = 0, run_id: str = "", settings: Optional[dict] = None, progress=None, device: str = "cpu",
        dtype: str = "float32") -> list[dict]:
    """Time both forms of every (model, mode, length); returns the rows (also written to ``output``).

    Lengths run ascending with the parallel form first, so the slow recurrent runs come last in
    each group. A failure is an ``error`` row with the message, never a crash. ``output`` must
    not exist yet (``ResultsError``); it is locked for the whole run.
    """
    output = Path(output)
    with sigterm_as_interrupt(), claim_output(output, columns=COLUMNS[:4], can_resume=False):
        return _run(models, seq_lengths, modes, output, config=config, batch_size=batch_size, threads=threads,
                    repeats=repeats, min_run_time=min_run_time, seed=seed, run_id=run_id, settings=settings,
                    progress=progress, device=device, dtype=dtype)


def _run(models, seq_lengths, modes, output: Path, *, config, batch_size, threads, repeats, min_run_time, seed,
         run_id, settings, progress, device, dtype) -> list[dict]:
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
                               chunk_size=config.chunk_size, dtype=dtype, threads=threads, device=device,
                               timer="cuda_event" if device.startswith("cuda") else "cpu_wall",
                               error="")
                    try:
                        fn = build(model, form, mode, n, config, batch_size, seed, device, dtype)
                        samples = time_fn(fn, device=device, repeats=repeats, min_run_time=min_run_time,
                                          threads=threads)
                    except Exception as err:  # a failing configuration is a row, never a crash
                        row.update(status="error", error=one_line(err, kind=True))
                    else:
                        row.update(sample_stats(samples), status="ok")
                    rows.append(row)
                    append_row(output, row, COLUMNS)
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


def run_forms(*, models=None, seq_lengths=None, modes=None, hidden_dim: int = 512, num_heads: int = 8,
              chunk_size: int = 64, batch_size: int = 1, repeats: int = 3, min_run_time: float = 0.0,
              threads: int = 1, seed: int = 0, output: Optional[Path] = None, progress=None,
              device: str = "cpu", dtype: str = "float32") -> tuple[list[dict], Path, int, str]:
    """``bsbr-eval forms``: check the options (``ResultsError`` names the bad one), run, and return
    the rows, the output path, the exit code and the closing line."""
    from bsbr.checks import check_heads

    output = check_output(Path(output) if output else Path("results") / f"forms_{utc_stamp()}.csv")
    valid = models_with_recurrence()
    names = choose("--models", models, valid, default=valid)
    lengths = positive_ints("--seq-lengths", seq_lengths, default=(1024, 4096))
    mode_list = choose("--modes", modes, FORM_MODES, default=("train",))
    device, dtype = choose("--device", [device], DEVICES)[0], choose("--dtype", [dtype], DTYPE_NAMES)[0]
    if device == "cuda" and not torch.cuda.is_available():
        raise ResultsError("--device: CUDA is not available on this machine; valid: cpu")
    check_positive(hidden_dim=hidden_dim, num_heads=num_heads, chunk_size=chunk_size, batch_size=batch_size,
                   repeats=repeats, threads=threads)
    check_fraction("--min-run-time", min_run_time)
    check_seed(seed)
    try:
        check_heads(hidden_dim, num_heads)
    except ValueError as e:
        raise ResultsError(str(e)) from None
    config = ModelConfig(hidden_dim=hidden_dim, num_heads=num_heads, chunk_size=chunk_size, num_layers=1)
    settings = dict(models=names, seq_lengths=lengths, modes=mode_list, config=config.as_dict(),
                    batch_size=batch_size, repeats=repeats, min_run_time=min_run_time, threads=threads, seed=seed,
                    device=device, dtype=dtype)
    rows = run(names, lengths, mode_list, output, config=config, batch_size=batch_size, threads=threads,
               repeats=repeats, min_run_time=min_run_time, seed=seed, settings=settings, progress=progress,
               run_id=new_run_id(), device=device, dtype=dtype)
    code, words = outcome(rows)
    summary = f"wrote {len(rows)} rows to {output} (+ {sidecar_path(output).name})"
    return rows, output, code, summary + (f"; {words}" if words else "")


def speedup_table(rows: Sequence[dict]):
    """A rich table of ``speedups``: both medians and how much faster the parallel form is."""
    from rich.table import Table

    table = Table(title="bsbr-eval forms: parallel vs recurrent (op level)")
    for col in ("model", "mode", "n", "parallel ms", "recurrent ms", "parallel is"):
        table.add_column(col, justify="right" if col not in ("model", "mode") else "left")
    for s in speedups(rows):
        table.add_row(s["model"], s["mode"], str(s["seq_len"]), f"{s['parallel_ms']:.3g}",
                      f"{s['recurrent_ms']:.4g}", f"{s['speedup']:.1f}x faster")
    return table
