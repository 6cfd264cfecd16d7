"""Causal modern-Hopfield retrieval (Ramsauer et al., 2021): the op against an oracle written from
the paper's equations (update in key space, values read once), one step == Standard, KV-cache
decoding with several steps. Bad hyperparameters and streaming with a mask: tests/bsbr/test_models.py."""

import math

import pytest
import torch

from bsbr_extras.hopfield import HopfieldAttention, HopfieldNetworkModel, hopfield_retrieval
from bsbr_extras.standard import StandardAttention, StandardTransformerModel, causal_softmax_attention
from tests.conftest import rel_err
from tests.reference_softmax import hopfield_loop
from tests.bsbr_extras.test_standard import at_real, pad_mask, qkv


@pytest.mark.parametrize("steps, beta", [(1, None), (1, 0.7), (2, 0.5), (3, 1.3)], ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_retrieval_matches_oracle_fp32(steps, beta, masked):
    n = 29
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, 18]) if masked else None
    if masked:
        mask[0, 1:4] = False
    out = hopfield_retrieval(q, k, v, beta, steps, mask=mask)
    ref = hopfield_loop(*(t.double() for t in (q, k, v)), beta if beta is not None else 1 / math.sqrt(8), steps, mask)
    assert rel_err(at_real(out, mask), ref) <= 1e-5


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_three_steps_with_values_unlike_keys_match_the_paper_to_fp64_rounding(masked):
    # V != K (independent draws) and beta large enough that each update really moves xi
    q, k, v = qkv(n=23, dtype=torch.float64)
    mask = pad_mask(2, 23, [23, 15]) if masked else None
    out = hopfield_retrieval(q, k, v, 0.9, 3, mask=mask)
    ref = hopfield_loop(q, k, v, 0.9, 3, mask)
    assert rel_err(at_real(out, mask), ref) <= 1e-12
    # the updates matter: three retrievals are not one, and not three reads through V
    one = hopfield_retrieval(q, k, v, 0.9, 1, mask=mask)
    assert rel_err(at_real(one, mask), ref) > 1e-2


def test_gradients_match_oracle():
    n = 19
    q, k, v = qkv(n=n, dtype=torch.float64)
    mask = pad_mask(2, n, [n, 12])
    wt = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for fn in (lambda q, k, v: at_real(hopfield_retrieval(q, k, v, 0.6, 3, mask=mask), mask),
               lambda q, k, v: hopfield_loop(q, k, v, 0.6, 3, mask)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * wt).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip("qkv", *grads):
        assert rel_err(a, b) <= 1e-10, f"d/d{name}"


def test_one_step_default_beta_equals_standard():
    q, k, v = qkv(n=20)
    assert rel_err(hopfield_retrieval(q, k, v), causal_softmax_attention(q, k, v)) <= 1e-6
    torch.manual_seed(0)
    std = StandardTransformerModel(50, 32, 2, 4, 64, dropout=0.0).eval()
    hop = HopfieldNetworkModel(50, 32, 2, 4, 64, dropout=0.0).eval()
    assert hop.layers[0].mixer.beta == pytest.approx(1 / math.sqrt(8))
    hop.load_state_dict(std.state_dict())  # same projections, and no extra parameter
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


def test_several_steps_add_no_parameters_and_stay_causal():
    torch.manual_seed(0)
    one = HopfieldNetworkModel(50, 32, 2, 4, 64, dropout=0.0)
    model = HopfieldNetworkModel(50, 32, 2, 4, 64, dropout=0.0, update_steps=3).double().eval()
    assert model.num_parameters() == one.num_parameters()
    x = torch.randint(0, 50, (1, 20))
    y = x.clone()
    y[0, 11] = (y[0, 11] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11], b[:, 11])


@pytest.mark.parametrize("beta", [0, -0.5, float("nan"), float("inf"), "1", True])
def test_op_rejects_bad_beta(beta):
    q, k, v = qkv(n=4)
    with pytest.raises(ValueError, match="beta"):
        hopfield_retrieval(q, k, v, beta)


@pytest.mark.parametrize("steps", [0, -1, 1.5, None])
def test_op_and_mixer_reject_bad_update_steps(steps):
    q, k, v = qkv(n=4)
    with pytest.raises(ValueError, match="update_steps"):
        hopfield_retrieval(q, k, v, 0.5, steps)
    with pytest.raises(ValueError, match="update_steps"):
        HopfieldAttention(32, 4, update_steps=steps)
