"""The one trainer: AdamW, linear warm-up then cosine decay, gradient clipping, early stopping.

Recall (``evals.recall``) trains every model through ``fit``, and so does the conversion experiment
(``evals.convert.experiment.train_lm``, with its GPT-2 recipe's betas, decay and LR floor as
``TrainConfig`` fields), so that "trained with the suite's loop and schedule" means one thing.

``fit`` knows nothing about the task: it draws batches from ``next_batch``, gets a scalar loss from
``loss_fn`` and, every ``eval_every`` steps, a validation score from ``validate``. Everything that
makes a run reproducible lives in ``deterministic`` (seeds, deterministic kernels, thread count), so
that the same seed gives bit-identical weights in this process, a worker process or a Ray task.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch

from bsbr.checks import check_positive_int


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for one from-scratch training run.

    Args:
        max_steps: optimiser steps at most.
        schedule_steps: length of the cosine decay (default ``max_steps``). Longer than
            ``max_steps`` truncates the cosine: the learning rate stays high for the whole budget,
            which matters on MQAR, where progress comes in a jump after a plateau.
        batch_size: sequences per step.
        lr: peak learning rate, reached after ``warmup_steps`` of linear warm-up.
        weight_decay: AdamW decoupled weight decay (Loshchilov & Hutter, 2019), matrices only.
        warmup_steps: linear warm-up length; then cosine decay to 0 at ``schedule_steps``.
        num_train: fixed training set size, reshuffled every epoch (a data setting the recall
            task reads; kept here so that one object reproduces a run).
        num_val: validation set for early stopping and for choosing the learning rate.
        num_test: held-out test set; its accuracy is the reported one.
        eval_every: steps between validation checks.
        target_acc: stop as soon as validation accuracy reaches this.
        grad_clip: global gradient-norm clip.
        reinit: apply the task's re-initialisation recipe before training (recall:
            ``unit_variance_init``).
        betas: AdamW's (beta1, beta2).
        min_lr_ratio: the cosine decays to this fraction of the peak (0: to zero).
        decay_all: weight decay on every parameter (biases and gains too), as the conversion
            experiment's GPT-2 recipe does; default: matrices only.
    """

    max_steps: int = 1500
    schedule_steps: Optional[int] = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    num_train: int = 8192
    num_val: int = 256
    num_test: int = 1024
    eval_every: int = 50
    target_acc: float = 0.99
    grad_clip: float = 1.0
    reinit: bool = True
    betas: tuple = (0.9, 0.98)
    min_lr_ratio: float = 0.0
    decay_all: bool = False

    def with_(self, **kw) -> "TrainConfig":
        return replace(self, **kw)

    def validate(self) -> "TrainConfig":
        for name in ("max_steps", "batch_size", "num_train", "num_val", "num_test", "eval_every"):
            check_positive_int(name, getattr(self, name))
        if self.schedule_steps is not None:
            check_positive_int("schedule_steps", self.schedule_steps)
        check_positive_int("warmup_steps", self.warmup_steps, allow_zero=True)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 < self.target_acc <= 1:
            raise ValueError(f"target_acc must lie in (0, 1], got {self.target_acc!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        return self


def unit_variance_init(model: torch.nn.Module) -> None:
    """The suite's training initialisation (recall and lm), the same rule for every architecture.

    Rule: every multiplicative map that mixes a token's features starts with unit-variance outputs.
    ``nn.Linear`` weights are drawn from N(0, 1/fan_in) (LeCun et al., 1998), the token embedding
    from N(0, 1) (Vaswani et al. 2017 multiply it by sqrt(D) to the same end), the per-dimension
    scales of GAU's scale-offset (``gamma`` of ``bsbr_extras.gau.ScaleOffset``, a diagonal map,
    fan_in = 1) from N(0, 1), and the tied LM head's logits through the final norm's gain, set to
    d^-1/2 (each logit is a sum of d unit-variance products). Offsets, biases, the blocks' norm
    gains and every other parameter a mixer sets itself (gates, temperatures) keep the model's own
    values.

    Why: the shared shell initialises like GPT-2 (every weight N(0, 0.02^2)) and adds
    unit-amplitude sinusoidal positions, so the token identity is ~2% of the input next to the
    positions. From there a 2-layer model sits on MQAR's plateau (it outputs *some* value seen in
    context, accuracy 1/P) for thousands of steps: the query and key maps start so small that the
    gradient that would grow a matching pattern is itself second order in them. On bytes (lm),
    Standard at context 512 reached 4.71 bits per byte after 150 steps from the GPT-2 start and
    3.46-3.57 from this one (rates 1e-2 and 3e-3), where the corpus's unigram entropy is 4.85.

    GAU: FLASH (Hua et al., 2022) and its reference PyTorch port (lucidrains/FLASH-pytorch,
    ``OffsetScale``) draw ``gamma`` from N(0, 0.02^2), matched to their own 0.02-scale weights.
    The recipe replaces those weights for every model; leaving ``gamma`` at 0.02 alone makes
    GAU's queries and keys ~50x smaller than every other model's, so relu(q.k / c)^2 and its
    gradient start near zero (fourth power of gamma) and GAU stays at chance (the probe in
    docs/recall.md). Treating ``gamma`` as the diagonal map it is keeps the rule uniform.
    """
    with torch.no_grad():
        head = getattr(model, "lm_head", None)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                torch.nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)  # (out, in): 1/sqrt(fan_in)
            elif type(m).__name__ == "ScaleOffset" and isinstance(getattr(m, "gamma", None), torch.nn.Parameter):
                torch.nn.init.normal_(m.gamma, std=1.0)  # (heads, s): diagonal maps, fan_in 1
        embed = getattr(model, "embed", None)
        if isinstance(embed, torch.nn.Embedding):
            torch.nn.init.normal_(embed.weight, std=1.0)  # also the tied LM head's weight
            norm = getattr(model, "norm", None)
            if head is not None and head.weight is embed.weight and isinstance(norm, torch.nn.LayerNorm) \
                    and norm.weight is not None:
                # unit-variance logits: the final norm's output has unit variance per feature and the
                # tied rows N(0, 1), so each logit would have variance d (initial loss ~34 at d = 64);
                # T5 (Raffel et al., 2020) scales the output by d^-1/2 before its tied projection for
                # the same reason. A learned gain, so the model can still sharpen its logits.
                norm.weight.fill_(norm.weight.shape[0] ** -0.5)


def warmup_cosine(warmup_steps: int, max_steps: int, floor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then half-cosine down to ``floor`` at ``max_steps``
    (and ``floor`` after)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple:
    """AdamW that decays the matrices (dim >= 2) only, not biases or gains (unless
    ``cfg.decay_all``), and its warm-up + cosine schedule."""
    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]  # tied once
    if cfg.decay_all:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps,
                                                                 cfg.schedule_steps or cfg.max_steps,
                                                                 cfg.min_lr_ratio))
    return params, opt, sched


@dataclass
class FitResult:
    val_score: float          # the last validation score (0.0 if never validated)
    train_loss: float         # loss of the last step
    steps: int
    reached_target: bool
    train_time_s: float
    history: list = field(default_factory=list)  # (step, loss, val_score)


def fit(model: torch.nn.Module, next_batch: Callable[[], tuple], loss_fn: Callable, cfg: TrainConfig, *,
        validate: Optional[Callable[[torch.nn.Module], float]] = None,
        on_step: Optional[Callable[[int, float, Optional[float]], None]] = None) -> FitResult:
    """Train ``model`` for at most ``cfg.max_steps`` steps; stop once ``validate(model)`` (run every
    ``cfg.eval_every`` steps and at the last one) reaches ``cfg.target_acc``.

    ``next_batch()`` returns the inputs of one step, ``loss_fn(model, *batch)`` its scalar loss.
    ``on_step(step, loss, score_or_None)`` is called after every step (progress bars).
    """
    cfg.validate()
    model.train()
    params, opt, sched = make_optimizer(model, cfg)
    step, loss_v, score, reached, history = 0, float("nan"), 0.0, False, []
    t0 = time.perf_counter()
    while step < cfg.max_steps:
        loss = loss_fn(model, *next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        loss_v = loss.item()
        checked = None
        if validate is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            score = checked = validate(model)
            model.train()
            history.append((step, loss_v, score))
        if on_step is not None:
            on_step(step, loss_v, checked)
        if checked is not None and checked >= cfg.target_acc:
            reached = True
            break
    return FitResult(score, loss_v, step, reached, time.perf_counter() - t0, history)


def shuffled_batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                     device="cpu") -> Iterator[tuple]:
    """Endless (x, y) batches of a fixed set, reshuffled every epoch by a seeded generator (so the
    order depends on ``seed`` only, never on the global RNG a model's construction consumed)."""
    g = torch.Generator().manual_seed(int(seed))
    while True:
        order = torch.randperm(inputs.shape[0], generator=g)
        for i in range(0, order.numel() - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield inputs[idx].to(device), labels[idx].to(device)


@contextmanager
def deterministic(seed: int, threads: int):
    """Seed torch's global RNG, pin the intra-op thread count and ask for deterministic kernels.

    Why each: the seed fixes the initial weights; a fixed thread count fixes how CPU reductions are
    split (a different split rounds differently); deterministic algorithms rule out the atomics some
    CUDA kernels use. Restores the previous thread count and mode afterwards.
    """
    check_positive_int("threads", threads)
    # cuBLAS is deterministic only with a fixed workspace (read when CUDA initialises)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(int(seed))
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
