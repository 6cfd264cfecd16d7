"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", ICML).

Softmax is replaced by the kernel ``phi(x) = elu(x) + 1``, so causal attention becomes a running
sum of outer products:

    S_t = sum_{s<=t} phi(k_s) v_s^T        (d x d state)
    z_t = sum_{s<=t} phi(k_s)              (d normaliser)
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

The state is a full ``d x d`` matrix, so the output varies across the head dimension (the scalar
"sum of values" degenerate form would not).

Two forms that give the same numbers:

* ``linear_attention``: chunkwise parallel. Inside a chunk, a causally masked ``c x c`` product;
  across chunks, an exclusive prefix sum over per-chunk states, formed a block of chunks at a
  time with the state carried across blocks (a Python loop over blocks, about a thousand tokens
  each at 8 heads of 64; none over chunks or tokens). Cost per head ``O(n c d + n d^2)``. The
  block size is the sizing policy's (``bsbr.sizing``): cache-sized on a CPU, every chunk in one
  block on a GPU (the prefix sums then by ``cumsum``, not a ``C x C`` product).
  States and the normaliser are summed in fp32 for half-precision inputs; the output has the
  input's dtype, the final state fp32.
* ``linear_attention_step``: the recurrence for one token, ``O(d^2)``; the decoding cache keeps
  ``(S, z)``.

Axis legend:  b batch   h heads   n tokens   C chunks   c chunk size   d head size   D hidden
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bsbr import sizing
from bsbr.causal_lm import CausalLM
from bsbr.checks import check_heads, check_positive_int, check_qkv_aligned
from bsbr.mixer import RecurrentStateMixer, exists, split_heads

EPS = 1e-6
_BLOCK_STATE_BYTES = 2 << 20  # cpu policy: a block of chunks holds about this much state at a time


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020, eq. 7)."""
    return F.elu(x).add_(1.0)  # in place: elu's backward needs its input, not its output


# ----------------------------------------------------------------------------- ops


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                     mask: Optional[torch.Tensor] = None, *, initial_state=None,
                     output_final_state: bool = False, eps: float = EPS, block_chunks: Optional[int] = None):
    """Causal linear attention, chunkwise-parallel form.

    Args:
        q, k: (b, h, n, d) raw queries and keys (the feature map is applied here).
        v: (b, h, n, d_v).
        chunk_size: tokens per chunk ``c``; any ``n`` works (the last chunk is zero-padded).
        mask: (b, n) bool, True = real token. Masked keys never enter ``S`` or ``z``.
        initial_state: optional ``(S0, z0)`` of shapes (b, h, d, d_v), (b, h, d): the sums over an
            earlier prefix (used by the decoding cache to continue a sequence).
        output_final_state: also return ``(S_n, z_n)``.
        eps: added to the normaliser.
        block_chunks: ``G``, chunks per block (a speed knob: the output does not depend on it
            beyond round-off). Default: the sizing policy's, i.e. as many as keep a block's
            states near 2 MiB on a CPU, all chunks on a GPU.

    Returns:
        o (b, h, n, d_v), and ``(S, z)`` if ``output_final_state``.

    The chunks are taken ``G`` at a time (all heads together), carrying ``[S | z]`` from block
    to block. Per block: the feature maps; the ``G`` chunk states ``phi(K_j)^T [V_j | 1]``; their
    exclusive prefix sums seeded with the carried state, one product with a constant ``G x G``
    strictly lower-triangular matrix (``baddbmm`` adds the carry); the read-out ``phi(Q_i) S_i``
    plus the intra-chunk term (one ``baddbmm``); the division. FLOPs are those
    of the all-chunks-at-once form, but every intermediate exists for one block only (a few MiB,
    reused while in cache, where the whole-sequence form allocated ``(b, h, n, .)`` tensors and
    32 MiB of states at n = 16k, h = 8, d = 64), and a block of tokens of all heads is one
    contiguous piece of the ``(b, n, h, d)`` layout that the projections produce. When autograd
    is not recording the blocks write straight into the output; otherwise they are concatenated.
    """
    check_positive_int("chunk_size", chunk_size)
    if exists(block_chunks):
        check_positive_int("block_chunks", block_chunks)
    check_qkv_aligned(q, k, v, mask)
    return linear_attention_unchecked(q, k, v, chunk_size, mask, initial_state=initial_state,
                                      output_final_state=output_final_state, eps=eps, block_chunks=block_chunks)


def linear_attention_unchecked(q, k, v, chunk_size: int, mask=None, *, initial_state=None,
                               output_final_state: bool = False, eps: float = EPS, block_chunks=None):
    """:func:`linear_attention` without its checks (the mixer's: the chunk size was checked in
    ``__init__``, the shapes are right by construction)."""
    dtype = v.dtype
    q, k, v = sizing.upcast(q, k, v)                                  # fp32 for half-precision inputs
    b, h, n, d = q.shape
    dv = v.shape[-1]
    B, N = b * h, d * (dv + 1)                                        # N: one state [S | z], flattened
    c = min(chunk_size, n)
    whole = sizing.whole(v.device)
    G = block_chunks or sizing.per_block(v.device, -(-n // c), B * N * v.element_size(), _BLOCK_STATE_BYTES)
    state = (torch.cat([initial_state[0], initial_state[1][..., None]], dim=-1).reshape(B, 1, N).to(v.dtype)
             if exists(initial_state) else v.new_zeros(B, 1, N))     # (bh, 1, d*(dv+1))
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state))
    out = None if tracked else v.new_empty(b, h, n, dv, dtype=dtype)
    # split, not slice, into blocks: autograd then assembles each input's gradient in one piece
    blocks = zip(*(t.split(G * c, dim=2) for t in (q, k, v)))
    outs, prefix = [], {}
    for i, (qb, kb, vb) in enumerate(blocks):                        # (b, h, L, .), L <= G c tokens
        t0, L = i * G * c, qb.shape[2]
        g = -(-L // c)
        pad = g * c - L
        fq, fk = feature_map(qb), feature_map(kb)
        if exists(mask):
            fk = fk * mask[:, None, t0:t0 + L, None].to(fk.dtype)    # masked keys: phi(k) = 0 -> no contribution
        # a ones column appended to v carries the normaliser: [S | z] = phi(K)^T [V | 1], so every
        # product below yields numerator and denominator together
        v1 = torch.cat([vb, torch.ones_like(vb[..., :1])], dim=-1)    # (b, h, L, dv+1)
        if pad:  # zero keys contribute nothing; padded query rows are dropped
            fq, fk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v1))
        fq, fk, v1 = fq.reshape(B * g, c, d), fk.reshape(B * g, c, d), v1.reshape(B * g, c, dv + 1)

        # per-chunk states, then their exclusive prefix sums seeded with the carry: what chunk j
        # of the block sees of every chunk before it
        kv = (fk.transpose(-1, -2) @ v1).view(B, g, N)                  # (bh, g, N)
        if whole:  # one block of all C chunks: O(C N) cumsum instead of an O(C^2 N) product
            states = state + F.pad(kv[:, :-1].cumsum(1), (0, 0, 1, 0))  # (bh, g, N): state + sum_{i<j} kv_i
        else:
            if g not in prefix:
                prefix[g] = torch.ones(g, g, dtype=v.dtype, device=v.device).tril_(-1)
            states = torch.baddbmm(state, prefix[g].expand(B, g, g), kv)  # (bh, g, N)
        state = (states[:, -1] + kv[:, -1])[:, None]                  # (bh, 1, N) carry-out

        # intra-chunk causal (c, c) scores, diagonal kept; then inter + intra in one fused product
        scores = (fq @ fk.transpose(-1, -2)).tril_()                  # (bhg, c, c)
        nd = torch.baddbmm(fq @ states.view(B * g, d, dv + 1), scores, v1)  # (bhg, c, dv+1)
        nd = nd.view(b, h, g * c, dv + 1)[:, :, :L]
        if exists(out):
            torch.div(nd[..., :dv], nd[..., dv:].add_(eps), out=out[:, :, t0:t0 + L])
        else:
            outs.append(nd[..., :dv] / (nd[..., dv:] + eps))          # (b, h, L, dv)

    o = out if exists(out) else torch.cat(outs, dim=2).to(dtype)      # (b, h, n, dv)
    if not output_final_state:
        return o
    final = state.view(b, h, d, dv + 1)
    return o, (final[..., :dv], final[..., dv])


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor,
                          z: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = EPS) -> torch.Tensor:
    """One decoding step of the recurrence; updates ``S`` and ``z`` in place.

    Args:
        q, k: (b, h, 1, d); v: (b, h, 1, d_v).
        S: (b, h, d, d_v), z: (b, h, d): the sums over every earlier token.
        mask: (b, 1) bool; a masked token does not enter the state.

    Returns:
        o (b, h, 1, d_v) in the input's dtype; the step itself runs in fp32 for half-precision
        inputs (``S``, ``z`` keep their own dtype: give them an fp32 cache to accumulate in fp32).
    """
    dtype = v.dtype
    q, k, v = sizing.upcast(q, k, v)
    fq, fk = feature_map(q), feature_map(k)                           # (b, h, 1, d)
    if exists(mask):
        fk = fk * mask[:, None, :, None].to(fk.dtype)
    S += fk.transpose(-1, -2) @ v                                     # (b, h, d, dv)
    z += fk[:, :, 0]                                                  # (b, h, d)
    if S.dtype != fq.dtype:  # a half-precision cache read by an fp32 step (a check, not a .to per token)
        S, z = S.to(fq.dtype), z.to(fq.dtype)
    num = fq @ S                                                      # (b, h, 1, dv)
    den = fq @ z[..., None]                                           # (b, h, 1, 1)
    o = num / (den + eps)
    return o if o.dtype == dtype else o.to(dtype)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: Optional[torch.Tensor] = None, eps: float = EPS) -> torch.Tensor:
    """Causal linear attention one token at a time, out of place (so autograd can train through it).

    ``S_t = S_{t-1} + phi(k_t)^T v_t``, ``z_t = z_{t-1} + phi(k_t)``,
    ``o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)``: the form :func:`linear_attention` replaces
    for training and prefill (``bsbr-eval forms`` times the two). Same arguments as that function,
    without ``chunk_size``; returns (b, h, n, d_v).
    """
    check_qkv_aligned(q, k, v, mask)
    dtype = v.dtype
    q, k, v = sizing.upcast(q, k, v)                                  # the sums in fp32 for half precision
    fq, fk = feature_map(q), feature_map(k)                           # (b, h, n, d)
    if exists(mask):
        fk = fk * mask[:, None, :, None].to(fk.dtype)
    b, h, n, d = q.shape
    S = q.new_zeros(b, h, d, v.shape[-1])
    z = q.new_zeros(b, h, d)
    out = []
    for t in range(n):
        S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]            # (b, h, d, dv)
        z = z + fk[:, :, t]                                           # (b, h, d)
        num = (fq[:, :, t, None] @ S)[:, :, 0]                        # (b, h, dv)
        den = (fq[:, :, t] * z).sum(-1, keepdim=True)                 # (b, h, 1)
        out.append(num / (den + eps))
    return torch.stack(out, dim=2).to(dtype)                          # (b, h, n, dv)


# ----------------------------------------------------------------------------- mixer


class LinearAttention(RecurrentStateMixer):
    """Multi-head causal linear attention: q, k, v projections -> ``linear_attention`` -> out_proj.

    Decoding state: ``(S, z)``, (b, h, d, d) and (b, h, d); O(d^2) per head, whatever the length.
    """

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int = 64):
        super().__init__()
        self.head_dim = check_heads(hidden_dim, num_heads)
        check_positive_int("chunk_size", chunk_size)
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def state_bytes(self, n: int) -> int:
        """Bytes of this layer's state (float32), whatever ``n``: S = sum phi(k) v^T and z = sum phi(k)."""
        d = self.head_dim
        return 4 * self.num_heads * (d * d + d)

    def op_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple:
        q, k, v = self.qkv(x).chunk(3, dim=-1)                        # 3 x (b, n, D)
        h = self.num_heads
        return split_heads(q, h), split_heads(k, h), split_heads(v, h)  # 3 x (b, h, n, d)

    def op(self, q, k, v, *, mask=None) -> torch.Tensor:
        return linear_attention_unchecked(q, k, v, self.chunk_size, mask)

    def op_recurrent(self, q, k, v, *, mask=None) -> torch.Tensor:
        """The same op one token at a time (the form ``op`` replaces for training and prefill)."""
        return linear_attention_recurrent(q, k, v, mask=mask)

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple:
        h, d = self.num_heads, self.head_dim
        return (torch.zeros(batch_size, h, d, d, device=device, dtype=dtype),
                torch.zeros(batch_size, h, d, device=device, dtype=dtype))

    def step(self, q, k, v, *, mask, state):
        S, z = state  # linear_attention_step adds this token into them in place
        return linear_attention_step(q, k, v, S, z, mask=mask), (S, z)

    def chunk(self, q, k, v, *, mask, state):
        return linear_attention_unchecked(q, k, v, self.chunk_size, mask, initial_state=state,
                                          output_final_state=True)


# ----------------------------------------------------------------------------- model


class LinearTransformerModel(CausalLM):
    """Causal LM with linear attention (Katharopoulos et al., 2020) as the token mixer.

    Args:
        vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout: as in every model here.
        chunk_size: chunk length of the chunkwise-parallel form (a speed knob only: the output
            does not depend on it beyond round-off). Positive int.
        **shell_kwargs: passed to :class:`bsbr.causal_lm.CausalLM` (position, tie_embeddings, ...).
    """

    mixer_class = LinearAttention

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, chunk_size: int = 64, **shell_kwargs):
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: LinearAttention(hidden_dim, num_heads, chunk_size),
                         **shell_kwargs)
