"""``bsbr-eval forms``: its ``Options`` and ``main(options)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.options import models_option, option


@dataclass(frozen=True)
class Options:
    """Time an op's chunkwise-parallel form against its token-by-token recurrence (op level).
    Both forms compute the same outputs (the tests pin it); the table shows how much faster the
    parallel form is. The recurrence is slow by nature: keep lengths modest."""

    models: Optional[tuple] = models_option("Models with a recurrent op form (`bsbr-eval models` lists op forms), "
                                            "space- or comma-separated. Default: all of them.")
    seq_lengths: Optional[tuple] = option(None, "Sequence lengths, space- or comma-separated. Default: 1024 4096.",
                                          many=True, show_default=False)
    modes: Optional[tuple] = option(None, "forward and/or train (forward + backward). Default: train.", many=True,
                                    show_default=False)
    hidden_dim: int = option(512, "Hidden size D.")
    num_heads: int = option(8, "Heads H (D must divide by H).")
    chunk_size: int = option(64, "Chunk size of the parallel form.")
    batch_size: int = option(1, "Batch size.")
    repeats: int = option(3, "Timed samples per configuration (time_ms is their median).")
    min_run_time: float = option(0.0, "Minimum seconds of timed work per configuration.")
    threads: int = option(1, "CPU threads, pinned for every measurement and recorded.")
    seed: int = option(0, "Seed for weights and inputs (recorded).")
    device: str = option("cpu", "Where to run the ops.", choices=("cpu", "cuda"))
    dtype: str = option("float32", "Floating-point type.", choices=("float32", "float64", "float16", "bfloat16"))
    output: Optional[Path] = option(None, "CSV to write (ends in .csv; its .json sidecar goes beside it). "
                                    "Default: results/forms_<UTC time>.csv.", show_default=False)


def plan(o: Options):
    """Every option checked (one ``ResultsError`` line naming the bad one), as a ``FormsPlan``."""
    import torch

    from bsbr.checks import check_heads
    from evals.errors import ResultsError
    from evals.forms.forms import FORM_MODES, FormsPlan, models_with_recurrence
    from evals.options import check_fraction, check_positive, check_seed, choose, positive_ints
    from evals.registry import ModelConfig, resolve_model, select

    valid = models_with_recurrence()
    names = select("--models", o.models, default=valid)
    lacking = [m for m in names if "recurrent" not in resolve_model(m).forms]
    if lacking:
        raise ResultsError(f"--models: {', '.join(lacking)} has no recurrent op form (op_recurrent); models with "
                           f"one: {', '.join(valid)}")
    lengths = positive_ints("--seq-lengths", o.seq_lengths, default=(1024, 4096))
    modes = choose("--modes", o.modes, FORM_MODES, default=("train",))
    if o.device == "cuda" and not torch.cuda.is_available():
        raise ResultsError("--device: CUDA is not available on this machine; valid: cpu")
    check_positive(hidden_dim=o.hidden_dim, num_heads=o.num_heads, chunk_size=o.chunk_size, batch_size=o.batch_size,
                   repeats=o.repeats, threads=o.threads)
    check_fraction("--min-run-time", o.min_run_time)
    check_seed(o.seed)
    try:
        check_heads(o.hidden_dim, o.num_heads)
    except ValueError as e:
        raise ResultsError(str(e)) from None
    config = ModelConfig(hidden_dim=o.hidden_dim, num_heads=o.num_heads, chunk_size=o.chunk_size, num_layers=1)
    return FormsPlan(tuple(names), tuple(lengths), tuple(modes), config, batch_size=o.batch_size, seed=o.seed,
                     device=o.device, dtype=o.dtype, repeats=o.repeats, min_run_time=o.min_run_time,
                     threads=o.threads)


def main(o: Options) -> int:
    from evals.console import err, finish, plural, table
    from evals.output.files import sidecar_path
    from evals.forms.forms import run, speedups
    from evals.machine import new_run_id, utc_stamp
    from evals.output.paths import check_target
    from evals.results import outcome

    output = check_target(o.output or Path("results") / f"forms_{utc_stamp()}.csv", "--output", folder=False,
                          suffix=".csv")
    p = plan(o)
    log = err()
    rows = run(p, output, run_id=new_run_id(), progress=lambda m, mode, n, form: log.print(f"{m} {mode} n={n} {form}",
                                                                                        style="dim"))
    table("bsbr-eval forms: parallel vs recurrent (op level)",
          ("model", "mode", "n", "parallel ms", "recurrent ms", "parallel is"),
          [(s["model"], s["mode"], s["seq_len"], f"{s['parallel_ms']:.3g}", f"{s['recurrent_ms']:.4g}",
            f"{s['speedup']:.1f}x faster") for s in speedups(rows)])
    for r in rows:
        if r["status"] != "ok":
            log.print(f"{r['model']} {r['mode']} n={r['seq_len']} {r['form']}: {r['error']}", style="red")
    code, words = outcome(rows)
    return finish(code, f"wrote {plural(len(rows), 'row')} to {output} (+ {sidecar_path(output).name})"
                        + (f"; {words}" if words else ""))
