"""Standard causal softmax attention (Vaswani et al., 2017, "Attention Is All You Need").

    o_t = sum_{s <= t, s real} softmax_s(q_t . k_s / sqrt(d)) v_s

Parallel form: ``F.scaled_dot_product_attention(is_causal=True)`` (PyTorch's fused kernel; it never
stores the n x n score matrix but still does O(n^2 d) work). Decoding form: the same function over a
KV cache holding every past key and value, O(n d) per generated token.

Axis legend used in shape comments:
    b  batch      h  heads      m  queries in this call      n  keys (cached prefix + this call)
    d  head size  D  hidden size (h * d)

Queries may be fewer than keys (``m <= n``): query ``i`` then sits at absolute position ``n - m + i``
(the last ``m`` positions, "bottom-right" causal alignment). With ``m == n`` that is the usual
training/prefill case; with a KV cache it is how a piece of any length, one token included,
continues the sequence without recomputing the prefix.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bsbr.causal_lm import CausalLM
from bsbr.checks import check_dropout, check_heads
from bsbr.mixer import TokenMixer, exists, split_heads

# ----------------------------------------------------------------------------- checks


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """One-line ValueErrors for per-head inputs q (b, h, m, d), k/v (b, h, n, d), mask (b, n) bool."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, tokens, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on (batch, heads, tokens)")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim")
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"q has {q.shape[-2]} tokens but k only {k.shape[-2]}; queries are the last tokens of k")
    if exists(mask):
        if mask.dtype != torch.bool or mask.shape != (k.shape[0], k.shape[-2]):
            raise ValueError(f"mask must be a bool tensor of shape (batch, n_keys)={(k.shape[0], k.shape[-2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")


def allowed_keys(causal: torch.Tensor, mask: Optional[torch.Tensor], m: int, n: int) -> torch.Tensor:
    """Combine a structural (m, n) bool pattern with a (b, n) key mask into a (b, 1, m, n) bool mask.

    Masked keys are never attended to. The diagonal (each query's own position) is kept even when
    that position is masked: a padded query then still has one key, so its (unspecified) output is
    finite instead of a 0/0 softmax. A real query never reaches a masked key through this.
    """
    if not exists(mask):
        return causal
    diag = torch.arange(n - m, n, device=causal.device)[:, None] == torch.arange(n, device=causal.device)  # (m, n)
    return causal & (mask[:, None, None, :] | diag)  # (b, 1, m, n)


# ----------------------------------------------------------------------------- the op


def causal_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal softmax attention, Vaswani et al. (2017), on per-head inputs.

    Args:
        q: (b, h, m, d) queries for the last ``m`` positions of the ``n`` keys (m <= n).
        k, v: (b, h, n, d) keys and values of every position so far.
        mask: (b, n) bool, True = real token, or None. Masked keys are never attended to.
        scale: the softmax temperature; None -> 1/sqrt(d).
        dropout_p: dropout on the attention probabilities (training only).

    Returns (b, h, m, d). O(m n d) time; the fused kernel keeps memory O((m + n) d).
    """
    check_qkv(q, k, v, mask)
    return causal_softmax_unchecked(q, k, v, mask, scale, dropout_p)


def causal_softmax_unchecked(q, k, v, mask=None, scale=None, dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`causal_softmax_attention` without its checks, for the mixers (their inputs are right by
    construction: the checks ran on every decode step before)."""
    m, n = q.shape[-2], k.shape[-2]
    if not exists(mask):
        if m == n:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
        if m == 1:  # one decode step sees every cached key
            return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p)
    # bottom-right aligned causal pattern: query i (position n-m+i) sees keys s <= n-m+i
    causal = torch.ones(m, n, dtype=torch.bool, device=q.device).tril(diagonal=n - m)  # (m, n)
    attn_mask = allowed_keys(causal, mask, m, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every token seen so far, for one layer.

    With ``max_len`` the buffer is allocated once, zero-filled, with ``max_len + 1`` slots, and never
    grows (more tokens raise a ValueError). An eager step (``append``) then attends to the filled
    slots only, O(pos d). Under ``torch.compile``, or with ``static=True``, a one-token step
    (``step``) keeps one static shape instead (the gpt-fast pattern): it writes the token at slot
    ``pos`` (a tensor) and also at the last slot, and attends to the whole buffer with the key mask
    ``[slots < pos (and real) | the last slot]``. The query is thereby bottom-right aligned with its
    own key, as every op here expects (``causal_softmax_attention``, Hopfield's retrieval), so the
    ops run unchanged; that step costs O(max_len d), the price of the static shape.
    Without ``max_len`` the buffer grows by 25% when full, so appending a token copies O(d) amortised
    instead of re-concatenating the whole prefix, and a prefill of n tokens leaves room for n/4
    decode steps before the first regrowth. ``key_mask`` stays None until some token is padding.
    """

    def __init__(self, batch_size: int, device=None, dtype=None, max_len: Optional[int] = None,
                 static: bool = False):
        self.batch_size, self.device, self.dtype, self.max_len = batch_size, device, dtype, max_len
        self.static = bool(static)      # one-token steps take the shape-static ``step`` even eagerly
        self.k = self.v = None          # (b, h, capacity, d)
        self.key_mask = None            # (b, capacity) bool, or None while every token is real
        self.length = 0                 # tokens held (multi-token calls slice with it)
        self.pos = None                 # with max_len: () long on the device, the same count for the step

    def _reserve(self, k: torch.Tensor, v: torch.Tensor, m: int) -> int:
        """Check the batch and max_len, make room for ``m`` more tokens; returns the new length."""
        b, h, _, d = k.shape
        if b != self.batch_size:
            raise ValueError(f"cache was made for batch_size={self.batch_size}, got {b}")
        need = self.length + m
        if exists(self.max_len) and need > self.max_len:
            raise ValueError(f"the cache was made for max_len={self.max_len} tokens; this call reaches {need}")
        if exists(self.max_len) and self.k is None:
            # zeros, not empty: a masked slot still enters softmax(...) @ V with weight 0, and 0 * NaN
            cap = self.max_len + 1
            self.k, self.v = k.new_zeros(b, h, cap, d), v.new_zeros(b, h, cap, v.shape[-1])
            self.pos = torch.full((), self.length, dtype=torch.long, device=k.device)
        elif self.k is None or need > self.k.shape[-2]:
            cap = max(need + need // 4, 16)
            new_k, new_v = k.new_empty(b, h, cap, d), v.new_empty(b, h, cap, v.shape[-1])
            if self.k is not None:
                new_k[:, :, :self.length] = self.k[:, :, :self.length]
                new_v[:, :, :self.length] = self.v[:, :, :self.length]
            if self.key_mask is not None:
                new_mask = torch.ones(b, cap, dtype=torch.bool, device=k.device)
                new_mask[:, :self.length] = self.key_mask[:, :self.length]
                self.key_mask = new_mask
            self.k, self.v = new_k, new_v
        if exists(self.pos):
            self.pos += m
        return need

    def append(self, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]):
        """Add this call's (b, h, m, d) keys/values; return views of all (b, h, n, d) and the (b, n) mask."""
        b, m = k.shape[0], k.shape[2]
        start, need = self.length, self._reserve(k, v, m)
        self.k[:, :, start:need] = k
        self.v[:, :, start:need] = v
        if exists(mask) and self.key_mask is None:
            self.key_mask = torch.ones(b, self.k.shape[-2], dtype=torch.bool, device=k.device)
        if self.key_mask is not None:
            self.key_mask[:, start:need] = mask if exists(mask) else True
        self.length = need
        key_mask = self.key_mask[:, :need] if self.key_mask is not None else None
        return self.k[:, :, :need], self.v[:, :, :need], key_mask

    def step(self, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]):
        """One token into the ``max_len`` buffer, with no Python int in the graph: returns the whole
        (b, h, max_len + 1, d) buffers and their (b, max_len + 1) key mask (see the class docstring)."""
        b = k.shape[0]
        self._reserve(k, v, 1)
        at = (self.pos - 1).view(1)                                            # (1,) this token's slot
        self.k.index_copy_(2, at, k)                                           # history, for later steps
        self.v.index_copy_(2, at, v)
        self.k[:, :, -1:] = k                                                  # the query's own key, last
        self.v[:, :, -1:] = v
        if exists(mask) and self.key_mask is None:
            self.key_mask = torch.ones(b, self.k.shape[-2], dtype=torch.bool, device=k.device)
        real = mask.bool() if exists(mask) else torch.ones(b, 1, dtype=torch.bool, device=k.device)
        if self.key_mask is not None:
            self.key_mask.index_copy_(1, at, real)
        self.length += 1
        before = torch.arange(self.max_len, device=k.device) < at            # (max_len,) slots < pos
        hist = before if self.key_mask is None else self.key_mask[:, :-1] & before
        return self.k, self.v, torch.cat([hist.expand(b, -1), real], dim=1)  # (b, max_len + 1)


# ----------------------------------------------------------------------------- mixer


class StandardAttention(TokenMixer):
    """Multi-head causal softmax attention with fused QKV and output projections (nanoGPT layout).

    ``dropout`` is on the attention probabilities (training only); the residual dropout of the
    mixer's output belongs to the shell's block.
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.head_dim = check_heads(hidden_dim, num_heads)
        check_dropout(dropout)
        self.hidden_dim, self.num_heads, self.dropout = hidden_dim, num_heads, float(dropout)
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim, bias=bias)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def state_bytes(self, n: int) -> int:
        """Bytes this layer's growing KV cache holds after a prefill of ``n`` tokens (batch 1,
        float32): K and V of every token, in a buffer of n + n/4 slots (at least 16)."""
        return 4 * 2 * self.num_heads * max(n + n // 4, 16) * self.head_dim

    def op_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (b, n, D)
        h = self.num_heads
        return split_heads(q, h), split_heads(k, h), split_heads(v, h)  # 3 x (b, h, n, d)

    def op(self, q, k, v, *, mask=None):
        return causal_softmax_unchecked(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None):
        q, k, v = self.op_inputs(x, mask)  # (b, h, m, d) each
        if exists(cache):
            # the new queries attend to the whole cached prefix plus themselves; nothing is recomputed
            k, v, mask = (cache.step if static_step(cache, q.shape[-2]) else cache.append)(k, v, mask)
        return self.output(self.op(q, k, v, mask=mask), x)  # (b, m, D)

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: Optional[int] = None,
                   static: bool = False) -> KVCache:
        return KVCache(batch_size, device, dtype, max_len, static)


def static_step(cache: KVCache, m: int) -> bool:
    """Whether ``m`` new tokens take the shape-static one-token step over the whole ``max_len``
    buffer: under ``torch.compile`` or when the cache was made ``static``; otherwise (eager) the
    step attends to the filled slots only."""
    return m == 1 and exists(cache.max_len) and (cache.static or torch.compiler.is_compiling())


# ----------------------------------------------------------------------------- model


class StandardTransformerModel(CausalLM):
    """Decoder-only transformer with causal softmax attention (the quadratic baseline).

    ``dropout`` is used by the shell (embeddings, residual, FFN) and on the attention probabilities.
    """

    mixer_class = StandardAttention

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, **shell_kwargs):
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: StandardAttention(hidden_dim, num_heads, dropout),
                         **shell_kwargs)
