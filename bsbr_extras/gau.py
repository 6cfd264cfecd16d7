"""GAU: the gated attention unit in FLASH's mixed-chunk form.

Hua, Dai, Liu & Le (2022), "Transformer Quality in Linear Time" (ICML), s.2 (GAU) and s.3 (FLASH).

A single-head unit (there are no heads, so :class:`GAUModel` takes no ``num_heads``):

    U = silu(W_u x),  V = silu(W_v x)            width e = expansion_factor * hidden_dim
    Z = silu(W_z x)                              width s = qk_dim (shared by all four below)
    Q_quad, K_quad, Q_lin, K_lin = Z * gamma_i + beta_i    (per-dimension scale and offset)
    O = W_o (U * (A V))

Mixed-chunk attention (FLASH, s.3.2), chunks of ``c`` tokens at absolute positions:

* quadratic inside a chunk:  ``relu(Q_quad K_quad^T / c)^2``, causal (diagonal kept);
* linear across chunks: every token of chunk ``i`` reads ``Q_lin S_i`` with
  ``S_i = sum_{j < i} K_lin_j^T V_j / c``, an exclusive prefix sum of one ``s x e`` state per
  chunk; never recomputed per pair. ``gau_mixed_chunk`` forms these sums a block of chunks at a
  time, carrying ``S`` across blocks, so only a block's states are held at once. The block size is
  the sizing policy's (``bsbr.sizing``): cache-sized on a CPU, all chunks on a GPU (prefix sums by
  ``cumsum``). For half-precision inputs the unit runs in fp32 (states included) and the output is
  cast back; the returned state is fp32.

Cost ``O(n c (s + e) + n s e)``. Departures and choices, stated here: the linear term is scaled by
``1/c`` like the quadratic one (so the state does not depend on ``n``); the paper's relative-position
bias is left out (the shared shell adds sinusoidal positions to the input); the per-dimension
scales start small (``gamma ~ N(0, 0.02^2)``) and the offsets at ``beta = 0``. The shell wraps this
unit in its standard pre-norm block, so a feed-forward layer follows it (the paper stacks GAUs
*instead of* attention + FFN; here GAU is only the token mixer, like every other architecture).

Decoding keeps the open chunk's ``K_quad`` and ``V`` in fixed ``c``-row buffers, its linear-term sum
``K_lin^T V / c`` (``pending``) and ``S``: a step costs ``O(c (s + e) + s e)`` and has no Python
branch on the position, so a compiled decode step is one graph.

Axis legend:  b batch   n tokens   C chunks   c chunk size   s qk_dim   e expansion width   D hidden
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bsbr import sizing
from bsbr.causal_lm import CausalLM
from bsbr.checks import check_positive_int
from bsbr.mixer import TokenMixer, exists


_BLOCK_STATE_BYTES = 4 << 20  # cpu policy: a block of chunks holds about this much cross-chunk state


def _mask_keys(quad_k, lin_k, mask):
    """A masked token's keys are zeroed: relu(q . 0)^2 = 0 and 0^T v = 0, so it is never read."""
    if not exists(mask):
        return quad_k, lin_k
    m = mask[..., None].to(quad_k.dtype)                              # (b, n, 1)
    return quad_k * m, lin_k * m


def _check_inputs(quad_q, quad_k, lin_q, lin_k, v, mask):
    if not (quad_q.dim() == 3 and quad_q.shape == quad_k.shape == lin_q.shape == lin_k.shape
            and v.dim() == 3 and v.shape[:2] == quad_q.shape[:2]):
        raise ValueError(f"expected quad_q, quad_k, lin_q, lin_k (b, n, s) and v (b, n, e); got "
                         f"{[tuple(t.shape) for t in (quad_q, quad_k, lin_q, lin_k, v)]}")
    if exists(mask) and mask.shape != quad_q.shape[:2]:
        raise ValueError(f"mask must be (batch, n) = {tuple(quad_q.shape[:2])}, got {tuple(mask.shape)}")


# ----------------------------------------------------------------------------- ops


def gau_mixed_chunk(quad_q: torch.Tensor, quad_k: torch.Tensor, lin_q: torch.Tensor, lin_k: torch.Tensor,
                    v: torch.Tensor, chunk_size: int, mask: Optional[torch.Tensor] = None, *,
                    initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    block_chunks: Optional[int] = None):
    """FLASH mixed-chunk attention ``A V`` (before the ``U`` gate), chunks starting at position 0.

    Args:
        quad_q, quad_k, lin_q, lin_k: (b, n, s).  v: (b, n, e).
        chunk_size: ``c``; also the scale in ``relu(q k / c)^2``, so unlike Linear/DeltaNet the
            output depends on it. Any ``n`` works (the last chunk is zero-padded).
        mask: (b, n) bool, True = real token; masked tokens are never attended to.
        initial_state: optional (b, s, e) cross-chunk state from an earlier, chunk-aligned prefix.
        output_final_state: also return the state after the last *complete* chunk (a trailing
            partial chunk is the caller's to keep, as the decoding cache does).
        block_chunks: ``G``, chunks per block (a speed knob: the output does not depend on it
            beyond round-off). Default: the sizing policy's, i.e. as many as keep a block's
            states near 4 MiB on a CPU, all chunks on a GPU.

    Returns:
        (b, n, e), and the state (b, s, e) if ``output_final_state``.

    The chunks are taken ``G`` at a time, carrying the state ``S`` from block to block. Per block:

    1. the ``G`` chunk states ``K_lin_j^T V_j``, one batched product;
    2. their exclusive prefix sums seeded with ``S``, one product with a constant
       ``(G+1) x G`` strictly lower-triangular matrix of ``1/c`` (``baddbmm`` adds ``S``); its
       last row is the next block's ``S``;
    3. the read-out ``Q_lin S_i`` plus the quadratic term, one ``baddbmm``.

    FLOPs are those of the all-chunks-at-once form, but at most ``G + 1`` states exist at a time
    instead of ``C`` (128 MiB at n = 16k, s = 128, e = 1024), so they are reused while still in
    cache. When autograd is not recording (and ``b = 1``) the read-out is written straight into
    the output; otherwise the blocks' outputs are concatenated.
    """
    check_positive_int("chunk_size", chunk_size)
    if exists(block_chunks):
        check_positive_int("block_chunks", block_chunks)
    _check_inputs(quad_q, quad_k, lin_q, lin_k, v, mask)
    return gau_mixed_unchecked(quad_q, quad_k, lin_q, lin_k, v, chunk_size, mask, initial_state=initial_state,
                               output_final_state=output_final_state, block_chunks=block_chunks)


def gau_mixed_unchecked(quad_q, quad_k, lin_q, lin_k, v, chunk_size: int, mask=None, *, initial_state=None,
                        output_final_state: bool = False, block_chunks=None):
    """:func:`gau_mixed_chunk` without its checks (the mixer's: the chunk size was checked in
    ``__init__``, the shapes are right by construction).

    A call shorter than one chunk holds one partial chunk: its block is ``n`` rows, not ``c``
    (memory and work follow ``min(c, n)``, as in BSBR, Linear and DeltaNet); the scale stays ``c``."""
    dtype = v.dtype
    quad_q, quad_k, lin_q, lin_k, v, initial_state = sizing.upcast(quad_q, quad_k, lin_q, lin_k, v, initial_state)
    quad_k, lin_k = _mask_keys(quad_k, lin_k, mask)
    b, n, s = quad_q.shape
    e = v.shape[-1]
    scale = chunk_size          # the true chunk length: the 1/c of both terms
    c = min(chunk_size, n)      # rows per block (only a call shorter than a chunk makes it < chunk_size)
    C = -(-n // c)
    pad = C * c - n
    whole = sizing.whole(v.device)
    G = block_chunks or sizing.per_block(v.device, C, s * e * v.element_size(), _BLOCK_STATE_BYTES)
    if pad:  # zero keys are never read; padded query rows are dropped
        quad_q, quad_k, lin_q, lin_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (quad_q, quad_k, lin_q, lin_k, v))
    state = initial_state.to(v.dtype) if exists(initial_state) else v.new_zeros(b, s, e)
    # split, not slice, into blocks: autograd then assembles each input's gradient in one piece
    blocks = zip(*(t.reshape(b, C, c, t.shape[-1]).split(G, dim=1) for t in (quad_q, quad_k, lin_q, lin_k, v)))
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (quad_q, quad_k, lin_q, lin_k, v, state))
    out = None if tracked or b > 1 else v.new_empty(b, C, c, e)  # (b, C, c, e)
    dest = out.split(G, dim=1) if exists(out) else None
    outs, prefix = [], {}
    for i, (qq, qk, lq, lk, vc) in enumerate(blocks):  # (b, g, c, s) x 4, (b, g, c, e); g = G but the last
        g = qq.shape[1]
        kv = lk.transpose(-1, -2) @ vc                                # (b, g, s, e) chunk states, unscaled
        if whole:  # all chunks in one block: an O(C s e) cumsum, not an O(C^2 s e) product
            states = state[:, None] + F.pad(kv.cumsum(1) / scale, (0, 0, 0, 0, 1, 0))  # (b, g+1, s, e)
        else:
            if g not in prefix:  # row j, for j = 0..g: (1/c) x (sum of the first j chunk states)
                prefix[g] = torch.ones(g + 1, g, dtype=v.dtype, device=v.device).tril_(-1).div_(scale)
            states = torch.baddbmm(state.reshape(b, 1, s * e), prefix[g].expand(b, g + 1, g),
                                   kv.view(b, g, s * e)).view(b, g + 1, s, e)  # S before chunk 0..g of the block
        kernel = F.relu((qq @ qk.transpose(-1, -2)).div_(scale)).square().tril_()  # (b, g, c, c), diagonal kept
        linear = (lq @ states[:, :g]).view(b * g, c, e)               # Q_lin S_i
        o = torch.baddbmm(linear, kernel.view(b * g, c, c), vc.reshape(b * g, c, e),
                          out=None if dest is None else dest[i].view(b * g, c, e))  # (bg, c, e)
        outs.append(o.view(b, g, c, e))
        last, state = states, states[:, g]
    o = (out if exists(out) else torch.cat(outs, dim=1)).view(b, C * c, e)[:, :n].to(dtype)  # (b, n, e)
    if not output_final_state:
        return o
    # a trailing partial chunk (the last of the last block) is not folded in
    return o, (state if n % scale == 0 else last[:, -2])


def gau_continue_chunk(quad_q: torch.Tensor, quad_k: torch.Tensor, lin_q: torch.Tensor, v: torch.Tensor,
                       chunk_size: int, past_quad_k: torch.Tensor, past_v: torch.Tensor,
                       state: torch.Tensor) -> tuple:
    """The step form: ``m`` new tokens that all fall in the open chunk, which already holds ``r`` tokens.

    Args:
        quad_q, quad_k, lin_q: (b, m, s) for the new tokens (masked keys already zeroed).
        v: (b, m, e).  past_quad_k: (b, r, s), past_v: (b, r, e): the open chunk so far.
        state: (b, s, e) cross-chunk state ``S_i`` of the open chunk.  Requires ``r + m <= c``.

    Returns:
        (o (b, m, e), the open chunk's quad keys (b, r+m, s), its values (b, r+m, e)).
    """
    r, m = past_v.shape[1], v.shape[1]
    if r + m > chunk_size:
        raise ValueError(f"the open chunk holds {r} tokens; {m} more exceed chunk_size={chunk_size}")
    keys = torch.cat([past_quad_k, quad_k], dim=1)                    # (b, r+m, s)
    vals = torch.cat([past_v, v], dim=1)                              # (b, r+m, e)
    qq, kk, lq, vv = sizing.upcast(quad_q, keys, lin_q, vals)         # the step in fp32 for half precision
    kernel = F.relu((qq @ kk.transpose(-1, -2)) / chunk_size).square()  # (b, m, r+m)
    causal = torch.ones(m, r + m, dtype=torch.bool, device=v.device).tril(diagonal=r)  # new token j sees keys <= r+j
    o = (kernel * causal.to(kernel.dtype)) @ vv + lq @ state.to(lq.dtype)  # (b, m, e)
    return o.to(v.dtype), keys, vals


# ----------------------------------------------------------------------------- mixer


@dataclass
class GAUCache:
    """Decoding state of one layer, in buffers of fixed shape (a compiled decode step keeps one graph).

    The open chunk holds ``r = length % c`` tokens: rows ``[0, r)`` of ``quad_k`` and ``v`` (later
    rows are stale and never read), and their linear-term contribution in ``pending``, which joins
    ``state`` when the chunk completes.
    """

    state: torch.Tensor    # (b, s, e)  sum over completed chunks of K_lin^T V / c
    pending: torch.Tensor  # (b, s, e)  the same sum over the open chunk's tokens
    quad_k: torch.Tensor   # (b, c, s)  open chunk's quadratic keys (rows [0, r))
    v: torch.Tensor        # (b, c, e)  open chunk's values (rows [0, r))
    pos: torch.Tensor      # ()  long: tokens seen, as a tensor (the one-token step reads only this)
    length: int = 0        # tokens seen, as an int (pieces of several tokens slice with it)
    static: bool = False   # eager one-token steps also take the shape-static form


class ScaleOffset(nn.Module):
    """``heads`` cheap per-dimension affine maps of one shared ``Z`` (Hua et al., 2022, s.2)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(heads, dim) * 0.02)
        self.beta = nn.Parameter(torch.zeros(heads, dim))

    def forward(self, z: torch.Tensor) -> tuple:
        out = z[..., None, :] * self.gamma + self.beta                # (b, n, heads, s)
        return out.unbind(dim=-2)


class GatedAttentionUnit(TokenMixer):
    """Single-head gated attention unit with FLASH mixed-chunk attention (Hua et al., 2022)."""

    def __init__(self, hidden_dim: int, chunk_size: int = 128, expansion_factor: int = 2, qk_dim: int = 128):
        super().__init__()
        for name, val in (("hidden_dim", hidden_dim), ("chunk_size", chunk_size),
                          ("expansion_factor", expansion_factor), ("qk_dim", qk_dim)):
            check_positive_int(name, val)
        self.chunk_size, self.qk_dim = chunk_size, qk_dim
        self.expansion_dim = e = expansion_factor * hidden_dim
        self.uv = nn.Linear(hidden_dim, 2 * e)
        self.z = nn.Linear(hidden_dim, qk_dim)
        self.scale_offset = ScaleOffset(qk_dim, heads=4)
        self.out_proj = nn.Linear(e, hidden_dim)

    def state_bytes(self, n: int) -> int:
        """Bytes of this layer's cache (float32), whatever ``n``: the global linear state and its
        pending update (s x e each), the open chunk's keys (c x s) and values (c x e), and the position."""
        s, e, c = self.qk_dim, self.expansion_dim, self.chunk_size
        return 4 * (2 * s * e + c * s + c * e) + 8

    def _project(self, x: torch.Tensor) -> tuple:
        u, v = F.silu(self.uv(x)).chunk(2, dim=-1)                    # 2 x (b, n, e)
        z = F.silu(self.z(x))                                         # (b, n, s)
        quad_q, quad_k, lin_q, lin_k = self.scale_offset(z)           # 4 x (b, n, s)
        return u, (quad_q, quad_k, lin_q, lin_k, v)

    def op_inputs(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> tuple:
        _, inputs = self._project(x)
        return inputs

    def op(self, quad_q, quad_k, lin_q, lin_k, v, *, mask=None) -> torch.Tensor:
        return gau_mixed_unchecked(quad_q, quad_k, lin_q, lin_k, v, self.chunk_size, mask)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``W_o (U * A V)``: the op's ``A V`` (b, n, e) gated by ``U = silu(W_u x)``."""
        u = F.silu(self.uv(x)).chunk(2, dim=-1)[0]                     # (b, n, e), as in _project
        return self.out_proj(u * o)

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len=None, static: bool = False) -> GAUCache:
        """``max_len`` bounds the open-chunk buffers to min(c, max_len) rows; ``static``: one-token
        steps take the shape-static form even in eager mode (under ``torch.compile`` they always do)."""
        s, e = self.qk_dim, self.expansion_dim
        rows = self.chunk_size if max_len is None else min(self.chunk_size, max_len)
        z = lambda *shape: torch.zeros(batch_size, *shape, device=device, dtype=dtype)  # noqa: E731
        return GAUCache(state=z(s, e), pending=z(s, e), quad_k=z(rows, s), v=z(rows, e),
                        pos=torch.zeros((), dtype=torch.long, device=device), static=bool(static))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[GAUCache] = None) -> torch.Tensor:
        u, inputs = self._project(x)  # U computed once here; ``output`` recomputes it for op-level callers
        o = self.op(*inputs, mask=mask) if cache is None else self._continue(cache, *inputs, mask)
        return self.out_proj(u * o)                                   # (b, n, D)

    def _continue(self, cache: GAUCache, quad_q, quad_k, lin_q, lin_k, v, mask) -> torch.Tensor:
        """Continue the cached sequence; a single token takes the branch-free step."""
        quad_k, lin_k = _mask_keys(quad_k, lin_k, mask)
        o = self._step(cache, quad_q, quad_k, lin_q, lin_k, v) if v.shape[1] == 1 else \
            self._piece(cache, quad_q, quad_k, lin_q, lin_k, v)
        cache.length += v.shape[1]
        cache.pos += v.shape[1]
        return o

    def _step(self, cache: GAUCache, quad_q, quad_k, lin_q, lin_k, v) -> torch.Tensor:
        """One token, with no Python branch on the position: write its row at ``r = pos % c``,
        attend to rows ``<= r``, add its K_lin^T V / c to ``pending``, and fold ``pending`` into
        ``state`` when the chunk is then complete (a ``where``, not an ``if``). O(c (s + e) + s e).

        Eager calls take :meth:`_step_eager` instead: the same arithmetic on the filled rows only,
        indexed by the host-side ``cache.length`` (no device read), which on a CPU does half the
        kernel work on average and ~10 fewer small ops per token. Compiled calls keep this
        shape-static form, so that one graph serves every position."""
        if not (cache.static or torch.compiler.is_compiling()):
            return self._step_eager(cache, quad_q, quad_k, lin_q, lin_k, v)
        c = self.chunk_size
        r = cache.pos.remainder(c).view(1)                                  # (1,) long
        cache.quad_k.index_copy_(1, r, quad_k)                             # (b, rows, s)
        cache.v.index_copy_(1, r, v)                                       # (b, rows, e)
        seen = (torch.arange(cache.v.shape[1], device=v.device) <= r).to(v.dtype)  # (rows,) rows [0, r]
        kernel = F.relu((quad_q @ cache.quad_k.transpose(-1, -2)) / c).square() * seen  # (b, 1, c)
        o = kernel @ cache.v + lin_q @ cache.state                         # (b, 1, e)
        cache.pending.add_(lin_k.transpose(-1, -2) @ v / c)               # (b, s, e)
        full = r == c - 1                                                  # (1,) bool: the chunk is complete
        cache.state.copy_(torch.where(full, cache.state + cache.pending, cache.state))
        cache.pending.masked_fill_(full, 0.0)
        return o

    def _step_eager(self, cache: GAUCache, quad_q, quad_k, lin_q, lin_k, v) -> torch.Tensor:
        """:meth:`_step` for eager calls: rows ``[0, r]`` sliced by the host's ``cache.length``."""
        c = self.chunk_size
        r = cache.length % c
        cache.quad_k[:, r] = quad_k[:, 0]
        cache.v[:, r] = v[:, 0]
        kernel = F.relu((quad_q @ cache.quad_k[:, :r + 1].transpose(-1, -2)) / c).square()  # (b, 1, r+1)
        o = kernel @ cache.v[:, :r + 1] + lin_q @ cache.state              # (b, 1, e)
        cache.pending.add_(lin_k.transpose(-1, -2) @ v / c)               # (b, s, e)
        if r == c - 1:  # the chunk is complete: fold it into the cross-chunk state
            cache.state.add_(cache.pending)
            cache.pending.zero_()
        return o

    def _piece(self, cache: GAUCache, quad_q, quad_k, lin_q, lin_k, v) -> torch.Tensor:
        """Several tokens: first fill the open chunk, then whole chunks from a boundary."""
        c, r, m = self.chunk_size, cache.length % self.chunk_size, v.shape[1]
        # tokens that land in the open chunk (at a boundary: the chunk they open), through the step
        # form: the mixed-chunk op would pad them to a whole chunk
        head = min(m, c - r)
        o, keys, vals = gau_continue_chunk(quad_q[:, :head], quad_k[:, :head], lin_q[:, :head], v[:, :head],
                                           c, cache.quad_k[:, :r], cache.v[:, :r], cache.state)
        outs = [o]
        cache.quad_k[:, r:r + head] = quad_k[:, :head]
        cache.v[:, r:r + head] = v[:, :head]
        cache.pending.add_(lin_k[:, :head].transpose(-1, -2) @ v[:, :head] / c)
        if r + head == c:  # the chunk is complete: fold it into the cross-chunk state
            cache.state.add_(cache.pending)
            cache.pending.zero_()
        if m > head:
            rest = slice(head, m)
            o, state = gau_mixed_unchecked(quad_q[:, rest], quad_k[:, rest], lin_q[:, rest], lin_k[:, rest],
                                       v[:, rest], c, initial_state=cache.state, output_final_state=True)
            outs.append(o)
            cache.state.copy_(state)
            tail = (m - head) % c  # a trailing partial chunk stays open in the cache
            cache.quad_k[:, :tail] = quad_k[:, m - tail:]
            cache.v[:, :tail] = v[:, m - tail:]
            cache.pending.copy_(lin_k[:, m - tail:].transpose(-1, -2) @ v[:, m - tail:] / c)
        return torch.cat(outs, dim=1)                                 # (b, m, e)


# ----------------------------------------------------------------------------- model


class GAUModel(CausalLM):
    """Causal LM whose token mixer is a gated attention unit (FLASH mixed-chunk; Hua et al., 2022).

    GAU is single-head, so unlike the other six models it takes no ``num_heads``: its fourth
    positional argument is ``ff_dim``.

    Args:
        vocab_size, hidden_dim, num_layers, ff_dim, dropout: as in every model here.
        chunk_size: FLASH chunk length ``c`` (positive int; also scales ``relu(q k / c)^2``).
        expansion_factor: ``e = expansion_factor * hidden_dim``, the width of ``U`` and ``V`` (positive int).
        qk_dim: ``s``, the width of the shared ``Z`` behind the queries and keys (positive int).
        **shell_kwargs: passed to :class:`bsbr.causal_lm.CausalLM`.

    The shared shell's pre-norm block adds its feed-forward layer after the unit.
    """

    mixer_class = GatedAttentionUnit

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, ff_dim: int, dropout: float = 0.1,
                 chunk_size: int = 128, expansion_factor: int = 2, qk_dim: int = 128, **shell_kwargs):
        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout,
                         mixer_factory=lambda i: GatedAttentionUnit(hidden_dim, chunk_size, expansion_factor, qk_dim),
                         **shell_kwargs)
