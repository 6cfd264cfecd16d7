"""Training one model on one MQAR setting: the shared initialisation, the loss, the accuracy, and
the measured decoding-state size. The loop itself is ``evals.train.fit`` (shared with the
conversion experiment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from evals.recall.data import IGNORE, Splits
from evals.train import TrainConfig, fit, shuffled_batches, unit_variance_init


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: tuple, batch_size: int, device) -> float:
    """Query accuracy of ``model`` on ``(inputs, labels)``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    inputs, labels = split
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        sel = y != IGNORE
        correct += int((query_logits(model, x, sel).argmax(-1) == y[sel]).sum())
        total += int(sel.sum())
    model.train(was_training)
    return correct / max(total, 1)


class _AtPositions(torch.nn.Module):
    """Stands in for a model's LM head for one call: applies it at the selected positions only."""

    def __init__(self, head: torch.nn.Module, sel: torch.Tensor):
        super().__init__()
        self.head, self.sel = head, sel

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h[self.sel])                                          # (m, V)


def query_logits(model: torch.nn.Module, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Logits ``(m, V)`` at the ``m`` positions where ``sel`` (b, n) is True.

    Why: only the query positions carry a label (P of n, 8 of 128 in the cpu preset), and the
    vocabulary projection at every position is most of a small model's cost at V = 1024. The
    shell's forward ends in ``lm_head(norm(h))``, so the head is swapped for the call; the result
    equals ``model(x)[sel]`` (tests/evals/recall/test_recall.py checks it). Models without ``lm_head`` get the
    plain forward.
    """
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Module):
        return model(x)[sel]
    model.lm_head = _AtPositions(head, sel)
    try:
        return model(x)
    finally:
        model.lm_head = head


def query_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query positions only, as in Zoology."""
    sel = y != IGNORE                                                          # (b, n)
    return F.cross_entropy(query_logits(model, x, sel), y[sel])


@dataclass
class TrainResult:
    test_acc: float
    val_acc: float
    train_loss: float
    steps: int
    reached_target: bool
    train_time_s: float
    history: list = field(default_factory=list)  # (step, loss, val_acc)


def train_and_evaluate(model: torch.nn.Module, splits: Splits, train: TrainConfig, *, seed: int = 0,
                       device="cpu", on_step: Optional[Callable[[int, float, Optional[float]], None]] = None
                       ) -> TrainResult:
    """Train ``model`` on ``splits.train`` until validation accuracy hits ``train.target_acc`` or
    ``train.max_steps`` run out; report accuracy on the held-out ``splits.test``.

    ``seed`` sets the order of the training batches (the same for every model).
    """
    train.validate()
    if train.reinit:
        unit_variance_init(model)
    model.to(device)
    batches = shuffled_batches(*splits.train, train.batch_size, seed + 1, device)
    res = fit(model, lambda: next(batches), query_loss, train,
              validate=lambda m: evaluate(m, splits.val, 256, device), on_step=on_step)
    test_acc = evaluate(model, splits.test, 256, device)
    return TrainResult(test_acc, res.val_score, res.train_loss, res.steps, res.reached_target,
                       res.train_time_s, res.history)


@torch.no_grad()
def decoding_state_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes held by ``model``'s decoding cache after it has read ``tokens`` (1, n).

    Measured through the shared shell (``init_cache`` + ``ModelCache.nbytes``, the tensors the
    cache really holds), so every architecture is sized the same way: Standard/Hopfield hold every
    token's K and V, BSBR one state per completed chunk plus the open chunk, Linear/DeltaNet a
    fixed d x d per head, ...
    """
    was_training = model.training
    model.eval()
    cache = model.init_cache(1)
    model(tokens[:1], cache=cache)
    model.train(was_training)
    return int(cache.nbytes())
