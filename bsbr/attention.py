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

from . import sizing
from .ops import (BSBRPast, bsbr_attention_unchecked, bsbr_open_chunk, chunk_states, chunk_summaries, default_gamma,
                  retrieval_weights)
from .checks import check_dropout, check_float, check_heads, check_positive_int
from .mixer import TokenMixer, split_heads


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


@dataclass
class BSBRStaticCache:
    """Per-layer decoding state for at most ``max_len`` tokens, allocated once (the gpt-fast
    ``KVCache`` pattern): no tensor ever changes shape, so a compiled one-token step is one graph
    and can be captured as a CUDA graph. ``init_cache(..., max_len)`` makes it.

    P = ceil(max_len / c) chunk slots; a slot not yet filled has ``valid`` False, so retrieval
    never sees it. acc = ``sizing.acc_dtype`` (fp32 for half-precision inputs).
    F (b,h,P,e,d) acc, hk (b,h,P,d), valid (b,P): completed chunks' states and meta keys.
    last_summary (b,D): summary of the last completed chunk (zeros before the first).
    k/v (b,h,o+c',d), m (b,o+c'): the open chunk's context, [previous chunk's last o tokens | the
    chunk's c' = min(c, max_len) rows]; rows past the current token are stale and never attended to.
    x (b,c',D): the open chunk's layer inputs (its summary at close).
    S (b,h,e,d) acc: the open chunk's retrieval state, always current (zeros with no past).
    pos () long: tokens seen, as a tensor (the one-token step reads only this);
    length: the same count as a Python int, for multi-token calls, the eager step and the max_len check.
    static: eager one-token steps also take the shape-static form (for CUDA-graph capture by
    hand); under ``torch.compile`` they always do. Otherwise an eager step reads only the filled
    slots, so it costs O(filled chunks), not O(max_len / c) (docs/decoding.md).
    """

    F: torch.Tensor
    hk: torch.Tensor
    valid: torch.Tensor
    last_summary: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    m: torch.Tensor
    x: torch.Tensor
    S: torch.Tensor
    pos: torch.Tensor
    max_len: int
    length: int = 0
    static: bool = False  # one-token steps take the shape-static form even in eager mode


def _own(*ts):
    """Contiguous copies, so that what the cache keeps holds no reference to larger tensors."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in ts)


class BSBRAttention(TokenMixer):
    """Block Sparse attention with Block Retrieval (README.md, "What BSBR computes").

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
        elif isinstance(cache, BSBRStaticCache):
            o = self._forward_static(x, mask, cache)
        else:
            o = self._forward_cached(x, mask, cache)
        return self.output(o, x)  # (b, n, D); no dropout here: the block owns it

    # ---- decoding -----------------------------------------------------------------------------

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len=None, static: bool = False):
        """``max_len=None``: a ``BSBRCache`` that grows by one chunk state per completed chunk, for
        eager streaming of unknown length. ``max_len``: a ``BSBRStaticCache`` for at most that many
        tokens, allocated once (more tokens raise a ValueError); ``static``: see ``BSBRStaticCache``."""
        b, h, d, e, D = batch_size, self.num_heads, self.head_dim, self.key_dim, self.hidden_dim
        if max_len is not None:
            cache = self._init_static_cache(b, device, dtype, max_len)
            cache.static = bool(static)
            return cache
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

    # ---- decoding into the preallocated cache (max_len) ---------------------------------------

    def _init_static_cache(self, b: int, device, dtype, max_len: int) -> BSBRStaticCache:
        h, d, e, D = self.num_heads, self.head_dim, self.key_dim, self.hidden_dim
        c, o = self.chunk_size, self.chunk_overlap
        dtype = torch.get_default_dtype() if dtype is None else dtype
        acc = sizing.acc_dtype(dtype)
        P = -(-max_len // c)
        rows = min(c, max_len)  # the open chunk's rows: a chunk longer than max_len never fills
        z = lambda *s, dt=dtype: torch.zeros(*s, device=device, dtype=dt)  # noqa: E731
        return BSBRStaticCache(F=z(b, h, P, e, d, dt=acc), hk=z(b, h, P, d), valid=z(b, P, dt=torch.bool),
                               last_summary=z(b, D), k=z(b, h, o + rows, d), v=z(b, h, o + rows, d),
                               m=z(b, o + rows, dt=torch.bool), x=z(b, rows, D), S=z(b, h, e, d, dt=acc),
                               pos=z((), dt=torch.long), max_len=max_len)

    def _open_state(self, cache: BSBRStaticCache, filled: Optional[int] = None) -> torch.Tensor:
        """S of the chunk that opens after the last completed one: its meta query (from that
        chunk's summary) retrieves over the valid slots. (b, h, e, d) in the accumulation dtype.
        ``filled``: read only the first ``filled`` slots (eager: O(filled)); None: every slot (static)."""
        b, h, P, e, d = cache.F.shape
        P = P if filled is None else filled
        F, hk, valid = cache.F[:, :, :P], cache.hk[:, :, :P], cache.valid[:, :P]
        r = split_heads(self.meta_query(cache.last_summary)[:, None], h)    # (b, h, 1, d)
        w = retrieval_weights(r, hk, valid, P)                              # (b, h, 1, P)
        return (w.to(F.dtype) @ F.flatten(-2)).view(b, h, e, d)

    def _fold(self, cache: BSBRStaticCache):
        """The open chunk's state (b, h, 1, e, d), meta key (b, h, 1, d), validity (b, 1), summary (b, D)."""
        o, rows = self.chunk_overlap, cache.x.shape[1]                      # rows = min(c, max_len)
        cm = cache.m[:, o:]                                                  # (b, rows)
        Fj = chunk_states(cache.k[:, :, o:], cache.v[:, :, o:], rows, cm, self.compress)  # (b, h, 1, e, d)
        s = chunk_summaries(cache.x, cm, rows)[:, 0]                         # (b, D)
        hkj = split_heads(self.meta_key(s)[:, None], self.num_heads)        # (b, h, 1, d)
        return Fj.to(cache.F.dtype), hkj, cm.any(-1, keepdim=True), s

    def _close_eager(self, cache: BSBRStaticCache, j: int) -> None:
        """The open chunk is complete (known in Python): fold it into slot ``j``, keep its last o
        tokens as the next tail, and make the next chunk's S over the j + 1 filled slots only."""
        c, o = self.chunk_size, self.chunk_overlap
        Fj, hkj, valid, s = self._fold(cache)
        cache.F[:, :, j:j + 1] = Fj
        cache.hk[:, :, j:j + 1] = hkj
        cache.valid[:, j:j + 1] = valid
        cache.last_summary.copy_(s)
        if o:  # the chunk's last o tokens (slots c .. c+o-1) become the tail (slots 0 .. o-1)
            cache.k[:, :, :o] = cache.k[:, :, c:]
            cache.v[:, :, :o] = cache.v[:, :, c:]
            cache.m[:, :o] = cache.m[:, c:]
        cache.S.copy_(self._open_state(cache, j + 1))

    def _close_static(self, cache: BSBRStaticCache, j: torch.Tensor, full: torch.Tensor) -> None:
        """:meth:`_close_eager` with no branch on a value: slot ``j`` (1,) long, and every write
        kept only where ``full`` (1,) bool is True (``torch.where``), so one graph serves every step."""
        c, o = self.chunk_size, self.chunk_overlap
        keep = lambda new, old: torch.where(full, new, old)  # noqa: E731
        Fj, hkj, valid, s = self._fold(cache)
        cache.F.index_copy_(2, j, keep(Fj, cache.F.index_select(2, j)))
        cache.hk.index_copy_(2, j, keep(hkj, cache.hk.index_select(2, j)))
        cache.valid.index_copy_(1, j, keep(valid, cache.valid.index_select(1, j)))
        cache.last_summary.copy_(keep(s, cache.last_summary))
        if o:
            cache.k[:, :, :o] = keep(cache.k[:, :, c:], cache.k[:, :, :o])
            cache.v[:, :, :o] = keep(cache.v[:, :, c:], cache.v[:, :, :o])
            cache.m[:, :o] = keep(cache.m[:, c:], cache.m[:, :o])
        cache.S.copy_(keep(self._open_state(cache), cache.S))

    def _step_static(self, cache: BSBRStaticCache, x, m, q, k, v) -> torch.Tensor:
        """One token, shape-static and with no Python branch on a value: write its row at
        ``r = pos % c`` (context slot o + r), attend to the slots up to it plus ``q S``, then fold the
        chunk when r = c - 1 (a where). The fold (state, summary, meta key, the next S over all
        P slots) is computed every step: O(c e d + P e d) per token, the price of one static graph.
        Taken under ``torch.compile`` and for a cache made with ``static=True``."""
        c, o = self.chunk_size, self.chunk_overlap
        m = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device) if m is None else m
        r = cache.pos.remainder(c).view(1)                                  # (1,) long
        slot = r + o
        cache.k.index_copy_(2, slot, k)                                     # (b, h, o + c, d)
        cache.v.index_copy_(2, slot, v)
        cache.m.index_copy_(1, slot, m)                                     # (b, o + c)
        cache.x.index_copy_(1, r, x)                                        # (b, c, D)
        out = bsbr_open_chunk(q, cache.k, cache.v, cache.m, slot, cache.S, self.compress, self.gamma)
        j = cache.pos.div(c, rounding_mode="floor").view(1).clamp(max=cache.F.shape[2] - 1)  # (1,) chunk slot
        self._close_static(cache, j, r == c - 1)
        return out                                                          # (b, h, 1, d)

    def _step_eager(self, cache: BSBRStaticCache, x, m, q, k, v) -> torch.Tensor:
        """One token, eager: positions from the host-side ``cache.length``, so the step reads the
        open chunk's filled slots only and folds (over the filled chunk slots only) only when the
        chunk completes. Its work does not depend on ``max_len`` (tests/test_decode_cost.py)."""
        c, o = self.chunk_size, self.chunk_overlap
        j, r = divmod(cache.length, c)
        slot = o + r
        cache.k[:, :, slot:slot + 1] = k
        cache.v[:, :, slot:slot + 1] = v
        cache.m[:, slot:slot + 1] = True if m is None else m
        cache.x[:, r:r + 1] = x
        e = slot + 1
        out = bsbr_open_chunk(q, cache.k[:, :, :e], cache.v[:, :, :e], cache.m[:, :e], slot, cache.S,
                              self.compress, self.gamma)
        if r == c - 1:
            self._close_eager(cache, j)
        return out                                                          # (b, h, 1, d)

    def _forward_static(self, x: torch.Tensor, mask: Optional[torch.Tensor], cache: BSBRStaticCache) -> torch.Tensor:
        b, n, _ = x.shape
        if cache.length + n > cache.max_len:
            raise ValueError(f"the cache was made for max_len={cache.max_len} tokens; this call reaches "
                             f"{cache.length + n}")
        q = split_heads(self.q_proj(x), self.num_heads)  # (b, h, n, d)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        if n > 1:
            out = self._piece_static(cache, x, mask, q, k, v)
        elif cache.static or torch.compiler.is_compiling():
            out = self._step_static(cache, x, mask, q, k, v)
        else:
            out = self._step_eager(cache, x, mask, q, k, v)
        cache.length += n
        cache.pos += n
        return out

    def _piece_static(self, cache: BSBRStaticCache, x, mask, q, k, v) -> torch.Tensor:
        """Several tokens (a prefill): the open chunk's part through the open-chunk form, the rest
        from a chunk boundary through the chunkwise-parallel op with the cached past; positions
        come from the Python count ``length``, so nothing here reads a tensor's value."""
        n = x.shape[1]
        c, o = self.chunk_size, self.chunk_overlap
        m = torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device) if mask is None else mask
        P, L = divmod(cache.length, c)  # completed chunks, tokens in the open chunk
        outs, i0 = [], 0
        if L:  # 1) finish the open chunk
            t = min(c - L, n)
            cache.k[:, :, o + L:o + L + t] = k[:, :, :t]
            cache.v[:, :, o + L:o + L + t] = v[:, :, :t]
            cache.m[:, o + L:o + L + t] = m[:, :t]
            cache.x[:, L:L + t] = x[:, :t]
            e = o + L + t
            outs.append(bsbr_open_chunk(q[:, :, :t], cache.k[:, :, :e], cache.v[:, :, :e], cache.m[:, :e], o + L,
                                        cache.S, self.compress, self.gamma))
            i0 = t
            if L + t == c:
                self._close_eager(cache, P)
                P += 1
        if i0 < n:  # 2) the rest starts on a chunk boundary
            xs, ms = x[:, i0:], (None if mask is None else m[:, i0:])
            ks, vs, mm = k[:, :, i0:], v[:, :, i0:], m[:, i0:]
            s = chunk_summaries(xs, ms, c)  # (b, C, D)
            r, hk = self._meta(torch.cat([cache.last_summary[:, None], s[:, :-1]], dim=1), s)
            past = BSBRPast(cache.F[:, :, :P], cache.hk[:, :, :P], cache.valid[:, :P],
                            cache.k[:, :, :o], cache.v[:, :, :o], cache.m[:, :o])
            out, st = self.op(q[:, :, i0:], ks, vs, r, hk, mask=ms, past=past, return_states=True)
            outs.append(out)
            full, rem = divmod(n - i0, c)
            if full:
                cache.F[:, :, P:P + full] = st["F"][:, :, :full]
                cache.hk[:, :, P:P + full] = hk[:, :, :full]
                cache.valid[:, P:P + full] = st["valid"][:, :full]
                cache.last_summary.copy_(s[:, full - 1])
                end = full * c
                if o:
                    cache.k[:, :, :o], cache.v[:, :, :o] = ks[:, :, end - o:end], vs[:, :, end - o:end]
                    cache.m[:, :o] = mm[:, end - o:end]
            if rem:
                cache.k[:, :, o:o + rem] = ks[:, :, full * c:]
                cache.v[:, :, o:o + rem] = vs[:, :, full * c:]
                cache.m[:, o:o + rem] = mm[:, full * c:]
                cache.x[:, :rem] = xs[:, full * c:]
                cache.S.copy_(st["S"][:, :, full])
            else:  # ends on a boundary: the next chunk's S now, so a step always finds it current
                cache.S.copy_(self._open_state(cache, P + full))
        return torch.cat(outs, dim=2)  # (b, h, n, d)
