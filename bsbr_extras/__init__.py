"""Six other efficient-attention architectures behind the bsbr model shell, and the GPT-2 converter.

Each module holds one architecture: its pure token-mixing function(s), its mixer module and its
model class (a thin subclass of :class:`bsbr.causal_lm.CausalLM`).
"""

# GPT-2 -> BSBR converter (transformers is imported lazily, only when a conversion runs).
from .convert import TransformerToBSBRConverter, convert_to_bsbr  # noqa: E402,F401

# Softmax family: the quadratic baseline, its windowed and its Hopfield variants.
from .standard import StandardAttention, StandardTransformerModel, causal_softmax_attention  # noqa: E402,F401
from .sliding_window import (SlidingWindowAttention, SlidingWindowTransformerModel,  # noqa: E402,F401
                             sliding_window_attention)
from .hopfield import HopfieldAttention, HopfieldNetworkModel, hopfield_retrieval  # noqa: E402,F401

# Linear family: kernelised linear attention, the delta rule, and the gated attention unit.
from .linear import (LinearAttention, LinearTransformerModel, linear_attention, linear_attention_recurrent,  # noqa: E402,F401
                     linear_attention_step)
from .deltanet import (DeltaNetAttention, DeltaNetModel, delta_rule_chunkwise,  # noqa: E402,F401
                       delta_rule_recurrent)
from .gau import GatedAttentionUnit, GAUModel, gau_continue_chunk, gau_mixed_chunk  # noqa: E402,F401
