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
