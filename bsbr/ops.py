"""BSBR as pure tensor functions on per-head inputs (no parameters, no modules).

Axis legend:
    b  batch          h  heads           n  tokens              d  head size
    c  chunk size     C  chunks in call  P  chunks already in the cache (past)
    o  overlap        L  keys seen by one chunk's queries (c + o)
    e  compressed key size d / f
    D  model width (a layer input before the head split: chunk summaries only)

For token t in chunk i the output is (README.md, "What BSBR computes")

    local_t     = sum_{s in W(t)} softmax_s(q_t . k_s / sqrt(d)) v_s,
                  W(t) = { s real : max(i c - o, 0) <= s <= t }
    F_j         = sum_{s in chunk j, real} (A^T k_s) v_s^T                      (e x d)
    P_ij        = softmax over earlier chunks j < i that hold a real token of (r_i . h_j / sqrt(d))
    S_i         = sum_j P_ij F_j                                                (S = 0 if no such j)
    retrieved_t = gamma (A^T q_t)^T S_i
    o_t         = local_t + retrieved_t

``A`` (h, d, e) is the optional per-head compression map (identity when None). ``gamma`` defaults
to ``1 / (c sqrt(e))``: the retrieved term is then the P-weighted mean over a chunk's tokens of
``(q.k / sqrt(e)) v``, i.e. values weighted by attention-logit-sized scalars, the same order of
magnitude as the local term's softmax average of values while logits are O(1).

Everything is batched over chunks: the local term is one batched (b h C) attention over
``c x (c + o)`` blocks, the retrieval is one (C x (P + C)) softmax and one matmul that mixes the
chunk states. No tensor of size n x n is built, and there is no Python loop over tokens or chunks.
How the local term runs is the sizing policy's choice (``bsbr.sizing``): under the cpu policy,
cache-sized tiles of fused baddbmm / softmax / bmm; under the cuda policy, one
``scaled_dot_product_attention`` call over all (b, h, C) blocks (``is_causal`` without a mask or
overlap, so the flash kernel can take it).

Numerics: the chunk states F, the retrieval scores and weights and the mixed states S are formed
in fp32 for half-precision inputs (``sizing.acc_dtype``); the read-out and the local term run in
the input dtype (SDPA and the matmuls accumulate in fp32 internally) and the output has the
input's dtype. ``return_states`` gives F and S in the accumulation dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import sizing
from .checks import mask_as_bool

_NEG_INF = float("-inf")


@dataclass
class BSBRPast:
    """What a continuation needs from the chunks before it (all optional-empty).

    F:      (b, h, P, e, d) states of completed chunks
    hk:     (b, h, P, d)    their meta keys
    valid:  (b, P) bool     chunk holds at least one real token
    tail_k, tail_v: (b, h, o', d) the last o' <= o keys/values of the previous chunk
    tail_m: (b, o') bool    their mask
    """

    F: torch.Tensor
    hk: torch.Tensor
    valid: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    tail_m: torch.Tensor


def default_gamma(chunk_size: int, key_dim: int) -> float:
    return 1.0 / (chunk_size * math.sqrt(key_dim))


# ----------------------------------------------------------------------------- local term


def _block_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                             scale: float, readout=None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v [+ gamma * qe @ S] over a batch of small blocks.

    q: (B, c, d); k, v: (B, L, d); bias broadcastable to (B, c, L) with 0 / -inf.
    readout: optional (qe (B, c, e), S (B, e, d), gamma), fused into the same pass.
    Every row must allow at least one key (callers guarantee the diagonal).
    """
    kt = k.transpose(1, 2)  # (B, d, L)
    per_block = bias.dim() == 3 and bias.shape[0] == q.shape[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v) + tuple(readout[:2] if readout else ())):
        att = torch.baddbmm(bias if per_block else bias.expand(q.shape[0], -1, -1), q, kt, alpha=scale)
        out = torch.bmm(att.softmax(-1), v)
        return out if readout is None else torch.baddbmm(out, readout[0], readout[1], alpha=readout[2])
    # Inference: tile over the block batch so the logits' working set stays bounded (one 8 MB
    # buffer reused by every tile), fuse scale and mask into baddbmm, take the softmax in place,
    # and fuse the retrieval read-out into the output matmul.
    B, c, L = q.shape[0], q.shape[1], k.shape[1]
    out = torch.empty(B, c, v.shape[-1], dtype=q.dtype, device=q.device)
    tile = min(B, max(1, (1 << 21) // (c * L)))
    buf = torch.empty(tile, c, L, dtype=q.dtype, device=q.device)  # one logits buffer, reused by every tile
    for s in range(0, B, tile):
        e = min(s + tile, B)
        logits = buf[:e - s]
        torch.baddbmm(bias[s:e] if per_block else bias, q[s:e], kt[s:e], alpha=scale, out=logits)
        torch.softmax(logits, -1, out=logits)
        torch.bmm(logits, v[s:e], out=out[s:e])
        if readout is not None:
            # the out= overload (unlike baddbmm_) is one FlopCounterMode counts
            torch.baddbmm(out[s:e], readout[0][s:e], readout[1][s:e], alpha=readout[2], out=out[s:e])
    return out


def _local_keys(x: torch.Tensor, tail: Optional[torch.Tensor], o: int, c: int, C: int) -> torch.Tensor:
    """Per-chunk key windows: chunk i sees the last o positions before it, then itself.

    x: (b, h, C*c, d); tail: (b, h, o, d) that precede position 0. Returns (b, h, C, o + c, d).
    """
    if o == 0:
        return x.unflatten(2, (C, c))
    full = torch.cat([tail, x], dim=2)  # (b, h, o + C c, d)
    return full.unfold(2, o + c, c).transpose(-1, -2)  # (b, h, C, o + c, d)


def _local_mask(m: torch.Tensor, tail_m: Optional[torch.Tensor], o: int, c: int, C: int) -> torch.Tensor:
    """Key-validity windows matching _local_keys: (b, C, o + c) bool."""
    if o == 0:
        return m.view(m.shape[0], C, c)
    return torch.cat([tail_m, m], dim=1).unfold(1, o + c, c)


def local_attention(q, k, v, *, chunk_size: int, overlap: int = 0, mask: Optional[torch.Tensor] = None,
                    tail_k=None, tail_v=None, tail_m=None, readout=None) -> torch.Tensor:
    """Causal softmax attention within chunks, each reaching ``overlap`` tokens back.

    q, k, v: (b, h, n, d) with n a multiple of chunk_size; mask (b, n) bool or None.
    tail_*: the ``overlap`` keys/values/mask preceding position 0 (zeros/False when absent).
    readout: optional (qe (b, h, n, e), S (b, h, C, e, d), gamma): adds gamma * qe_t S_i in the same pass.
    """
    b, h, n, d = q.shape
    c, o = chunk_size, overlap
    C = n // c
    if sizing.whole(q.device):
        return _local_attention_sdpa(q, k, v, c, o, mask, tail_k, tail_v, tail_m, readout)
    if o and tail_k is None:
        tail_k = q.new_zeros(b, h, o, d)
        tail_v = q.new_zeros(b, h, o, d)
        tail_m = torch.zeros(b, o, dtype=torch.bool, device=q.device)
    # query i (0..c-1) of a chunk may see window slot j (0..o+c-1) iff j - o <= i
    causal = torch.ones(c, o + c, dtype=torch.bool, device=q.device).tril(diagonal=o)  # (c, L)
    diag = torch.zeros(c, o + c, dtype=torch.bool, device=q.device)
    diag[torch.arange(c), torch.arange(c) + o] = True  # the query itself: keeps masked rows finite
    if mask is None and o == 0:  # the common fast path: one (c, c) causal bias shared by all blocks
        bias = torch.zeros(c, c, dtype=q.dtype, device=q.device).masked_fill(~causal, _NEG_INF)
    else:
        m = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
        win = _local_mask(m, tail_m, o, c, C)  # (b, C, L)
        allowed = (causal & win[:, :, None, :]) | diag  # (b, C, c, L)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, _NEG_INF)
        bias = bias[:, None].expand(b, h, C, c, o + c).reshape(b * h * C, c, o + c)
    kw = _local_keys(k, tail_k, o, c, C).reshape(b * h * C, o + c, d)
    vw = _local_keys(v, tail_v, o, c, C).reshape(b * h * C, o + c, d)
    if readout is not None:
        qe, S, g = readout
        readout = (qe.reshape(b * h * C, c, qe.shape[-1]), S.reshape(b * h * C, S.shape[-2], d), g)
    out = _block_softmax_attention(q.reshape(b * h * C, c, d), kw, vw, bias, 1.0 / math.sqrt(d), readout)
    return out.view(b, h, n, d)


def _local_attention_sdpa(q, k, v, c, o, mask, tail_k, tail_v, tail_m, readout) -> torch.Tensor:
    """``local_attention`` under the cuda policy: every (b, h, C) block in one SDPA call.

    The blocks are laid out (b, h C, c, .) so queries are a free view of (b, h, n, d). Without a
    mask or overlap the pattern is the plain causal square (``is_causal``: eligible for the flash
    kernel); otherwise a (b, h C, c, L) bool mask, the same rule as the cpu path's bias.
    """
    b, h, n, d = q.shape
    C, L = n // c, o + c
    if o and tail_k is None:  # nothing before position 0: a masked-out zero tail
        tail_k, tail_v = q.new_zeros(b, h, o, d), v.new_zeros(b, h, o, d)
        tail_m = torch.zeros(b, o, dtype=torch.bool, device=q.device)
    qb = q.reshape(b, h * C, c, d)                                    # (b, hC, c, d), a view
    kw = _local_keys(k, tail_k, o, c, C).reshape(b, h * C, L, d)      # (b, hC, L, d)
    vw = _local_keys(v, tail_v, o, c, C).reshape(b, h * C, L, d)
    if mask is None and o == 0:
        out = F.scaled_dot_product_attention(qb, kw, vw, is_causal=True)
    else:
        m = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
        causal = torch.ones(c, L, dtype=torch.bool, device=q.device).tril(diagonal=o)  # slot j - o <= i
        diag = torch.arange(c, device=q.device)[:, None] + o == torch.arange(L, device=q.device)  # (c, L)
        allowed = (causal & _local_mask(m, tail_m, o, c, C)[:, :, None, :]) | diag  # (b, C, c, L)
        allowed = allowed[:, None].expand(b, h, C, c, L).reshape(b, h * C, c, L)
        out = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=allowed)
    out = out.reshape(b * h * C, c, d)
    if readout is not None:
        qe, S, g = readout
        out = torch.baddbmm(out, qe.reshape(b * h * C, c, qe.shape[-1]), S.reshape(b * h * C, S.shape[-2], d),
                            alpha=g)
    return out.view(b, h, n, d)


# ----------------------------------------------------------------------------- retrieval term


def chunk_summaries(x: torch.Tensor, mask: Optional[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """s_j: the mean of x over chunk j's real tokens, (b, n, D) -> (b, C, D); 0 for an all-padding
    chunk. The meta key of chunk j is read from s_j, the meta query of chunk j + 1 too."""
    b, n, D = x.shape
    chunk_size = min(chunk_size, n)  # one partial chunk: n rows, not chunk_size (memory follows min(c, n))
    C = -(-n // chunk_size)
    pad = C * chunk_size - n
    w = torch.ones(b, n, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        w = F.pad(w, (0, pad))
    x = x.view(b, C, chunk_size, D)
    w = w.view(b, C, chunk_size, 1)
    return (x * w).sum(2) / w.sum(2).clamp_min(1.0)  # (b, C, D)


def chunk_states(k: torch.Tensor, v: torch.Tensor, chunk_size: int, mask: Optional[torch.Tensor] = None,
                 compress: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F_j = sum_{s in chunk j, real} (A^T k_s) v_s^T.  k, v: (b, h, C*c, d) -> (b, h, C, e, d).

    Summed in ``sizing.acc_dtype`` (fp32 for half-precision inputs): a state adds c products.
    """
    k, v, compress = sizing.upcast(k, v, compress)
    if compress is not None:
        k = torch.einsum("bhnd,hde->bhne", k, compress)
    if mask is not None:
        k = k * mask[:, None, :, None].to(k.dtype)
    b, h, n, e = k.shape
    C, d = n // chunk_size, v.shape[-1]
    kc = k.reshape(b * h * C, chunk_size, e)
    vc = v.reshape(b * h * C, chunk_size, d)
    return torch.bmm(kc.transpose(1, 2), vc).view(b, h, C, e, d)


def retrieval_weights(r: torch.Tensor, hk: torch.Tensor, valid: torch.Tensor, num_past: int) -> torch.Tensor:
    """P_ij: softmax over valid chunks j < num_past + i of r_i . h_j / sqrt(d); all-zero rows if none.

    r: (b, h, C, d) queries of the new chunks; hk: (b, h, P + C, d); valid: (b, P + C) bool.
    Returns (b, h, C, P + C).
    """
    C, T, d = r.shape[2], hk.shape[2], r.shape[-1]
    r, hk = sizing.upcast(r, hk)  # the chunk-level softmax in fp32 for half-precision inputs
    scores = (r @ hk.transpose(-1, -2)) / math.sqrt(d)  # (b, h, C, P+C)
    earlier = torch.ones(C, T, dtype=torch.bool, device=r.device).tril(diagonal=num_past - 1)  # j < P + i
    allowed = earlier & valid[:, None, None, :]  # (b, 1, C, T)
    any_allowed = allowed.any(-1, keepdim=True)  # (b, 1, C, 1)
    # rows with nothing to retrieve get a dummy all-zero score row and are zeroed after the softmax,
    # so neither the values nor the gradients ever see NaN
    scores = scores.masked_fill(~allowed & any_allowed, _NEG_INF).masked_fill(~any_allowed, 0.0)
    return scores.softmax(-1) * allowed.to(scores.dtype)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_bsbr_inputs(q, k, v, r, hk, chunk_size, overlap, mask, compress, gamma) -> Optional[torch.Tensor]:
    """Validate ``bsbr_attention``'s arguments; one ValueError naming the argument. Returns the mask
    as bool (a 0/1 numeric mask is converted; reading its values is the one host read here)."""
    if not _is_int(chunk_size) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not _is_int(overlap) or not 0 <= overlap <= chunk_size:
        raise ValueError(f"overlap must be an integer in [0, chunk_size={chunk_size}], got {overlap!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("r", r), ("hk", hk)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, tokens or chunks, head_dim), got {got}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    b, h, n, d = q.shape
    if n == 0:
        raise ValueError("q, k, v must hold at least one token (n >= 1)")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)} (b, h, n, d)")
    C = -(-n // min(chunk_size, n))
    for name, t in (("r", r), ("hk", hk)):
        if t.shape != (b, h, C, d):
            raise ValueError(f"{name} must have shape (b, h, ceil(n / chunk_size), d) = {(b, h, C, d)}, "
                             f"got {tuple(t.shape)}")
    if compress is not None:
        if not isinstance(compress, torch.Tensor) or compress.dim() != 3 or compress.shape[:2] != (h, d)                 or not 1 <= compress.shape[2] <= d:
            got = tuple(compress.shape) if isinstance(compress, torch.Tensor) else type(compress).__name__
            raise ValueError(f"compress must be None or a tensor of shape (h, d, e) = ({h}, {d}, e) with "
                             f"1 <= e <= d, got {got}")
        if compress.dtype != q.dtype or compress.device != q.device:
            raise ValueError(f"compress must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {compress.dtype}, {compress.device}")
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                              or not math.isfinite(gamma) or gamma <= 0):
        raise ValueError(f"gamma must be None or a finite number > 0, got {gamma!r}")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != (b, n):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be None or a (batch, n) = {(b, n)} tensor, True/1 = real token, got {got}")
    if mask.device != q.device:
        raise ValueError(f"mask must be on q's device {q.device}, got {mask.device}")
    return mask_as_bool(mask, "mask")


def bsbr_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, hk: torch.Tensor, *,
                   chunk_size: int, overlap: int = 0, mask: Optional[torch.Tensor] = None,
                   compress: Optional[torch.Tensor] = None, gamma: Optional[float] = None,
                   past: Optional[BSBRPast] = None, return_states: bool = False):
    """The BSBR token mixer, chunkwise-parallel.

    Args:
        q, k, v: (b, h, n, d) per-head projections; any n >= 1 (padded internally to chunks).
        r: (b, h, C, d) meta query of each chunk (from the summary of the chunk before it).
        hk: (b, h, C, d) meta key of each chunk (from its own summary). C = ceil(n / chunk_size).
        mask: (b, n) bool (or 0/1 numbers), True = real token; masked tokens are never attended to or stored.
        compress: (h, d, e) per-head compression map A, or None.
        gamma: retrieval scale; default ``default_gamma(chunk_size, e)``.
        past: state of the chunks before position 0 (the call must start on a chunk boundary).
        return_states: also return the new chunks' states (F, valid, S) for the cache.
    Returns:
        (b, h, n, d) outputs; with ``return_states`` also a dict of F (b,h,C,e,d), valid (b,C),
        S (b,h,C,e,d).
    Raises:
        ValueError naming the argument for a wrong rank, shape, dtype or device, a chunk_size that is
        not a positive int, an overlap outside [0, chunk_size], a bad compress, gamma or mask.
    """
    mask = check_bsbr_inputs(q, k, v, r, hk, chunk_size, overlap, mask, compress, gamma)
    return bsbr_attention_unchecked(q, k, v, r, hk, chunk_size=chunk_size, overlap=overlap, mask=mask,
                                    compress=compress, gamma=gamma, past=past, return_states=return_states)


def bsbr_attention_unchecked(q, k, v, r, hk, *, chunk_size: int, overlap: int = 0, mask=None, compress=None,
                             gamma=None, past=None, return_states: bool = False):
    """:func:`bsbr_attention` without its argument checks, for callers that build the arguments
    themselves (``BSBRAttention``, whose shapes, dtypes and bool mask are right by construction):
    the checks are ~30 Python-level tests per call, a few percent of a small model's forward."""
    b, h, n, d = q.shape
    o = overlap
    # A call shorter than one chunk holds a single partial chunk: its blocks need only be n long
    # (padding them to chunk_size would cost (c/n)^2 more local work). gamma keeps the true c.
    c = min(chunk_size, n)
    C = -(-n // c)
    pad = C * c - n
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    m = mask
    if pad and m is None:
        m = torch.ones(b, n, dtype=torch.bool, device=q.device)
    if m is not None and pad:
        m = F.pad(m, (0, pad), value=False)

    F_new = chunk_states(k, v, c, m, compress)  # (b, h, C, e, d)
    e = F_new.shape[3]
    valid_new = m.view(b, C, c).any(-1) if m is not None else torch.ones(b, C, dtype=torch.bool, device=q.device)
    if past is not None and past.F.shape[2]:
        F_all = torch.cat([past.F.to(F_new.dtype), F_new], dim=2)
        hk_all = torch.cat([past.hk, hk], dim=2)
        valid_all = torch.cat([past.valid, valid_new], dim=1)
        P = past.F.shape[2]
    else:
        F_all, hk_all, valid_all, P = F_new, hk, valid_new, 0
    weights = retrieval_weights(r, hk_all, valid_all, P)  # (b, h, C, P + C)
    S = (weights @ F_all.flatten(-2)).view(b, h, C, e, d)  # (b, h, C, e, d), in the accumulation dtype
    qe = torch.einsum("bhnd,hde->bhne", q, compress) if compress is not None else q
    g = default_gamma(chunk_size, e) if gamma is None else gamma

    tail = (past.tail_k, past.tail_v, past.tail_m) if past is not None and past.tail_k.shape[2] == o else (None,) * 3
    out = local_attention(q, k, v, chunk_size=c, overlap=o, mask=m, tail_k=tail[0], tail_v=tail[1],
                          tail_m=tail[2], readout=(qe, S.to(q.dtype), g))[:, :, :n]  # (b, h, n, d)
    if return_states:
        return out, dict(F=F_new, valid=valid_new, S=S)
    return out


def bsbr_open_chunk(q, k_ctx, v_ctx, m_ctx, start: int, S: Optional[torch.Tensor],
                    compress: Optional[torch.Tensor], gamma: float) -> torch.Tensor:
    """Outputs for queries continuing an open chunk (the decoding step).

    q: (b, h, m, d) queries at context positions start .. start+m-1 of k_ctx/v_ctx (b, h, T, d),
    which hold [overlap tail | chunk so far | these m tokens]; m_ctx (b, T) bool. S (b, h, e, d) is
    the chunk's retrieval state. Cost per query O(T d + e d): no prefix recomputation.
    """
    mq, T = q.shape[2], k_ctx.shape[2]
    qi = torch.arange(mq, device=q.device)[:, None] + start
    kj = torch.arange(T, device=q.device)[None, :]
    allowed = ((kj <= qi) & m_ctx[:, None, :]) | (kj == qi)  # (b, m, T)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, _NEG_INF)
    out = F.scaled_dot_product_attention(q, k_ctx, v_ctx, attn_mask=bias[:, None])
    if S is not None:
        qe = torch.einsum("bhnd,hde->bhne", q, compress) if compress is not None else q
        out = (out + gamma * (qe.to(S.dtype) @ S)).to(q.dtype)  # S may be an fp32 state
    return out


def bsbr_attention_flops(batch: int, heads: int, n: int, head_dim: int, chunk_size: int, overlap: int = 0,
                         compression_factor: Optional[int] = None) -> int:
    """Analytic FLOPs (2 per multiply-add) of ``bsbr_attention`` as implemented.

    Counts the matrix products only (softmax and elementwise work are lower order), over the full
    c x (c + o) blocks and the full C x C chunk-score matrix, as computed.
    """
    for name, value in (("batch", batch), ("heads", heads), ("n", n), ("head_dim", head_dim),
                        ("chunk_size", chunk_size)):
        if not _is_int(value) or value <= 0:
            raise ValueError(f"bsbr_attention_flops: {name} must be a positive integer, got {value!r}")
    if not _is_int(overlap) or not 0 <= overlap <= chunk_size:
        raise ValueError(f"bsbr_attention_flops: overlap must be an integer in [0, chunk_size={chunk_size}], "
                         f"got {overlap!r}")
    if compression_factor is not None and (not _is_int(compression_factor) or compression_factor <= 0
                                           or head_dim % compression_factor):
        raise ValueError(f"bsbr_attention_flops: compression_factor must be None or a positive integer dividing "
                         f"head_dim={head_dim}, got {compression_factor!r}")
    c, o, d = chunk_size, overlap, head_dim
    C = -(-n // c)
    N = C * c
    e = d // (compression_factor or 1)
    local = 2 * 2 * N * (c + o) * d            # q k^T and p v over (c, c+o) blocks
    compress = 2 * 2 * N * d * e if compression_factor else 0  # k A and q A
    states = 2 * N * e * d                     # (k A)^T v per chunk
    scores = 2 * C * C * d                     # r h^T
    mixing = 2 * C * C * e * d                 # P F
    readout = 2 * N * e * d                    # (q A) S
    return batch * heads * (local + compress + states + scores + mixing + readout)
