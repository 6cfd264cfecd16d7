"""DeltaNet: linear attention with the delta rule.

Schlag, Irie & Schmidhuber (2021), "Linear Transformers Are Secretly Fast Weight Programmers";
chunkwise-parallel training form from Yang, Wang, Zhang, Shen & Kim (2024), "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length" (NeurIPS).

Per head, with L2-normalised ``q_t, k_t`` and a write strength ``beta_t = sigmoid(w_beta . x_t)``:

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T        S: (d_k, d_v)
    o_t = S_t^T q_t

i.e. ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``: each write first erases what the
state currently returns for ``k_t``. No clamps, decay or noise are added.

Chunkwise form (Yang et al., 2024, s.3). Inside a chunk that starts from state ``S``, the product of
the ``c`` Householder-like factors has the WY representation ``I - sum_r k_r w_r^T`` and the written
part ``sum_r k_r u_r^T``, where (UT transform)

    T = (I + strict_tril(diag(beta) K K^T))^{-1}      W = T diag(beta) K,   U = T diag(beta) V

so, with ``U~ = U - W S`` (the "pseudo values" corrected for what ``S`` already stores),

    O      = Q S + tril(Q K^T) U~        (tril keeps the diagonal)
    S_next = S + K^T U~ = (I - K^T W) S + K^T U

``T`` needs one small unit-lower-triangular inversion per chunk, done for all chunks at once by
block doubling (``unit_lower_inverse``; batched products only). Only the ``S -> S_next`` pass is
sequential across chunks, as in the paper's algorithm; ``affine_scan`` runs it in about
``2 sqrt(C)`` batched steps. Every other product is batched over all chunks.
Cost per head ``O(n c d + n d^2)`` (the scan adds ``O(n d^3 / c)``, i.e. ``n d^2`` for ``c = d``).

Axis legend:  b batch   h heads   n tokens   C chunks   c chunk size   d head size   D hidden
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bsbr.shell import CausalLM, check_heads, check_positive_int, exists, merge_heads, split_heads


def _check_inputs(q, k, v, beta, mask):
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"expected q, k (b, h, n, d), v (b, h, n, d_v), beta (b, h, n); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, beta {tuple(beta.shape)}")
    if exists(mask) and mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"mask must be (batch, n) = {(q.shape[0], q.shape[2])}, got {tuple(mask.shape)}")


def _apply_mask(k, beta, mask):
    """Masked tokens get beta = 0 and k = 0, so they neither erase nor write."""
    if not exists(mask):
        return k, beta
    m = mask[:, None, :].to(beta.dtype)                               # (b, 1, n)
    return k * m[..., None], beta * m


# ----------------------------------------------------------------------------- ops


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """``T = (I + strict_tril(A))^{-1}`` for a batch ``A`` (N, c, c), by recursive block doubling.

    The inverse of ``[[X, 0], [Y, Z]]`` is ``[[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]]``: starting from the
    4 x 4 diagonal blocks (whose inverse is exactly ``(I - L)(I + L^2)`` since ``L^4 = 0``), each
    level doubles the block size with two batched products, all blocks of a level at once.

    Why not ``torch.linalg.solve_triangular``: on CPU it makes one small LAPACK call per chunk, and
    with MKL threading on a loaded 2-core machine we measured it stall from ~50 ms to 13 s per call
    at 16k tokens. These few large batched products cost about the same and do not stall.
    Everything above the diagonal of ``A`` is ignored. Any ``c`` (padded to a power of two).
    """
    N, c, _ = A.shape
    c2 = 1 << max(2, (c - 1).bit_length())                            # next power of two, >= 4
    if c2 != c:  # zero rows/columns: the padded system is block-diagonal with an identity block
        A = F.pad(A, (0, c2 - c, 0, c2 - c))
    m, G = 4, c2 // 4
    L = A.view(N, G, m, G, m).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).tril(-1)  # (N, G, 4, 4)
    eye = torch.eye(m, dtype=A.dtype, device=A.device)
    inv = (eye - L) @ (eye + L @ L)                                   # (N, G, 4, 4) diagonal-block inverses
    while m < c2:
        G = c2 // (2 * m)
        blocks = A.view(N, G, 2 * m, G, 2 * m).diagonal(dim1=1, dim2=3)  # (N, 2m, 2m, G)
        Y = blocks[:, m:, :m].permute(0, 3, 1, 2)                     # (N, G, m, m) lower-left blocks
        Xi, Zi = inv[:, 0::2], inv[:, 1::2]                           # (N, G, m, m) inverses of the diagonal pairs
        top = torch.cat([Xi, torch.zeros_like(Xi)], dim=-1)           # (N, G, m, 2m)
        bottom = torch.cat([-(Zi @ Y @ Xi), Zi], dim=-1)              # (N, G, m, 2m)
        inv = torch.cat([top, bottom], dim=-2)                        # (N, G, 2m, 2m)
        m *= 2
    return inv[:, 0, :c, :c]




def affine_scan(P: torch.Tensor, H: torch.Tensor, S0: torch.Tensor) -> tuple:
    """States of ``S_{i+1} = P_i S_i + H_i`` before every step, and the state after the last.

    P (B, C, d, d), H (B, C, d, e), S0 (B, d, e) -> (states (B, C, d, e), S_C (B, d, e)).

    Two levels of about ``sqrt(C)`` sequential steps instead of ``C``: inside groups of ``g``
    steps the partial maps ``S -> M_j S + N_j`` are composed for all groups at once; then the
    groups' start states are chained; then every state is one batched product. It costs three
    times the FLOPs of the plain loop, but with 2 threads on a loaded machine every small product
    pays a thread wake-up (we measured 256 (8 x 64 x 64) products take 1.6 s with 2 threads vs
    14 ms with 1), so fewer, larger steps are what keeps the sequential pass cheap.
    """
    B, C, d, _ = P.shape
    e = H.shape[-1]
    g = math.isqrt(C - 1) + 1                                         # steps per group
    G = -(-C // g)                                                    # groups
    if G * g != C:  # identity steps change nothing
        P = torch.cat([P, torch.eye(d, dtype=P.dtype, device=P.device).expand(B, G * g - C, d, d)], dim=1)
        H = F.pad(H, (0, 0, 0, 0, 0, G * g - C))
    BG = B * G
    # 1. inside every group at once: M_{j+1} = P_j M_j, N_{j+1} = P_j N_j + H_j, from (M_0, N_0) = (I, 0)
    Ps = [t.reshape(BG, d, d) for t in P.view(B, G, g, d, d).unbind(2)]  # g x (BG, d, d)
    Hs = [t.reshape(BG, d, e) for t in H.view(B, G, g, d, e).unbind(2)]  # g x (BG, d, e)
    M, N = [None, Ps[0]], [None, Hs[0]]                              # index j: the map over steps < j
    for j in range(1, g):
        M.append(Ps[j] @ M[-1])
        N.append(torch.baddbmm(Hs[j], Ps[j], N[-1]))
    # 2. chain the groups: each group's whole map is (M_g, N_g)
    S, starts = S0, []
    for M_t, N_t in zip(M[g].view(B, G, d, d).unbind(1), N[g].view(B, G, d, e).unbind(1)):
        starts.append(S)
        S = torch.baddbmm(N_t, M_t, S)                                # (B, d, e)
    starts = torch.stack(starts, dim=1).view(BG, d, e)                # (BG, d, e)
    # 3. every state from its group's start: states[t, j] = M_j S_t + N_j (M_0 = I, N_0 = 0)
    states = [starts] + [torch.baddbmm(N[j], M[j], starts) for j in range(1, g)]  # g x (BG, d, e)
    states = torch.stack(states, dim=1).view(B, G * g, d, e)[:, :C]  # (B, C, d, e)
    return states, S


def delta_rule_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         chunk_size: int, mask: Optional[torch.Tensor] = None, *,
                         initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False):
    """The delta rule, chunkwise WY/UT-transform form (Yang et al., 2024).

    Args:
        q, k: (b, h, n, d), expected L2-normalised per head (``DeltaNetAttention`` does it).
        v: (b, h, n, d_v).  beta: (b, h, n) write strengths in (0, 1).
        chunk_size: tokens per chunk; any ``n`` works (the last chunk is zero-padded).
        mask: (b, n) bool, True = real token; masked tokens get beta = 0 and k = 0.
        initial_state: optional (b, h, d, d_v) state ``S`` before the first token.
        output_final_state: also return the state after the last token.

    Returns:
        o (b, h, n, d_v), and the final state (b, h, d, d_v) if ``output_final_state``.
    """
    check_positive_int("chunk_size", chunk_size)
    _check_inputs(q, k, v, beta, mask)
    k, beta = _apply_mask(k, beta, mask)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, n)
    C = -(-n // c)
    pad = C * c - n
    if pad:  # zero keys with beta 0 are no-ops on the state; padded outputs are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, pad))
    B = b * h
    q = q.reshape(B, C, c, d)
    k = k.reshape(B, C, c, d)
    v = v.reshape(B, C, c, dv)
    beta = beta.reshape(B, C, c, 1)

    # UT transform for every chunk at once (Yang et al., 2024, eq. 8-9):
    #   T = (I + strict_tril(diag(beta) K K^T))^{-1},  [W U] = T diag(beta) [K V]
    # T comes from one batched unit-lower-triangular inversion (``unit_lower_inverse`` reads only
    # the strict lower triangle, so tril(-1) + I is never formed); W and U are one batched product.
    BC = B * C
    kb = k * beta                                                     # (B, C, c, d)
    kT = k.reshape(BC, c, d).transpose(-1, -2)                        # (BC, d, c), a view: bmm reads it transposed
    A = kb.reshape(BC, c, d) @ kT                                      # (BC, c, c)
    T = unit_lower_inverse(A)                                         # (BC, c, c)
    WU = T @ torch.cat([kb, v * beta], dim=-1).reshape(BC, c, d + dv)   # (BC, c, d + dv)
    W, U = WU[..., :d], WU[..., d:]                                   # (BC, c, d), (BC, c, dv)

    # Across chunks S_{i+1} = S_i + K_i^T (U_i - W_i S_i) = P_i S_i + H_i, an affine map whose
    # P_i = I - K_i^T W_i and H_i = K_i^T U_i come from one product batched over all chunks. The
    # sequential part (as in the paper's algorithm) is this recurrence, in ~2 sqrt(C) steps.
    KWU = (kT @ WU).view(B, C, d, d + dv)                             # (B, C, d, d + dv): [K^T W | K^T U]
    P = torch.eye(d, dtype=q.dtype, device=q.device) - KWU[..., :d]   # (B, C, d, d)
    H = KWU[..., d:]                                                  # (B, C, d, dv)
    S0 = initial_state.reshape(B, d, dv) if exists(initial_state) else q.new_zeros(B, d, dv)
    states, S = affine_scan(P, H, S0)                                 # (B, C, d, dv): S before each chunk
    states = states.reshape(BC, d, dv)
    pseudo_v = torch.baddbmm(U, W, states, alpha=-1)                  # (BC, c, dv): U~ = U - W S

    qv = q.reshape(BC, c, d)
    qk = (qv @ kT).tril_()                                            # (BC, c, c), diagonal kept
    o = torch.baddbmm(qv @ states, qk, pseudo_v)                     # (BC, c, dv): Q S + tril(Q K^T) U~
    o = o.view(b, h, C * c, dv)[:, :, :n]
    S = S.view(b, h, d, dv)
    return (o, S) if output_final_state else o


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         mask: Optional[torch.Tensor] = None, *, initial_state: Optional[torch.Tensor] = None,
                         output_final_state: bool = False):
    """The delta rule one token at a time (the decoding form; ``O(d^2)`` per token).

    Same arguments and results as :func:`delta_rule_chunkwise`, without ``chunk_size``.
    """
    _check_inputs(q, k, v, beta, mask)
    k, beta = _apply_mask(k, beta, mask)
    b, h, n, d = q.shape
    S = initial_state if exists(initial_state) else q.new_zeros(b, h, d, v.shape[-1])
    out = []
    for t in range(n):
        kt = k[:, :, t:t + 1]                                         # (b, h, 1, d)
        err = v[:, :, t:t + 1] - kt @ S                               # (b, h, 1, dv): v_t - S^T k_t
        S = S + beta[:, :, t, None, None] * kt.transpose(-1, -2) @ err  # (b, h, d, dv)
        out.append(q[:, :, t:t + 1] @ S)                              # (b, h, 1, dv): S^T q_t
    o = torch.cat(out, dim=2)                                         # (b, h, n, dv)
    return (o, S) if output_final_state else o


# ----------------------------------------------------------------------------- mixer


@dataclass
class DeltaNetCache:
    """Decoding state of one layer: the fast-weight matrix ``S`` (b, h, d, d)."""

    S: torch.Tensor


class DeltaNetAttention(nn.Module):
    """Multi-head DeltaNet mixer: q, k, v and per-head beta projections -> delta rule -> out_proj."""

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int = 64):
        super().__init__()
        self.head_dim = check_heads(hidden_dim, num_heads)
        check_positive_int("chunk_size", chunk_size)
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.beta_proj = nn.Linear(hidden_dim, num_heads, bias=False)  # w_beta, one row per head
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def op_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple:
        q, k, v = self.qkv(x).chunk(3, dim=-1)                        # 3 x (b, n, D)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # 3 x (b, h, n, d)
        # unit-norm keys keep every (I - beta k k^T) a contraction for beta in (0, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)       # (b, h, n)
        return (q, k, v, beta) if mask is None else (q, k, v, beta, mask)

    def op(self, q, k, v, beta, mask=None) -> torch.Tensor:
        return delta_rule_chunkwise(q, k, v, beta, self.chunk_size, mask)

    def init_cache(self, batch_size: int, device=None, dtype=None) -> DeltaNetCache:
        d = self.head_dim
        return DeltaNetCache(S=torch.zeros(batch_size, self.num_heads, d, d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[DeltaNetCache] = None) -> torch.Tensor:
        inputs = self.op_inputs(x, mask)
        if cache is None:
            o = self.op(*inputs)
        else:
            # one token: the recurrence; a longer piece (a prompt): the chunkwise form from the cached S
            if x.shape[1] == 1:
                o, S = delta_rule_recurrent(*inputs[:4], mask, initial_state=cache.S, output_final_state=True)
            else:
                o, S = delta_rule_chunkwise(*inputs[:4], self.chunk_size, mask, initial_state=cache.S,
                                            output_final_state=True)
            cache.S.copy_(S)
        return self.out_proj(merge_heads(o))                           # (b, n, D)


# ----------------------------------------------------------------------------- model


class DeltaNetModel(CausalLM):
    """Causal LM with a DeltaNet token mixer (Schlag et al., 2021; Yang et al., 2024).

    Args:
        chunk_size: chunk length of the chunkwise-parallel form (a speed knob only: the output
            does not depend on it beyond round-off). Positive int.
        **shell_kwargs: passed to :class:`bsbr.shell.CausalLM`.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, chunk_size: int = 64, **shell_kwargs):
        check_heads(hidden_dim, num_heads)
        check_positive_int("chunk_size", chunk_size)
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: DeltaNetAttention(hidden_dim, num_heads, chunk_size),
                         **shell_kwargs)
