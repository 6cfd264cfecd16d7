"""DeltaNet (Schlag et al.'s 2021 delta rule, Yang et al.'s 2024 chunkwise form): the WY/UT form and
the recurrence against the token-loop oracle, the delta rule's exact-recall property, masking, the
mixer's q/k normalisation and beta. Bad hyperparameters and streaming: tests/bsbr/test_models.py."""

import pytest
import torch
import torch.nn.functional as F

from bsbr_extras.deltanet import (SEGMENT_BYTES, DeltaNetAttention, delta_rule_chunkwise,
                                  delta_rule_recurrent, unit_lower_inverse)
from tests.conftest import rel_err
from tests.reference_linear import delta_rule_ref

TOL = 1e-5


def inputs(b=2, h=3, n=29, d=8, dv=None, dtype=torch.float32, seed=0):
    """L2-normalised q, k (as the mixer makes them), random v, beta in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(b, h, n, d, generator=g, dtype=dtype), dim=-1) for _ in range(2))
    v = torch.randn(b, h, n, dv or d, generator=g, dtype=dtype)
    beta = torch.rand(b, h, n, generator=g, dtype=dtype)
    return q, k, v, beta


def pad_mask(b, n, lens):
    return torch.arange(n)[None, :] < torch.tensor(lens)[:, None]


@pytest.mark.parametrize("n,chunk", [(1, 8), (29, 8), (32, 8), (29, 64), (29, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("segment", [None, 1, 3], ids=lambda g: f"seg{g}")
def test_chunkwise_matches_oracle(n, chunk, masked, segment):
    # segment None is one segment at these sizes; 1 and 3 force the state across segment seams
    q, k, v, beta = inputs(n=n, dv=5)
    mask = pad_mask(2, n, [n, max(1, n - 11)]) if masked else None
    out = delta_rule_chunkwise(q, k, v, beta, chunk, mask, segment_chunks=segment)
    assert out.dtype == torch.float32
    ref = delta_rule_ref(*(t.double() for t in (q, k, v, beta)), mask)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("c", [1, 2, 3, 4, 7, 8, 29, 64])
def test_unit_lower_inverse_is_the_inverse(c):
    A = 0.3 * torch.randn(5, c, c, dtype=torch.float64)  # the upper triangle is garbage and must be ignored
    M = torch.eye(c, dtype=torch.float64) + A.tril(-1)
    assert rel_err(unit_lower_inverse(A), torch.linalg.inv(M)) <= 1e-12


def test_default_segments_split_a_long_sequence_without_changing_it():
    # At benchmark sizes the default splits the sequence into several segments; the seams must be exact.
    b, h, d, c = 1, 2, 64, 64
    n = (3 * (SEGMENT_BYTES // (b * h * c * 2 * d * 4)) + 1) * c + 5  # 3 full default segments, one more chunk, a ragged tail
    q, k, v, beta = inputs(b=b, h=h, n=n, d=d, dtype=torch.float32)
    o, S = delta_rule_chunkwise(q, k, v, beta, c, output_final_state=True)
    o1, S1 = delta_rule_chunkwise(q, k, v, beta, c, output_final_state=True, segment_chunks=n)
    assert rel_err(o, o1) <= 1e-6 and rel_err(S, S1) <= 1e-6
    assert rel_err(o[..., -200:, :], delta_rule_recurrent(q, k, v, beta)[..., -200:, :]) <= 1e-5


def test_correlated_keys_stay_accurate():
    # Nearly repeated keys with beta = 1 make (I + strict_tril(beta K K^T)) far from the identity:
    # the hardest case for the UT transform in fp32.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 3, 1, 8, generator=g)
    k = F.normalize(base + 0.05 * torch.randn(2, 3, 64, 8, generator=g), dim=-1)
    q = F.normalize(torch.randn(2, 3, 64, 8, generator=g), dim=-1)
    v = torch.randn(2, 3, 64, 8, generator=g)
    beta = torch.ones(2, 3, 64)
    out = delta_rule_chunkwise(q, k, v, beta, 64)
    assert rel_err(out, delta_rule_ref(q.double(), k.double(), v.double(), beta.double())) <= TOL


@pytest.mark.parametrize("segment", [None, 2], ids=lambda g: f"seg{g}")
def test_gradients_match_oracle(segment):
    q, k, v, beta = (t.requires_grad_() for t in inputs(n=29))
    mask = pad_mask(2, 29, [29, 17])
    cot = torch.randn(2, 3, 29, 8)
    out = delta_rule_chunkwise(q, k, v, beta, 8, mask, segment_chunks=segment)
    grads = torch.autograd.grad((out * cot).sum(), (q, k, v, beta))
    ref = torch.autograd.grad((delta_rule_ref(q, k, v, beta, mask) * cot).sum(), (q, k, v, beta))
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= TOL


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("segment", [None, 1, 2], ids=lambda g: f"seg{g}")
def test_recurrent_matches_chunkwise(masked, segment):
    q, k, v, beta = inputs(n=37, dv=6, dtype=torch.float64)  # 37 = 4 chunks of 8 + 5
    mask = pad_mask(2, 37, [37, 22]) if masked else None
    o_c, S_c = delta_rule_chunkwise(q, k, v, beta, 8, mask, output_final_state=True, segment_chunks=segment)
    o_r, S_r = delta_rule_recurrent(q, k, v, beta, mask, output_final_state=True)
    assert rel_err(o_c, o_r) <= 1e-12
    assert rel_err(S_c, S_r) <= 1e-12


def test_initial_state_continues_a_sequence():
    q, k, v, beta = inputs(n=30, dtype=torch.float64)
    full = delta_rule_chunkwise(q, k, v, beta, 8)
    cut = lambda t, sl: t[:, :, sl]
    a, S = delta_rule_chunkwise(*(cut(t, slice(0, 11)) for t in (q, k, v, beta)), 8, output_final_state=True)
    b = delta_rule_chunkwise(*(cut(t, slice(11, 30)) for t in (q, k, v, beta)), 8, initial_state=S)
    c = delta_rule_recurrent(*(cut(t, slice(11, 30)) for t in (q, k, v, beta)), initial_state=S)
    assert rel_err(torch.cat([a, b], dim=2), full) <= 1e-12
    assert rel_err(torch.cat([a, c], dim=2), full) <= 1e-12


def test_delta_rule_recalls_the_last_write_exactly():
    # With beta = 1 and unit keys, S_t^T k_t = v_t: the write replaces what k_t read before.
    # Reading with q_t = k_t must return v_t, whatever was stored earlier (an additive
    # linear-attention update, or S read in the wrong orientation, would not).
    q, k, v, _ = inputs(n=27, d=16, dtype=torch.float64)
    k[:, :, 10] = k[:, :, 3]  # overwrite the same key: recall must give the newer value
    beta = torch.ones(2, 3, 27, dtype=torch.float64)
    for out in (delta_rule_chunkwise(k, k, v, beta, 8), delta_rule_recurrent(k, k, v, beta)):
        assert rel_err(out, v) <= 1e-10


def test_chunk_size_does_not_change_the_result():
    q, k, v, beta = inputs(n=37, dtype=torch.float64)
    outs = [delta_rule_chunkwise(q, k, v, beta, c) for c in (1, 4, 7, 37, 100)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) <= 1e-12


def test_masked_tokens_neither_erase_nor_write():
    q, k, v, beta = inputs(n=21, dtype=torch.float64)
    mask = torch.ones(2, 21, dtype=torch.bool)
    drop = [0, 5, 8, 9, 20]
    mask[:, drop] = False
    out, S = delta_rule_chunkwise(q, k, v, beta, 4, mask, output_final_state=True)
    keep = mask[0]
    # the same as running the real tokens alone
    alone, S_alone = delta_rule_chunkwise(*(t[:, :, keep] for t in (q, k, v, beta)), 4, output_final_state=True)
    assert rel_err(out[:, :, keep], alone) <= 1e-12
    assert rel_err(S, S_alone) <= 1e-12
    assert torch.isfinite(out).all()


def test_mixer_normalises_q_k_and_bounds_beta():
    torch.manual_seed(0)
    mixer = DeltaNetAttention(24, 3, chunk_size=5).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    q, k, v, beta = mixer.op_inputs(x)
    assert torch.allclose(q.norm(dim=-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(k.norm(dim=-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    assert beta.shape == (2, 3, 13) and ((beta > 0) & (beta < 1)).all()
    # beta_t = sigmoid(w_beta . x_t) per head
    assert torch.allclose(beta, torch.sigmoid(x @ mixer.beta_proj.weight.T).transpose(1, 2))


def test_op_rejects_bad_arguments():
    q, k, v, beta = inputs(n=6)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_chunkwise(q, k, v, beta, 0)
    with pytest.raises(ValueError, match="beta"):
        delta_rule_chunkwise(q, k, v, beta[..., :5], 4)
