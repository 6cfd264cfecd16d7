"""Training one model on one MQAR setting: the shared initialisation, the loss, the accuracy, and
the measured decoding-state size. The loop itself is ``evals.train.fit`` (shared with the
conversion experiment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from evals.recall.data import IGNORE, Splits
from evals.train import TrainConfig, fit, shuffled_batches


def reinit_for_recall(model: torch.nn.Module) -> None:
    """The recall recipe's initialisation, the same rule for every architecture.

    Rule: every multiplicative map that mixes a token's features starts with unit-variance outputs.
    ``nn.Linear`` weights are drawn from N(0, 1/fan_in) (LeCun et al., 1998), the token embedding
    from N(0, 1) (Vaswani et al. 2017 multiply it by sqrt(D) to the same end), the per-dimension
    scales of GAU's scale-offset (``gamma`` of ``bsbr_extras.gau.ScaleOffset``, a diagonal map,
    fan_in = 1) from N(0, 1), and the tied LM head's logits through the final norm's gain, set to
    d^-1/2 (each logit is a sum of d unit-variance products). Offsets, biases, the blocks' norm
    gains and every other parameter a mixer sets itself (gates, temperatures) keep the model's own
    values.

    Why: the shared shell initialises like GPT-2 (every weight N(0, 0.02^2)) and adds
    unit-amplitude sinusoidal positions. From there a 2-layer model sits on MQAR's plateau (it
    outputs *some* value seen in context, accuracy 1/P) for thousands of steps: the query and key
    maps start so small that the gradient that would grow a matching pattern is itself second
    order in them, and the token identity is ~2% of the input next to the positions.

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
    equals ``model(x)[sel]`` (tests/test_recall.py checks it). Models without ``lm_head`` get the
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
        reinit_for_recall(model)
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
