"""Byte windows for language modelling: training batches and evaluation windows.

A window is ``context + 1`` consecutive bytes of one document: the model reads the first
``context`` and predicts the last ``context`` (each byte from the bytes before it in the window).
Windows never cross a document boundary, and position ``p`` of a window is its ``p``-th byte,
counted from the window's own start: the loss at position ``p`` is the loss of a prediction made
with ``p`` bytes of context.

- Training: windows at seeded random offsets in the training documents, each document drawn in
  proportion to how many windows it holds, so every byte is about equally likely to be seen.
- Evaluation: every document cut from its start into consecutive windows (stride ``context``), so
  every byte but a document's first is predicted exactly once; the last, shorter window is padded
  on the right, and the padding is masked out of the loss (``mask`` False) and out of the model's
  attention (``attention_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class EvalWindows:
    """Every evaluation window of a split: ``tokens`` (w, context + 1) uint8 as int64, ``mask``
    (w, context + 1) bool (False = padding), and the number of bytes predicted."""

    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def predicted(self) -> int:
        return int(self.mask[:, 1:].sum())


def check_context(context: int, docs: Sequence) -> None:
    """A context the corpus can fill: every document must hold at least one whole window."""
    shortest = min(len(d.data) for d in docs)
    if not (isinstance(context, int) and 1 <= context < shortest):
        raise ValueError(f"context {context!r} is longer than a document: the corpus's shortest document has "
                         f"{shortest:,} bytes, so a context may be 1 to {shortest - 1:,}")


def eval_windows(docs: Sequence, context: int) -> EvalWindows:
    """Each document from its start in windows of ``context + 1`` bytes at stride ``context``;
    the last window of a document is right-padded (mask False)."""
    rows, masks = [], []
    for d in docs:
        a = np.frombuffer(d.data, dtype=np.uint8)
        for start in range(0, max(1, len(a) - 1), context):
            piece = a[start:start + context + 1]
            if len(piece) < 2:
                break
            row = np.zeros(context + 1, dtype=np.int64)
            row[:len(piece)] = piece
            m = np.zeros(context + 1, dtype=bool)
            m[:len(piece)] = True
            rows.append(row)
            masks.append(m)
    return EvalWindows(torch.from_numpy(np.stack(rows)), torch.from_numpy(np.stack(masks)))


def train_batches(docs: Sequence, context: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch, context + 1) int64 batches of windows at random offsets, from a generator
    seeded with ``seed`` alone (the same batches in every process, whatever the model)."""
    arrays = [np.frombuffer(d.data, dtype=np.uint8) for d in docs]
    starts = np.array([len(a) - context for a in arrays], dtype=np.int64)  # offsets 0 .. len - context - 1
    if (starts < 1).any():
        raise ValueError(f"context {context} does not fit every training document")
    weights = starts / starts.sum()
    rng = np.random.default_rng(seed)
    while True:
        which = rng.choice(len(arrays), size=batch_size, p=weights)
        offs = rng.integers(0, starts[which])
        yield torch.from_numpy(np.stack([arrays[i][o:o + context + 1] for i, o in zip(which, offs)]).astype(np.int64))


def position_buckets(context: int, per_octave: int = 4) -> list:
    """Half-open position ranges ``[lo, hi)`` for the loss-by-position table: position 0 alone,
    then ``per_octave`` buckets per doubling of the position (edges ``round(2^(j / per_octave))``,
    deduplicated), the last ending at ``context``."""
    edges, j = {0, 1, context}, 0
    while 2 ** (j / per_octave) < context:
        edges.add(int(round(2 ** (j / per_octave))))
        j += 1
    edges = sorted(e for e in edges if e <= context)
    return list(zip(edges[:-1], edges[1:]))
