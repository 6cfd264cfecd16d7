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

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from evals import interrupts
from evals.errors import one_line
from evals.output.files import write_sidecar
from evals.interrupts import sigterm_as_interrupt
from evals.machine import environment, utc_now
from evals.measure import time_fn
from evals.registry import ModelConfig, resolve_model
from evals.results import FORMS_COLUMNS as COLUMNS, append_row, sample_stats
from evals.output.claims import claim_file
from evals.workload import DTYPES, op_call

FORMS = ("parallel", "recurrent")
FORM_MODES = ("forward", "train")


def models_with_recurrence() -> tuple:
    """Registry models whose op also has a token-by-token recurrent form."""
    from evals.registry import registered

    out = []
    for name in registered():
        try:
            if "recurrent" in resolve_model(name).forms:
                out.append(name)
        except ValueError:  # a plugin that does not import is not one with a recurrence
            continue
    return tuple(out)


@dataclass(frozen=True)
class FormsPlan:
    """One ``forms`` run: what is built (models, lengths, modes, the mixer configuration, batch,
    seed, device, dtype) and how it is timed (repeats, minimum time, threads)."""

    models: tuple
    seq_lengths: tuple
    modes: tuple
    config: ModelConfig
    batch_size: int = 1
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 3
    min_run_time: float = 0.0
    threads: int = 1

    def settings(self) -> dict:
        return dict(models=list(self.models), seq_lengths=list(self.seq_lengths), modes=list(self.modes),
                    config=self.config.as_dict(), batch_size=self.batch_size, repeats=self.repeats,
                    min_run_time=self.min_run_time, threads=self.threads, seed=self.seed, device=self.device,
                    dtype=self.dtype)


def build(model: str, form: str, mode: str, n: int, plan: FormsPlan):
    """The untimed set-up: a seeded mixer, its op inputs for ``n`` tokens, and the call to time."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    if mode not in FORM_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(FORM_MODES)}")
    spec = resolve_model(model)
    if form not in spec.forms:
        raise ValueError(f"{model} has no {form} form; models with one: {', '.join(models_with_recurrence())}")
    torch.manual_seed(plan.seed)
    g = torch.Generator().manual_seed(plan.seed)
    mixer = spec.build_mixer(plan.config).eval().to(device=plan.device, dtype=DTYPES[plan.dtype])
    op = mixer.op if form == "parallel" else mixer.op_recurrent
    x = torch.randn(plan.batch_size, n, plan.config.hidden_dim, generator=g).to(device=plan.device,
                                                                                  dtype=DTYPES[plan.dtype])
    return op_call(mixer, op, x, train=mode == "train")


def run(plan: FormsPlan, output: Path | str, *, run_id: str = "", progress=None) -> list[dict]:
    """Time both forms of every (model, mode, length); returns the rows (also written to ``output``).

    Lengths run ascending with the parallel form first, so the slow recurrent runs come last in
    each group. A failure is an ``error`` row with the message, never a crash. ``output`` must
    not exist yet (``ResultsError``); it is locked for the whole run.
    """
    output = Path(output)
    with sigterm_as_interrupt(), claim_file(output, columns=COLUMNS[:4], can_resume=False):
        interrupts.hint(f"the rows finished so far are in {output}; forms cannot resume, so rerun it with a new "
                        f"--output")
        info = dict(environment(), run_id=run_id, started_utc=utc_now(), settings=plan.settings())
        write_sidecar(output, info)
        rows = [_row(plan, model, mode, n, form, output, run_id, progress) for model in plan.models
                for mode in plan.modes for n in sorted(set(plan.seq_lengths)) for form in FORMS]
        write_sidecar(output, dict(info, ended_utc=utc_now()))
    return rows


def _row(plan: FormsPlan, model: str, mode: str, n: int, form: str, output: Path, run_id: str, progress) -> dict:
    """One (model, mode, length, form) timed and appended; a failure is an ``error`` row."""
    if progress:
        progress(model, mode, n, form)
    c = plan.config
    row = dict(run_id=run_id, model=model, form=form, mode=mode, seq_len=n, batch_size=plan.batch_size,
               hidden_dim=c.hidden_dim, num_heads=c.num_heads, chunk_size=c.chunk_size, dtype=plan.dtype,
               threads=plan.threads, device=plan.device,
               timer="cuda_event" if plan.device.startswith("cuda") else "cpu_wall", error="")
    try:
        fn = build(model, form, mode, n, plan)
        samples = time_fn(fn, device=plan.device, repeats=plan.repeats, min_run_time=plan.min_run_time,
                          threads=plan.threads)
    except Exception as err:  # a failing configuration is a row, never a crash
        row.update(status="error", error=one_line(err, kind=True))
    else:
        row.update(sample_stats(samples), status="ok")
    append_row(output, row, COLUMNS)
    return row


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
