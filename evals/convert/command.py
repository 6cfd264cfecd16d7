"""``bsbr-eval convert``: its ``Options`` and ``main(options)``.

Every option is checked before anything loads (one line, exit 2). With ``--output-dir`` the
results are written as one step (``evals.output.staged_folder``): into a hidden folder beside it,
which becomes the output folder only when everything is written, so a stop part-way leaves
nothing behind. Without ``--output-dir`` nothing is saved, and the closing line says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.options import option


@dataclass(frozen=True)
class Options:
    """GPT-2 -> BSBR: convert at several chunk sizes and compare with the original on held-out
    text. Reports logits agreement (max |diff|, KL, top-1), perplexity, and forward time and memory
    against length (measured by the harness). See docs/convert.md. The earlier package's
    `python -m bsbr_extras.convert_example` runs this command (its underscore spellings work here)."""

    model_name: Optional[str] = option(None, "Hub name or local save_pretrained directory of a GPT-2 (loaded by "
                                       "transformers).", flags=("--model-name", "--model_name"), show_default=False)
    chunk_sizes: Optional[tuple] = option(None, "BSBR chunk sizes to compare, space- or comma-separated (e.g. "
                                          "512,128,32). Default: 128.", flags=("--chunk-sizes", "--chunk_size"),
                                          many=True, show_default=False)
    compression_factor: Optional[int] = option(None, "BSBR state compression f (must divide the head size). "
                                               "Default: none.", flags=("--compression-factor",
                                                                        "--compression_factor"), show_default=False)
    seq_len: Optional[int] = option(None, "Evaluation window length (at most the GPT-2's n_positions). Default: "
                                    "min(512, n_positions).", flags=("--seq-len", "--seq_len"), show_default=False)
    output_dir: Optional[Path] = option(None, "Write convert.csv, convert_speed.csv, the convert.json sidecar and the "
                                        "figure here (a new or empty folder). Without it nothing is saved.",
                                        flags=("--output-dir", "--output_dir"), show_default=False)
    save_model: bool = option(False, "Also save each converted model (config.json + model.safetensors) under "
                              "--output-dir.", flags=("--save-model", "--save_model"))
    experiment: bool = option(False, "Train a small byte-level GPT-2 on pydoc_data.topics (~10 CPU minutes), then "
                              "convert, compare and fine-tune; ignores --chunk-sizes and --seq-len.",
                              flags=("--experiment",))
    device: str = option("cpu", "Where the forward-time rows are measured (the comparison itself runs on the CPU).",
                         choices=("cpu", "cuda"))
    dtype: str = option("float32", "Floating-point type of the forward-time rows.",
                        choices=("float32", "float64", "float16", "bfloat16"))


@dataclass(frozen=True)
class Checked:
    """The options after checking: ``sizes`` as integers."""

    model_name: Optional[str]
    sizes: tuple
    compression_factor: Optional[int]
    seq_len: Optional[int]
    save_model: bool
    experiment: bool
    device: str
    dtype: str


def check(o: Options) -> Checked:
    import torch

    from evals.convert.comparison import check_comparison_args
    from evals.errors import ResultsError
    from evals.options import check_positive, positive_ints

    sizes = tuple(positive_ints("--chunk-sizes", o.chunk_sizes, default=(128,), example="512,128,32"))
    if o.save_model and o.output_dir is None:
        raise ResultsError("--save-model needs --output-dir")
    if o.experiment and o.model_name is not None:
        raise ResultsError("--experiment trains its own GPT-2; do not pass --model-name with it")
    if not o.experiment and o.model_name is None:
        raise ResultsError("give --model-name (a hub name or a local GPT-2 directory) or --experiment")
    check_positive(seq_len=o.seq_len, compression_factor=o.compression_factor)  # bounded, before any loading
    try:
        check_comparison_args(list(sizes), o.seq_len, o.compression_factor)
    except ValueError as e:
        raise ResultsError(str(e)) from None
    if o.device == "cuda" and not torch.cuda.is_available():
        raise ResultsError("--device: CUDA is not available on this machine; valid: cpu")
    return Checked(o.model_name, sizes, o.compression_factor, o.seq_len, o.save_model, o.experiment, o.device,
                   o.dtype)


def _is_conversion(folder: Path) -> bool:
    return False  # an earlier conversion is never replaced: choose another folder


def main(o: Options) -> int:
    from evals import interrupts
    from evals.console import finish, table
    from evals.convert.run import quiet_transformers, run_convert, summary_tables
    from evals.output.paths import check_target
    from evals.output.claims import staged_folder

    c = check(o)
    quiet_transformers()
    if o.output_dir is None:
        interrupts.hint("convert saves nothing without --output-dir, so nothing was written")
        result = run_convert(c, None)
        saved = "nothing saved: pass --output-dir DIR to write the tables, the sidecar and the figure"
    else:
        out = check_target(o.output_dir, "--output-dir", folder=True)
        with staged_folder(out, "--output-dir", replaceable=_is_conversion, what="a conversion's results") as stage:
            interrupts.hint(f"nothing was written: {out} is as it was (convert writes its folder whole or not at all)")
            result = run_convert(c, stage)
        saved = f"wrote results to {out}/"
    for t in summary_tables(result):
        table(*t)
    return finish(0, saved)
