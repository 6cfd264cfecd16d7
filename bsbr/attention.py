"""BSBRAttention: projections, chunk summaries, meta projections and the decoding cache around
the pure op in :mod:`bsbr.ops`.

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
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .ops import BSBRPast, bsbr_attention, bsbr_open_chunk, default_gamma
from .shell import TokenMixer, check_dropout, check_heads, check_positive_int, split_heads


@dataclass
class BSBRCache:
    """Per-layer decoding state. Memory grows with the number of chunks, not tokens.

    F (b,h,P,e,d), hk (b,h,P,d), valid (b,P): completed chunks' states and meta keys.
    last_summary (b,D): summary of the last completed chunk (source of the next meta query).
    tail_k/tail_v (b,h,o',d), tail_m (b,o'): the previous chunk's last `overlap` tokens.
    cur_k/cur_v (b,h,L,d), cur_m (b,L), cur_x (b,L,D): the open chunk (L < c tokens).
    S (b,h,e,d) or None: the open chunk's retrieval state, computed once when it opens.
    """

    F: torch.Tensor
    hk: torch.Tensor
    valid: torch.Tensor
    last_summary: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    tail_m: torch.Tensor
    cur_k: torch.Tensor
    cur_v: torch.Tensor
    cur_m: torch.Tensor
    cur_x: torch.Tensor
    S: Optional[torch.Tensor] = None

    @property
    def cur_len(self) -> int:
        return self.cur_k.shape[2]


def _own(*ts):
    """Contiguous copies, so that what the cache keeps holds no reference to larger tensors."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in ts)


def chunk_summaries(x: torch.Tensor, mask: Optional[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Mean of x over each chunk's real tokens: (b, n, D) -> (b, C, D); 0 for an all-padding chunk."""
    b, n, D = x.shape
    C = -(-n // chunk_size)
    pad = C * chunk_size - n
    w = torch.ones(b, n, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad))
        w = nn.functional.pad(w, (0, pad))
    x = x.view(b, C, chunk_size, D)
    w = w.view(b, C, chunk_size, 1)
    return (x * w).sum(2) / w.sum(2).clamp_min(1.0)


class BSBRAttention(TokenMixer):
    """Block Sparse attention with Block Retrieval (design/architectures.md s.1).

    Args:
        hidden_dim: model width D.
        num_heads: heads h; D must be divisible by h.
        chunk_size: tokens per chunk c (> 0).
        dropout: kept in the seed's fourth positional slot and validated, but the mixer applies no
            dropout: the residual dropout of its output belongs to the block (``BSBRLayer``,
            ``BSBRModel``), as for every mixer here. A value > 0 raises a warning saying so.
        compression_factor: f dividing the head size d; chunk states become (d/f) x d. None = no compression.
        chunk_overlap: o in [0, chunk_size]; each chunk's local window reaches o tokens back.
        bias: biases on the q/k/v/out and meta projections (GPT-2 has them).
        gamma: retrieval scale; default 1 / (c sqrt(d/f)) (see :mod:`bsbr.ops`).
    """

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
        if gamma is not None and not (isinstance(gamma, (int, float)) and gamma > 0):
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
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

    def _meta(self, s_prev: torch.Tensor, s: torch.Tensor):
        """(b, C, D) summaries -> r, h per head: (b, h, C, d)."""
        return split_heads(self.meta_query(s_prev), self.num_heads), split_heads(self.meta_key(s), self.num_heads)

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
        r, hk = self._meta(torch.cat([first, s[:, :-1]], dim=1), s)
        return q, k, v, r, hk

    def op(self, q, k, v, r, hk, *, mask=None, **kw):
        return bsbr_attention(q, k, v, r, hk, chunk_size=self.chunk_size, overlap=self.chunk_overlap,
                              mask=mask, compress=self.compress, gamma=self.gamma, **kw)

    # ---- module forward -----------------------------------------------------------------------

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, cache: Optional[BSBRCache] = None, **kwargs) -> torch.Tensor:
        """Self-attention when key/value are omitted. query/key/value: (b, n, D); mask: (b, n), 1 = real.

        With ``cache`` (self-attention only) the call continues the cached sequence, updating it.
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
        if cache is not None:
            if key is not None or value is not None:
                raise ValueError("cache is supported for self-attention only (pass key=value=None)")
            o = self._forward_cached(query, mask, cache)
        else:
            o = self.op(*self.op_inputs(query, mask, key, value), mask=mask)
        return self.output(o, query)  # (b, n, D); no dropout here: the block owns it

    # ---- decoding -----------------------------------------------------------------------------

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len=None) -> BSBRCache:
        b, h, d, e, D = batch_size, self.num_heads, self.head_dim, self.key_dim, self.hidden_dim
        z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        nb = lambda *s: torch.zeros(*s, device=device, dtype=torch.bool)  # noqa: E731
        return BSBRCache(F=z(b, h, 0, e, d), hk=z(b, h, 0, d), valid=nb(b, 0), last_summary=z(b, D),
                         tail_k=z(b, h, 0, d), tail_v=z(b, h, 0, d), tail_m=nb(b, 0),
                         cur_k=z(b, h, 0, d), cur_v=z(b, h, 0, d), cur_m=nb(b, 0), cur_x=z(b, 0, D))

    def _close_chunk(self, cache: BSBRCache) -> None:
        """The open chunk is full: fold it into a state, a meta key and a summary; keep its tail."""
        c, o = self.chunk_size, self.chunk_overlap
        m = cache.cur_m
        k = cache.cur_k
        if self.compress is not None:
            k = torch.einsum("bhnd,hde->bhne", k, self.compress)
        k = k * m[:, None, :, None].to(k.dtype)
        Fj = k.transpose(-1, -2) @ cache.cur_v  # (b, h, e, d)
        s = chunk_summaries(cache.cur_x, m, c)[:, 0]  # (b, D)
        hk = split_heads(self.meta_key(s)[:, None], self.num_heads)[:, :, 0]  # (b, h, d)
        cache.F = torch.cat([cache.F, Fj[:, :, None]], dim=2)
        cache.hk = torch.cat([cache.hk, hk[:, :, None]], dim=2)
        cache.valid = torch.cat([cache.valid, m.any(-1, keepdim=True)], dim=1)
        cache.last_summary = s
        cache.tail_k, cache.tail_v, cache.tail_m = _own(cache.cur_k[:, :, c - o:], cache.cur_v[:, :, c - o:], m[:, c - o:])
        cache.cur_k, cache.cur_v, cache.cur_m, cache.cur_x = _own(cache.cur_k[:, :, :0], cache.cur_v[:, :, :0],
                                                                  m[:, :0], cache.cur_x[:, :0])
        cache.S = None

    def _forward_cached(self, x: torch.Tensor, mask: Optional[torch.Tensor], cache: BSBRCache) -> torch.Tensor:
        b, n, _ = x.shape
        c, o = self.chunk_size, self.chunk_overlap
        m = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        q = split_heads(self.q_proj(x), self.num_heads)  # (b, h, n, d)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        outs = []
        i0 = 0
        if cache.cur_len:  # 1) finish the open chunk: attend to [tail | chunk so far | new], add q S
            L = cache.cur_len
            t = min(c - L, n)
            cache.cur_k = torch.cat([cache.cur_k, k[:, :, :t]], dim=2)
            cache.cur_v = torch.cat([cache.cur_v, v[:, :, :t]], dim=2)
            cache.cur_m = torch.cat([cache.cur_m, m[:, :t]], dim=1)
            cache.cur_x = torch.cat([cache.cur_x, x[:, :t]], dim=1)
            T = cache.tail_k.shape[2]
            ctx_k = torch.cat([cache.tail_k, cache.cur_k], dim=2)
            ctx_v = torch.cat([cache.tail_v, cache.cur_v], dim=2)
            ctx_m = torch.cat([cache.tail_m, cache.cur_m], dim=1)
            outs.append(bsbr_open_chunk(q[:, :, :t], ctx_k, ctx_v, ctx_m, T + L, cache.S, self.compress, self.gamma))
            i0 = t
            if cache.cur_len == c:
                self._close_chunk(cache)
        if i0 < n:  # 2) the rest starts on a chunk boundary: the chunkwise-parallel op with the past
            xs, ms = x[:, i0:], (None if mask is None else m[:, i0:])
            s = chunk_summaries(xs, ms, c)  # (b, C, D)
            first = cache.last_summary[:, None] if cache.F.shape[2] else torch.zeros_like(s[:, :1])
            r, hk = self._meta(torch.cat([first, s[:, :-1]], dim=1), s)
            past = BSBRPast(cache.F, cache.hk, cache.valid, cache.tail_k, cache.tail_v, cache.tail_m)
            out, st = self.op(q[:, :, i0:], k[:, :, i0:], v[:, :, i0:], r, hk, mask=ms, past=past, return_states=True)
            outs.append(out)
            rest = n - i0
            full, rem = divmod(rest, c)
            ks, vs, mm = k[:, :, i0:], v[:, :, i0:], m[:, i0:]
            if full:
                cache.F = torch.cat([cache.F, st["F"][:, :, :full]], dim=2)
                cache.hk = torch.cat([cache.hk, hk[:, :, :full]], dim=2)
                cache.valid = torch.cat([cache.valid, st["valid"][:, :full]], dim=1)
                cache.last_summary = s[:, full - 1].clone()
                end = full * c
                cache.tail_k, cache.tail_v, cache.tail_m = _own(ks[:, :, end - o:end], vs[:, :, end - o:end],
                                                                mm[:, end - o:end])
            # copies, not views: a view would pin the whole call's activations in the cache
            cache.cur_k, cache.cur_v, cache.cur_m, cache.cur_x = _own(ks[:, :, full * c:], vs[:, :, full * c:],
                                                                      mm[:, full * c:], xs[:, full * c:])
            cache.S = st["S"][:, :, full].clone() if rem else None
        return torch.cat(outs, dim=2)  # (b, h, n, d)
