"""bsbr: Block Sparse attention with Block Retrieval.

Softmax attention inside fixed-size chunks plus strictly-causal retrieval of compressed per-chunk
states between chunks; sub-quadratic, causal, and decodable from a cache that grows with the
number of chunks. See README.md and docs/.
"""

from .attention import BSBRAttention, BSBRCache, BSBRStaticCache
from .causal_lm import CausalLM, ModelCache
from .mixer import RecurrentStateMixer, TokenMixer
from .model import BSBRLayer, BSBRModel
from .ops import bsbr_attention, bsbr_attention_flops

__all__ = ["BSBRAttention", "BSBRCache", "BSBRStaticCache", "BSBRLayer", "BSBRModel", "CausalLM", "ModelCache",
           "RecurrentStateMixer", "TokenMixer", "bsbr_attention", "bsbr_attention_flops"]
__version__ = "0.2.0"
