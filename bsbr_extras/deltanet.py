"""DeltaNet: linear attention with the delta rule.

Which published layer this is: the delta rule of Schlag, Irie & Schmidhuber (2021), "Linear
Transformers Are Secretly Fast Weight Programmers" (ICML), with the L2-normalised queries and keys
of Yang, Wang, Zhang, Shen & Kim (2024), "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (NeurIPS), computed with Yang et al.'s chunkwise WY/UT algorithm. It is NOT Yang
et al.'s full DeltaNet layer. Every departure:

- from Yang et al.'s layer: no short causal convolution on q, k, v; no SiLU on q, k, v; no
  per-head output normalisation before ``out_proj`` (their layer has an RMSNorm there);
- from Schlag et al.'s layer: q and k are L2-normalised instead of passed through a feature map
  (e.g. their DPFP) and sum-normalised;
- shared with both: ``beta_t = sigmoid(w_beta . x_t)`` per head; no decay, clamp or noise.

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

``T`` needs one small unit-lower-triangular inversion per chunk, done for many chunks at once by
block doubling (``unit_lower_inverse``; batched products only). Only the ``S -> S_next`` pass is
sequential across chunks, as in the paper's algorithm: two ``c x d x d_v`` products per chunk,
batched over batch and heads. How many chunks a segment batches is the sizing policy's
(``bsbr.sizing``): on a CPU, segments of a few chunks so that no temporary outgrows the
allocator's reused heap (see ``SEGMENT_BYTES``); on a GPU, one segment, so the UT transform of
every chunk is one batched pass (as flash-linear-attention's naive chunk reference does) and only
the chunk recurrence loops. Cost per head ``O(n c d + n d^2)``.

Numerics: for half-precision inputs everything (the UT inverse, ``W``, ``U``, the state) runs in
fp32 and the output is cast back; the final state stays fp32. A bf16 state fails on correlated
keys (``tests/test_dtypes.py``).

Axis legend:  b batch   h heads   n tokens   C chunks   c chunk size   d head size   D hidden
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bsbr import sizing
from bsbr.causal_lm import CausalLM
from bsbr.checks import check_heads, check_positive_int
from bsbr.mixer import RecurrentStateMixer, exists, split_heads


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




# Bytes of the largest per-segment temporary (a segment's [K V] rows). glibc serves allocations over
# its mmap threshold (at most 32 MB) with fresh pages, and first-touch page faults then cost more than
# the arithmetic: at n = 16k, 8 heads of 64, chunk 64, 2 threads, the whole-sequence form (every
# temporary 32-64 MB) took 215 ms, of which about 100 ms were page faults. Segments of ~2 MB are
# served from reused heap memory and cache: 108 ms. Any value gives the same result.
SEGMENT_BYTES = 2 << 20  # the cpu policy's budget (``bsbr.sizing``); the cuda policy takes every chunk


def _segment(q, k, v, beta, S):
    """The chunkwise form over the ``g`` chunks of one segment, from state ``S`` before its first chunk.

    q, k (B, g, c, d), v (B, g, c, dv), beta (B, g, c, 1), S (B, d, dv) -> (o (B, g, c, dv), S after).
    """
    B, g, c, d = q.shape
    dv = v.shape[-1]
    # UT transform for every chunk of the segment at once (Yang et al., 2024, eq. 8-9):
    #   T = (I + strict_tril(diag(beta) K K^T))^{-1},  [W U] = T diag(beta) [K V]
    # ``unit_lower_inverse`` reads only the strict lower triangle, so tril(-1) + I is never formed.
    R = torch.cat([k, v], dim=-1) * beta                              # (B, g, c, d + dv): diag(beta) [K V]
    kT = k.transpose(-1, -2)                                          # (B, g, d, c), a view
    A = torch.matmul(R[..., :d], kT)                                  # (B, g, c, c): diag(beta) K K^T
    T = unit_lower_inverse(A.reshape(B * g, c, c))                    # (Bg, c, c)
    WU = (T @ R.view(B * g, c, d + dv)).view(B, g, c, d + dv)         # [W U]
    # The sequential part, as in the paper's algorithm: chunk by chunk, the pseudo-values
    # U~ = U - W S (what the chunk writes, corrected for what S already returns) and
    # S_next = S + K^T U~. Two (c x d x dv) products per chunk, batched over b * h.
    states, pseudo = [], []
    for i in range(g):
        states.append(S)
        Wi, Ui = WU[:, i, :, :d], WU[:, i, :, d:]                      # (B, c, d), (B, c, dv)
        pv = torch.baddbmm(Ui, Wi, S, alpha=-1)                       # (B, c, dv): U~
        pseudo.append(pv)
        S = torch.baddbmm(S, kT[:, i], pv)                            # (B, d, dv)
    states = torch.stack(states, dim=1)                               # (B, g, d, dv): S before each chunk
    pseudo = torch.stack(pseudo, dim=1)                               # (B, g, c, dv)
    # Outputs, batched again: O = Q S + tril(Q K^T) U~ (diagonal kept)
    qk = torch.matmul(q, kT).tril_()                                  # (B, g, c, c)
    o = torch.matmul(q, states) + torch.matmul(qk, pseudo)            # (B, g, c, dv)
    return o, S


def delta_rule_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         chunk_size: int, mask: Optional[torch.Tensor] = None, *,
                         initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                         segment_chunks: Optional[int] = None):
    """The delta rule, chunkwise WY/UT-transform form (Yang et al., 2024).

    Args:
        q, k: (b, h, n, d), expected L2-normalised per head (``DeltaNetAttention`` does it).
        v: (b, h, n, d_v).  beta: (b, h, n) write strengths in (0, 1).
        chunk_size: tokens per chunk; any ``n`` works (the last chunk is zero-padded).
        mask: (b, n) bool, True = real token; masked tokens get beta = 0 and k = 0.
        initial_state: optional (b, h, d, d_v) state ``S`` before the first token.
        output_final_state: also return the state after the last token.
        segment_chunks: chunks per segment (a memory-locality knob that does not change the
            result); None asks the sizing policy: on a CPU segments whose largest temporary is
            about ``SEGMENT_BYTES``, on a GPU one segment of all chunks.

    Returns:
        o (b, h, n, d_v), and the final state (b, h, d, d_v) if ``output_final_state``.
    """
    check_positive_int("chunk_size", chunk_size)
    if segment_chunks is not None:
        check_positive_int("segment_chunks", segment_chunks)
    _check_inputs(q, k, v, beta, mask)
    return delta_chunkwise_unchecked(q, k, v, beta, chunk_size, mask, initial_state=initial_state,
                                     output_final_state=output_final_state, segment_chunks=segment_chunks)


def delta_chunkwise_unchecked(q, k, v, beta, chunk_size: int, mask=None, *, initial_state=None,
                              output_final_state: bool = False, segment_chunks=None):
    """:func:`delta_rule_chunkwise` without its checks (the mixer's: the chunk size was checked in
    ``__init__``, the shapes are right by construction)."""
    dtype = v.dtype
    q, k, v, beta, initial_state = sizing.upcast(q, k, v, beta, initial_state)  # fp32 for half precision
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
    q, k, v = q.reshape(B, C, c, d), k.reshape(B, C, c, d), v.reshape(B, C, c, dv)
    beta = beta.reshape(B, C, c, 1)
    g = segment_chunks or sizing.per_block(q.device, C, B * c * (d + dv) * q.element_size(), SEGMENT_BYTES)
    S = initial_state.reshape(B, d, dv).to(q.dtype) if exists(initial_state) else q.new_zeros(B, d, dv)
    outs = []
    # split, not slice: autograd then assembles each input's gradient once, instead of one
    # input-sized zero tensor per segment
    for parts in zip(*(t.split(g, dim=1) for t in (q, k, v, beta))):
        o, S = _segment(*parts, S)
        outs.append(o)
    o = torch.cat(outs, dim=1).view(b, h, C * c, dv)[:, :, :n].to(dtype)
    S = S.view(b, h, d, dv)
    return (o, S) if output_final_state else o


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         mask: Optional[torch.Tensor] = None, *, initial_state: Optional[torch.Tensor] = None,
                         output_final_state: bool = False):
    """The delta rule one token at a time (the decoding form; ``O(d^2)`` per token).

    Same arguments and results as :func:`delta_rule_chunkwise`, without ``chunk_size``.
    """
    _check_inputs(q, k, v, beta, mask)
    return delta_recurrent_unchecked(q, k, v, beta, mask, initial_state=initial_state,
                                     output_final_state=output_final_state)


def delta_recurrent_unchecked(q, k, v, beta, mask=None, *, initial_state=None, output_final_state: bool = False):
    """:func:`delta_rule_recurrent` without its checks (the mixer's decode step)."""
    dtype = v.dtype
    q, k, v, beta, initial_state = sizing.upcast(q, k, v, beta, initial_state)  # fp32 state for half precision
    k, beta = _apply_mask(k, beta, mask)
    b, h, n, d = q.shape
    S = initial_state.to(q.dtype) if exists(initial_state) else q.new_zeros(b, h, d, v.shape[-1])
    out = []
    for t in range(n):
        kt = k[:, :, t:t + 1]                                         # (b, h, 1, d)
        err = v[:, :, t:t + 1] - kt @ S                               # (b, h, 1, dv): v_t - S^T k_t
        S = S + beta[:, :, t, None, None] * kt.transpose(-1, -2) @ err  # (b, h, d, dv)
        out.append(q[:, :, t:t + 1] @ S)                              # (b, h, 1, dv): S^T q_t
    o = torch.cat(out, dim=2).to(dtype)                               # (b, h, n, dv)
    return (o, S) if output_final_state else o


# ----------------------------------------------------------------------------- mixer


class DeltaNetAttention(RecurrentStateMixer):
    """Multi-head DeltaNet mixer: q, k, v and per-head beta projections -> delta rule -> out_proj.

    ``q, k`` are L2-normalised per head and ``beta_t = sigmoid(w_beta . x_t)`` (no bias); there is
    no short convolution, no SiLU and no output norm (see the module docstring for every
    departure from the published layers). Decoding state: ``(S,)``, (b, h, d, d).
    """

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int = 64):
        super().__init__()
        self.head_dim = check_heads(hidden_dim, num_heads)
        check_positive_int("chunk_size", chunk_size)
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.beta_proj = nn.Linear(hidden_dim, num_heads, bias=False)  # w_beta, one row per head
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def state_bytes(self, n: int) -> int:
        """Bytes of this layer's delta-rule memory (float32), whatever ``n``: one d x d matrix per head."""
        return 4 * self.num_heads * self.head_dim * self.head_dim

    def op_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple:
        q, k, v = self.qkv(x).chunk(3, dim=-1)                        # 3 x (b, n, D)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # 3 x (b, h, n, d)
        # unit-norm keys keep every (I - beta k k^T) a contraction for beta in (0, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)       # (b, h, n)
        return q, k, v, beta

    def op(self, q, k, v, beta, *, mask=None) -> torch.Tensor:
        return delta_chunkwise_unchecked(q, k, v, beta, self.chunk_size, mask)

    def op_recurrent(self, q, k, v, beta, *, mask=None) -> torch.Tensor:
        """The same op one token at a time (the form ``op`` replaces for training and prefill)."""
        return delta_rule_recurrent(q, k, v, beta, mask=mask)

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple:
        d = self.head_dim
        return (torch.zeros(batch_size, self.num_heads, d, d, device=device, dtype=dtype),)

    def step(self, q, k, v, beta, *, mask, state):
        o, S = delta_recurrent_unchecked(q, k, v, beta, mask, initial_state=state[0], output_final_state=True)
        return o, (S,)

    def chunk(self, q, k, v, beta, *, mask, state):
        o, S = delta_chunkwise_unchecked(q, k, v, beta, self.chunk_size, mask, initial_state=state[0],
                                         output_final_state=True)
        return o, (S,)


# ----------------------------------------------------------------------------- model


class DeltaNetModel(CausalLM):
    """Causal LM with a DeltaNet token mixer: Schlag et al. (2021)'s delta rule with L2-normalised
    q, k, computed by Yang et al. (2024)'s chunkwise algorithm (departures: the module docstring).

    Args:
        vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout: as in every model here.
        chunk_size: chunk length of the chunkwise-parallel form (a speed knob only: the output
            does not depend on it beyond round-off). Positive int.
        **shell_kwargs: passed to :class:`bsbr.causal_lm.CausalLM`.
    """

    mixer_class = DeltaNetAttention

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, chunk_size: int = 64, **shell_kwargs):
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: DeltaNetAttention(hidden_dim, num_heads, chunk_size),
                         **shell_kwargs)
