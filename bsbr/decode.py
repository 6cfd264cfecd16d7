"""BSBR decoding: the two per-layer caches and every call that continues a cached sequence.

Axis legend: b batch, n tokens in the call, D hidden, h heads, d head size, e = d / f compressed
key size, c chunk, C chunks in the call, o overlap, P completed chunks (``BSBRStaticCache``: its
chunk slots), L tokens in the open chunk, acc = ``sizing.acc_dtype``.

A cached sequence is a list of completed chunks, each kept as its state ``F_j`` (e x d), meta key
``h_j`` and validity, plus the open chunk, whose tokens are kept as they are. ``BSBRCache`` grows
by one state per completed chunk (eager streaming of unknown length); ``BSBRStaticCache`` holds at
most ``max_len`` tokens in buffers allocated once, so no tensor ever changes shape.

Three forms continue the sequence (docs/decoding.md says which runs when and what it costs):

- ``prefill``: a piece of several tokens, or any call on a ``BSBRCache``. The tokens that finish
  the open chunk go through the open-chunk form (``bsbr_open_chunk``), the rest, from a chunk
  boundary, through the chunkwise-parallel op with the cached past. One algorithm for both
  caches; each cache says how it stores and reads its state through the same seven methods:

      counts(layer) -> (P, L)               completed chunks, tokens in the open chunk
      extend(layer, L, k, v, m, x)          append t tokens to the open chunk; returns its attention
        -> (k_ctx, v_ctx, m_ctx, start)     context and the new tokens' first position in it
      close(layer, j)                       the open chunk is complete: fold it in as chunk j
      summary_before(s) -> (b, 1, D)        the summary the first new chunk's meta query reads
      past(layer, P) -> BSBRPast            what the chunkwise op needs from before the call
      append_chunks(layer, P, F, hk, valid, summary, tail)
                                            keep the call's C' completed chunks from chunk P on:
                                            states (b,h,C',e,d), meta keys (b,h,C',d), validity
                                            (b,C'), the last one's summary (b,D) and its last o
                                            tokens' (k, v, m)
      open_rest(layer, j, k, v, m, x, S)    the call's last, partial chunk (maybe empty) opens as
                                            chunk j with retrieval state S (None when empty)

- ``step_eager``: one token into a ``BSBRStaticCache``, positions from the host-side count; reads
  the filled slots only.
- ``step_static``: one token into a ``BSBRStaticCache`` with no branch on a value (one graph for
  every position); taken under ``torch.compile`` and for ``static=True``.

``layer`` is the ``BSBRAttention`` that owns the cache: its sizes, ``compress``, ``gamma``, meta
projections and ``op`` are read here. This module never imports it (``bsbr.attention`` imports
this one), and a cache never holds it (``ModelCache.nbytes`` would count its parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import sizing
from .mixer import split_heads
from .ops import BSBRPast, bsbr_open_chunk, chunk_states, chunk_summaries, retrieval_weights


def _own(*ts):
    """Contiguous copies, so that what the cache keeps holds no reference to larger tensors."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in ts)


def _heads(layer, x: torch.Tensor):
    """q, k, v per head: (b, n, D) -> 3 x (b, h, n, d), views of the projections."""
    h = layer.num_heads
    return split_heads(layer.q_proj(x), h), split_heads(layer.k_proj(x), h), split_heads(layer.v_proj(x), h)


# ----------------------------------------------------------------------------- the growing cache


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

    @classmethod
    def empty(cls, layer, b: int, device=None, dtype=None) -> BSBRCache:
        h, d, e, D = layer.num_heads, layer.head_dim, layer.key_dim, layer.hidden_dim
        z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        nb = lambda *s: torch.zeros(*s, device=device, dtype=torch.bool)  # noqa: E731
        return cls(F=z(b, h, 0, e, d), hk=z(b, h, 0, d), valid=nb(b, 0), last_summary=z(b, D),
                   tail_k=z(b, h, 0, d), tail_v=z(b, h, 0, d), tail_m=nb(b, 0),
                   cur_k=z(b, h, 0, d), cur_v=z(b, h, 0, d), cur_m=nb(b, 0), cur_x=z(b, 0, D))

    @property
    def cur_len(self) -> int:
        return self.cur_k.shape[2]

    def counts(self, layer):
        return self.F.shape[2], self.cur_len

    def extend(self, layer, L: int, k, v, m, x):
        """Append t tokens (k, v (b,h,t,d), m (b,t), x (b,t,D)); the context [tail | chunk so far],
        (b,h,o'+L+t,d), and the new tokens' first position in it."""
        self.cur_k = torch.cat([self.cur_k, k], dim=2)
        self.cur_v = torch.cat([self.cur_v, v], dim=2)
        self.cur_m = torch.cat([self.cur_m, m], dim=1)
        self.cur_x = torch.cat([self.cur_x, x], dim=1)
        T = self.tail_k.shape[2]
        return (torch.cat([self.tail_k, self.cur_k], dim=2), torch.cat([self.tail_v, self.cur_v], dim=2),
                torch.cat([self.tail_m, self.cur_m], dim=1), T + L)

    def close(self, layer, j: int) -> None:
        """Fold the full open chunk into a state, a meta key and a summary; keep its tail. The next
        chunk's S is left to the call that opens it (the chunkwise op computes it anyway)."""
        c, o = layer.chunk_size, layer.chunk_overlap
        m = self.cur_m
        k = self.cur_k
        if layer.compress is not None:
            k = torch.einsum("bhnd,hde->bhne", k, layer.compress)
        k = k * m[:, None, :, None].to(k.dtype)
        Fj = k.transpose(-1, -2) @ self.cur_v  # (b, h, e, d)
        s = chunk_summaries(self.cur_x, m, c)[:, 0]  # (b, D)
        hk = split_heads(layer.meta_key(s)[:, None], layer.num_heads)[:, :, 0]  # (b, h, d)
        self.F = torch.cat([self.F, Fj[:, :, None]], dim=2)
        self.hk = torch.cat([self.hk, hk[:, :, None]], dim=2)
        self.valid = torch.cat([self.valid, m.any(-1, keepdim=True)], dim=1)
        self.last_summary = s
        self.tail_k, self.tail_v, self.tail_m = _own(self.cur_k[:, :, c - o:], self.cur_v[:, :, c - o:], m[:, c - o:])
        self.cur_k, self.cur_v, self.cur_m, self.cur_x = _own(self.cur_k[:, :, :0], self.cur_v[:, :, :0],
                                                              m[:, :0], self.cur_x[:, :0])
        self.S = None

    def summary_before(self, s):
        return self.last_summary[:, None] if self.F.shape[2] else torch.zeros_like(s[:, :1])

    def past(self, layer, P: int) -> BSBRPast:
        return BSBRPast(self.F, self.hk, self.valid, self.tail_k, self.tail_v, self.tail_m)

    def append_chunks(self, layer, P: int, F, hk, valid, summary, tail) -> None:
        self.F = torch.cat([self.F, F], dim=2)
        self.hk = torch.cat([self.hk, hk], dim=2)
        self.valid = torch.cat([self.valid, valid], dim=1)
        self.last_summary = summary.clone()
        self.tail_k, self.tail_v, self.tail_m = _own(*tail)

    def open_rest(self, layer, j: int, k, v, m, x, S) -> None:
        # copies, not views: a view would pin the whole call's activations in the cache
        self.cur_k, self.cur_v, self.cur_m, self.cur_x = _own(k, v, m, x)
        self.S = None if S is None else S.clone()


# ----------------------------------------------------------------------------- the preallocated cache


@dataclass
class BSBRStaticCache:
    """Per-layer decoding state for at most ``max_len`` tokens, allocated once (the gpt-fast
    ``KVCache`` pattern): no tensor ever changes shape, so a compiled one-token step is one graph
    and can be captured as a CUDA graph. ``init_cache(..., max_len)`` makes it.

    P = ceil(max_len / c) chunk slots; a slot not yet filled has ``valid`` False, so retrieval
    never sees it.
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

    @classmethod
    def empty(cls, layer, b: int, device, dtype, max_len: int, static: bool = False) -> BSBRStaticCache:
        h, d, e, D = layer.num_heads, layer.head_dim, layer.key_dim, layer.hidden_dim
        c, o = layer.chunk_size, layer.chunk_overlap
        dtype = torch.get_default_dtype() if dtype is None else dtype
        acc = sizing.acc_dtype(dtype)
        P = -(-max_len // c)
        rows = min(c, max_len)  # the open chunk's rows: a chunk longer than max_len never fills
        z = lambda *s, dt=dtype: torch.zeros(*s, device=device, dtype=dt)  # noqa: E731
        return cls(F=z(b, h, P, e, d, dt=acc), hk=z(b, h, P, d), valid=z(b, P, dt=torch.bool),
                   last_summary=z(b, D), k=z(b, h, o + rows, d), v=z(b, h, o + rows, d),
                   m=z(b, o + rows, dt=torch.bool), x=z(b, rows, D), S=z(b, h, e, d, dt=acc),
                   pos=z((), dt=torch.long), max_len=max_len, static=bool(static))

    def counts(self, layer):
        return divmod(self.length, layer.chunk_size)

    def extend(self, layer, L: int, k, v, m, x):
        """Write t tokens at rows L .. L+t-1 (context slots o+L ..); m may be True (all real). The
        context is the filled slots only, (b,h,o+L+t,d), views."""
        o, t = layer.chunk_overlap, k.shape[2]
        self.k[:, :, o + L:o + L + t] = k
        self.v[:, :, o + L:o + L + t] = v
        self.m[:, o + L:o + L + t] = m
        self.x[:, L:L + t] = x
        e = o + L + t
        return self.k[:, :, :e], self.v[:, :, :e], self.m[:, :e], o + L

    def fold(self, layer):
        """The open chunk's state (b, h, 1, e, d), meta key (b, h, 1, d), validity (b, 1), summary (b, D)."""
        o, rows = layer.chunk_overlap, self.x.shape[1]                      # rows = min(c, max_len)
        cm = self.m[:, o:]                                                   # (b, rows)
        Fj = chunk_states(self.k[:, :, o:], self.v[:, :, o:], rows, cm, layer.compress)  # (b, h, 1, e, d)
        s = chunk_summaries(self.x, cm, rows)[:, 0]                          # (b, D)
        hkj = split_heads(layer.meta_key(s)[:, None], layer.num_heads)      # (b, h, 1, d)
        return Fj.to(self.F.dtype), hkj, cm.any(-1, keepdim=True), s

    def open_state(self, layer, filled: Optional[int] = None) -> torch.Tensor:
        """S of the chunk that opens after the last completed one: its meta query (from that
        chunk's summary) retrieves over the valid slots. (b, h, e, d) in the accumulation dtype.
        ``filled``: read only the first ``filled`` slots (eager: O(filled)); None: every slot (static)."""
        b, h, P, e, d = self.F.shape
        P = P if filled is None else filled
        F, hk, valid = self.F[:, :, :P], self.hk[:, :, :P], self.valid[:, :P]
        r = split_heads(layer.meta_query(self.last_summary)[:, None], h)     # (b, h, 1, d)
        w = retrieval_weights(r, hk, valid, P)                              # (b, h, 1, P)
        return (w.to(F.dtype) @ F.flatten(-2)).view(b, h, e, d)

    def close(self, layer, j: int) -> None:
        """The open chunk is complete (known in Python): fold it into slot ``j``, keep its last o
        tokens as the next tail, and make the next chunk's S over the j + 1 filled slots only."""
        o = layer.chunk_overlap
        Fj, hkj, valid, s = self.fold(layer)
        self.F[:, :, j:j + 1] = Fj
        self.hk[:, :, j:j + 1] = hkj
        self.valid[:, j:j + 1] = valid
        self.last_summary.copy_(s)
        if o:  # the chunk's last o tokens (the buffer's last o slots) become the tail (slots 0 .. o-1)
            self.k[:, :, :o] = self.k[:, :, -o:]
            self.v[:, :, :o] = self.v[:, :, -o:]
            self.m[:, :o] = self.m[:, -o:]
        self.S.copy_(self.open_state(layer, j + 1))

    def summary_before(self, s):
        return self.last_summary[:, None]  # zeros before the first chunk

    def past(self, layer, P: int) -> BSBRPast:
        o = layer.chunk_overlap
        return BSBRPast(self.F[:, :, :P], self.hk[:, :, :P], self.valid[:, :P],
                        self.k[:, :, :o], self.v[:, :, :o], self.m[:, :o])

    def append_chunks(self, layer, P: int, F, hk, valid, summary, tail) -> None:
        o, full = layer.chunk_overlap, F.shape[2]
        self.F[:, :, P:P + full] = F
        self.hk[:, :, P:P + full] = hk
        self.valid[:, P:P + full] = valid
        self.last_summary.copy_(summary)
        if o:
            self.k[:, :, :o], self.v[:, :, :o] = tail[0], tail[1]
            self.m[:, :o] = tail[2]

    def open_rest(self, layer, j: int, k, v, m, x, S) -> None:
        if S is None:  # the call ended on a boundary: the next chunk's S now, so a step finds it current
            self.S.copy_(self.open_state(layer, j))
            return
        o, rem = layer.chunk_overlap, k.shape[2]
        self.k[:, :, o:o + rem] = k
        self.v[:, :, o:o + rem] = v
        self.m[:, o:o + rem] = m
        self.x[:, :rem] = x
        self.S.copy_(S)


# ----------------------------------------------------------------------------- continuing a sequence


def forward_cached(layer, x: torch.Tensor, mask: Optional[torch.Tensor], cache) -> torch.Tensor:
    """The layer's forward with a cache: (b, n, D) -> (b, h, n, d), continuing the cached sequence
    and updating the cache in place. mask: (b, n) bool or None."""
    if isinstance(cache, BSBRCache):
        return prefill(layer, cache, x, mask)
    n = x.shape[1]
    if cache.length + n > cache.max_len:
        raise ValueError(f"the cache was made for max_len={cache.max_len} tokens; this call reaches "
                         f"{cache.length + n}")
    if n > 1:
        out = prefill(layer, cache, x, mask)
    elif cache.static or torch.compiler.is_compiling():
        out = step_static(layer, cache, x, mask)
    else:
        out = step_eager(layer, cache, x, mask)
    cache.length += n
    cache.pos += n
    return out


def prefill(layer, cache, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Several tokens (any number into a ``BSBRCache``): the part that finishes the open chunk
    through the open-chunk form, the rest from a chunk boundary through the chunkwise-parallel op
    with the cached past. Positions are Python counts, so nothing here reads a tensor's value."""
    b, n, _ = x.shape
    c, o = layer.chunk_size, layer.chunk_overlap
    m = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    q, k, v = _heads(layer, x)  # (b, h, n, d)
    P, L = cache.counts(layer)
    outs, i0 = [], 0
    if L:  # 1) finish the open chunk: attend to [tail | chunk so far | new], add q S
        t = min(c - L, n)
        k_ctx, v_ctx, m_ctx, start = cache.extend(layer, L, k[:, :, :t], v[:, :, :t], m[:, :t], x[:, :t])
        outs.append(bsbr_open_chunk(q[:, :, :t], k_ctx, v_ctx, m_ctx, start, cache.S, layer.compress, layer.gamma))
        i0 = t
        if L + t == c:
            cache.close(layer, P)
            P += 1
    if i0 < n:  # 2) the rest starts on a chunk boundary: the chunkwise-parallel op with the past
        xs, ks, vs, mm = x[:, i0:], k[:, :, i0:], v[:, :, i0:], m[:, i0:]
        ms = None if mask is None else mm
        s = chunk_summaries(xs, ms, c)  # (b, C, D)
        first = cache.summary_before(s)  # (b, 1, D)
        r, hk = layer.meta_qk(torch.cat([first, s[:, :-1]], dim=1), s)  # (b, h, C, d)
        past = cache.past(layer, P)
        out, st = layer.op(q[:, :, i0:], ks, vs, r, hk, mask=ms, past=past, return_states=True)
        outs.append(out)
        full, rem = divmod(n - i0, c)
        end = full * c
        if full:
            cache.append_chunks(layer, P, st["F"][:, :, :full], hk[:, :, :full], st["valid"][:, :full],
                                s[:, full - 1], (ks[:, :, end - o:end], vs[:, :, end - o:end], mm[:, end - o:end]))
        cache.open_rest(layer, P + full, ks[:, :, end:], vs[:, :, end:], mm[:, end:], xs[:, end:],
                        st["S"][:, :, full] if rem else None)
    return torch.cat(outs, dim=2)  # (b, h, n, d)


def step_eager(layer, cache: BSBRStaticCache, x, mask) -> torch.Tensor:
    """One token, eager: positions from the host-side ``cache.length``, so the step reads the
    open chunk's filled slots only and folds (over the filled chunk slots only) only when the
    chunk completes. Its work does not depend on ``max_len`` (tests/test_decode_cost.py)."""
    q, k, v = _heads(layer, x)  # (b, h, 1, d)
    j, r = divmod(cache.length, layer.chunk_size)
    k_ctx, v_ctx, m_ctx, slot = cache.extend(layer, r, k, v, True if mask is None else mask, x)
    out = bsbr_open_chunk(q, k_ctx, v_ctx, m_ctx, slot, cache.S, layer.compress, layer.gamma)
    if r == layer.chunk_size - 1:
        cache.close(layer, j)
    return out  # (b, h, 1, d)


def step_static(layer, cache: BSBRStaticCache, x, mask) -> torch.Tensor:
    """One token, shape-static and with no Python branch on a value: write its row at
    ``r = pos % c`` (context slot o + r), attend to the slots up to it plus ``q S``, then fold the
    chunk when r = c - 1 (a where). The fold (state, summary, meta key, the next S over all
    P slots) is computed every step: O(c e d + P e d) per token, the price of one static graph."""
    c, o = layer.chunk_size, layer.chunk_overlap
    q, k, v = _heads(layer, x)  # (b, h, 1, d)
    m = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device) if mask is None else mask
    r = cache.pos.remainder(c).view(1)                                  # (1,) long
    slot = r + o
    cache.k.index_copy_(2, slot, k)                                     # (b, h, o + c, d)
    cache.v.index_copy_(2, slot, v)
    cache.m.index_copy_(1, slot, m)                                     # (b, o + c)
    cache.x.index_copy_(1, r, x)                                        # (b, c, D)
    out = bsbr_open_chunk(q, cache.k, cache.v, cache.m, slot, cache.S, layer.compress, layer.gamma)
    j = cache.pos.div(c, rounding_mode="floor").view(1).clamp(max=cache.F.shape[2] - 1)  # (1,) chunk slot
    _close_static(layer, cache, j, r == c - 1)
    return out                                                          # (b, h, 1, d)


def _close_static(layer, cache: BSBRStaticCache, j: torch.Tensor, full: torch.Tensor) -> None:
    """``BSBRStaticCache.close`` with no branch on a value: slot ``j`` (1,) long, and every write
    kept only where ``full`` (1,) bool is True (``torch.where``), so one graph serves every step."""
    o = layer.chunk_overlap
    keep = lambda new, old: torch.where(full, new, old)  # noqa: E731
    Fj, hkj, valid, s = cache.fold(layer)
    cache.F.index_copy_(2, j, keep(Fj, cache.F.index_select(2, j)))
    cache.hk.index_copy_(2, j, keep(hkj, cache.hk.index_select(2, j)))
    cache.valid.index_copy_(1, j, keep(valid, cache.valid.index_select(1, j)))
    cache.last_summary.copy_(keep(s, cache.last_summary))
    if o:  # the last o slots, not c:, since a buffer of max_len < c rows holds o + max_len slots
        cache.k[:, :, :o] = keep(cache.k[:, :, -o:], cache.k[:, :, :o])
        cache.v[:, :, :o] = keep(cache.v[:, :, -o:], cache.v[:, :, :o])
        cache.m[:, :o] = keep(cache.m[:, -o:], cache.m[:, :o])
    cache.S.copy_(keep(cache.open_state(layer), cache.S))
