"""BSBRLayer and BSBRModel: the shared shell (bsbr.causal_lm) with BSBRAttention as the token mixer."""

from __future__ import annotations

from typing import Optional

from .attention import BSBRAttention
from .causal_lm import Block, CausalLM


class BSBRLayer(Block):
    """A pre-norm transformer layer: BSBR attention then a feed-forward network.

    Positional order (the earlier package's): ``hidden_dim, num_heads, chunk_size, ff_dim, dropout``; ``dropout``
    is the residual dropout of both branches (applied once to each, by the block).
    ``forward(x, mask=None, cache=None)`` with x (batch, seq_len, hidden_dim).
    """

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, ff_dim: int, dropout: float = 0.1,
                 compression_factor: Optional[int] = None, chunk_overlap: int = 0, bias: bool = True,
                 gamma: Optional[float] = None, norm_eps: float = 1e-5, activation: str = "gelu"):
        mixer = BSBRAttention(hidden_dim, num_heads, chunk_size, compression_factor=compression_factor,
                              chunk_overlap=chunk_overlap, bias=bias, gamma=gamma)
        super().__init__(hidden_dim, mixer, ff_dim, dropout, norm_eps=norm_eps, activation=activation)

    @property
    def attention(self) -> BSBRAttention:
        return self.mixer


class BSBRModel(CausalLM):
    """Block Sparse attention with Block Retrieval language model.

    Positional order: BSBRModel keeps the earlier package's ``vocab_size, hidden_dim, num_layers, num_heads,
    chunk_size, ff_dim, dropout``, with ``chunk_size`` fifth and ``ff_dim`` sixth. The other six
    models take ``ff_dim`` fifth (``vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout``;
    GAU has no ``num_heads``), so pass ``chunk_size=`` and ``ff_dim=`` by keyword when code builds
    several architectures; the registry does.

    Args:
        vocab_size, hidden_dim, num_layers, num_heads, chunk_size, ff_dim: as named.
        dropout: embedding dropout and the residual dropout of each block's two branches.
        compression_factor: divide each chunk state from d x d to (d/f) x d (None: no compression).
        chunk_overlap: tokens each chunk's local window reaches into the previous chunk.
        use_checkpointing: gradient checkpointing per layer while training.
        bias, gamma: see :class:`bsbr.attention.BSBRAttention`.
        **shell_kwargs: position ("sinusoidal" | "learned"), max_positions, tie_embeddings,
            norm_eps, activation; see :class:`bsbr.causal_lm.CausalLM`.

    ``model(input_ids, attention_mask=None, cache=None)`` returns logits (batch, seq_len, vocab_size).
    """

    mixer_class = BSBRAttention

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.1, compression_factor: Optional[int] = None,
                 chunk_overlap: int = 0, use_checkpointing: bool = False, bias: bool = True,
                 gamma: Optional[float] = None, **shell_kwargs):
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.compression_factor, self.chunk_overlap = compression_factor, chunk_overlap

        def mixer(_):
            return BSBRAttention(hidden_dim, num_heads, chunk_size, compression_factor=compression_factor,
                                 chunk_overlap=chunk_overlap, bias=bias, gamma=gamma)

        super().__init__(vocab_size, hidden_dim, num_layers, ff_dim, dropout, mixer,
                         use_checkpointing=use_checkpointing, **shell_kwargs)
