"""The registry: one explicit table of the seven architectures.

The CLI's choices, the tests' parametrisation and the plots' order and colours all come from
``REGISTRY``. Nothing else in the project lists the models.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:  # the registry is read by --help and `models`, which must not load torch
    from torch import nn

MODES = ("forward", "train", "decode")
LEVELS = ("model", "layer", "op")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyperparameter any registered model takes; each builder reads what it needs."""

    vocab_size: int = 1000
    hidden_dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    ff_dim: int = 512
    dropout: float = 0.0
    chunk_size: int = 64          # BSBR, Linear, DeltaNet, GAU
    chunk_overlap: int = 0        # BSBR
    compression_factor: Optional[int] = None  # BSBR
    window_size: int = 64         # SlidingWindow
    hopfield_beta: Optional[float] = None     # Hopfield; None -> 1/sqrt(head size)
    update_steps: int = 1         # Hopfield
    expansion_factor: int = 2     # GAU
    qk_dim: int = 128             # GAU (the paper's s)

    def with_(self, **kw) -> "ModelConfig":
        return replace(self, **kw)

    def as_dict(self) -> dict:
        return asdict(self)


def _common(c: ModelConfig, heads: bool = True) -> dict:
    """The arguments every model takes (GAU, single-head, takes no num_heads)."""
    d = dict(vocab_size=c.vocab_size, hidden_dim=c.hidden_dim, num_layers=c.num_layers, ff_dim=c.ff_dim,
             dropout=c.dropout)
    return dict(d, num_heads=c.num_heads) if heads else d


@dataclass(frozen=True)
class ModelSpec:
    name: str
    method: str                      # the published method it follows (with citation)
    complexity: str                  # parallel-form cost, per head
    time_class: str                  # expected growth in n of the parallel form: "n" or "n^2"
    modes: tuple                     # which of MODES it supports
    target: str                      # "module:ClassName" of the model class
    kwargs: Callable[[ModelConfig], dict]  # only the arguments the model class takes
    state: str = ""                  # what its decoding cache holds
    departures: str = ""             # every way the code departs from the published method

    def model_class(self):
        mod, cls = self.target.split(":")
        return getattr(importlib.import_module(mod), cls)

    @property
    def forms(self) -> tuple:
        """The op's forms, read from the mixer class: "parallel", plus "recurrent" if it has ``op_recurrent``."""
        return self.model_class().mixer_class.forms()

    def build(self, cfg: ModelConfig) -> "nn.Module":
        """The whole model (embedding, layers, head) for ``cfg``."""
        return self.model_class()(**self.kwargs(cfg))

    def build_mixer(self, cfg: ModelConfig) -> "nn.Module":
        """One token-mixing layer with its projections (the ``layer`` level)."""
        return self.build(cfg.with_(num_layers=1)).layers[0].mixer


# Shared by every entry, so not repeated in each ``departures``: the shared shell (pre-norm blocks,
# a GELU feed-forward layer after every mixer, sinusoidal positions, tied LM head, dropout once on
# each residual branch), not each paper's own block.
REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            "BSBR", "Block Sparse attention with Block Retrieval (this project; README.md, 'What BSBR computes')",
            "O(n(c+o)d + n d^2/f + C^2 d^2/f)", "n", MODES, "bsbr.model:BSBRModel",
            lambda c: dict(_common(c), chunk_size=c.chunk_size, compression_factor=c.compression_factor,
                           chunk_overlap=c.chunk_overlap),
            state="current chunk K,V + one d x d/f state per completed chunk",
            departures="none, the method is this project's; its choices: chunk summary = mean of the layer input over real tokens; "
                       "gamma = 1/(c sqrt(d/f)); compression = learned per-head map d -> d/f"),
        ModelSpec(
            "Standard", "Causal softmax attention (Vaswani et al., 2017)",
            "O(n^2 d)", "n^2", MODES, "bsbr_extras.standard:StandardTransformerModel",
            lambda c: _common(c), state="K,V of every token",
            departures="none beyond the shared shell"),
        ModelSpec(
            "Linear", "Linear attention, phi=elu+1 (Katharopoulos et al., 2020)",
            "O(n c d + n d^2)", "n", MODES, "bsbr_extras.linear:LinearTransformerModel",
            lambda c: dict(_common(c), chunk_size=c.chunk_size), state="d x d state + d normaliser",
            departures="none beyond the shared shell (eps = 1e-6 in the normaliser)"),
        ModelSpec(
            "DeltaNet", "Delta rule of Schlag et al. (2021) with L2-normalised q, k, computed by the chunkwise "
                        "WY/UT algorithm of Yang et al. (2024)",
            "O(n c d + n d^2)", "n", MODES, "bsbr_extras.deltanet:DeltaNetModel",
            lambda c: dict(_common(c), chunk_size=c.chunk_size), state="d x d state",
            departures="not Yang et al.'s full layer: no short convolution, no SiLU on q/k/v, no output "
                       "RMSNorm; L2 norm on q, k instead of Schlag et al.'s feature map + sum norm"),
        ModelSpec(
            "SlidingWindow", "Causal sliding-window softmax attention (the local attention of Beltagy et al., "
                             "2020; as in Jiang et al., 2023)",
            "O(n w d)", "n", MODES, "bsbr_extras.sliding_window:SlidingWindowTransformerModel",
            lambda c: dict(_common(c), window_size=c.window_size), state="ring buffer of w keys and values",
            departures="no global tokens and no dilation (Longformer has both)"),
        ModelSpec(
            "Hopfield", "Modern Hopfield retrieval (Ramsauer et al., 2021)",
            "O(update_steps * n^2 d)", "n^2", MODES, "bsbr_extras.hopfield:HopfieldNetworkModel",
            lambda c: dict(_common(c), beta=c.hopfield_beta, update_steps=c.update_steps),
            state="K,V of every token",
            departures="stored patterns = the causal context (no static pattern set); V its own projection "
                       "(the paper's layer derives V from K); no pattern layer norms"),
        ModelSpec(
            "GAU", "Gated attention unit, FLASH mixed-chunk form (Hua et al., 2022)",
            "O(n c e + n e^2)", "n", MODES, "bsbr_extras.gau:GAUModel",
            lambda c: dict(_common(c, heads=False), chunk_size=c.chunk_size, expansion_factor=c.expansion_factor,
                           qk_dim=c.qk_dim),
            state="current chunk + s x e cross-chunk state",
            departures="no relative-position bias (sinusoidal positions instead); linear term scaled by 1/c; "
                       "a feed-forward layer follows the unit (the paper stacks GAUs instead)"),
    ]
}

MODEL_NAMES: tuple = tuple(REGISTRY)


def model_order(names: Iterable[str]) -> list:
    """Registry order first (the plots' and tables' order), then any unregistered names."""
    names = list(dict.fromkeys(names))
    return [m for m in MODEL_NAMES if m in names] + sorted(m for m in names if m not in MODEL_NAMES)


def resolve_model(name: str) -> ModelSpec:
    """Case-insensitive lookup; raises ValueError naming the valid choices."""
    for key, spec in REGISTRY.items():
        if key.lower() == str(name).strip().lower():
            return spec
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
