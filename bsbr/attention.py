"""BSBRAttention: the layer (projections, chunk summaries, meta projections) around the pure op in
:mod:`bsbr.ops`, and its parallel form. Continuing a cached sequence is :mod:`bsbr.decode`.

Axis legend: b batch, n tokens, D hidden, h heads, d head size, c chunk, C chunks, e = d / f.

Chunk summary: ``s_j`` is the mean of the layer input over chunk j's real tokens. The meta key of
chunk j is ``h_j = W_H s_j``; the meta query of chunk i is ``r_i = W_R s_{i-1}``, so every token
of chunk i (its first included) retrieves with information from before ``i * c`` only.

Compression (``compression_factor = f``): a learned per-head map ``A: d -> d/f`` applied to keys
before the chunk states are formed and to queries before read-out, so each chunk state is
``(d/f) x d`` instead of ``d x d``: state memory, mixing and read-out FLOPs all divide by f.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .checks import check_dropout, check_float, check_heads, check_positive_int
from .decode import BSBRCache, BSBRStaticCache, forward_cached
from .mixer import TokenMixer, split_heads
from .ops import bsbr_attention_unchecked, chunk_summaries, default_gamma


class BSBRAttention(TokenMixer):
    """Block Sparse attention with Block Retrieval (README.md, "What BSBR computes").

    Args:
        hidden_dim: model width D.
        num_heads: heads h; D must be divisible by h.
        chunk_size: tokens per chunk c (> 0).
        dropout: kept in the earlier package's fourth positional slot and validated, but the mixer applies no
            dropout: the residual dropout of its output belongs to the block (``BSBRLayer``,
            ``BSBRModel``), as for every mixer here. A value > 0 raises a warning saying so.
        compression_factor: f dividing the head size d; chunk states become (d/f) x d. None = no compression.
        chunk_overlap: o in [0, chunk_size]; each chunk's local window reaches o tokens back.
        bias: biases on the q/k/v/out and meta projections (GPT-2 has them).
        gamma: retrieval scale; default 1 / (c sqrt(d/f)) (see :mod:`bsbr.ops`).
    """

    # as BSBRModel builds it: dropout is the block's (residual), not the mixer's
    config_fields = ("hidden_dim", "num_heads", "chunk_size", "compression_factor", "chunk_overlap")

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, dropout: float = 0.0,
                 compression_factor: Optional[int] = None, chunk_overlap: int = 0, bias: bool = True,
                 gamma: Optional[float] = None):
        super().__init__()
        d = check_heads(hidden_dim, num_heads)
        check_positive_int("chunk_size", chunk_size)
        check_dropout(dropout)
        if dropout > 0:
            warnings.warn("BSBRAttention applies no dropout to its output (dropout=%r is ignored); residual "
                          "dropout belongs to the block: use BSBRLayer or BSBRModel" % (dropout,), stacklevel=2)
        check_positive_int("chunk_overlap", chunk_overlap, allow_zero=True)
        if chunk_overlap > chunk_size:
            raise ValueError(f"chunk_overlap must be in [0, chunk_size={chunk_size}], got {chunk_overlap}")
        if compression_factor is not None:
            check_positive_int("compression_factor", compression_factor)
            if d % compression_factor:
                raise ValueError(f"compression_factor ({compression_factor}) must divide the head size "
                                 f"hidden_dim/num_heads = {d}")
        check_float("gamma", gamma, allow_none=True, note=" for 1 / (chunk_size sqrt(head_dim / compression))")
        self.hidden_dim, self.num_heads, self.head_dim = hidden_dim, num_heads, d
        self.chunk_size, self.chunk_overlap = chunk_size, chunk_overlap
        self.compression_factor = compression_factor
        self.key_dim = d // (compression_factor or 1)
        self.gamma = default_gamma(chunk_size, self.key_dim) if gamma is None else float(gamma)

        self.q_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.meta_query = nn.Linear(hidden_dim, hidden_dim, bias=bias)  # r_i = W_R s_{i-1}
        self.meta_key = nn.Linear(hidden_dim, hidden_dim, bias=bias)    # h_j = W_H s_j
        if compression_factor:
            # orthonormal columns: at init A^T A = I, so (A^T q).(A^T k) is a projection of q.k
            a = torch.empty(num_heads, d, self.key_dim)
            for i in range(num_heads):
                nn.init.orthogonal_(a[i])
            self.compress = nn.Parameter(a)
        else:
            self.register_parameter("compress", None)

    # ---- the op-level interface ---------------------------------------------------------------

    def meta_qk(self, s_prev: torch.Tensor, s: torch.Tensor):
        """(b, C, D) summaries -> r, h per head: (b, h, C, d)."""
        return split_heads(self.meta_query(s_prev), self.num_heads), split_heads(self.meta_key(s), self.num_heads)

    def state_bytes(self, n: int) -> int:
        """Bytes this layer's growing cache holds after a prefill of ``n`` tokens (batch 1, float32):
        per completed chunk one (d/f) x d state and one meta key per head and a validity flag, the
        running summary (D); for an open chunk of r tokens its K, V and input x and its state S."""
        h, d, dk, D = self.num_heads, self.head_dim, self.key_dim, self.hidden_dim
        done, r = divmod(n, self.chunk_size)
        nbytes = 4 * (h * done * dk * d + h * done * d + D) + done
        if r:
            nbytes += 4 * (2 * h * r * d + r * D + h * dk * d) + r
        return nbytes

    def op_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, key=None, value=None,
                  prev_summary: Optional[torch.Tensor] = None):
        """Per-head positional inputs of the pure op: (q, k, v, r, h). The mask is not among them
        (pass it to ``op`` as ``mask=``), but it shapes r and h: summaries average real tokens only."""
        key = x if key is None else key
        value = key if value is None else value
        # head-major contiguous copies: the op's chunk reshapes are then free views (a strided
        # view would be copied inside the op instead, ~30% of its time at 16k tokens)
        q = split_heads(self.q_proj(x), self.num_heads).contiguous()  # (b, h, n, d)
        k = split_heads(self.k_proj(key), self.num_heads).contiguous()
        v = split_heads(self.v_proj(value), self.num_heads).contiguous()
        s = chunk_summaries(key, mask, self.chunk_size)  # (b, C, D)
        first = torch.zeros_like(s[:, :1]) if prev_summary is None else prev_summary[:, None]
        r, hk = self.meta_qk(torch.cat([first, s[:, :-1]], dim=1), s)
        return q, k, v, r, hk

    def op(self, q, k, v, r, hk, *, mask=None, **kw):
        # below the edge: op_inputs built these, so bsbr_attention's checks would only repeat
        return bsbr_attention_unchecked(q, k, v, r, hk, chunk_size=self.chunk_size, overlap=self.chunk_overlap,
                              mask=mask, compress=self.compress, gamma=self.gamma, **kw)

    # ---- module forward -----------------------------------------------------------------------

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, cache: Optional[BSBRCache] = None, **kwargs) -> torch.Tensor:
        """Self-attention when key/value are omitted. query/key/value: (b, n, D); mask: (b, n), 1 = real.

        With ``cache`` (self-attention only) the call continues the cached sequence, updating it.
        The public edge: the arguments are checked here, once; the block calls :meth:`mix`.
        """
        if kwargs:
            raise ValueError(f"unexpected keyword argument(s) {sorted(kwargs)}; valid: key, value, mask, cache")
        if query.dim() != 3 or query.shape[-1] != self.hidden_dim:
            raise ValueError(f"query must have shape (batch, seq_len, {self.hidden_dim}), got {tuple(query.shape)}")
        for name, t in (("key", key), ("value", value)):
            if t is not None and t.shape != query.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal query shape {tuple(query.shape)}")
        if mask is not None:
            if mask.shape != query.shape[:2]:
                raise ValueError(f"mask shape {tuple(mask.shape)} must be (batch, seq_len) = {tuple(query.shape[:2])}")
            mask = mask != 0
        if cache is not None and (key is not None or value is not None):
            raise ValueError("cache is supported for self-attention only (pass key=value=None)")
        return self.mix(query, mask, cache, key, value)

    def mix(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache=None, key=None, value=None):
        """:meth:`forward` without its checks (the block's entry: its inputs are right by
        construction, a bool mask or None)."""
        if cache is None:
            o = bsbr_attention_unchecked(*self.op_inputs(x, mask, key, value), chunk_size=self.chunk_size,
                                         overlap=self.chunk_overlap, mask=mask, compress=self.compress,
                                         gamma=self.gamma)
        else:
            o = forward_cached(self, x, mask, cache)
        return self.output(o, x)  # (b, n, D); no dropout here: the block owns it

    # ---- decoding (bsbr.decode) ---------------------------------------------------------------

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len=None,
                   static: bool = False) -> BSBRCache | BSBRStaticCache:
        """``max_len=None``: a ``BSBRCache`` that grows by one chunk state per completed chunk, for
        eager streaming of unknown length. ``max_len``: a ``BSBRStaticCache`` for at most that many
        tokens, allocated once (more tokens raise a ValueError); ``static``: see ``BSBRStaticCache``."""
        if max_len is None:
            return BSBRCache.empty(self, batch_size, device, dtype)
        return BSBRStaticCache.empty(self, batch_size, device, dtype, max_len, static)
