"""MQAR data: the seeded, deterministic generator and its train/validation/test splits.

The task follows Arora et al. (2023), "Zoology: Measuring and Improving Recall in Efficient
Language Models" (arXiv:2312.04927): a sequence opens with ``P`` key-value pairs, then
re-issues keys later on; at each re-issued key the model must emit the value that was paired with
it. Keys and values come from disjoint halves of the vocabulary, and the distance between the end
of the key-value block and a query follows a power law, so most queries are near and a few far.

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
from dataclasses import dataclass
from typing import Optional

import torch

IGNORE = -100  # label of every non-query position (torch cross_entropy's ignore_index)
FILLER = 0     # token at every position that is neither a pair nor a query


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


@dataclass
class Splits:
    """Train / validation / test sets of one MQAR setting, disjoint by seed."""

    train: tuple
    val: tuple
    test: tuple

    @classmethod
    def make(cls, data: MQARConfig, num_train: int, num_val: int, num_test: int, seed: int) -> "Splits":
        # three different seeds -> three independent draws; the same for every model
        return cls(make_mqar(data, num_train, seed * 3 + 0),
                   make_mqar(data, num_val, seed * 3 + 1),
                   make_mqar(data, num_test, seed * 3 + 2))
