"""Multi-query associative recall (MQAR): can each architecture retrieve what it saw?

The task follows Arora et al. (2023), "Zoology: Measuring and Improving Recall in Efficient
Language Models" (arXiv:2312.04927): a sequence opens with ``P`` key-value pairs, then
re-issues keys later on; at each re-issued key the model must emit the value that was paired with
it. Keys and values come from disjoint halves of the vocabulary, and the distance between the end
of the key-value block and a query follows a power law, so most queries are near and a few far.

This module has three jobs, in this order:

1. ``make_mqar``: the seeded, deterministic data generator (pure tensors, no model).
2. ``train_and_evaluate``: trains one model from scratch on one MQAR setting (AdamW, linear
   warm-up then cosine decay, early stop at a target validation accuracy) and returns held-out
   accuracy on a disjoint test set.
3. ``recall_grid`` / ``run_recall``: the sweep over sequence length and number of pairs, and over
   ``d_model`` and the chunk/window size, so that decoding-state size vs recall can be compared.
   State size is *measured*: the bytes held by the model's decoding cache after it has read one
   whole sequence (``ModelCache.nbytes``), the same way for every architecture.

Axis legend for shape comments:
    b  batch (sequences)      n  tokens per sequence      V  vocabulary
    P  key-value pairs        Q  queries per sequence     R  query-region length (n - 2P)

Token layout of one sequence (``FILLER`` = 0, keys in ``[1, 1+K)``, values in ``[1+K, V)``)::

    k1 v1 k2 v2 ... kP vP | 0 0 k7 0 k2 0 0 0 k5 ...
    <--- 2P tokens -----> | <--- R = n - 2P tokens, Q of them queries --->

Labels are ``-100`` (ignored by cross-entropy) everywhere except at the query positions, where
the label is the value paired with that key: the model answers *at* the query token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from bsbr.shell import check_positive_int
from evals.registry import ModelConfig, resolve_model

IGNORE = -100  # label of every non-query position (torch cross_entropy's ignore_index)
FILLER = 0     # token at every position that is neither a pair nor a query


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting.

    Args:
        vocab_size: total vocabulary ``V``; id 0 is the filler, keys take ``[1, 1+K)`` and values
            ``[1+K, V)`` with ``K = (V - 1) // 2``.
        seq_len: tokens per sequence ``n``.
        num_pairs: key-value pairs ``P`` at the start of each sequence (distinct keys).
        num_queries: queries ``Q`` per sequence, each re-issuing a different key
            (default: every key once, ``Q = P``, as in Zoology).
        gap_power: query gaps ``g >= 1`` (distance past the key-value block) are drawn with
            probability proportional to ``g ** -gap_power``; 0 gives uniform gaps.
    """

    vocab_size: int = 256
    seq_len: int = 64
    num_pairs: int = 8
    num_queries: Optional[int] = None
    gap_power: float = 1.0

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def key_range(self) -> tuple:
        k = (self.vocab_size - 1) // 2
        return 1, 1 + k

    @property
    def value_range(self) -> tuple:
        return self.key_range[1], self.vocab_size

    def validate(self) -> "MQARConfig":
        """Raise a one-line ValueError naming what is wrong and what would be valid."""
        for name in ("vocab_size", "seq_len", "num_pairs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        q = self.queries
        if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= self.num_pairs:
            raise ValueError(f"num_queries must be an integer in [1, num_pairs={self.num_pairs}], got {q!r}")
        if self.vocab_size < 2 * self.num_pairs + 1:
            raise ValueError(
                f"vocab_size={self.vocab_size} is too small for num_pairs={self.num_pairs}: keys and values "
                f"need disjoint halves of at least num_pairs ids each plus a filler, so vocab_size >= "
                f"{2 * self.num_pairs + 1}")
        if self.seq_len < 2 * self.num_pairs + q:
            raise ValueError(
                f"num_pairs={self.num_pairs} with {q} queries does not fit seq_len={self.seq_len}: "
                f"need seq_len >= 2*num_pairs + num_queries = {2 * self.num_pairs + q}")
        if not isinstance(self.gap_power, (int, float)) or not math.isfinite(self.gap_power) or self.gap_power < 0:
            raise ValueError(f"gap_power must be a finite number >= 0, got {self.gap_power!r}")
        return self


def make_mqar(cfg: MQARConfig, num_examples: int, seed: int) -> tuple:
    """``num_examples`` MQAR sequences, a pure function of ``(cfg, num_examples, seed)``.

    Returns ``(inputs, labels)``, both ``(b, n)`` int64. ``labels[i, t]`` is the value paired with
    key ``inputs[i, t]`` when ``t`` is a query position and ``IGNORE`` otherwise.
    """
    cfg.validate()
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    g = torch.Generator().manual_seed(int(seed))
    # rows are drawn in blocks so that a large vocabulary (the draw below is O(b * V)) never
    # needs more than ~16 MB of scratch; the block size depends only on cfg, so the result is
    # still a pure function of (cfg, num_examples, seed)
    rows = max(1, 2 ** 22 // max(cfg.vocab_size, cfg.seq_len))
    parts = [_mqar_block(cfg, min(rows, num_examples - i), g) for i in range(0, num_examples, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _mqar_block(cfg: MQARConfig, b: int, g: torch.Generator) -> tuple:
    n, P, Q = cfg.seq_len, cfg.num_pairs, cfg.queries
    R = n - 2 * P
    k_lo, k_hi = cfg.key_range
    v_lo, v_hi = cfg.value_range

    # distinct keys (so every query has one answer) and distinct values, per sequence:
    # the first P entries of a random permutation of each half.
    keys = torch.rand(b, k_hi - k_lo, generator=g).argsort(-1)[:, :P] + k_lo    # (b, P)
    values = torch.rand(b, v_hi - v_lo, generator=g).argsort(-1)[:, :P] + v_lo  # (b, P)

    inputs = torch.full((b, n), FILLER, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * P:2] = keys
    inputs[:, 1:2 * P:2] = values

    # query slots: Q distinct offsets in the query region, offset j has gap g = j + 1 past the
    # key-value block and weight g^-gap_power (a power law: near queries common, far ones rare).
    gaps = torch.arange(1, R + 1, dtype=torch.float64)
    weights = gaps.pow(-float(cfg.gap_power)).expand(b, R)                     # (b, R)
    slots = torch.multinomial(weights, Q, replacement=False, generator=g)      # (b, Q)
    # which pair each query re-issues: a random subset of Q of the P pairs, in random order
    which = torch.rand(b, P, generator=g).argsort(-1)[:, :Q]                   # (b, Q)

    pos = 2 * P + slots                                                        # (b, Q)
    inputs.scatter_(1, pos, keys.gather(1, which))
    labels.scatter_(1, pos, values.gather(1, which))
    return inputs, labels


def query_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """(correct, total) over the labelled positions; logits (b, n, V), labels (b, n)."""
    sel = labels != IGNORE
    correct = (logits.argmax(-1)[sel] == labels[sel]).sum()
    return int(correct), int(sel.sum())


# ----------------------------------------------------------------------------- training


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
        weight_decay: AdamW decoupled weight decay (Loshchilov & Hutter, 2019).
        warmup_steps: linear warm-up length; then cosine decay to 0 at ``max_steps``.
        num_train: fixed training set size, reshuffled every epoch.
        num_val: validation set for early stopping (never used for the reported number).
        num_test: held-out test set; its accuracy is the reported one.
        eval_every: steps between validation checks.
        target_acc: stop as soon as validation accuracy reaches this.
        grad_clip: global gradient-norm clip.
        reinit: before training, draw every ``nn.Linear`` weight from N(0, 1/fan_in) (LeCun)
            and the token embedding from N(0, 1); see ``reinit_for_recall``. False keeps the model's own (GPT-2 style, std 0.02) init.
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
        return self


def warmup_cosine(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then half-cosine to 0 at ``max_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def reinit_for_recall(model: torch.nn.Module) -> None:
    """The recall recipe's initialisation, the same for every architecture.

    Why: the shared shell initialises like GPT-2 (every weight N(0, 0.02)) and adds unit-amplitude
    sinusoidal positions. From there a 2-layer model sits on MQAR's plateau (it learns to output
    *some* value seen in context, accuracy 1/P) for thousands of steps: the query and key
    projections start so small that the gradient that would grow a matching pattern is itself
    second order in them, and the token identity is ~2% of the input next to the positions.
    Drawing Linear weights from N(0, 1/fan_in) (LeCun et al., 1998: unit-variance outputs, so
    attention scores are O(1) from the start) and the embedding at unit scale (as Vaswani et al.
    2017 do by multiplying it by sqrt(D)) shortens the plateau to a few hundred steps, which is
    what makes a CPU run possible. Biases and every non-Linear parameter a mixer
    sets itself (gates, scales, temperatures) keep the model's own initial values.
    """
    with torch.no_grad():
        head = getattr(model, "lm_head", None)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                torch.nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)  # (out, in): 1/sqrt(fan_in)
        embed = getattr(model, "embed", None)
        if isinstance(embed, torch.nn.Embedding):
            torch.nn.init.normal_(embed.weight, std=1.0)  # also the tied LM head's weight


@dataclass
class Splits:
    """Train / validation / test sets of one MQAR setting, disjoint by seed."""

    train: tuple
    val: tuple
    test: tuple

    @classmethod
    def make(cls, data: MQARConfig, train: TrainConfig, seed: int) -> "Splits":
        # three different seeds -> three independent draws; the same for every model
        return cls(make_mqar(data, train.num_train, seed * 3 + 0),
                   make_mqar(data, train.num_val, seed * 3 + 1),
                   make_mqar(data, train.num_test, seed * 3 + 2))


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
        c, t = query_accuracy(model(x), y)
        correct, total = correct + c, total + t
    model.train(was_training)
    return correct / max(total, 1)


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

    The loss is cross-entropy at the query positions only (``IGNORE`` elsewhere), as in Zoology.
    ``on_step(step, loss, val_acc_or_None)`` is called after every step (for progress bars).
    """
    train.validate()
    if train.reinit:
        reinit_for_recall(model)
    model.to(device).train()
    # decay the matrices (dim >= 2) only, not biases or norm gains (the usual GPT recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=train.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(train.warmup_steps,
                                                                 train.schedule_steps or train.max_steps))

    x_all, y_all = splits.train
    g = torch.Generator().manual_seed(int(seed) + 1)  # shuffling order: same for every model
    order = torch.randperm(x_all.shape[0], generator=g)
    cursor, step, loss_v, val_acc = 0, 0, float("nan"), 0.0
    history, reached = [], False
    t0 = time.perf_counter()
    while step < train.max_steps:
        if cursor + train.batch_size > order.numel():
            order, cursor = torch.randperm(x_all.shape[0], generator=g), 0
        idx = order[cursor:cursor + train.batch_size]
        cursor += train.batch_size
        x, y = x_all[idx].to(device), y_all[idx].to(device)         # (b, n)
        logits = model(x)                                            # (b, n, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        step += 1
        loss_v = loss.item()
        checked = None
        if step % train.eval_every == 0 or step == train.max_steps:
            val_acc = checked = evaluate(model, splits.val, 256, device)
            history.append((step, loss_v, val_acc))
        if on_step is not None:
            on_step(step, loss_v, checked)
        if checked is not None and checked >= train.target_acc:
            reached = True
            break
    train_time = time.perf_counter() - t0
    test_acc = evaluate(model, splits.test, 256, device)
    return TrainResult(test_acc, val_acc, loss_v, step, reached, train_time, history)


# ----------------------------------------------------------------------------- state size


@torch.no_grad()
def decoding_state_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes held by ``model``'s decoding cache after it has read ``tokens`` (1, n).

    Measured through the shared shell (``init_cache`` + ``ModelCache.nbytes``), so every
    architecture is sized the same way: Standard/Hopfield hold every token's K and V, BSBR one
    state per completed chunk plus the open chunk, Linear/DeltaNet a fixed d x d per head, ...
    """
    was_training = model.training
    model.eval()
    cache = model.init_cache(1)
    model(tokens[:1], cache=cache)
    model.train(was_training)
    return int(cache.nbytes())


# ----------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class RecallCase:
    """One (model, task, size) point of the sweep.

    ``size`` is the memory knob: it sets both ``chunk_size`` (BSBR, Linear, DeltaNet, GAU) and
    ``window_size`` (SlidingWindow) of the ``ModelConfig``; each builder reads the field it uses,
    so there is no per-model branch here. Standard and Hopfield ignore it.
    """

    model: str
    seq_len: int
    num_pairs: int
    hidden_dim: int
    size: int

    def key(self) -> tuple:
        return (self.model, self.seq_len, self.num_pairs, self.hidden_dim, self.size)


@dataclass(frozen=True)
class RecallPreset:
    """A sweep in two parts, so that accuracy can be read against length, pairs and state size:

    - the task sweep: sequence lengths and pair counts, at the base width and chunk/window size;
    - the state sweep: widths ``d`` and chunk/window sizes, at the base task.

    Each part is one factor at a time around its base point, or the full cross product with
    ``cross=True``.
    """

    vocab_size: int
    seq_lens: tuple
    num_pairs: tuple
    base_seq_len: int
    base_num_pairs: int
    hidden_dims: tuple
    sizes: tuple
    base_hidden_dim: int
    base_size: int
    num_layers: int
    num_heads: int
    ff_mult: int
    qk_dim: int
    train: TrainConfig
    cross: bool = False
    jobs: int = 1                 # cases trained at once (worker processes) unless --jobs says otherwise

    def data(self, seq_len: int, num_pairs: int) -> MQARConfig:
        return MQARConfig(vocab_size=self.vocab_size, seq_len=seq_len, num_pairs=num_pairs)

    def model_config(self, case: RecallCase) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, hidden_dim=case.hidden_dim, num_layers=self.num_layers,
                           num_heads=self.num_heads, ff_dim=self.ff_mult * case.hidden_dim, dropout=0.0,
                           chunk_size=case.size, window_size=case.size, qk_dim=min(self.qk_dim, case.hidden_dim))

    def with_(self, **kw) -> "RecallPreset":
        return replace(self, **kw)

    def task_points(self) -> list:
        """(seq_len, num_pairs) points: every length at the base pair count and every pair count at
        the base length ("axes"), or the whole cross product with ``cross``; those whose pairs do
        not fit the length are left out."""
        pts = ([(n, P) for n in self.seq_lens for P in self.num_pairs] if self.cross else
               [(n, self.base_num_pairs) for n in self.seq_lens] + [(self.base_seq_len, P) for P in self.num_pairs])
        return [pt for pt in dict.fromkeys(pts) if _fits(self, *pt)]

    def state_points(self) -> list:
        """(hidden_dim, size) points at the base task, "axes" or cross product like ``task_points``."""
        pts = ([(D, s) for D in self.hidden_dims for s in self.sizes] if self.cross else
               [(self.base_hidden_dim, s) for s in self.sizes] + [(D, self.base_size) for D in self.hidden_dims])
        return list(dict.fromkeys(pts))

    def check(self) -> "RecallPreset":
        """One-line ValueError on a sweep with a value that cannot be used.

        The base task must fit, the vocabulary must hold the largest pair count, and every given
        length and pair count must take part in at least one point that fits.
        """
        from bsbr.shell import check_heads

        self.train.validate()
        for name in ("seq_lens", "num_pairs", "hidden_dims", "sizes"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in vals):
                raise ValueError(f"{name} must be positive integers, got {vals!r}")
        big = max(self.num_pairs)
        MQARConfig(self.vocab_size, 3 * big, big).validate()  # the length fits; this checks the vocabulary
        self.data(self.base_seq_len, self.base_num_pairs).validate()
        pts = self.task_points()
        for n in self.seq_lens:
            if not any(m == n for m, _ in pts):
                raise ValueError(f"seq_len={n} fits no requested pair count: P pairs and P queries need "
                                 f"seq_len >= 3P; the largest P that fits is {n // 3}")
        for P in self.num_pairs:
            if not any(q == P for _, q in pts):
                lens = [n for n, _ in pts] or list(self.seq_lens)
                raise ValueError(f"num_pairs={P} fits none of the sequence lengths it is paired with "
                                 f"({', '.join(map(str, sorted(set(lens))))}): it needs seq_len >= {3 * P}")
        for D in self.hidden_dims:
            check_heads(D, self.num_heads)
        return self


def _fits(preset: "RecallPreset", n: int, P: int) -> bool:
    try:
        preset.data(n, P).validate()
        return True
    except ValueError:
        return False


PRESETS: dict = {
    # CPU, all seven models in < 15 min on a 2-core machine: a small model and short sequences.
    "quick": RecallPreset(
        vocab_size=32, seq_lens=(32, 64), num_pairs=(4, 8), base_seq_len=32, base_num_pairs=4,
        hidden_dims=(32, 64), sizes=(4, 8, 16), base_hidden_dim=64, base_size=8,
        num_layers=2, num_heads=2, ff_mult=2, qk_dim=32, jobs=2,
        train=TrainConfig(max_steps=600, schedule_steps=1500, batch_size=64, lr=3e-3, weight_decay=0.0,
                          warmup_steps=30, num_train=8192, num_val=256, num_test=1024, eval_every=50,
                          target_acc=0.995)),
    # GPU (--device cuda): Zoology-like scale, longer sequences, more pairs, wider models.
    "full": RecallPreset(
        vocab_size=8192, seq_lens=(64, 128, 256, 512), num_pairs=(4, 8, 16, 32, 64), base_seq_len=256,
        base_num_pairs=16, hidden_dims=(64, 128, 256), sizes=(16, 32, 64, 128), base_hidden_dim=128,
        base_size=32, num_layers=2, num_heads=2, ff_mult=2, qk_dim=128,
        train=TrainConfig(max_steps=8000, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=300,
                          num_train=100_000, num_val=1000, num_test=3000, eval_every=250, target_acc=0.99)),
}


def recall_grid(models: Sequence[str], preset: RecallPreset) -> list:
    """The cases of ``preset`` for ``models``, deduplicated, in a fixed order (task, then model)."""
    names = [resolve_model(m).name for m in models]
    points = [(n, P, preset.base_hidden_dim, preset.base_size) for n, P in preset.task_points()]
    points += [(preset.base_seq_len, preset.base_num_pairs, D, sz) for D, sz in preset.state_points()]
    return [RecallCase(m, n, P, D, sz) for (n, P, D, sz) in dict.fromkeys(points) for m in names]


COLUMNS = (
    "run_id", "task", "model", "device", "status", "test_acc", "val_acc", "reached_target", "steps",
    "train_time_s", "final_loss",
    "seq_len", "num_pairs", "num_queries", "vocab_size", "hidden_dim", "num_layers", "num_heads", "size",
    "chunk_size", "window_size", "state_bytes", "params",
    "max_steps", "batch_size", "lr", "weight_decay", "warmup_steps", "num_train", "num_test", "target_acc",
    "seed", "threads", "error",
)


def run_case(case: RecallCase, preset: RecallPreset, splits: Splits, *, seed: int, device: str,
             on_step=None) -> dict:
    """Train and evaluate one case; a failure becomes a row with status ``error``, never a crash."""
    cfg = preset.model_config(case)
    data = preset.data(case.seq_len, case.num_pairs)
    tr = preset.train
    row = dict(task="mqar", model=case.model, device=device, seq_len=case.seq_len, num_pairs=case.num_pairs,
               num_queries=data.queries, vocab_size=preset.vocab_size, hidden_dim=case.hidden_dim,
               num_layers=preset.num_layers, num_heads=preset.num_heads, size=case.size,
               chunk_size=cfg.chunk_size, window_size=cfg.window_size, max_steps=tr.max_steps,
               batch_size=tr.batch_size, lr=tr.lr, weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps,
               num_train=tr.num_train, num_test=tr.num_test, target_acc=tr.target_acc, seed=seed,
               threads=torch.get_num_threads(), error="")
    try:
        torch.manual_seed(seed)  # same initial weights for a model across reruns
        model = resolve_model(case.model).build(cfg)
        row["params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        row["state_bytes"] = decoding_state_bytes(model, splits.test[0][:1])
        res = train_and_evaluate(model, splits, tr, seed=seed, device=device, on_step=on_step)
        row.update(status="ok", test_acc=round(res.test_acc, 6), val_acc=round(res.val_acc, 6),
                   reached_target=res.reached_target, steps=res.steps, train_time_s=round(res.train_time_s, 2),
                   final_loss=round(res.train_loss, 5))
    except Exception as e:  # noqa: BLE001 - recorded in the row, the sweep goes on
        row.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:300])
    return row


def write_rows(path, rows: list) -> None:
    """Write the whole CSV to a temporary file and rename it: never left half-written."""
    import os
    from pathlib import Path

    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_rows(path) -> list:
    import pandas as pd

    df = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in ("model", "seq_len", "num_pairs", "hidden_dim", "size") if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a recall CSV: it lacks column(s) {', '.join(missing)}")
    return df.to_dict("records")


def settings(preset: RecallPreset) -> dict:
    """The preset as plain data, for the JSON sidecar."""
    return asdict(preset)


_SPLITS: dict = {}  # per process: the data of the task being trained (grids are ordered by task)


def _splits_for(preset: RecallPreset, case: RecallCase, seed: int) -> Splits:
    key = (preset.vocab_size, case.seq_len, case.num_pairs, preset.train, seed)
    if key not in _SPLITS:
        _SPLITS.clear()  # one task's data held at a time
        _SPLITS[key] = Splits.make(preset.data(case.seq_len, case.num_pairs), preset.train, seed)
    return _SPLITS[key]


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(case: RecallCase, preset: RecallPreset, seed: int, device: str) -> dict:
    return run_case(case, preset, _splits_for(preset, case, seed), seed=seed, device=device)


def _label(case: RecallCase) -> str:
    return f"{case.model} n={case.seq_len} P={case.num_pairs} d={case.hidden_dim} size={case.size}"


def run_recall(cases: Sequence[RecallCase], preset: RecallPreset, output, *, seed: int = 0, device: str = "cpu",
               run_id: str = "", resume: bool = False, jobs: int = 1, progress: bool = True, console=None) -> list:
    """Run every case (skipping those already in ``output`` with ``resume``); return all rows.

    Every model sees the same train/val/test sets for a given (seq_len, num_pairs): they are a
    pure function of ``seed`` (``Splits.make``), so they are identical in every process.
    ``jobs > 1`` trains that many cases at once in worker processes, each with the current
    ``torch.get_num_threads()`` threads (CPU only: a GPU runs one case at a time). The CSV is
    rewritten (temporary file + rename) after every case, in grid order.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    import multiprocessing as mp

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    old = read_rows(output) if resume else []
    by_key = {(r["model"], int(r["seq_len"]), int(r["num_pairs"]), int(r["hidden_dim"]), int(r["size"])): r
              for r in old}
    todo = [c for c in cases if c.key() not in by_key]
    order = {c.key(): i for i, c in enumerate(cases)}

    def record(case: RecallCase, row: dict) -> None:
        row["run_id"] = run_id
        by_key[case.key()] = row
        write_rows(output, sorted(by_key.values(), key=lambda r: order.get(
            (r["model"], int(r["seq_len"]), int(r["num_pairs"]), int(r["hidden_dim"]), int(r["size"])), len(order))))

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=not progress, transient=False) as bar:
        overall = bar.add_task("recall sweep", total=len(todo))
        if jobs == 1 or device != "cpu":
            inner = bar.add_task("", total=preset.train.max_steps)
            for case in todo:
                label = _label(case)
                bar.reset(inner, total=preset.train.max_steps, description=label)
                state = {"acc": 0.0}

                def on_step(step, loss, acc, _label=label):
                    if acc is not None:
                        state["acc"] = acc
                    bar.update(inner, completed=step,
                               description=f"{_label} loss {loss:.3f} val acc {state['acc']:.3f}")

                record(case, run_case(case, preset, _splits_for(preset, case, seed), seed=seed, device=device,
                                      on_step=on_step))
                bar.advance(overall)
        else:
            # spawn, not fork: a forked child would inherit the parent's OpenMP state
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                     initargs=(torch.get_num_threads(),)) as pool:
                running = {pool.submit(_run_in_worker, c, preset, seed, device): c for c in todo}
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        case = running.pop(fut)
                        row = fut.result()
                        record(case, row)
                        acc = f"{float(row['test_acc']):.3f}" if row["status"] == "ok" else row["status"]
                        bar.update(overall, advance=1, description=f"recall sweep (last: {_label(case)} -> {acc})")
    return [by_key[c.key()] for c in cases if c.key() in by_key] + [r for k, r in by_key.items() if k not in order]


# ----------------------------------------------------------------------------- reading a run


def task_rows(df, preset: RecallPreset):
    """Rows of the length x pairs sweep: base width and base chunk/window size."""
    return df[(df["hidden_dim"] == preset.base_hidden_dim) & (df["size"] == preset.base_size)]


def state_rows(df, preset: RecallPreset):
    """Rows of the width x size sweep: the base task (sequence length, pairs)."""
    return df[(df["seq_len"] == preset.base_seq_len) & (df["num_pairs"] == preset.base_num_pairs)]


def plot_run(rows: list, preset: RecallPreset, out_dir, stem: str = "recall") -> list:
    """Both recall figures through the plotting module; returns the paths written."""
    import pandas as pd

    from evals import plots

    df = pd.DataFrame(rows)
    for c in ("test_acc", "state_bytes"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    target = preset.train.target_acc
    return (plots.plot_recall_task(task_rows(df, preset), out_dir, preset.base_seq_len, preset.base_num_pairs,
                                   target=target, stem=stem)
            + plots.plot_recall_state(state_rows(df, preset), out_dir, target=target, stem=stem))


def summary_table(rows: list, preset: RecallPreset):
    """A rich table: one row per model, one column per configuration, held-out accuracy in %."""
    import pandas as pd
    from rich.table import Table

    from evals.analysis import model_order

    df = pd.DataFrame(rows)
    df["config"] = ("n" + df["seq_len"].astype(str) + " P" + df["num_pairs"].astype(str) + " d"
                    + df["hidden_dim"].astype(str) + " s" + df["size"].astype(str))
    configs = list(dict.fromkeys(df["config"]))
    table = Table(title=f"MQAR held-out accuracy (%), vocab {preset.vocab_size}; "
                        f"n=length P=pairs d=width s=chunk/window")
    table.add_column("model", no_wrap=True, min_width=13)
    for c in configs:
        table.add_column(c, justify="right")
    for m in model_order(df["model"]):
        cells = []
        for c in configs:
            r = df[(df["model"] == m) & (df["config"] == c)]
            if r.empty:
                cells.append("")
            elif r.iloc[0]["status"] != "ok":
                cells.append("error")
            else:
                cells.append(f"{100 * float(r.iloc[0]['test_acc']):.1f}")
        table.add_row(m, *cells)
    return table
