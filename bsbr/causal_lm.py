"""The model shell shared by every architecture in this project: ``CausalLM``.

Token embedding -> positions -> ``num_layers`` pre-norm blocks -> final norm -> LM head.
Only the token *mixer* differs between architectures (its contract: :mod:`bsbr.mixer`);
everything here is written once.

Axis legend used in shape comments:
    b  batch            n  tokens in this call        D  hidden size
    V  vocabulary
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import sizing
from .checks import (check_dropout, check_float, check_input_ids, check_positive_float, check_positive_int,
                     normalize_mask)
from .mixer import default


# ----------------------------------------------------------------------------- positions


def sinusoidal_positions(start: int, length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Vaswani et al. (2017) sinusoidal encodings for positions start .. start+length-1; no length cap."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float64)[:, None]  # (n, 1)
    half = (dim + 1) // 2
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float64) * 2 / dim)
    ang = pos * inv_freq[None, :]  # (n, half)
    enc = torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)[:, :dim]  # (n, dim) interleaved sin/cos
    return enc.to(dtype)


# ----------------------------------------------------------------------------- blocks


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


class FeedForward(nn.Module):
    def __init__(self, hidden_dim: int, ff_dim: int, dropout: float, activation: str = "gelu"):
        super().__init__()
        check_positive_int("ff_dim", ff_dim)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.fc_in = nn.Linear(hidden_dim, ff_dim)
        self.fc_out = nn.Linear(ff_dim, hidden_dim)
        self.act = _ACTIVATIONS[activation]
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Module):
    """Pre-norm block: ``x + drop(mixer(norm(x)))`` then ``x + drop(ffn(norm(x)))``.

    The block owns the residual dropout of both branches (the FFN's is ``self.ffn.drop``, its last
    step); the mixer's output is never dropped inside the mixer.
    """

    def __init__(self, hidden_dim: int, mixer: nn.Module, ff_dim: int, dropout: float,
                 norm_eps: float = 1e-5, activation: str = "gelu"):
        super().__init__()
        check_dropout(dropout)
        check_positive_float("norm_eps", norm_eps)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=norm_eps)
        self.mixer = mixer
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=norm_eps)
        self.ffn = FeedForward(hidden_dim, ff_dim, dropout, activation)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        # Below the model's edge a mixer with an unchecked entry (``mix``) is called through it,
        # looked up on the class (an instance getattr of a missing name raises and catches an
        # AttributeError inside nn.Module.__getattr__). No local holds the mixer's output, so it is
        # freed before the feed-forward runs (holding it raised the traced peak memory).
        mixer = self.mixer
        mix = getattr(type(mixer), "mix", None)
        x = x + self.drop(mixer(self.norm1(x), mask=mask, cache=cache) if mix is None
                          else mix(mixer, self.norm1(x), mask=mask, cache=cache))
        return x + self.ffn(self.norm2(x))


# ----------------------------------------------------------------------------- cache


@dataclass
class ModelCache:
    """Decoding state of a whole model: one mixer cache per layer plus the position reached."""

    batch_size: int
    layers: list = field(default_factory=list)
    pos: int = 0

    def nbytes(self) -> int:
        """Bytes of storage the cache keeps alive (a view pins its whole base tensor, so views of a
        long prefill's activations would show up here rather than hide)."""
        total = 0
        seen = set()

        def walk(obj):
            nonlocal total
            if isinstance(obj, torch.Tensor):
                st = obj.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    walk(o)
            elif isinstance(obj, dict):
                for o in obj.values():
                    walk(o)
            elif hasattr(obj, "__dict__"):
                for o in vars(obj).values():
                    walk(o)

        walk(self.layers)
        return total


# ----------------------------------------------------------------------------- model


class CausalLM(nn.Module):
    """Embedding, positions, pre-norm blocks with a pluggable mixer, final norm, LM head.

    Args:
        mixer_factory: ``layer_index -> nn.Module`` following the mixer protocol (:mod:`bsbr.mixer`).
        position: ``"sinusoidal"`` (default; any length) or ``"learned"`` (a table of
            ``max_positions`` rows, as GPT-2 has; longer inputs raise a clear error).
        tie_embeddings: share the LM head weight with the token embedding (default True).
        use_checkpointing: recompute each block in backward instead of storing its activations.
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, ff_dim: int, dropout: float,
                 mixer_factory: Callable[[int], nn.Module], *, position: str = "sinusoidal",
                 max_positions: Optional[int] = None, tie_embeddings: bool = True, norm_eps: float = 1e-5,
                 activation: str = "gelu", use_checkpointing: bool = False):
        super().__init__()
        sizing.refresh()  # $BSBR_SIZING is read here (and by sizing.use), never per op call
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("num_layers", num_layers)
        check_positive_int("ff_dim", ff_dim)
        check_dropout(dropout)
        check_positive_float("norm_eps", norm_eps)
        if position not in ("sinusoidal", "learned"):
            raise ValueError(f"position must be 'sinusoidal' or 'learned', got {position!r}")
        if position == "learned":
            check_positive_int("max_positions", max_positions)
        self.vocab_size, self.hidden_dim, self.num_layers = vocab_size, hidden_dim, num_layers
        self.position, self.max_positions = position, max_positions
        self.use_checkpointing = bool(use_checkpointing)

        self._sin_table: Optional[torch.Tensor] = None  # cache only: not a parameter or buffer
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.pos_embed = nn.Embedding(max_positions, hidden_dim) if position == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            Block(hidden_dim, mixer_factory(i), ff_dim, dropout, norm_eps, activation) for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim, eps=norm_eps)
        self.lm_head = nn.Linear(hidden_dim, vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.layers:  # a mixer's own initialisation of its weights comes after the shell's
            hook = getattr(block.mixer, "init_weights", None)
            if callable(hook):
                hook()
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # GPT-2 style init; mixers may re-initialise their own special parameters afterwards.
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ---- positions -----------------------------------------------------------------------

    def _positions(self, start: int, n: int, device, dtype) -> torch.Tensor:
        if self.pos_embed is None:
            # The table is computed once (in float64, then cast) and extended by doubling when a
            # longer sequence arrives: there is no cap, and no per-call transcendental work.
            table = self._sin_table
            if table is None or table.shape[0] < start + n or table.device != device or table.dtype != dtype:
                size = max(start + n, 2 * (table.shape[0] if table is not None else 0), 1024)
                table = sinusoidal_positions(0, size, self.hidden_dim, device=device, dtype=dtype)
                self._sin_table = table
            return table[start:start + n]
        if start + n > self.max_positions:
            raise ValueError(
                f"sequence reaches position {start + n}, past this model's learned position table "
                f"(max_positions={self.max_positions}); use a sinusoidal-position model for longer inputs"
            )
        return self.pos_embed.weight[start:start + n]

    # ---- forward -------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[ModelCache] = None, **kwargs) -> torch.Tensor:
        """Logits ``(batch, seq_len, vocab_size)``.

        ``attention_mask`` (batch, seq_len): 1 for real tokens, 0 for padding; padded positions
        are never attended to (their own outputs are unspecified). With ``cache`` the call
        continues the sequence held in the cache and updates it in place.
        The public edge: ids, mask and cache are checked here, once per call; nothing below
        checks them again.
        """
        trusted = kwargs.pop("_trusted_ids", False)  # generate's own tokens: argmax/sample < vocab_size
        if kwargs:
            raise ValueError(f"unexpected keyword argument(s) {sorted(kwargs)}; valid: attention_mask, cache")
        if not trusted:
            check_input_ids(input_ids, self.vocab_size)
        mask = normalize_mask(attention_mask, input_ids)
        if cache is not None:
            if not isinstance(cache, ModelCache) or len(cache.layers) != len(self.layers):
                raise ValueError("cache must come from this model's init_cache()")
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(f"cache was made for batch_size={cache.batch_size}, got input batch "
                                 f"{input_ids.shape[0]}")
        return self._logits(input_ids, mask, cache)

    def _logits(self, input_ids: torch.Tensor, mask: Optional[torch.Tensor], cache: Optional[ModelCache]):
        """:meth:`forward` below the edge: checked ids, a bool mask or None, this model's cache."""
        n = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        x = self.embed(input_ids)  # (b, n, D)
        x = self.drop(x + self._positions(start, n, x.device, x.dtype))
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.use_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, None, use_reentrant=False)
            else:
                x = block(x, mask, layer_cache)
        if cache is not None:
            cache.pos += n
        return self.lm_head(self.norm(x))  # (b, n, V)

    def init_cache(self, batch_size: int, device=None, dtype=None, max_len: Optional[int] = None,
                   static: bool = False) -> ModelCache:
        """An empty decoding cache; pass it to ``forward`` to stream a sequence in pieces.

        ``max_len``: the most tokens the cache will hold. The key/value caches (Standard, Hopfield)
        and BSBR's chunk-state cache then allocate it once and never grow; a longer sequence raises
        a ValueError. The fixed-size caches (Linear, DeltaNet, SlidingWindow, GAU) do not need it.
        Without it BSBR's cache grows per chunk.

        Which one-token step runs (docs/decoding.md): eager, a step reads the filled part of the
        buffers only, so it costs what the context costs, whatever ``max_len``; under
        ``torch.compile``, or with ``static=True`` (needs ``max_len``; for CUDA graphs captured by
        hand), it is the shape-static masked step over the whole buffer (one graph, O(max_len)).
        """
        check_positive_int("batch_size", batch_size)
        if max_len is not None:
            check_positive_int("max_len", max_len)
        if not isinstance(static, bool):
            raise ValueError(f"static must be True or False, got {static!r}")
        if static and max_len is None:
            raise ValueError("static=True needs max_len: a shape-static step needs a fixed buffer size")
        p = self.embed.weight
        device, dtype = default(device, p.device), default(dtype, p.dtype)
        kw = {} if max_len is None else {"max_len": max_len}  # a mixer need not know max_len to be used without it
        if static:
            kw["static"] = True
        return ModelCache(batch_size, [blk.mixer.init_cache(batch_size, device, dtype, **kw) for blk in self.layers])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue ``input_ids`` by ``max_new_tokens`` tokens using the cache.

        Greedy (``temperature=0``, the default) or sampled from ``softmax(logits / temperature)``,
        restricted to the ``top_k`` most likely tokens and/or the smallest set whose probability
        reaches ``top_p`` (nucleus sampling; Holtzman et al., 2020). ``top_k``/``top_p`` are
        validated but have no effect when greedy. The prompt is prefilled once; each further step
        feeds one token, so no step recomputes the prefix.
        Returns ``(batch, prompt_len + max_new_tokens)`` token ids.
        """
        check_positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
        check_float("temperature", temperature, lo_open=False, note=" (0 = greedy)")
        if top_k is not None:
            check_positive_int("top_k", top_k)
        check_float("top_p", top_p, 0.0, 1.0, hi_open=False, allow_none=True)
        check_input_ids(input_ids, self.vocab_size)  # once, before the cache is made for it
        # sized to this call: the prompt plus the new tokens (a step's work follows the filled part)
        cache = self.init_cache(input_ids.shape[0], max_len=input_ids.shape[1] + max_new_tokens)
        out = input_ids
        logits = self(input_ids, cache=cache, _trusted_ids=True)[:, -1]
        for step in range(max_new_tokens):
            if temperature > 0:
                nxt = sample_token(logits / temperature, top_k, top_p, generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if step + 1 < max_new_tokens:  # the model's own token: in range by construction
                logits = self(nxt, cache=cache, _trusted_ids=True)[:, -1]
        return out

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


# ----------------------------------------------------------------------------- sampling


def sample_token(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row from ``softmax(logits)`` (b, V) -> (b, 1), after top-k / top-p filtering.

    Sampled by an exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks index i with
    probability ``p_i`` (the Gumbel-max trick in another guise), with no host synchronisation.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.float().softmax(-1)  # (b, V)
    if top_p is not None and top_p < 1.0:
        sp, idx = probs.sort(-1, descending=True)
        # drop a token when the tokens more likely than it already reach top_p (the first always stays)
        drop = (sp.cumsum(-1) - sp) >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), 0.0)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1, keepdim=True)
