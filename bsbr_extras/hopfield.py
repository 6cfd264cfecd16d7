"""Modern (continuous) Hopfield retrieval as a causal token mixer, after Ramsauer et al. (2021),
"Hopfield Networks is All You Need" (ICLR).

The paper's update rule (its eq. 3) moves a state pattern xi towards the stored patterns Y:

    xi_new = Y^T softmax(beta Y xi)

and its Hopfield layer (eq. 10) reads, after the update, the values of the retrieved association:
``Z = softmax(beta R W_Q W_K^T Y^T) Y W_K W_V``. With keys ``K = Y W_K`` and values ``V = K W_V``
(here: a separate projection ``V = Y W_V``, as in attention), iterating the update in key space and
reading the values once at the end gives, per token:

    xi_0     = q_t                                          (the token's projected query)
    xi_{j+1} = softmax(beta xi_j K_{<=t}^T) K_{<=t}           j = 0 .. update_steps - 2   (key space)
    o_t      = softmax(beta xi_{S-1} K_{<=t}^T) V_{<=t}       S = update_steps            (values, once)

``update_steps`` counts the retrievals (softmax reads): 1 is one read, exactly standard causal
softmax attention when ``beta = 1/sqrt(d)`` (the paper's observation); each further step is one more
update of the state pattern in key space before the values are read. The stored patterns are the
causal context, the keys/values of positions s <= t (real tokens only), so the layer is causal and
decodes with a KV cache like Standard (each update needs only the cached past K).

Defaults and choices: ``beta`` is a fixed hyperparameter, default ``None`` -> 1/sqrt(head_dim);
``update_steps=1``; no learned static pattern set; no layer norms on the patterns (the paper's
layer has optional ones; the shell's pre-norm is applied to the block input); attention dropout
(training only) is applied to the final read's probabilities only.

Cost: O(update_steps * n^2 d) per head.

Axis legend used in shape comments:
    b  batch      h  heads      m  queries in this call      n  keys (cached prefix + this call)
    d  head size  D  hidden size (h * d)
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from bsbr.causal_lm import CausalLM
from bsbr.checks import check_float, check_positive_int
from bsbr.mixer import default
from bsbr_extras.standard import StandardAttention, causal_softmax_unchecked, check_qkv


def check_beta(beta) -> None:
    check_float("beta", beta, allow_none=True, note=" for 1/sqrt(head_dim)")


# ----------------------------------------------------------------------------- the op


def hopfield_retrieval(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: Optional[float] = None,
                       update_steps: int = 1, *, mask: Optional[torch.Tensor] = None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """Causal Hopfield retrieval with ``update_steps`` softmax reads (Ramsauer et al., 2021).

    Args:
        q: (b, h, m, d) initial state patterns for the last ``m`` of the ``n`` positions.
        k: (b, h, n, d) stored patterns (keys); v: (b, h, n, d_v) their values.
        beta: inverse temperature > 0; None -> 1/sqrt(d).
        update_steps: >= 1 retrievals: ``update_steps - 1`` updates ``xi <- softmax(beta xi K^T) K``
            in key space, then one read of the values ``softmax(beta xi K^T) V``.
        mask: (b, n) bool, True = real token, or None; masked patterns are never retrieved.
        dropout_p: dropout on the final read's probabilities.

    Returns (b, h, m, d_v).
    """
    check_beta(beta)
    check_positive_int("update_steps", update_steps)
    check_qkv(q, k, v, mask)
    return hopfield_unchecked(q, k, v, float(default(beta, 1.0 / math.sqrt(q.shape[-1]))), update_steps,
                              mask=mask, dropout_p=dropout_p)


def hopfield_unchecked(q, k, v, beta: float, update_steps: int, *, mask=None, dropout_p: float = 0.0):
    """:func:`hopfield_retrieval` without its checks (the mixer's: beta and the steps were checked
    in ``__init__``, the shapes are right by construction). ``beta`` is a float here."""
    xi = q  # (b, h, m, d)
    for _ in range(update_steps - 1):
        xi = causal_softmax_unchecked(xi, k, k, mask, scale=beta)  # (b, h, m, d): stays in key space
    return causal_softmax_unchecked(xi, k, v, mask, scale=beta, dropout_p=dropout_p)  # (b, h, m, d_v)


# ----------------------------------------------------------------------------- mixer


class HopfieldAttention(StandardAttention):
    """Multi-head causal Hopfield retrieval: Standard's projections and KV cache, the Hopfield op.

    With ``update_steps > 1`` the layer has no parameter beyond Standard's: the extra updates reuse
    the keys.
    """

    config_names = {"beta": "hopfield_beta"}

    def __init__(self, hidden_dim: int, num_heads: int, beta: Optional[float] = None, update_steps: int = 1,
                 dropout: float = 0.0, bias: bool = True):
        check_beta(beta)
        check_positive_int("update_steps", update_steps)
        super().__init__(hidden_dim, num_heads, dropout, bias)
        self.beta = float(beta) if beta is not None else 1.0 / math.sqrt(self.head_dim)
        self.update_steps = update_steps

    def op(self, q, k, v, *, mask=None):
        return hopfield_unchecked(q, k, v, self.beta, self.update_steps, mask=mask,
                                  dropout_p=self.dropout if self.training else 0.0)


# ----------------------------------------------------------------------------- model


class HopfieldNetworkModel(CausalLM):
    """Decoder-only transformer whose token mixer is causal modern-Hopfield retrieval.

    Args:
        vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout: as in every model here
            (``dropout`` also on the final read's attention probabilities).
        beta: inverse temperature (None -> 1/sqrt(head size)).
        update_steps: softmax reads per token (1 = Standard attention at the default beta).
    """

    mixer_class = HopfieldAttention

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, beta: Optional[float] = None, update_steps: int = 1, **shell_kwargs):
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: HopfieldAttention(hidden_dim, num_heads, beta, update_steps, dropout),
                         **shell_kwargs)
