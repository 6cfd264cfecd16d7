"""Linear attention (Katharopoulos et al., 2020): the chunkwise op and the step form against the
full-matrix oracle, masking, the head-dimension guard, bad op arguments. Bad hyperparameters and
streaming through the cache: tests/bsbr/test_models.py."""

import pytest
import torch

from bsbr_extras.linear import linear_attention, linear_attention_step
from tests.conftest import rel_err
from tests.reference_linear import linear_attention_ref

TOL = 1e-5


def qkv(b=2, h=3, n=29, d=8, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=dtype) for s in (d, d, dv or d)]


def pad_mask(b, n, lens):
    return torch.arange(n)[None, :] < torch.tensor(lens)[:, None]  # (b, n), right padding


def ref64(q, k, v, mask=None):
    return linear_attention_ref(q.double(), k.double(), v.double(), mask)


@pytest.mark.parametrize("n,chunk", [(1, 8), (29, 8), (32, 8), (29, 64), (29, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_chunkwise_matches_oracle(n, chunk, masked):
    q, k, v = qkv(n=n, dv=5)
    mask = pad_mask(2, n, [n, max(1, n - 11)]) if masked else None
    out = linear_attention(q, k, v, chunk, mask)
    assert out.dtype == torch.float32
    assert rel_err(out, ref64(q, k, v, mask)) <= TOL


def test_gradients_match_oracle():
    q, k, v = (t.requires_grad_() for t in qkv(n=29))
    mask = pad_mask(2, 29, [29, 17])
    cot = torch.randn(2, 3, 29, 8)
    grads = torch.autograd.grad((linear_attention(q, k, v, 8, mask) * cot).sum(), (q, k, v))
    ref = torch.autograd.grad((linear_attention_ref(q, k, v, mask) * cot).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= TOL


def test_chunk_size_does_not_change_the_result():
    q, k, v = qkv(n=37, dtype=torch.float64)
    outs = [linear_attention(q, k, v, c) for c in (1, 4, 7, 37, 100)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) <= 1e-12


def test_step_form_matches_parallel_form():
    q, k, v = qkv(n=23, dv=6, dtype=torch.float64)
    mask = pad_mask(2, 23, [23, 14])
    par = linear_attention(q, k, v, 8, mask)
    S, z = torch.zeros(2, 3, 8, 6, dtype=torch.float64), torch.zeros(2, 3, 8, dtype=torch.float64)
    steps = [linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], S, z, mask[:, t:t + 1])
             for t in range(23)]
    assert rel_err(torch.cat(steps, dim=2), par) <= 1e-12
    # the carried state is the plain sum over real tokens
    fk = torch.nn.functional.elu(k) + 1
    fk = fk * mask[:, None, :, None]
    assert rel_err(S, fk.transpose(-1, -2) @ v) <= 1e-12
    assert rel_err(z, fk.sum(2)) <= 1e-12


def test_initial_state_continues_a_sequence():
    q, k, v = qkv(n=30, dtype=torch.float64)
    full = linear_attention(q, k, v, 8)
    a, state = linear_attention(q[:, :, :11], k[:, :, :11], v[:, :, :11], 8, output_final_state=True)
    b = linear_attention(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], 8, initial_state=state)
    assert rel_err(torch.cat([a, b], dim=2), full) <= 1e-12


def test_masked_tokens_are_never_attended_to():
    q, k, v = qkv(n=21, dtype=torch.float64)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[:, [0, 5, 8, 9, 20]] = False
    out = linear_attention(q, k, v, 4, mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, ~mask[0]] = 50 * torch.randn_like(k2[:, :, ~mask[0]])
    v2[:, :, ~mask[0]] = 50 * torch.randn_like(v2[:, :, ~mask[0]])
    out2 = linear_attention(q, k2, v2, 4, mask)
    assert torch.allclose(out[:, :, mask[0]], out2[:, :, mask[0]], atol=1e-12, rtol=0)
    assert torch.isfinite(out).all()  # a query with no real key before it (position 0) stays finite


def test_output_varies_across_head_dim():
    # Guard against the scalar-state degenerate form: with one token o_1 = v_1 exactly (up to eps),
    # and in general the output is a different mixture per value dimension of a d x d state.
    q, k, v = qkv(n=1, d=16, dtype=torch.float64)
    assert rel_err(linear_attention(q, k, v, 4), v) <= 1e-5
    q, k, v = qkv(n=40, d=16)
    o = linear_attention(q, k, v, 8)
    spread = o.std(dim=-1) / o.abs().mean(dim=-1)                     # (b, h, n)
    assert spread[:, :, 1:].min() > 0.05


def test_op_rejects_bad_arguments():
    q, k, v = qkv(n=6)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="mask"):
        linear_attention(q, k, v, 4, torch.ones(2, 5, dtype=torch.bool))


# Blocks of chunks: linear_attention takes the chunks `block_chunks` at a time (all heads
# together), carrying [S | z] across blocks, and when autograd is not recording writes each block
# straight into the output. Both paths, several block sizes (one chunk per block, a short last
# block ending in a partial chunk, one block for all), a mask, a carried-in state and the final
# state, all against the full-matrix oracle.

@pytest.mark.parametrize("block", [1, 2, 3, 100], ids=lambda x: f"G{x}")
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_chunk_blocks_match_oracle(block, grad):
    q, k, v = (t.requires_grad_(grad) for t in qkv(h=5, n=29, dv=6))  # chunks of 4: 8, the last partial
    mask = pad_mask(2, 29, [29, 17])
    with torch.set_grad_enabled(grad):
        out = linear_attention(q, k, v, 4, mask, block_chunks=block)
    assert out.requires_grad == grad
    assert rel_err(out, ref64(q.detach(), k.detach(), v.detach(), mask)) <= TOL
    if grad:
        cot = torch.randn(2, 5, 29, 6)
        grads = torch.autograd.grad((out * cot).sum(), (q, k, v))
        want = torch.autograd.grad((linear_attention_ref(q, k, v, mask) * cot).sum(), (q, k, v))
        for g, w in zip(grads, want):
            assert rel_err(g, w) <= TOL


@pytest.mark.parametrize("block", [1, 2, None], ids=lambda x: f"G{x}")
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_chunk_blocks_carry_states(block, grad):
    q, k, v = (t.requires_grad_(grad) for t in qkv(h=3, n=30, dv=5))
    mask = pad_mask(2, 30, [30, 21])
    with torch.set_grad_enabled(grad):
        a, state = linear_attention(q[:, :, :11], k[:, :, :11], v[:, :, :11], 4, mask[:, :11],
                                    output_final_state=True, block_chunks=block)
        b, (S, z) = linear_attention(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], 4, mask[:, 11:],
                                     initial_state=state, output_final_state=True, block_chunks=block)
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    assert rel_err(torch.cat([a, b], dim=2), ref64(qd, kd, vd, mask)) <= TOL
    fk = (torch.nn.functional.elu(kd) + 1) * mask[:, None, :, None]
    assert rel_err(S, fk.transpose(-1, -2) @ vd) <= TOL
    assert rel_err(z, fk.sum(2)) <= TOL
    if grad:  # the gradient flows through the carried state into the prefix's keys
        assert torch.autograd.grad(b.sum(), k)[0][:, :, :11].abs().sum() > 0


def test_chunk_blocks_take_strided_inputs():
    # the mixer passes (b, h, n, d) views of one (b, n, 3 h d) projection
    x = torch.randn(2, 29, 3 * 3 * 8, dtype=torch.float64)
    q, k, v = (t.view(2, 29, 3, 8).transpose(1, 2) for t in x.chunk(3, dim=-1))
    for block in (1, 3, None):
        assert rel_err(linear_attention(q, k, v, 4, block_chunks=block), ref64(q, k, v)) <= 1e-12
    with pytest.raises(ValueError, match="block_chunks"):
        linear_attention(q, k, v, 4, block_chunks=0)
