"""Modern (continuous) Hopfield retrieval as a causal token mixer, after Ramsauer et al. (2021),
"Hopfield Networks is All You Need".

The paper's update rule retrieves from stored patterns (keys K, values V) with a state pattern xi:

    xi_new = softmax(beta * xi K^T) V

Here the stored patterns are the causal context: token t retrieves from the keys and values of
positions s <= t (real tokens only). The variant implemented, and its defaults:

- state: xi_0 = q_t, the token's projected query ("Hopfield" layer with R = q, Y = K, V);
- inverse temperature ``beta``: a fixed hyperparameter; default ``None`` -> 1/sqrt(head_dim), which
  makes one step exactly standard causal softmax attention (the paper's observation);
- ``update_steps`` (default 1): each further step re-queries with the retrieved pattern mapped back
  to query space by a learned per-head matrix W_xi (d x d, initialised to the identity, so the
  second step starts as the paper's iteration xi <- softmax(beta xi K^T) V fed back as the state):

      r_1 = softmax(beta q K^T) V,    r_{j+1} = softmax(beta (r_j W_xi) K^T) V,    output r_steps;

- no learned static pattern set: every pattern is a context token, so the layer stays causal and
  decodes with a KV cache exactly like Standard (each re-query needs only the cached past K, V).

Cost: O(update_steps * n^2 d) per head.

Axis legend used in shape comments:
    b  batch      h  heads      m  queries in this call      n  keys (cached prefix + this call)
    d  head size  D  hidden size (h * d)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from bsbr.shell import CausalLM, check_dropout, check_heads, check_positive_int, default, exists
from bsbr_extras.standard import StandardAttention, causal_softmax_attention


def check_beta(beta) -> None:
    if beta is None:
        return
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0 (or None for 1/sqrt(head_dim)), got {beta!r}")


# ----------------------------------------------------------------------------- the op


def hopfield_retrieval(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: Optional[float] = None, update_steps: int = 1,
                       requery: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """``update_steps`` causal Hopfield updates xi <- softmax(beta xi K^T) V (Ramsauer et al., 2021).

    Args:
        q: (b, h, m, d) initial state patterns for the last ``m`` of the ``n`` positions.
        k, v: (b, h, n, d) stored patterns: the context's keys and values.
        beta: inverse temperature > 0; None -> 1/sqrt(d).
        update_steps: >= 1 retrieval steps.
        requery: (h, d_v, d) per-head map from a retrieved pattern back to query space; required
            when ``update_steps > 1``.
        mask: (b, n) bool, True = real token, or None; masked patterns are never retrieved.

    Returns (b, h, m, d_v), the last retrieved pattern.
    """
    check_beta(beta)
    beta = default(beta, 1.0 / math.sqrt(q.shape[-1]))
    check_positive_int("update_steps", update_steps)
    if update_steps > 1:
        want = (q.shape[1], v.shape[-1], q.shape[-1])
        if not exists(requery) or tuple(requery.shape) != want:
            got = None if requery is None else tuple(requery.shape)
            raise ValueError(f"requery must be a tensor of shape (heads, d_v, d)={want} when update_steps > 1, got {got}")
    xi = q  # (b, h, m, d)
    for step in range(update_steps):
        if step:
            xi = torch.matmul(r, requery)  # (b, h, m, d_v) @ (h, d_v, d) -> (b, h, m, d)
        r = causal_softmax_attention(xi, k, v, mask, scale=float(beta), dropout_p=dropout_p)  # (b, h, m, d_v)
    return r


# ----------------------------------------------------------------------------- mixer


class HopfieldAttention(StandardAttention):
    """Multi-head causal Hopfield retrieval: Standard's projections and KV cache, the Hopfield op.

    ``requery`` (the per-head W_xi) exists only when ``update_steps > 1``; with one step the layer has
    no parameter that would receive no gradient.
    """

    def __init__(self, hidden_dim: int, num_heads: int, beta: Optional[float] = None, update_steps: int = 1,
                 dropout: float = 0.0, bias: bool = True):
        check_beta(beta)
        check_positive_int("update_steps", update_steps)
        super().__init__(hidden_dim, num_heads, dropout, bias)
        self.beta = float(beta) if beta is not None else 1.0 / math.sqrt(self.head_dim)
        self.update_steps = update_steps
        if update_steps > 1:
            eye = torch.eye(self.head_dim).expand(num_heads, self.head_dim, self.head_dim)
            self.requery = nn.Parameter(eye.clone())  # (h, d, d)
        else:
            self.register_parameter("requery", None)

    def op(self, q, k, v, mask=None):
        return hopfield_retrieval(q, k, v, self.beta, self.update_steps, self.requery, mask,
                                  dropout_p=self.dropout if self.training else 0.0)


# ----------------------------------------------------------------------------- model


class HopfieldNetworkModel(CausalLM):
    """Decoder-only transformer whose token mixer is causal modern-Hopfield retrieval.

    ``_init_weights`` (GPT-2 style) touches only Linear/Embedding, so ``requery`` keeps its identity init.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, beta: Optional[float] = None, update_steps: int = 1, **shell_kwargs):
        check_heads(hidden_dim, num_heads)
        check_dropout(dropout)
        check_beta(beta)
        check_positive_int("update_steps", update_steps)
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: HopfieldAttention(hidden_dim, num_heads, beta, update_steps, dropout),
                         **shell_kwargs)
