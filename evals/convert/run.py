"""``bsbr-eval convert``'s work, once ``evals.convert.command`` has checked the options: run the
comparison (``evals.convert.comparison``) or the experiment (``evals.convert.experiment``) and
write the results (``convert.csv``, ``convert_speed.csv``, ``convert_training.csv``, the
``convert.json`` sidecar and ``convert.png``) into a folder written whole or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bsbr_extras.convert import save_converted
from evals.convert.comparison import SpeedTiming, run_comparison
from evals.convert.experiment import ExperimentConfig, run_experiment
from evals.errors import ResultsError
from evals.output.files import write_frame, write_sidecar
from evals.machine import environment, utc_now


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


def summary_tables(result: dict) -> list:
    """(title, columns, rows) of the terminal tables: agreement, and forward time and memory."""
    out = [("GPT-2 vs BSBR conversion (held-out text)",
            ("variant", "ppl", "KL(gpt2||bsbr)", "top-1 agree", "max |diff|", "first-chunk max |diff|"),
            [(r["variant"], f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}",
              f"{r['max_abs_diff']:.2e}", f"{r['first_chunk_max_abs_diff']:.2e}") for r in result["agreement"]])]
    if result.get("speed"):
        out.append(("forward time and peak memory (batch 1, no grad)", ("variant", "seq_len", "time_ms", "peak MB"),
                    [(r["variant"], r["seq_len"], f"{r['time_ms']:.1f}", f"{r['peak_memory_mb']:.1f}")
                     for r in result["speed"]]))
    return out


# ----------------------------------------------------------------------------- the command


def quiet_transformers() -> None:
    """For the command lines: no per-load progress bars or config warnings from transformers."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run_convert(o, out: Optional[Path]) -> dict:
    """Run the comparison or the experiment for the checked options ``o``; with ``out`` (a folder
    the caller holds: see ``evals.convert.command``) write the results and saved models there."""
    where = dict(device=o.device, dtype=o.dtype)
    return _run(o, out, where)


def _run(o, out: Optional[Path], where: dict) -> dict:
    try:
        if o.experiment:
            cfg = ExperimentConfig(speed_device=where["device"], speed_dtype=where["dtype"])
            result = run_experiment(cfg, gpt2_dir=out / "gpt2" if (out and o.save_model) else None)
        else:
            result = run_comparison(o.model_name, o.sizes, compression_factor=o.compression_factor,
                                    seq_len=o.seq_len, speed=(None, SpeedTiming(**where)))
    except ImportError as e:
        extras = getattr(e, "name", None) in ("transformers", "safetensors")
        raise ResultsError(f"{e}; install the converter's extras: pip install 'bsbr[convert]'" if extras
                           else str(e)) from None
    except ValueError as e:  # a model that does not load, a sequence longer than its position table, ...
        raise ResultsError(str(e)) from None
    if out is not None:
        write_outputs(result, out)
        if o.save_model:
            for label, model in result["converted"].items():
                save_converted(model, out / label)
    return result
