"""Causal modern-Hopfield retrieval: op vs the token-loop oracle, one step == Standard, KV-cache decoding."""

import math

import pytest
import torch

from bsbr_extras.hopfield import HopfieldAttention, HopfieldNetworkModel, hopfield_retrieval
from bsbr_extras.standard import StandardAttention, StandardTransformerModel, causal_softmax_attention
from tests.conftest import rel_err
from tests.reference_softmax import hopfield_loop
from tests.test_standard import at_real, pad_mask, qkv


def requery_map(h=3, d=8, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=g)


@pytest.mark.parametrize("steps, beta", [(1, None), (1, 0.7), (2, 0.5), (3, 1.3)], ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_retrieval_matches_oracle(steps, beta, masked):
    n = 29
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, 18]) if masked else None
    if masked:
        mask[0, 1:4] = False
    W = requery_map() if steps > 1 else None
    out = hopfield_retrieval(q, k, v, beta, steps, W, mask)
    ref = hopfield_loop(q, k, v, beta if beta is not None else 1 / math.sqrt(8), steps, W, mask)
    assert rel_err(at_real(out, mask), ref) <= 1e-5


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_gradients_match_oracle(masked):
    n = 19
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, 12]) if masked else None
    wt = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (lambda q, k, v, W: at_real(hopfield_retrieval(q, k, v, 0.6, 3, W, mask), mask),
               lambda q, k, v, W: hopfield_loop(q, k, v, 0.6, 3, W, mask)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, requery_map())]
        (fn(*leaves) * wt).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(["q", "k", "v", "requery"], *grads):
        assert rel_err(a, b) <= 1e-5, f"d/d{name}"


def test_further_steps_change_the_retrieval():
    q, k, v = qkv(n=20)
    one = hopfield_retrieval(q, k, v, None, 1)
    two = hopfield_retrieval(q, k, v, None, 2, requery_map())
    assert rel_err(two, one) > 1e-2
    # with beta = 1/sqrt(d) one step is exactly standard causal attention
    assert rel_err(one, causal_softmax_attention(q, k, v)) <= 1e-6


def test_one_step_default_beta_equals_standard_model():
    torch.manual_seed(0)
    std = StandardTransformerModel(50, 32, 2, 4, 64, dropout=0.0).eval()
    hop = HopfieldNetworkModel(50, 32, 2, 4, 64, dropout=0.0).eval()
    assert hop.layers[0].mixer.beta == pytest.approx(1 / math.sqrt(8))
    hop.load_state_dict(std.state_dict())  # same projections
    x = torch.randint(0, 50, (2, 27))
    mask = torch.ones(2, 27, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.no_grad():
        assert rel_err(hop(x), std(x)) <= 1e-6
        real = mask.bool()
        assert rel_err(hop(x, mask)[real], std(x, mask)[real]) <= 1e-6
    # a different temperature really is different attention (standalone mixers: default, larger init)
    mix_std, mix_hop = StandardAttention(32, 4).eval(), HopfieldAttention(32, 4, beta=2.0).eval()
    mix_hop.load_state_dict(mix_std.state_dict())
    h = torch.randn(2, 27, 32)
    with torch.no_grad():
        assert rel_err(mix_hop(h), mix_std(h)) > 1e-2


def test_requery_parameter_only_with_several_steps():
    assert HopfieldAttention(32, 4).requery is None
    m = HopfieldAttention(32, 4, update_steps=3)
    assert m.requery.shape == (4, 8, 8)
    model = HopfieldNetworkModel(50, 32, 1, 4, 64, update_steps=2)
    assert torch.equal(model.layers[0].mixer.requery.detach(), torch.eye(8).expand(4, 8, 8))  # shell init keeps it


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_kv_cache_streaming_with_several_steps_matches_parallel(masked):
    torch.manual_seed(0)
    mixer = HopfieldAttention(24, 3, beta=0.4, update_steps=3).double().eval()
    with torch.no_grad():
        mixer.requery.add_(0.2 * torch.randn_like(mixer.requery))
    n = 30
    x = torch.randn(2, n, 24, dtype=torch.float64)
    mask = pad_mask(2, n, [n, 21]) if masked else None
    with torch.no_grad():
        full = mixer(x, mask)
        for cuts in ([*range(1, n)], [4, 5, 19]):
            cache = mixer.init_cache(2)
            pieces, prev = [], 0
            for c in cuts + [n]:
                pieces.append(mixer(x[:, prev:c], None if mask is None else mask[:, prev:c], cache=cache))
                prev = c
            out = torch.cat(pieces, dim=1)
            real = torch.ones(2, n, dtype=torch.bool) if mask is None else mask
            assert torch.allclose(out[real], full[real], atol=1e-12, rtol=1e-10), cuts


def test_model_with_several_steps_is_causal():
    torch.manual_seed(0)
    model = HopfieldNetworkModel(50, 32, 2, 4, 64, dropout=0.0, update_steps=3).double().eval()
    x = torch.randint(0, 50, (1, 20))
    y = x.clone()
    y[0, 11] = (y[0, 11] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11], b[:, 11])


@pytest.mark.parametrize("beta", [0, -0.5, float("nan"), float("inf"), "1", True])
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match="beta"):
        HopfieldNetworkModel(50, 32, 1, 4, 64, beta=beta)
    q, k, v = qkv(n=4)
    with pytest.raises(ValueError, match="beta"):
        hopfield_retrieval(q, k, v, beta)


@pytest.mark.parametrize("steps", [0, -1, 1.5, None])
def test_bad_update_steps_raises(steps):
    with pytest.raises(ValueError, match="update_steps"):
        HopfieldNetworkModel(50, 32, 1, 4, 64, update_steps=steps)
    with pytest.raises(ValueError, match="update_steps"):
        HopfieldAttention(32, 4, update_steps=steps)


def test_missing_requery_raises():
    q, k, v = qkv(n=4)
    with pytest.raises(ValueError, match="requery"):
        hopfield_retrieval(q, k, v, 0.5, 2)
    with pytest.raises(ValueError, match="requery"):
        hopfield_retrieval(q, k, v, 0.5, 2, torch.eye(5).expand(3, 5, 5))
