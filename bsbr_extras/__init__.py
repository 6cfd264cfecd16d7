"""Six other efficient-attention architectures behind the bsbr model shell, and the GPT-2 converter.

Each module holds one architecture: its pure token-mixing function(s), its mixer module and its
model class (a thin subclass of :class:`bsbr.shell.CausalLM`).
"""

# GPT-2 -> BSBR converter (transformers is imported lazily, only when a conversion runs).
from .convert import TransformerToBSBRConverter, convert_to_bsbr  # noqa: E402,F401
