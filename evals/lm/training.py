"""One language model trained and evaluated: the next-byte loss, bits per byte with padding left
out, and the loss by position. The loop is ``evals.train.fit``, the suite's one trainer.

Bits per byte: the summed next-byte cross-entropy (nats) over every predicted byte of a split,
divided by the number of predicted bytes and by ln 2. Padding (the right end of a document's last
window) is in neither sum. Tokens are bytes, so bits per token and bits per byte are one number.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from evals.lm.data import EvalWindows, position_buckets
from evals.train import TrainConfig, fit

LN2 = math.log(2.0)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of a (b, L + 1) batch of whole windows."""
    logits = model(batch[:, :-1])  # (b, L, 256)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@dataclass
class Evaluation:
    """Summed losses of a split: ``nats`` over ``count`` predicted bytes, and per position
    ``pos_nats`` / ``pos_count`` (length = context)."""

    nats: float
    count: int
    pos_nats: torch.Tensor
    pos_count: torch.Tensor

    @property
    def bits_per_byte(self) -> float:
        return self.nats / max(self.count, 1) / LN2

    def bucket_bits(self, buckets: Sequence[tuple]) -> list:
        """Mean bits per byte in each ``[lo, hi)`` position bucket."""
        return [float(self.pos_nats[lo:hi].sum() / self.pos_count[lo:hi].sum().clamp_min(1)) / LN2
                for lo, hi in buckets]


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: EvalWindows, batch_size: int, device) -> Evaluation:
    """Summed next-byte loss of every window (padding masked out of the model and of the loss)."""
    was_training = model.training
    model.eval()
    L = windows.tokens.shape[1] - 1
    pos_nats = torch.zeros(L, dtype=torch.float64)
    pos_count = torch.zeros(L, dtype=torch.float64)
    for i in range(0, windows.tokens.shape[0], batch_size):
        tok = windows.tokens[i:i + batch_size].to(device)
        m = windows.mask[i:i + batch_size].to(device)
        inp, tgt, keep = tok[:, :-1], tok[:, 1:], m[:, 1:]  # a target counts when it is a real byte
        full = bool(m.all())
        logits = model(inp, attention_mask=None if full else m[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), reduction="none").view(tgt.shape)
        nll = torch.where(keep, nll, torch.zeros_like(nll))  # padding: no loss (its logits are unspecified)
        pos_nats += nll.double().sum(0).cpu()
        pos_count += keep.double().sum(0).cpu()
    model.train(was_training)
    return Evaluation(float(pos_nats.sum()), int(pos_count.sum()), pos_nats, pos_count)


@dataclass
class LMResult:
    val: Evaluation
    test: Evaluation
    train_loss: float
    steps: int
    train_time_s: float
    eval_time_s: float


def train_and_evaluate(model: torch.nn.Module, batches, val: EvalWindows, test: EvalWindows, cfg: TrainConfig, *,
                       eval_batch: int, device, on_step=None) -> LMResult:
    """Train ``model`` on ``batches`` for ``cfg.max_steps`` steps, then score validation and test."""
    model.to(device)

    def next_batch():
        return (next(batches).to(device),)

    res = fit(model, next_batch, lm_loss, cfg, on_step=on_step)
    t0 = time.perf_counter()
    v = evaluate(model, val, eval_batch, device)
    t = evaluate(model, test, eval_batch, device)
    return LMResult(v, t, res.train_loss, res.steps, res.train_time_s, time.perf_counter() - t0)


def loss_by_position(ev: Evaluation, context: int) -> str:
    """The bucketed loss of a split as one CSV cell: bits per byte per bucket, space-separated
    (``evals.lm.data.position_buckets(context)`` gives the buckets)."""
    return " ".join(f"{b:.5f}" for b in ev.bucket_bits(position_buckets(context)))


def parse_positions(cell: str, context: int) -> Optional[list]:
    """``[(lo, hi, bits), ...]`` from a ``loss_by_position`` cell; None if it does not fit ``context``."""
    try:
        vals = [float(v) for v in str(cell).split()]
    except ValueError:
        return None
    buckets = position_buckets(context)
    if len(vals) != len(buckets):
        return None
    return [(lo, hi, v) for (lo, hi), v in zip(buckets, vals)]
