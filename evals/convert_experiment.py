"""GPT-2 vs its BSBR conversions, side by side; and the train -> convert -> fine-tune experiment.

The evaluation side of the converter (``bsbr_extras.convert`` is the weight map only). Run by
``bsbr-eval convert`` and by the seed's ``python -m bsbr_extras.convert_example``, which hands its
command line to the same command (one set of options, one error style).

Comparison (any GPT-2 that ``transformers`` can load, by hub name or local path)::

    bsbr-eval convert --model-name PATH_OR_NAME --chunk-sizes 512,128,32 \
        --seq-len 512 --output-dir out/ [--compression-factor 2] [--save-model]

For each chunk size it reports, against the original on held-out text: logits agreement (max abs
diff over all logits, and over the first chunk alone, which must be ~0), the mean KL(GPT-2 || BSBR)
per token, top-1 agreement, and both perplexities; then forward time and peak memory against
length, measured by the harness (``evals.measure.time_fn`` / ``peak_memory``: warm-up, repeated
samples, pinned threads, allocator trace; no private timer here).

Experiment (no pretrained weights can be downloaded here, so a small GPT-2 is trained first)::

    bsbr-eval convert --experiment --output-dir results/convert

Output: ``convert.csv`` (agreement and perplexity), ``convert_speed.csv``, ``convert_training.csv``,
the ``convert.json`` sidecar and ``convert.png``, each written whole through ``evals.results``.
The folder is checked and locked before any work, and a folder that already holds a
``convert.csv`` is refused (nothing is replaced).

It trains a transformers ``GPT2LMHeadModel`` on UTF-8 bytes of the Python Language Reference
text that ships with CPython (``pydoc_data.topics``; the last 10% of the characters held out),
converts it, measures perplexity of the original and of the conversion at several chunk sizes,
then fine-tunes the conversion at one chunk size and, as a control for "it just trained longer",
fine-tunes the original GPT-2 for the same steps on the same batches.

Text: ``pydoc_data.topics`` bytes when the model has no tokenizer (the experiment's byte-level
GPT-2); the model's own tokenizer when one loads with it (e.g. a hub GPT-2).
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from bsbr_extras.convert import convert_to_bsbr, load_gpt2, save_converted
from evals.measure import peak_memory, time_fn  # the one module that reads a clock
from evals.train import TrainConfig, fit
from evals.options import check_positive
from evals.results import (ResultsError, check_output_dir, environment, locked, sample_stats, utc_now, write_frame,
                           write_sidecar)

log = logging.getLogger("bsbr.convert")

CORPUS = ("pydoc_data.topics: the Python Language Reference topics that ship with CPython "
          f"{sys.version_info.major}.{sys.version_info.minor} (all topics, sorted by name, joined by blank lines)")
HELDOUT_FRACTION = 0.1


# ----------------------------------------------------------------------------- data


def corpus_text() -> tuple[str, str]:
    """(train, held-out) text: the sorted pydoc topics; the last 10% of characters held out."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    return text[:cut], text[cut:]


def load_tokenizer(model_name: str, vocab_size: int):
    """The model's own tokenizer, or None for UTF-8 bytes (needs ``vocab_size >= 256``)."""
    tok = None
    local = Path(model_name)
    # A local directory without tokenizer files has no tokenizer (recent transformers would
    # otherwise hand back an empty GPT2Tokenizer built from the model config alone).
    if not local.is_dir() or any((local / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model_name)
        except Exception:  # no tokenizer to be had: fall back to bytes
            tok = None
    if tok is not None and len(tok) > 0:
        return tok
    if vocab_size < 256:
        raise ValueError(f"{model_name!r} has no tokenizer and vocab_size={vocab_size} < 256, "
                         "so the held-out text cannot be fed to it as bytes")
    return None


def encode(text: str, tokenizer=None) -> torch.Tensor:
    """Token ids (N,) int64: UTF-8 bytes without a tokenizer."""
    if tokenizer is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping evaluation windows (W, seq_len) from the start of ``tokens``."""
    w = tokens.numel() // seq_len
    if w == 0:
        raise ValueError(f"held-out text has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    w = min(w, max_windows) if max_windows else w
    return tokens[: w * seq_len].view(w, seq_len)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """(b, n, V) logits from a transformers GPT-2 (``.logits``) or a BSBRModel (a tensor)."""
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats): position t predicts token t+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# ----------------------------------------------------------------------------- agreement and perplexity


@torch.no_grad()
def compare_logits(reference, models: dict, data: torch.Tensor, *, batch_size: int = 4,
                   first_chunk: Optional[dict] = None) -> list[dict]:
    """Agreement of each model in ``models`` (label -> model) with ``reference`` on ``data`` (W, n).

    Per label: ``ppl`` (exp of the mean next-token NLL), ``max_abs_diff`` over all logits,
    ``first_chunk_max_abs_diff`` over positions ``< first_chunk[label]``, ``kl`` = mean over
    positions of KL(p_ref || p_model) in nats, ``top1_agreement`` = share of positions whose argmax
    agrees. The reference itself is reported with label ``"original"``.
    """
    first_chunk = first_chunk or {}
    acc = {k: dict(nll=0.0, kl=0.0, top1=0, mad=0.0, mad1=0.0) for k in ["original", *models]}
    count = pos = 0
    for i in range(0, data.shape[0], batch_size):
        ids = data[i:i + batch_size]
        ref = logits_of(reference, ids).float()  # (b, n, V)
        ref_lp = ref.log_softmax(-1)
        ref_top = ref.argmax(-1)
        count += ids[:, 1:].numel()
        pos += ids.numel()
        acc["original"]["nll"] += float(lm_loss(ref, ids)) * ids[:, 1:].numel()
        acc["original"]["top1"] += ids.numel()
        for label, model in models.items():
            out = logits_of(model, ids).float()
            lp = out.log_softmax(-1)
            a = acc[label]
            a["nll"] += float(lm_loss(out, ids)) * ids[:, 1:].numel()
            a["kl"] += float((ref_lp.exp() * (ref_lp - lp)).sum())
            a["top1"] += int((out.argmax(-1) == ref_top).sum())
            a["mad"] = max(a["mad"], float((out - ref).abs().max()))
            c = first_chunk.get(label, ids.shape[1])
            a["mad1"] = max(a["mad1"], float((out[:, :c] - ref[:, :c]).abs().max()))
    return [dict(variant=k, ppl=math.exp(a["nll"] / count), kl=a["kl"] / pos, top1_agreement=a["top1"] / pos,
                 max_abs_diff=a["mad"], first_chunk_max_abs_diff=a["mad1"], eval_tokens=count)
            for k, a in acc.items()]


# ----------------------------------------------------------------------------- time and memory


def speed_rows(models: dict, lengths: Sequence[int], vocab_size: int, *, batch_size: int = 1,
               repeats: int = 5, min_run_time: float = 0.2, seed: int = 0, threads: int = 1,
               device: str = "cpu", dtype: str = "float32") -> list[dict]:
    """Forward (no grad) time and peak memory of each model at each length, through the harness.

    Threads are pinned (default 1, as ``bsbr-eval compare``) and recorded in each row. The models
    are timed as copies on ``device`` in ``dtype`` (the originals, which may be saved, stay as they are).
    """
    from evals.measure import DTYPES

    placed = {label: copy.deepcopy(m).to(device=device, dtype=DTYPES[dtype]).eval() for label, m in models.items()}
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab_size, (batch_size, n), generator=torch.Generator().manual_seed(seed)).to(device)
        for label, model in placed.items():

            def fn(model=model):
                with torch.no_grad():
                    return logits_of(model, ids)

            mem, method = peak_memory(fn, device=device)
            stats = sample_stats(time_fn(fn, device=device, repeats=repeats, warmup=1, min_run_time=min_run_time,
                                         threads=threads))
            stats.pop("samples_ms")
            rows.append(dict(variant=label, seq_len=n, batch_size=batch_size, **stats,
                             timer="cuda_event" if device.startswith("cuda") else "cpu_wall", device=device,
                             dtype=dtype, peak_memory_mb=mem, memory_method=method, threads=threads))
            log.info("speed %s n=%d: %.1f ms, %.1f MB", label, n, rows[-1]["time_ms"], mem)
    return rows


# ----------------------------------------------------------------------------- the comparison


def check_comparison_args(chunk_sizes: Sequence[int], seq_len: Optional[int], compression_factor: Optional[int]) -> None:
    if not chunk_sizes:
        raise ValueError("chunk sizes must list at least one positive integer")
    for c in chunk_sizes:
        if not isinstance(c, int) or c <= 0:
            raise ValueError(f"chunk sizes must be positive integers, got {c!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if compression_factor is not None and (not isinstance(compression_factor, int) or compression_factor <= 0):
        raise ValueError(f"compression_factor must be a positive integer, got {compression_factor!r}")


def variant_label(chunk_size: int, compression_factor: Optional[int] = None, finetuned: bool = False) -> str:
    return f"bsbr-c{chunk_size}" + (f"-f{compression_factor}" if compression_factor else "") + ("-ft" if finetuned else "")


def run_comparison(model_name: str, chunk_sizes: Sequence[int] = (128,), *, compression_factor: Optional[int] = None,
                   seq_len: Optional[int] = None, max_windows: Optional[int] = 32, batch_size: int = 4,
                   speed_lengths: Optional[Sequence[int]] = None, device: str = "cpu", dtype: str = "float32") -> dict:
    """Load a GPT-2, convert it at each chunk size, compare on the held-out text.

    ``seq_len`` (evaluation window) defaults to ``min(512, n_positions)``.

    Returns ``{"agreement": rows, "speed": rows, "info": {...}, "gpt2": model, "converted": {label: model}}``.
    """
    check_comparison_args(chunk_sizes, seq_len, compression_factor)
    started = utc_now()
    gpt2 = load_gpt2(model_name)
    n_pos = gpt2.config.n_positions
    seq_len = min(512, n_pos) if seq_len is None else seq_len
    if seq_len > n_pos:
        raise ValueError(f"seq_len={seq_len} is longer than the GPT-2's position table (n_positions={n_pos})")
    tokenizer = load_tokenizer(model_name, gpt2.config.vocab_size)
    data = windows(encode(corpus_text()[1], tokenizer), seq_len, max_windows)
    converted = {variant_label(c, compression_factor): convert_to_bsbr(gpt2, chunk_size=c,
                                                                        compression_factor=compression_factor)
                 for c in chunk_sizes}
    chunk_of = {variant_label(c, compression_factor): c for c in chunk_sizes}
    rows = compare_logits(gpt2, converted, data, batch_size=batch_size, first_chunk=chunk_of)
    for r in rows:
        r.update(chunk_size=chunk_of.get(r["variant"], ""), compression_factor=compression_factor or "",
                 seq_len=seq_len, finetuned=False)
    lengths = speed_lengths if speed_lengths is not None else _default_lengths(seq_len)
    speed = speed_rows({"original": gpt2, **converted}, lengths, gpt2.config.vocab_size, device=device,
                       dtype=dtype) if lengths else []
    for r in speed:
        r["chunk_size"] = chunk_of.get(r["variant"], "")
    info = dict(model=model_name, tokenizer="utf-8 bytes" if tokenizer is None else type(tokenizer).__name__,
                text=CORPUS + "; held-out part", eval_windows=int(data.shape[0]), seq_len=seq_len,
                chunk_sizes=list(chunk_sizes), compression_factor=compression_factor,
                gpt2_config=gpt2.config.to_diff_dict(), started_utc=started)
    return dict(agreement=rows, speed=speed, info=info, gpt2=gpt2, converted=converted)


def _default_lengths(seq_len: int) -> list[int]:
    """Powers of two from 64 up to seq_len (and seq_len itself)."""
    out, n = [], 64
    while n < seq_len:
        out.append(n)
        n *= 2
    return out + [seq_len]


# ----------------------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class ExperimentConfig:
    """The train -> convert -> fine-tune experiment. CPU budget: about 10 minutes on 2 cores."""

    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 512          # GPT-2 context = the evaluation length
    batch_size: int = 4
    pretrain_steps: int = 180
    lr: float = 2e-3
    warmup_steps: int = 15
    chunk_sizes: tuple = (512, 256, 128, 64, 32)
    finetune_chunk: int = 64
    finetune_steps: int = 80
    finetune_lr: float = 3e-4
    eval_windows: int = 32          # held-out windows of n_positions bytes
    speed_lengths: tuple = (64, 128, 256, 512)
    speed_device: str = "cpu"       # where the speed rows are timed (training always runs on the CPU)
    speed_dtype: str = "float32"
    seed: int = 0
    # One thread: on a shared 2-core box, two OpenMP threads contending with other processes
    # spin at barriers and run several times slower than one.
    threads: int = 1


# The experiment's GPT-2 recipe, on the suite's one trainer (evals.train): AdamW (0.9, 0.95) with
# weight decay 0.1 on every parameter, linear warm-up then cosine decay to 10% of the peak.
GPT2_RECIPE = TrainConfig(betas=(0.9, 0.95), weight_decay=0.1, decay_all=True, min_lr_ratio=0.1, grad_clip=1.0,
                          reinit=False)


def train_lm(model, tokens: torch.Tensor, *, steps: int, seq_len: int, batch_size: int, lr: float,
             warmup: int, seed: int, phase: str) -> list[dict]:
    """Train on random windows of ``tokens`` with ``evals.train.fit``; the batches depend only on
    ``seed`` (so two models trained with the same seed see the same data in the same order).
    Returns the loss curve."""
    g = torch.Generator().manual_seed(seed)

    def next_batch():
        start = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=g)
        return (torch.stack([tokens[s:s + seq_len] for s in start.tolist()]),)  # (b, n)

    curve, t0 = [], time.perf_counter()

    def on_step(step, loss, _score):
        curve.append(dict(phase=phase, step=step, loss=loss, elapsed_s=time.perf_counter() - t0))
        if step % 10 == 0 or step == 1:
            log.info("%s step %d/%d loss %.3f (%.0f s)", phase, step, steps, loss, curve[-1]["elapsed_s"])

    cfg = GPT2_RECIPE.with_(max_steps=steps, lr=lr, warmup_steps=warmup, batch_size=batch_size)
    fit(model, next_batch, lambda m, ids: lm_loss(logits_of(m, ids), ids), cfg, on_step=on_step)
    model.eval()
    return curve


def run_experiment(cfg: ExperimentConfig = ExperimentConfig(), gpt2_dir: Optional[Path] = None) -> dict:
    """Train a byte-level GPT-2 on pydoc_data.topics, convert, evaluate, fine-tune; return the tables.

    ``gpt2_dir``: where to ``save_pretrained`` the trained GPT-2 (None: not saved).
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_experiment(cfg, gpt2_dir)
    finally:
        torch.set_num_threads(prev_threads)


def _run_experiment(cfg: ExperimentConfig, gpt2_dir: Optional[Path]) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    t_start, started = time.perf_counter(), utc_now()
    train_text, held_text = corpus_text()
    train_tok, held_tok = encode(train_text), encode(held_text)
    data = windows(held_tok, cfg.n_positions, cfg.eval_windows)
    torch.manual_seed(cfg.seed)
    gcfg = GPT2Config(vocab_size=256, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0)
    gpt2 = GPT2LMHeadModel(gcfg)
    curve = train_lm(gpt2, train_tok, steps=cfg.pretrain_steps, seq_len=cfg.n_positions, batch_size=cfg.batch_size,
                     lr=cfg.lr, warmup=cfg.warmup_steps, seed=cfg.seed, phase="pretrain gpt2")
    if gpt2_dir is not None:
        gpt2.save_pretrained(gpt2_dir)

    # 1. conversion without any training
    converted = {variant_label(c): convert_to_bsbr(gpt2, chunk_size=c) for c in cfg.chunk_sizes}
    chunk_of = {variant_label(c): c for c in cfg.chunk_sizes}
    rows = compare_logits(gpt2, converted, data, first_chunk=chunk_of)
    for r in rows:
        r.update(chunk_size=chunk_of.get(r["variant"], ""), finetuned=False, finetune_steps=0)

    # 2. fine-tune the conversion at one chunk size, and the original for the same steps (control)
    ft_seed = cfg.seed + 1
    bsbr_ft = convert_to_bsbr(gpt2, chunk_size=cfg.finetune_chunk)
    curve += train_lm(bsbr_ft, train_tok, steps=cfg.finetune_steps, seq_len=cfg.n_positions,
                      batch_size=cfg.batch_size, lr=cfg.finetune_lr, warmup=5, seed=ft_seed,
                      phase=f"finetune {variant_label(cfg.finetune_chunk)}")
    gpt2_ft = copy.deepcopy(gpt2)
    curve += train_lm(gpt2_ft, train_tok, steps=cfg.finetune_steps, seq_len=cfg.n_positions,
                      batch_size=cfg.batch_size, lr=cfg.finetune_lr, warmup=5, seed=ft_seed,
                      phase="finetune gpt2 (control)")
    ft_label = variant_label(cfg.finetune_chunk, finetuned=True)
    ft_rows = compare_logits(gpt2, {ft_label: bsbr_ft, "original-ft": gpt2_ft}, data,
                             first_chunk={ft_label: cfg.finetune_chunk})
    for r in ft_rows[1:]:
        r.update(chunk_size=cfg.finetune_chunk if r["variant"] == ft_label else "", finetuned=True,
                 finetune_steps=cfg.finetune_steps)
    rows += ft_rows[1:]
    for r in rows:
        r["seq_len"] = cfg.n_positions

    # 3. forward time and memory against length, through the harness
    speed = speed_rows({"original": gpt2, **converted}, cfg.speed_lengths, 256, threads=cfg.threads,
                       device=cfg.speed_device, dtype=cfg.speed_dtype)
    for r in speed:
        r["chunk_size"] = chunk_of.get(r["variant"], "")

    info = dict(experiment=asdict(cfg), corpus=CORPUS, tokenizer="utf-8 bytes (vocab 256)",
                train_tokens=int(train_tok.numel()), heldout_tokens=int(held_tok.numel()),
                eval_tokens=int(data[:, 1:].numel()), gpt2_params=gpt2.num_parameters(),
                bsbr_params=converted[variant_label(cfg.chunk_sizes[0])].num_parameters(),
                started_utc=started, wall_time_s=round(time.perf_counter() - t_start, 1))
    return dict(agreement=rows, speed=speed, curve=curve, info=info, gpt2=gpt2, converted=converted,
                finetuned=bsbr_ft)


# ----------------------------------------------------------------------------- output


AGREEMENT_COLUMNS = ["variant", "chunk_size", "compression_factor", "finetuned", "finetune_steps", "seq_len",
                     "ppl", "kl", "top1_agreement", "max_abs_diff", "first_chunk_max_abs_diff", "eval_tokens"]


def write_outputs(result: dict, output_dir: Path, *, stem: str = "convert", plot: bool = True) -> list[Path]:
    """``{stem}.csv`` (agreement/perplexity), ``{stem}_speed.csv``, ``{stem}_training.csv`` when there
    is a loss curve, the JSON sidecar ``{stem}.json`` and the figure, each written whole (temporary
    file and rename); returns the paths written."""
    import pandas as pd

    from evals.plots import plot_conversion

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

    from evals.plots import plot_conversion

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
        return _run(model_name, chunk_sizes, compression_factor, seq_len, None, save_model, experiment, where)
    out = check_output_dir(output_dir)
    with locked(out / "convert.csv", "--output-dir"):
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
