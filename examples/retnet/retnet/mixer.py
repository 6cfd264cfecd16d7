"""Multi-scale retention (Sun et al., 2023, "Retentive Network: A Successor to Transformer for Large
Language Models", arXiv:2307.08621) as a bsbr token mixer, brought from outside the project: it
imports only bsbr's public contract (``bsbr.mixer``, ``bsbr.checks``, ``bsbr.sizing``).

Retention is causal linear attention with a fixed exponential decay per head,
``gamma_h = 1 - 2^(-5-h)`` for heads ``h = 0 .. H-1`` (the paper's section 2.2), and it has three
forms that give the same numbers:

* parallel (``retention_parallel``): ``o = (Q K^T ⊙ D) V``, ``D[n, m] = gamma^(n-m)`` for
  ``n >= m``, 0 otherwise. ``O(n^2 d)``: the definition, kept as the oracle of the tests.
* chunkwise (``retention_chunkwise``, the mixer's ``op``): chunks of ``c`` tokens; inside a chunk
  the parallel form, across chunks the state ``R_i = gamma^c R_{i-1} + K_i^T (V_i ⊙ zeta)`` with
  ``zeta_j = gamma^(c-1-j)``, read out as ``(Q_i R_{i-1}) ⊙ xi`` with ``xi_j = gamma^(j+1)`` (the
  paper's eq. 7). ``O(n c d + n d^2)`` per head.
* recurrent (``retention_recurrent``, the mixer's ``op_recurrent``; ``retention_step`` decodes):
  ``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``. ``O(d^2)`` per token; the decoding cache
  holds ``S``, one ``d x d`` matrix per head.

The layer around the op is the paper's multi-scale retention (eq. 8)::

    Y = GroupNorm_h(concat_h(retention_h(X)))        one group per head, per token
    MSR(X) = (swish(X W_G) ⊙ Y) W_O

with ``q, k, v = X W_Q, X W_K, X W_V`` and the keys scaled by ``1/sqrt(d)``.

Departures from the paper (also ``MultiScaleRetention.departures``):

* no xPos (the paper's relative position on q, k): the shared shell adds sinusoidal positions to
  the input instead;
* value heads of size ``d`` (hidden / heads), not the paper's ``2d``: the width every mixer of
  the suite has;
* of the normalisations of the paper's section 2.2 only the ``1/sqrt(d)`` of ``Q K^T`` is kept. The
  other two (the decay mask's rows divided by ``sqrt(sum D)``, the scores by ``max(|sum|, 1)``)
  rescale each head's output per token, which the GroupNorm after it undoes up to its ``eps``;
  the second, data dependent, would also make the three forms differ.

Padding: ``mask`` (b, n) bool, True = real. A padded position's key is zeroed before anything
reads it, so it enters no state and no output. Decay counts positions, padded ones included: right
padding comes after every real token and left padding meets an empty state, so neither changes a
real position's output.

Numerics: half-precision inputs are upcast, so the products and states accumulate in fp32 (the
decoding cache is fp32 too); the output has the input's dtype. The decay powers are
``exp(e log gamma)`` with ``log gamma = log1p(-2^(-5-h))``, made on the input's device from
``arange``: no value is read on the host and no tensor lives elsewhere (the op runs on ``meta``).

Axis legend:  b batch   h heads   n tokens   C chunks   c chunk size   d head size   D hidden
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bsbr import sizing
from bsbr.checks import check_heads, check_positive_int, check_qkv_aligned
from bsbr.mixer import RecurrentStateMixer, exists, merge_heads, split_heads


def decays(num_heads: int) -> tuple:
    """``gamma_h = 1 - 2^(-5-h)`` for ``h = 0 .. num_heads-1`` as Python floats (the documentation's)."""
    return tuple(1.0 - 2.0 ** (-5 - h) for h in range(num_heads))


def log_decays(num_heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``log gamma_h``, (h,), made on ``device``: ``log1p`` keeps it exact where gamma is near 1."""
    h = torch.arange(num_heads, device=device, dtype=dtype)
    return torch.log1p(-torch.exp2(-5.0 - h))


def _masked(k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    # a zero key adds nothing to a state and scores zero against every query
    return k if mask is None else k * mask[:, None, :, None].to(k.dtype)


# ----------------------------------------------------------------------------- ops


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(Q K^T ⊙ D) V`` with the causal decay mask ``D``: the definition (``O(n^2 d)``), the oracle.

    Args: q, k (b, h, n, d); v (b, h, n, d_v); mask (b, n) bool, True = real.
    Returns: o (b, h, n, d_v) in v's dtype.
    """
    check_qkv_aligned(q, k, v, mask)
    dtype = v.dtype
    q, k, v = sizing.upcast(q, k, v)
    k = _masked(k, mask)
    h, n = q.shape[1], q.shape[2]
    lg = log_decays(h, q.device, q.dtype)[:, None, None]               # (h, 1, 1)
    i = torch.arange(n, device=q.device, dtype=q.dtype)
    # the distance clamped at 0 before exp: above the diagonal exp(-e log gamma) would overflow at
    # long n before tril zeroes it (inf * 0 = nan in a product)
    D = torch.exp((i[:, None] - i[None, :]).clamp_min(0) * lg).tril()  # (h, n, n)
    return (((q @ k.transpose(-1, -2)) * D) @ v).to(dtype)             # (b, h, n, d_v)


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                        mask: Optional[torch.Tensor] = None, *, initial_state: Optional[torch.Tensor] = None,
                        output_final_state: bool = False):
    """Retention, chunkwise-parallel form (the paper's eq. 7).

    Args:
        q, k: (b, h, n, d); v: (b, h, n, d_v).
        chunk_size: tokens per chunk ``c`` (a speed knob: the output does not depend on it beyond
            round-off); any ``n`` works (the last chunk is zero-padded).
        mask: (b, n) bool, True = real. Masked keys enter no state and no score.
        initial_state: optional (b, h, d, d_v), the state ``S`` after an earlier prefix (the
            decoding cache continues a sequence from it).
        output_final_state: also return ``S`` after the last token, in the accumulation dtype.

    Returns:
        o (b, h, n, d_v) in v's dtype, and ``S`` if ``output_final_state``.
    """
    check_positive_int("chunk_size", chunk_size)
    check_qkv_aligned(q, k, v, mask)
    return _chunkwise(q, k, v, chunk_size, mask, initial_state, output_final_state)


def _chunkwise(q, k, v, chunk_size: int, mask=None, initial_state=None, output_final_state: bool = False):
    """:func:`retention_chunkwise` without its checks (the mixer's: shapes right by construction)."""
    dtype = v.dtype
    q, k, v = sizing.upcast(q, k, v)                                   # fp32 for half-precision inputs
    k = _masked(k, mask)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, n)
    C = -(-n // c)
    pad = C * c - n
    if pad:  # zero keys and values add nothing; the padded query rows are dropped at the end
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    # reshape, not view: without padding q, k, v are the head-split views of the projections
    q, k, v = q.reshape(b, h, C, c, d), k.reshape(b, h, C, c, d), v.reshape(b, h, C, c, dv)

    lg = log_decays(h, q.device, q.dtype)[:, None, None]               # (h, 1, 1)
    j = torch.arange(c, device=q.device, dtype=q.dtype)                # position inside a chunk
    # intra-chunk: the parallel form on each (c, c) block, D[j, m] = gamma^(j-m) for j >= m
    Dc = torch.exp((j[:, None] - j[None, :]).clamp_min(0) * lg).tril()  # (h, c, c)
    o = ((q @ k.transpose(-1, -2)) * Dc[:, None]) @ v                  # (b, h, C, c, dv)

    # each chunk's own state, every key decayed to its chunk's last real token: gamma^(len-1-j),
    # len = c except for a ragged last chunk (then the final state sits at token n-1, not at the
    # padded end; the clamp only touches padded rows, whose keys are zero)
    lens = (n - c * torch.arange(C, device=q.device, dtype=q.dtype)).clamp(max=c)  # (C,)
    zeta = torch.exp((lens[:, None] - 1 - j).clamp_min(0) * lg)        # (h, C, c)
    kv = k.transpose(-1, -2) @ (v * zeta[..., None])                   # (b, h, C, d, dv)
    step = torch.exp(lens * lg[..., 0])                                # (h, C): gamma^len, a chunk's decay

    # the state entering each chunk: a loop over chunks (never tokens) of a d x dv multiply-add
    state = (initial_state.to(q.dtype) if exists(initial_state)
             else q.new_zeros(b, h, d, dv))                            # (b, h, d, dv)
    entering = []
    for i in range(C):
        entering.append(state)
        state = step[:, i, None, None] * state + kv[:, :, i]           # R_i = gamma^len R_{i-1} + K^T (V ⊙ zeta)
    R = torch.stack(entering, dim=2)                                   # (b, h, C, d, dv)

    # cross-chunk read-out: token j is j+1 positions past the entering state's last token
    xi = torch.exp((j + 1) * lg)[..., None]                            # (h, 1, c, 1)
    o = o + (q @ R) * xi                                               # (b, h, C, c, dv)
    o = o.reshape(b, h, C * c, dv)[:, :, :n].to(dtype)                 # (b, h, n, dv)
    return (o, state) if output_final_state else o


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Retention one token at a time, out of place (autograd can train through it):
    ``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``. Same arguments as
    :func:`retention_parallel`; returns (b, h, n, d_v) in v's dtype."""
    check_qkv_aligned(q, k, v, mask)
    dtype = v.dtype
    q, k, v = sizing.upcast(q, k, v)
    k = _masked(k, mask)
    b, h, n, d = q.shape
    # gamma itself here (not exp of log gamma as in the other forms): the forms share no decay code
    gamma = 1.0 - torch.exp2(-5.0 - torch.arange(h, device=q.device, dtype=q.dtype))[:, None, None]  # (h, 1, 1)
    S = q.new_zeros(b, h, d, v.shape[-1])
    out = []
    for t in range(n):
        S = gamma * S + k[:, :, t, :, None] * v[:, :, t, None, :]      # (b, h, d, dv)
        out.append((q[:, :, t, None] @ S)[:, :, 0])                    # (b, h, dv)
    return torch.stack(out, dim=2).to(dtype)                           # (b, h, n, dv)


def retention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decoding step: ``S <- gamma S + k^T v`` in place, then ``o = q S``.

    Args: q, k (b, h, 1, d); v (b, h, 1, d_v); S (b, h, d, d_v), the state after every earlier
    token (the step computes in its dtype: give it an fp32 cache to accumulate in fp32);
    mask (b, 1) bool, a masked token does not enter the state.
    Returns: o (b, h, 1, d_v) in v's dtype.
    """
    dtype = v.dtype
    q, k, v = (t if t.dtype == S.dtype else t.to(S.dtype) for t in (q, k, v))
    k = _masked(k, mask)
    gamma = torch.exp(log_decays(q.shape[1], S.device, S.dtype))[:, None, None]  # (h, 1, 1)
    S.mul_(gamma).add_(k.transpose(-1, -2) @ v)                        # (b, h, d, dv)
    o = q @ S                                                          # (b, h, 1, dv)
    return o if o.dtype == dtype else o.to(dtype)


# ----------------------------------------------------------------------------- mixer


class MultiScaleRetention(RecurrentStateMixer):
    """Multi-scale retention (Sun et al., 2023): q, k, v projections -> retention with one decay per
    head -> per-head GroupNorm -> swish gate -> out_proj.

    Decoding state: ``S``, (b, h, d, d) in fp32 (or the cache's dtype if wider); ``O(d^2)`` per head
    whatever the length.
    """

    method = "Multi-scale retention (Sun et al., 2023), chunkwise form"
    complexity = "O(n c d + n d^2)"
    time_class = "n"
    state = "one d x d state per head"
    departures = ("no xPos (sinusoidal positions from the shell instead); value heads of size d, not 2d; "
                  "of the paper's normalisations only 1/sqrt(d) on QK^T (the decay-mask and score ones are "
                  "undone by the per-head GroupNorm up to its eps)")

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int = 64):
        super().__init__()
        self.head_dim = check_heads(hidden_dim, num_heads)
        check_positive_int("chunk_size", chunk_size)
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.scale = self.head_dim ** -0.5
        # no biases, as in the paper's W_Q, W_K, W_V, W_G, W_O
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)
        self.gate = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.group_norm = nn.GroupNorm(num_heads, hidden_dim)          # one group per head
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)

    @property
    def decays(self) -> tuple:
        """``gamma_h = 1 - 2^(-5-h)``, one per head."""
        return decays(self.num_heads)

    def state_bytes(self, n: int) -> int:
        """Bytes of this layer's state (float32), whatever ``n``: one d x d matrix per head."""
        return 4 * self.num_heads * self.head_dim * self.head_dim

    def op_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple:
        q, k, v = self.qkv(x).chunk(3, dim=-1)                        # 3 x (b, n, D)
        h = self.num_heads
        return split_heads(q, h), split_heads(k * self.scale, h), split_heads(v, h)  # 3 x (b, h, n, d)

    def op(self, q, k, v, *, mask=None) -> torch.Tensor:
        return _chunkwise(q, k, v, self.chunk_size, mask)

    def op_parallel(self, q, k, v, *, mask=None) -> torch.Tensor:
        """The same op as ``(Q K^T ⊙ D) V``, ``O(n^2 d)`` (the oracle; the suite does not call it)."""
        return retention_parallel(q, k, v, mask=mask)

    def op_recurrent(self, q, k, v, *, mask=None) -> torch.Tensor:
        """The same op one token at a time (the form ``op`` replaces for training and prefill)."""
        return retention_recurrent(q, k, v, mask=mask)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = merge_heads(o)                                             # (b, n, D)
        # GroupNorm takes (N, C): each token's D channels, normalised per head (group)
        y = self.group_norm(y.flatten(0, 1)).view_as(y)
        return self.out_proj(F.silu(self.gate(x)) * y)                 # swish gate, then W_O

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple:
        h, d = self.num_heads, self.head_dim
        # the state accumulates in fp32 even for a half-precision model (step and chunk upcast to it)
        acc = None if dtype is None else sizing.acc_dtype(dtype)
        return (torch.zeros(batch_size, h, d, d, device=device, dtype=acc),)

    def step(self, q, k, v, *, mask, state):
        (S,) = state  # retention_step adds this token into it in place
        return retention_step(q, k, v, S, mask=mask), (S,)

    def chunk(self, q, k, v, *, mask, state):
        o, S = _chunkwise(q, k, v, self.chunk_size, mask, initial_state=state[0], output_final_state=True)
        return o, (S,)
