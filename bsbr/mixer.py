"""The token-mixer contract: what the model shell (``bsbr.causal_lm``) and the evaluation suite
need from a mixer, and the parts of it written once for every architecture. The seven built-in
mixers follow it, and so does any architecture brought from outside (docs/plugins.md).

Axis legend used in shape comments:
    b  batch            n  tokens in this call        D  hidden size
    h  heads            d  head size

A mixer is a subclass of ``TokenMixer`` (an ``nn.Module``). What it provides, by mode:

    Mixer.from_config(config) -> mixer            built from the suite's config: the constructor's
                                                    parameters are filled from the config's fields of
                                                    the same names (hidden_dim, num_heads, chunk_size,
                                                    window_size, ...; ``config_fields`` and
                                                    ``config_names`` narrow or rename them)
    mixer(x, mask=None, cache=None) -> y          forward and train: x, y (b, n, D); mask (b, n)
                                                    bool, True = real. Causal: y[t] depends on x[<= t]
                                                    only; padded positions are never attended to
    mixer.init_cache(batch_size, device, dtype, max_len=None, static=False) -> cache
                                                  decode: a mutable per-layer cache; ``mixer(x,
                                                    cache=cache)`` continues the sequence held in it
                                                    and updates it in place (no ``init_cache``: the
                                                    decode mode is unsupported for this mixer)
    mixer.op_inputs(x, mask=None), mixer.op(*inputs, mask=None), mixer.output(o, x)
                                                  the op level: ``forward`` without a cache equals
                                                    ``output(op(*op_inputs(x, mask), mask=mask), x)``
    mixer.op_recurrent(*inputs, mask=None)        optional (forms): the op one token at a time
    mixer.init_weights()                          optional: called by the shell after it initialised
                                                    every Linear and Embedding GPT-2 style (N(0, 0.02)),
                                                    to set the mixer's own initialisation
    mixer.state_bytes(n) -> int                   optional (recall, frontier): the bytes its cache
                                                    holds after n tokens at batch 1 in float32, which
                                                    the conformance check holds the measured bytes to

and, optionally, its description as class attributes: ``method``, ``complexity``, ``time_class``
("n" or "n^2"), ``state`` and ``departures``. The suite names it by its import path
(``package.module:Class``) or by the name its package's entry point gives it.

What it gets from the shell: the token embedding and sinusoidal positions (any length), a
pre-norm block around it (LayerNorm, the mixer, residual dropout, then a GELU feed-forward layer),
the final norm and the tied LM head, the whole-model cache (``ModelCache``: one mixer cache per
layer and the position reached) and ``generate``. No mixer applies dropout to its own output: the
block owns the residual dropout of both branches, so every mixer branch is dropped exactly once.
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
    """Base of every token mixer: the parts of the contract written once (see the module docstring).

    Subclasses define ``forward`` (and, for the modes they support, ``init_cache``, ``op_inputs``,
    ``op``); ``output`` maps the op's per-head output to the layer's (``out_proj`` of the merged
    heads, unless overridden); ``from_config`` builds one from the suite's configuration.
    """

    # Which constructor parameters ``from_config`` fills from the config (None: every parameter
    # whose name the config has), and under which config names when they differ.
    config_fields: Optional[tuple] = None
    config_names: dict = {}

    @classmethod
    def from_config(cls, config) -> "TokenMixer":
        """A mixer whose constructor parameters come from ``config``'s fields of the same names."""
        import inspect

        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        kwargs = {}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if cls.config_fields is not None and p.name not in cls.config_fields:
                continue
            field = cls.config_names.get(p.name, p.name)
            if hasattr(config, field):
                kwargs[p.name] = getattr(config, field)
        return cls(**kwargs)

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
