import pytest
import torch

from evals.registry import ModelConfig

# A tiny configuration in which every architecture has several chunks / windows at n ~ 30.
TINY = ModelConfig(vocab_size=53, hidden_dim=32, num_layers=2, num_heads=4, ff_dim=48, dropout=0.0,
                   chunk_size=8, window_size=8, qk_dim=16, expansion_factor=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| (flash-linear-attention style), robust to scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def public_model(name: str, cfg: ModelConfig = TINY, **kw):
    """The library's own model class for ``name`` (``bsbr.BSBRModel``, ``bsbr_extras.GAUModel``, ...),
    built from ``cfg`` as a user of the library would, with ``kw`` for its other arguments. The
    registry builds the same network generically (tests/bsbr/test_models.py holds the two equal)."""
    from bsbr.model import BSBRModel
    from bsbr_extras.deltanet import DeltaNetModel
    from bsbr_extras.gau import GAUModel
    from bsbr_extras.hopfield import HopfieldNetworkModel
    from bsbr_extras.linear import LinearTransformerModel
    from bsbr_extras.sliding_window import SlidingWindowTransformerModel
    from bsbr_extras.standard import StandardTransformerModel

    c = cfg
    common = dict(vocab_size=c.vocab_size, hidden_dim=c.hidden_dim, num_layers=c.num_layers, ff_dim=c.ff_dim,
                  dropout=c.dropout)
    heads = dict(common, num_heads=c.num_heads)
    made = {  # (class, its arguments from cfg); ``kw`` overrides any of them
        "BSBR": (BSBRModel, dict(heads, chunk_size=c.chunk_size, compression_factor=c.compression_factor,
                                 chunk_overlap=c.chunk_overlap)),
        "Standard": (StandardTransformerModel, heads),
        "Linear": (LinearTransformerModel, dict(heads, chunk_size=c.chunk_size)),
        "DeltaNet": (DeltaNetModel, dict(heads, chunk_size=c.chunk_size)),
        "SlidingWindow": (SlidingWindowTransformerModel, dict(heads, window_size=c.window_size)),
        "Hopfield": (HopfieldNetworkModel, dict(heads, beta=c.hopfield_beta, update_steps=c.update_steps)),
        "GAU": (GAUModel, dict(common, chunk_size=c.chunk_size, expansion_factor=c.expansion_factor, qk_dim=c.qk_dim)),
    }
    cls, args = made[name]
    return cls(**{**args, **kw})
