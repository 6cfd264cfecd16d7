"""Six other efficient-attention architectures behind the bsbr model shell, and the GPT-2 converter.

Each module holds one architecture: its pure token-mixing function(s), its mixer module and its
model class (a thin subclass of :class:`bsbr.shell.CausalLM`).
"""
