"""The token-mixer contract: what ``Block`` (``bsbr.causal_lm``) and ``evals`` need from a mixer,
and the parts of it written once for every architecture.

Axis legend used in shape comments:
    b  batch            n  tokens in this call        D  hidden size
    h  heads            d  head size

The protocol:

    mixer(x, mask=None, cache=None) -> y         x, y: (b, n, D); mask: (b, n) bool, True = real
    mixer.init_cache(batch_size, device, dtype, max_len=None) -> a mutable per-layer cache object
                                                    (max_len: see CausalLM.init_cache)
    mixer.op_inputs(x, mask=None)                -> the op's positional inputs (projections done;
                                                    the mask is NOT among them)
    mixer.op(*inputs, mask=None)                 -> the pure token-mixing computation
    mixer.output(o, x)                           -> y from the op's output (``out_proj`` of the
                                                    merged heads; GAU also gates by its U(x))
    mixer.op_recurrent(*inputs, mask=None)       -> optional: the same op one token at a time

``forward`` without a cache equals ``output(op(*op_inputs(x, mask), mask=mask), x)``. With a cache
the mixer continues the sequence held in it and updates it in place. No mixer applies dropout to
its own output: ``Block`` owns the residual dropout of both branches, so every architecture's
mixer branch is dropped exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


def exists(x) -> bool:
    return x is not None


def default(x, d):
    return x if x is not None else d


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, n, h*d) -> (b, h, n, d)"""
    b, n, _ = x.shape
    return x.view(b, n, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, h, n, d) -> (b, n, h*d)"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class TokenMixer(nn.Module):
    """Base of every token mixer: the parts of the protocol written once.

    Subclasses define ``op_inputs``, ``op``, ``init_cache`` and ``forward``; ``output`` maps the
    op's per-head output to the layer's (``out_proj`` of the merged heads, unless overridden).
    """

    @classmethod
    def forms(cls) -> tuple:
        """The op's forms: "parallel" always, "recurrent" when the mixer has ``op_recurrent``."""
        return ("parallel", "recurrent") if hasattr(cls, "op_recurrent") else ("parallel",)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(merge_heads(o))  # (b, h, n, d) -> (b, n, D)


@dataclass
class RecurrentStateCache:
    """Decoding state of a recurrent-state mixer: its fixed-size state tensors, updated in place."""

    state: tuple


class RecurrentStateMixer(TokenMixer):
    """A mixer whose whole past is a fixed-size state (Linear, DeltaNet); the cache dispatch, once:

    - no cache: the chunkwise-parallel ``op``;
    - one token with a cache: ``step`` (the recurrence, O(state) per token);
    - a longer piece with a cache (a prompt): ``chunk`` continuing from the cached state.

    Subclasses define ``op_inputs``, ``op``, ``op_recurrent``, ``init_state(batch, device, dtype)``
    and ``step(*inputs, mask, state)`` / ``chunk(*inputs, mask, state)``, each returning
    ``(o, new_state)`` with ``new_state`` a tuple shaped like ``state``.
    """

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len=None,
                   static: bool = False) -> RecurrentStateCache:
        # a fixed-size state: every step already has one shape, so max_len and static change nothing
        return RecurrentStateCache(self.init_state(batch_size, device, dtype))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[RecurrentStateCache] = None) -> torch.Tensor:
        inputs = self.op_inputs(x, mask)
        if cache is None:
            o = self.op(*inputs, mask=mask)
        else:
            o, new = (self.step if x.shape[1] == 1 else self.chunk)(*inputs, mask=mask, state=cache.state)
            for held, value in zip(cache.state, new):
                if value is not held:  # a step that updated the state in place returns it as is
                    held.copy_(value)  # in place: the cache keeps its tensors
        return self.output(o, x)
