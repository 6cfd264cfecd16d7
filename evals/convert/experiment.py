"""The train -> convert -> fine-tune experiment (``bsbr-eval convert --experiment``).

No pretrained weights can be downloaded here, so a small GPT-2 is trained first: a transformers
``GPT2LMHeadModel`` on UTF-8 bytes of the Python Language Reference text that ships with CPython
(``pydoc_data.topics``; the last 10% of the characters held out). It is converted, the perplexity
of the original and of the conversion is measured at several chunk sizes (``evals.convert.comparison``),
then the conversion is fine-tuned at one chunk size and, as a control for "it just trained longer",
the original GPT-2 is fine-tuned for the same steps on the same batches.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from bsbr_extras.convert import convert_to_bsbr
from evals.convert.comparison import (CORPUS, SpeedTiming, compare_logits, corpus_text, encode, lm_loss, log,
                                      logits_of, speed_rows, variant_label, windows)
from evals.machine import utc_now
from evals.train import TrainConfig, fit


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


@dataclass(frozen=True)
class Phase:
    """One training phase of the experiment: its budget, window, batch, rate, warm-up, data seed
    and the name its loss-curve rows carry."""

    steps: int
    seq_len: int
    batch_size: int
    lr: float
    warmup: int
    seed: int
    name: str


def train_lm(model, tokens: torch.Tensor, phase: Phase) -> list[dict]:
    """Train on random windows of ``tokens`` with ``evals.train.fit``; the batches depend only on
    ``phase.seed`` (so two models trained with the same seed see the same data in the same order).
    Returns the loss curve."""
    steps, seq_len, batch_size, lr, warmup = phase.steps, phase.seq_len, phase.batch_size, phase.lr, phase.warmup
    g = torch.Generator().manual_seed(phase.seed)

    def next_batch():
        start = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=g)
        return (torch.stack([tokens[s:s + seq_len] for s in start.tolist()]),)  # (b, n)

    curve, t0 = [], time.perf_counter()

    def on_step(step, loss, _score):
        curve.append(dict(phase=phase.name, step=step, loss=loss, elapsed_s=time.perf_counter() - t0))
        if step % 10 == 0 or step == 1:
            log.info("%s step %d/%d loss %.3f (%.0f s)", phase.name, step, steps, loss, curve[-1]["elapsed_s"])

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
    curve = train_lm(gpt2, train_tok, Phase(cfg.pretrain_steps, cfg.n_positions, cfg.batch_size, cfg.lr,
                                            cfg.warmup_steps, cfg.seed, "pretrain gpt2"))
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
    ft = Phase(cfg.finetune_steps, cfg.n_positions, cfg.batch_size, cfg.finetune_lr, 5, ft_seed, "")
    curve += train_lm(bsbr_ft, train_tok, replace(ft, name=f"finetune {variant_label(cfg.finetune_chunk)}"))
    gpt2_ft = copy.deepcopy(gpt2)
    curve += train_lm(gpt2_ft, train_tok, replace(ft, name="finetune gpt2 (control)"))
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
    speed = speed_rows({"original": gpt2, **converted}, cfg.speed_lengths, 256,
                       SpeedTiming(threads=cfg.threads, device=cfg.speed_device, dtype=cfg.speed_dtype))
    for r in speed:
        r["chunk_size"] = chunk_of.get(r["variant"], "")

    info = dict(experiment=asdict(cfg), corpus=CORPUS, tokenizer="utf-8 bytes (vocab 256)",
                train_tokens=int(train_tok.numel()), heldout_tokens=int(held_tok.numel()),
                eval_tokens=int(data[:, 1:].numel()), gpt2_params=gpt2.num_parameters(),
                bsbr_params=converted[variant_label(cfg.chunk_sizes[0])].num_parameters(),
                started_utc=started, wall_time_s=round(time.perf_counter() - t_start, 1))
    return dict(agreement=rows, speed=speed, curve=curve, info=info, gpt2=gpt2, converted=converted,
                finetuned=bsbr_ft)
