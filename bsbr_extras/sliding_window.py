"""Causal sliding-window softmax attention (local attention as in Longformer, Beltagy et al., 2020;
Mistral 7B, Jiang et al., 2023): each token attends to the last ``w`` positions, itself included,

    o_t = sum_{s in [t-w+1, t], s real} softmax_s(q_t . k_s / sqrt(d)) v_s

Parallel (blocked) form: cut the queries into blocks. Every key a block of ``w`` queries can see lies
in that block or the one before, so each block attends to those 2w keys under one fixed (w, 2w) band
mask. Here the blocks hold B = min(w, 64) queries and attend to the w + B keys ending at their last
query (B = w is exactly the block-and-previous-block form; smaller B scores fewer keys that the band
then discards). Cost O(n (w + B) d) per head; no n x n tensor or mask is ever built.

How the blocks are run is the sizing policy's (``bsbr.sizing``): on a CPU in segments of a few
hundred queries (``SEGMENT_BYTES``), with a padding mask one call per sequence; on a GPU all blocks
of all sequences in one ``scaled_dot_product_attention`` call (after the plain causal call for
the first w queries). Softmax statistics are SDPA's
(fp32 accumulation for half-precision inputs); there is no carried state.

Decoding form: a ring buffer holding the last ``w`` keys and values; one step costs O(w d) and the
cache never grows.

Axis legend used in shape comments:
    b  batch      h  heads      m  queries in this call     n  keys (prefix + this call)
    d  head size  w  window     B  queries per block        J  blocks after the first w queries
    D  hidden size (h * d)

As in :mod:`bsbr_extras.standard`, queries may be the last ``m`` of ``n`` keys (bottom-right aligned).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from bsbr import sizing
from bsbr.causal_lm import CausalLM
from bsbr.checks import check_positive_int
from bsbr.mixer import exists
from bsbr_extras.standard import StandardAttention, allowed_keys, causal_softmax_unchecked, check_qkv

# Queries per block in the blocked form (a CPU-tuned constant; any value gives the same result):
# blocks of min(w, 64) beat blocks of w for w > 64 since each query scores w + B keys, not 2w.
QUERY_BLOCK = 64

# ----------------------------------------------------------------------------- the op


def _band(m: int, n: int, window_size: int, device) -> torch.Tensor:
    """(m, n) bool: query i at position n-m+i sees key s iff 0 <= (n-m+i) - s < window_size."""
    t = torch.arange(n - m, n, device=device)[:, None]
    s = torch.arange(n, device=device)[None, :]
    return (t - s >= 0) & (t - s < window_size)


def _banded_dense(q, k, v, window_size, mask, scale, dropout_p):
    """Direct form for few queries (m <= w, e.g. decoding): only the last m + w - 1 keys can be seen."""
    m, n = q.shape[-2], k.shape[-2]
    lo = max(0, n - m - window_size + 1)
    k, v = k[:, :, lo:], v[:, :, lo:]  # (b, h, n', d), n' <= m + w - 1
    mask = mask[:, lo:] if exists(mask) else None
    n = k.shape[-2]
    attn_mask = allowed_keys(_band(m, n, window_size, q.device), mask, m, n)  # (m, n') or (b, 1, m, n')
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)


# Bytes of one segment's queries in the blocked form (a memory-locality constant; any value gives the
# same result). The whole-sequence form made (b, h, n, d) contiguous copies that, at n = 16k and 8
# heads of 64, are 32 MB each: glibc maps those fresh and page-faults them on every call (about 7 ms
# each here). Segments of ~2 MB are served from reused heap memory and stay in cache.
SEGMENT_BYTES = 2 << 20  # the cpu policy's budget (``bsbr.sizing``); the cuda policy takes one segment


def _banded_blocked(q, k, v, window_size, mask, scale, dropout_p):
    """Blocked form for m == n (no (n, n) tensor anywhere).

    The first w queries see every earlier position, so they are plain causal attention. After them,
    queries go in blocks of B = min(w, QUERY_BLOCK): the block at positions [p, p + B) can only see
    keys in [p - w + 1, p + B), so it attends to the w + B keys [p - w, p + B) under one fixed
    (B, w + B) band mask. With B = w this is the textbook "own block and the previous one" form;
    a smaller B wastes less of the band (w + B instead of 2w scores per query).

    The blocks run in segments of a few hundred queries: each segment copies its queries and its
    keys (w more than its queries) into small contiguous tensors, so the fused kernel reads
    contiguous heads (on heads strided straight out of the fused projection it ran 40% slower) and
    no temporary is large enough to be freshly mapped by the allocator (see ``SEGMENT_BYTES``).
    """
    b, h, n, d = q.shape
    w = window_size
    B = min(w, QUERY_BLOCK)
    J = math.ceil((n - w) / B)  # query blocks after the first w positions
    pad = w + J * B - n
    if pad:  # padded tail positions come after every real query, so causality keeps them out of real outputs
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (b, h, w + J*B, d)
        mask = F.pad(mask, (0, pad), value=False) if exists(mask) else None

    # token-major output, so merging heads afterwards is a free view instead of another copy
    out = q.new_empty(b, w + J * B, h, v.shape[-1])  # (b, w + J*B, h, d)
    # Inputs are split, never sliced, into the first w positions and then segments aligned with the
    # query segments: autograd then assembles each input's gradient once (a slice's backward makes
    # an input-sized zero tensor per segment). A segment is at least w positions long, so the w
    # keys before it lie in the part just before it.
    per_block = b * h * B * d * q.element_size()
    whole = sizing.whole(q.device)  # one segment of all J blocks, and one call even with a mask
    rows = B * max(sizing.per_block(q.device, J, per_block, SEGMENT_BYTES), -(-w // B))  # positions per segment, >= w
    (q0, q_rest), (k0, k_rest), (v0, v_rest) = (t.split([w, J * B], dim=2) for t in (q, k, v))
    out[:, :w] = causal_softmax_unchecked(q0, k0, v0, mask[:, :w] if exists(mask) else None,
                                          scale, dropout_p).transpose(1, 2)
    band = _band(B, w + B, w, q.device)  # (B, w+B): local query i (column w+i) sees columns i+1 .. w+i
    if exists(mask):
        diag = torch.arange(B, device=q.device)[:, None] + w == torch.arange(w + B, device=q.device)  # (B, w+B)
    k_prev, v_prev, p0 = k0, v0, 0  # p0: the segment's first query position, minus w
    for qp, kp, vp in zip(*(t.split(rows, dim=2) for t in (q_rest, k_rest, v_rest))):
        Js = qp.shape[2] // B
        # block j's queries are positions [w + jB, w + (j+1)B), its keys [jB, jB + w + B): overlapping
        # windows of stride B over the segment's keys, which unfold returns as a view (no copy)
        qq = qp.contiguous().unflatten(2, (Js, B))  # (b, h, Js, B, d)
        ks = torch.cat([k_prev[:, :, -w:], kp], dim=2)  # (b, h, w + Js*B, d), contiguous
        vs = torch.cat([v_prev[:, :, -w:], vp], dim=2)
        k_prev, v_prev = kp, vp
        kk = ks.unfold(2, w + B, B).transpose(-1, -2)  # (b, h, Js, w+B, d)
        vv = vs.unfold(2, w + B, B).transpose(-1, -2)  # (b, h, Js, w+B, d)
        km = mask[:, p0: p0 + Js * B + w].unfold(1, w + B, B) if exists(mask) else None  # (b, Js, w+B)
        rest = _blocks_attention(qq, kk, vv, band, diag if exists(mask) else None, km, whole, scale, dropout_p)
        out[:, w + p0: w + p0 + Js * B] = rest.reshape(b, h, Js * B, -1).transpose(1, 2)
        p0 += Js * B
    return out[:, :n].transpose(1, 2)  # (b, h, n, d)


def _blocks_attention(qq, kk, vv, band, diag, km, whole: bool, scale, dropout_p) -> torch.Tensor:
    """One segment's query blocks against their (w + B)-key windows: (b, h, Js, B, d) -> (b, h, Js, B, d)
    or (b, h Js, B, d) (the caller reshapes). ``km`` (b, Js, w+B) is the key mask per block, None
    without padding; ``diag`` marks each query's own key, which stays visible (see allowed_keys)."""
    if km is None:
        # 4-D (b*h, Js, ...) views keep PyTorch's fused attention kernel; the band broadcasts over blocks
        return F.scaled_dot_product_attention(qq.flatten(0, 1), kk.flatten(0, 1), vv.flatten(0, 1),
                                              attn_mask=band, scale=scale, dropout_p=dropout_p)
    b, h, Js, B, d = qq.shape
    Ls = kk.shape[-2]  # w + B
    allowed = band & (km[:, :, None, :] | diag)  # (b, Js, B, w+B)
    if whole:
        # one call for every sequence: blocks laid out (b, h Js, ., .), the mask repeated over heads
        return F.scaled_dot_product_attention(
            qq.flatten(1, 2), kk.reshape(b, h * Js, Ls, d), vv.reshape(b, h * Js, Ls, vv.shape[-1]),
            attn_mask=allowed[:, None].expand(b, h, Js, B, Ls).reshape(b, h * Js, B, Ls),
            scale=scale, dropout_p=dropout_p)  # (b, h Js, B, d)
    # the key mask differs per sequence: one fused call per sequence keeps every tensor a view
    return torch.stack([F.scaled_dot_product_attention(qq[i], kk[i], vv[i], attn_mask=allowed[i], scale=scale,
                                                       dropout_p=dropout_p) for i in range(b)])


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                             mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """Causal softmax attention over the last ``window_size`` positions (blocked parallel form).

    Args:
        q: (b, h, m, d) queries for the last ``m`` of the ``n`` key positions (m <= n).
        k, v: (b, h, n, d).
        window_size: w >= 1; position t sees s in [t - w + 1, t]. w >= n gives standard causal attention.
        mask: (b, n) bool, True = real token, or None. Masked keys are never attended to.
        scale: None -> 1/sqrt(d).

    Returns (b, h, m, d). O(m (w + B) d) time, O(m (w + B)) extra memory; never an (m, n) tensor when m > w.
    """
    check_positive_int("window_size", window_size)
    check_qkv(q, k, v, mask)
    return sliding_window_unchecked(q, k, v, window_size, mask, scale, dropout_p)


def sliding_window_unchecked(q, k, v, window_size: int, mask=None, scale=None, dropout_p: float = 0.0):
    """:func:`sliding_window_attention` without its checks (the mixer's: the window was checked in
    ``__init__``, the shapes are right by construction)."""
    m, n = q.shape[-2], k.shape[-2]
    if m <= window_size:
        return _banded_dense(q, k, v, window_size, mask, scale, dropout_p)
    if m < n:  # a long piece after a cached prefix (< w keys): pad the queries to the keys' length
        q = F.pad(q, (0, 0, n - m, 0))
    return _banded_blocked(q, k, v, window_size, mask, scale, dropout_p)[:, :, n - m:]


def sliding_window_step(q: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor, valid: torch.Tensor,
                        slot, scale: Optional[float] = None) -> torch.Tensor:
    """One decoding step over a ring buffer that already holds the current token.

    Args:
        q: (b, h, 1, d) the current query.
        k_ring, v_ring: (b, h, w, d) the last w keys/values in slot order (softmax is order-free).
        valid: (b, w) bool, slots holding a real (filled, unmasked) token.
        slot: the current token's slot (an int or a (1,) long tensor); it is always allowed (see
            ``allowed_keys``).

    Returns (b, h, 1, d). O(w d).
    """
    w = k_ring.shape[-2]
    own = torch.arange(w, device=q.device) == slot  # (w,)
    attn_mask = (valid | own)[:, None, None, :]  # (b, 1, 1, w)
    return F.scaled_dot_product_attention(q, k_ring, v_ring, attn_mask=attn_mask, scale=scale)


# ----------------------------------------------------------------------------- ring-buffer cache


class RingKVCache:
    """The last ``w`` keys and values of one layer; token at absolute position p lives in slot p % w."""

    def __init__(self, batch_size: int, window_size: int, device=None, dtype=None, max_len: Optional[int] = None):
        self.batch_size, self.window_size, self.device, self.dtype = batch_size, window_size, device, dtype
        # slots: w, or max_len when fewer (positions then stay below it, so p % w never wraps)
        self.slots = window_size if max_len is None else min(window_size, max_len)
        self.k = self.v = None  # (b, h, w, d), allocated on first use with the inputs' shape and dtype
        self.valid = None       # (b, w) bool
        self.pos = 0            # tokens seen so far (multi-token calls slice with it)
        self.padded = False     # some token written was padding (else every filled slot is real)
        self.pos_t = None       # () long on the device: the same count, which the one-token step reads

    def allocate(self, k, v):
        b, h, _, d = k.shape
        if b != self.batch_size:
            raise ValueError(f"cache was made for batch_size={self.batch_size}, got {b}")
        if self.k is None:
            w = self.slots
            self.k, self.v = k.new_zeros(b, h, w, d), v.new_zeros(b, h, w, v.shape[-1])
            self.valid = torch.zeros(b, w, dtype=torch.bool, device=k.device)
            self.pos_t = torch.full((), self.pos, dtype=torch.long, device=k.device)

    def prefix(self):
        """Chronological keys/values/validity of the last min(pos, w-1) tokens: all a new query can see."""
        P = min(self.pos, self.window_size - 1)
        idx = (torch.arange(self.pos - P, self.pos, device=self.k.device)) % self.window_size  # (P,)
        return self.k[:, :, idx], self.v[:, :, idx], self.valid[:, idx]

    def write(self, k, v, mask):
        """Store this call's (b, h, m, d) keys/values: only the last w of them can ever be seen again."""
        m, w = k.shape[-2], self.window_size
        keep = min(m, w)
        idx = torch.arange(self.pos + m - keep, self.pos + m, device=k.device) % w  # (keep,)
        self.k[:, :, idx] = k[:, :, m - keep:]
        self.v[:, :, idx] = v[:, :, m - keep:]
        self.valid[:, idx] = mask[:, m - keep:] if exists(mask) else True
        self.padded = self.padded or exists(mask)
        self.pos += m
        self.pos_t += m

    def step(self, k, v, mask) -> torch.Tensor:
        """Store one token's (b, h, 1, d) key/value at slot ``pos_t % w``, read from the tensor
        count (no Python int in the step, so a compiled step keeps one graph); returns the slot (1,)."""
        slot = self.pos_t.remainder(self.window_size).view(1)
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        real = mask.bool() if exists(mask) else torch.ones(k.shape[0], 1, dtype=torch.bool, device=k.device)
        self.valid.index_copy_(1, slot, real)
        self.padded = self.padded or exists(mask)
        self.pos += 1
        self.pos_t += 1
        return slot


# ----------------------------------------------------------------------------- mixer


class SlidingWindowAttention(StandardAttention):
    """Multi-head sliding-window attention: Standard's projections, a windowed op, a ring-buffer cache."""

    def __init__(self, hidden_dim: int, num_heads: int, window_size: int = 512, dropout: float = 0.0,
                 bias: bool = True):
        check_positive_int("window_size", window_size)
        super().__init__(hidden_dim, num_heads, dropout, bias)
        self.window_size = window_size

    def state_bytes(self, n: int) -> int:
        """Bytes of this layer's ring buffer (float32), whatever ``n``: w keys and values per head,
        their validity flags and the position (a long)."""
        return 4 * 2 * self.num_heads * self.window_size * self.head_dim + self.window_size + 8

    def op(self, q, k, v, *, mask=None):
        return sliding_window_unchecked(q, k, v, self.window_size, mask,
                                        dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache: Optional[RingKVCache] = None):
        q, k, v = self.op_inputs(x, mask)  # (b, h, m, d) each
        if not exists(cache):
            out = self.op(q, k, v, mask=mask)
        elif q.shape[-2] == 1:
            # decode step: write the token into its slot, then attend over the ring as it stands
            cache.allocate(k, v)
            slot = cache.step(k, v, mask)  # (1,) long tensor
            out = sliding_window_step(q, cache.k, cache.v, cache.valid, slot)
        else:
            # a piece of several tokens: the ring's last w-1 tokens in order, then this piece
            cache.allocate(k, v)
            kp, vp, mp = cache.prefix()  # (b, h, P, d), (b, P)
            full_mask = None  # every key real (known on the host: no read of the mask's values)
            if exists(mask) or cache.padded:
                new_mask = mask if exists(mask) else torch.ones(q.shape[0], q.shape[-2], dtype=torch.bool,
                                                                device=q.device)
                full_mask = torch.cat([mp, new_mask], dim=1)  # (b, P + m)
            out = self.op(q, torch.cat([kp, k], dim=-2), torch.cat([vp, v], dim=-2), mask=full_mask)
            cache.write(k, v, mask)
        return self.output(out, x)  # (b, m, D)

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len=None, static: bool = False) -> RingKVCache:
        # a ring of w slots (fewer when max_len is smaller): its step already has one shape and costs
        # O(w), so static changes nothing
        return RingKVCache(batch_size, self.window_size, device, dtype, max_len)


# ----------------------------------------------------------------------------- model


class SlidingWindowTransformerModel(CausalLM):
    """Decoder-only transformer whose attention sees the last ``window_size`` tokens (O(n w) cost)."""

    mixer_class = SlidingWindowAttention

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, window_size: int = 512, **shell_kwargs):
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: SlidingWindowAttention(hidden_dim, num_heads, window_size, dropout),
                         **shell_kwargs)
        self.window_size = window_size
