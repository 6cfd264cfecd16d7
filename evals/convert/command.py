"""``bsbr-eval convert``'s logic (``cli.py`` only parses): check the options and the output folder
before any work, hold the folder's lock, run the comparison (``evals.convert.comparison``) or the
experiment (``evals.convert.experiment``), and write the results (``convert.csv``,
``convert_speed.csv``, ``convert_training.csv``, the ``convert.json`` sidecar and ``convert.png``,
each written whole through ``evals.results``); the terminal summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from bsbr_extras.convert import save_converted
from evals.convert.comparison import check_comparison_args, run_comparison
from evals.convert.experiment import ExperimentConfig, run_experiment
from evals.interrupts import sigterm_as_interrupt
from evals.options import check_positive
from evals.results import ResultsError, check_output_dir, environment, locked, utc_now, write_frame, write_sidecar


# ----------------------------------------------------------------------------- output


AGREEMENT_COLUMNS = ["variant", "chunk_size", "compression_factor", "finetuned", "finetune_steps", "seq_len",
                     "ppl", "kl", "top1_agreement", "max_abs_diff", "first_chunk_max_abs_diff", "eval_tokens"]


def write_outputs(result: dict, output_dir: Path, *, stem: str = "convert", plot: bool = True) -> list[Path]:
    """``{stem}.csv`` (agreement/perplexity), ``{stem}_speed.csv``, ``{stem}_training.csv`` when there
    is a loss curve, the JSON sidecar ``{stem}.json`` and the figure, each written whole (temporary
    file and rename); returns the paths written."""
    import pandas as pd

    from evals.convert.plots import plot_conversion

    output_dir = Path(output_dir)
    agree = pd.DataFrame(result["agreement"])
    agree = agree[[c for c in AGREEMENT_COLUMNS if c in agree] + [c for c in agree if c not in AGREEMENT_COLUMNS]]
    path = write_frame(output_dir / f"{stem}.csv", agree, float_format="%.6g")
    written = [path]
    if result.get("speed"):
        written.append(write_frame(output_dir / f"{stem}_speed.csv", pd.DataFrame(result["speed"]), float_format="%.6g"))
    if result.get("curve"):
        written.append(write_frame(output_dir / f"{stem}_training.csv", pd.DataFrame(result["curve"]),
                                   float_format="%.6g"))
    written.append(write_sidecar(path, dict(result["info"], environment=environment(), finished_utc=utc_now())))
    if plot:
        written += plot_conversion(agree, pd.DataFrame(result.get("speed") or []), output_dir, stem=stem)
    return written


def replot(output_dir: Path, stem: str = "convert") -> list[Path]:
    """Draw ``{stem}.png`` again from the CSVs already in ``output_dir`` (no model is run)."""
    import pandas as pd

    from evals.convert.plots import plot_conversion

    output_dir = Path(output_dir)
    speed = output_dir / f"{stem}_speed.csv"
    return plot_conversion(pd.read_csv(output_dir / f"{stem}.csv"),
                           pd.read_csv(speed) if speed.is_file() else pd.DataFrame(), output_dir, stem=stem)


def print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="GPT-2 vs BSBR conversion (held-out text)")
    for col in ("variant", "ppl", "KL(gpt2||bsbr)", "top-1 agree", "max |diff|", "first-chunk max |diff|"):
        t.add_column(col, justify="right")
    for r in result["agreement"]:
        t.add_row(r["variant"], f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}",
                  f"{r['max_abs_diff']:.2e}", f"{r['first_chunk_max_abs_diff']:.2e}")
    Console().print(t)
    if result.get("speed"):
        s = Table(title="forward time and peak memory (batch 1, no grad)")
        for col in ("variant", "seq_len", "time_ms", "peak MB"):
            s.add_column(col, justify="right")
        for r in result["speed"]:
            s.add_row(r["variant"], str(r["seq_len"]), f"{r['time_ms']:.1f}", f"{r['peak_memory_mb']:.1f}")
        Console().print(s)


# ----------------------------------------------------------------------------- the command


def quiet_transformers() -> None:
    """For the command lines: no per-load progress bars or config warnings from transformers."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run_convert(*, model_name: Optional[str] = None, chunk_sizes: Sequence[int] = (128,),
                compression_factor: Optional[int] = None, seq_len: Optional[int] = None,
                output_dir: Optional[Path] = None, save_model: bool = False, experiment: bool = False,
                device: str = "cpu", dtype: str = "float32") -> dict:
    """``bsbr-eval convert``: check the options and the output folder before any work, hold the
    folder's lock, run the comparison or the experiment, write the results. ``ResultsError`` for
    bad input (a missing extra, a model that does not load, a bad option or folder)."""
    if save_model and output_dir is None:
        raise ResultsError("--save-model needs --output-dir")
    if experiment and model_name is not None:
        raise ResultsError("--experiment trains its own GPT-2; do not pass --model-name with it")
    if not experiment and model_name is None:
        raise ResultsError("give --model-name (a hub name or a local GPT-2 directory) or --experiment")
    check_positive(seq_len=seq_len, compression_factor=compression_factor)  # bounded, before any loading
    try:
        check_comparison_args(list(chunk_sizes), seq_len, compression_factor)
    except ValueError as e:
        raise ResultsError(str(e)) from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ResultsError("--device: CUDA is not available on this machine; valid: cpu")
    where = dict(device=device, dtype=dtype)
    if output_dir is None:
        with sigterm_as_interrupt():
            return _run(model_name, chunk_sizes, compression_factor, seq_len, None, save_model, experiment, where)
    out = check_output_dir(output_dir)
    # SIGTERM (timeout, a scheduler) stops it as Ctrl-C does: the lock is released, nothing is half-written
    with sigterm_as_interrupt(), locked(out / "convert.csv", "--output-dir"):
        if (out / "convert.csv").exists() or (out / "convert.json").exists():
            raise ResultsError(f"--output-dir: {out} already holds a conversion's results (convert.csv); "
                               "choose another folder")
        return _run(model_name, chunk_sizes, compression_factor, seq_len, out, save_model, experiment, where)


def _run(model_name, chunk_sizes, compression_factor, seq_len, out: Optional[Path], save_model, experiment,
         where: dict) -> dict:
    try:
        if experiment:
            cfg = ExperimentConfig(speed_device=where["device"], speed_dtype=where["dtype"])
            result = run_experiment(cfg, gpt2_dir=out / "gpt2" if (out and save_model) else None)
        else:
            result = run_comparison(model_name, chunk_sizes, compression_factor=compression_factor, seq_len=seq_len,
                                    **where)
    except ImportError as e:
        extras = getattr(e, "name", None) in ("transformers", "safetensors")
        raise ResultsError(f"{e}; install the converter's extras: pip install 'bsbr[convert]'" if extras
                           else str(e)) from None
    except ValueError as e:  # a model that does not load, a sequence longer than its position table, ...
        raise ResultsError(str(e)) from None
    if out is not None:
        write_outputs(result, out)
        if save_model:
            for label, model in result["converted"].items():
                save_converted(model, out / label)
    return result
