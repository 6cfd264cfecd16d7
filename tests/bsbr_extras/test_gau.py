"""GAU / FLASH mixed-chunk attention (Hua et al., 2022): the op against the full-matrix oracle,
the step form, the two terms separately, the unit against its weights, bad op arguments. Bad
hyperparameters, streaming through the cache and GAU taking no num_heads: tests/bsbr/test_models.py."""

import pytest
import torch

from bsbr_extras.gau import GatedAttentionUnit, gau_continue_chunk, gau_mixed_chunk
from tests.conftest import rel_err
from tests.reference_linear import gau_attention_ref, gau_unit_ref

TOL = 1e-5


def inputs(b=2, n=29, s=8, e=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qq, qk, lq, lk = (torch.randn(b, n, s, generator=g, dtype=dtype) for _ in range(4))
    return qq, qk, lq, lk, torch.randn(b, n, e, generator=g, dtype=dtype)


def pad_mask(b, n, lens):
    return torch.arange(n)[None, :] < torch.tensor(lens)[:, None]


@pytest.mark.parametrize("n,chunk", [(1, 8), (29, 8), (32, 8), (29, 64), (29, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_mixed_chunk_matches_oracle(n, chunk, masked):
    x = inputs(n=n)
    mask = pad_mask(2, n, [n, max(1, n - 11)]) if masked else None
    out = gau_mixed_chunk(*x, chunk, mask)
    assert out.dtype == torch.float32
    assert rel_err(out, gau_attention_ref(*(t.double() for t in x), chunk, mask)) <= TOL


def test_gradients_match_oracle():
    x = [t.requires_grad_() for t in inputs(n=29)]
    mask = pad_mask(2, 29, [29, 17])
    cot = torch.randn(2, 29, 12)
    grads = torch.autograd.grad((gau_mixed_chunk(*x, 8, mask) * cot).sum(), x)
    ref = torch.autograd.grad((gau_attention_ref(*x, 8, mask) * cot).sum(), x)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= TOL


def test_each_term_alone():
    # quadratic term only (zero linear queries): relu^2 inside the chunk, nothing across chunks
    qq, qk, lq, lk, v = inputs(n=12, dtype=torch.float64)
    c = 4
    quad = gau_mixed_chunk(qq, qk, torch.zeros_like(lq), lk, v, c)
    for i in range(3):
        sl = slice(i * c, (i + 1) * c)
        w = torch.relu(qq[:, sl] @ qk[:, sl].transpose(-1, -2) / c) ** 2 * torch.ones(c, c).tril()
        assert rel_err(quad[:, sl], w @ v[:, sl]) <= 1e-12
    # linear term only (zero quadratic queries): the first chunk reads nothing; chunk i reads
    # lq @ sum_{j<i} lk_j^T v_j / c
    lin = gau_mixed_chunk(torch.zeros_like(qq), qk, lq, lk, v, c)
    assert lin[:, :c].abs().max() == 0
    state = lk[:, :8].transpose(-1, -2) @ v[:, :8] / c
    assert rel_err(lin[:, 8:], lq[:, 8:] @ state) <= 1e-12


def test_step_form_matches_mixed_chunk():
    # Token by token through gau_continue_chunk, folding each completed chunk into the state.
    qq, qk, lq, lk, v = inputs(n=21, dtype=torch.float64)
    c = 4
    state = torch.zeros(2, 8, 12, dtype=torch.float64)
    keys, lkeys, vals = qk[:, :0], lk[:, :0], v[:, :0]
    outs = []
    for t in range(21):
        sl = slice(t, t + 1)
        o, keys, vals = gau_continue_chunk(qq[:, sl], qk[:, sl], lq[:, sl], v[:, sl], c, keys, vals, state)
        lkeys = torch.cat([lkeys, lk[:, sl]], dim=1)
        outs.append(o)
        if keys.shape[1] == c:
            state = state + lkeys.transpose(-1, -2) @ vals / c
            keys, lkeys, vals = keys[:, :0], lkeys[:, :0], vals[:, :0]
    assert rel_err(torch.cat(outs, dim=1), gau_mixed_chunk(qq, qk, lq, lk, v, c)) <= 1e-12


def test_final_state_counts_only_complete_chunks():
    qq, qk, lq, lk, v = inputs(n=30, dtype=torch.float64)
    full = gau_mixed_chunk(qq, qk, lq, lk, v, 8)
    a, S = gau_mixed_chunk(qq[:, :16], qk[:, :16], lq[:, :16], lk[:, :16], v[:, :16], 8, output_final_state=True)
    b = gau_mixed_chunk(qq[:, 16:], qk[:, 16:], lq[:, 16:], lk[:, 16:], v[:, 16:], 8, initial_state=S)
    assert rel_err(torch.cat([a, b], dim=1), full) <= 1e-12
    _, S_partial = gau_mixed_chunk(qq[:, :13], qk[:, :13], lq[:, :13], lk[:, :13], v[:, :13], 8,
                                   output_final_state=True)
    assert rel_err(S_partial, lk[:, :8].transpose(-1, -2) @ v[:, :8] / 8) <= 1e-12


def test_unit_matches_reference_from_weights():
    torch.manual_seed(0)
    unit = GatedAttentionUnit(16, chunk_size=4, expansion_factor=2, qk_dim=8).double()
    with torch.no_grad():  # make attention non-negligible (paper init gamma ~ N(0, 0.02) is tiny)
        unit.scale_offset.gamma.normal_(0, 1.0)
        unit.scale_offset.beta.normal_(0, 0.5)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    mask = pad_mask(2, 15, [15, 10])
    for m in (None, mask):
        out = unit(x, mask=m)
        ref = gau_unit_ref(unit, x, m)
        rows = slice(None) if m is None else m
        assert rel_err(out[rows], ref[rows]) <= 1e-12
        assert torch.equal(out, unit.output(unit.op(*unit.op_inputs(x, m), mask=m), x))


def test_decode_step_at_a_chunk_boundary_is_not_a_whole_chunk():
    # A one-token step that opens a new chunk must cost like any other step, O(c (s + e) + s e),
    # not like the mixed-chunk op on a zero-padded chunk, O(c^2 (s + e) + c s e).
    from torch.utils.flop_counter import FlopCounterMode
    unit = GatedAttentionUnit(16, chunk_size=16, expansion_factor=4, qk_dim=16).eval()
    x = torch.randn(1, 41, 16)

    def step_flops(prefix):
        cache = unit.init_cache(1)
        with torch.no_grad():
            unit(x[:, :prefix], cache=cache)
            with FlopCounterMode(display=False) as fc:
                unit(x[:, prefix:prefix + 1], cache=cache)
        return fc.get_total_flops()

    assert step_flops(32) <= step_flops(40)  # boundary (open chunk empty) vs 8 tokens into a chunk


def test_op_rejects_bad_arguments():
    x = inputs(n=6)
    with pytest.raises(ValueError, match="chunk_size"):
        gau_mixed_chunk(*x, 0)
    with pytest.raises(ValueError, match="mask"):
        gau_mixed_chunk(*x, 4, torch.ones(2, 5, dtype=torch.bool))


# Blocks of chunks: gau_mixed_chunk takes the chunks `block_chunks` at a time, carrying the
# state across blocks, and without autograd (b = 1) writes each block straight into the output.
# Both paths, several block sizes (one chunk per block, a short last block, one block for all),
# a trailing partial chunk, a mask, and a carried-in state, all against the full-matrix oracle.

@pytest.mark.parametrize("block", [1, 2, 5, 12, 100], ids=lambda x: f"G{x}")
@pytest.mark.parametrize("b", [1, 2], ids=["b1", "b2"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_blocks_match_oracle(block, b, grad):
    n, c = 45, 4  # 12 chunks, the last one partial
    x = [t.requires_grad_(grad) for t in inputs(b=b, n=n)]
    mask = pad_mask(b, n, [n - 3, 30][:b])
    with torch.set_grad_enabled(grad):
        out = gau_mixed_chunk(*x, c, mask, block_chunks=block)
    ref = gau_attention_ref(*(t.detach().double() for t in x), c, mask)
    assert out.requires_grad == grad
    assert rel_err(out, ref) <= TOL
    if grad:
        cot = torch.randn(b, n, 12)
        grads = torch.autograd.grad((out * cot).sum(), x)
        want = torch.autograd.grad((gau_attention_ref(*x, c, mask) * cot).sum(), x)
        for gr, w in zip(grads, want):
            assert rel_err(gr, w) <= TOL


@pytest.mark.parametrize("block", [1, 3, None], ids=lambda x: f"G{x}")
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_blocks_continue_from_a_state(block, grad):
    # a chunk-aligned prefix, its final state, then the rest from that state == the oracle's tail
    n, c, p = 41, 4, 12
    x = [t.requires_grad_(grad) for t in inputs(b=1, n=n)]
    with torch.set_grad_enabled(grad):
        _, S = gau_mixed_chunk(*(t[:, :p] for t in x), c, block_chunks=block, output_final_state=True)
        rest, S_end = gau_mixed_chunk(*(t[:, p:] for t in x), c, block_chunks=block, initial_state=S,
                                      output_final_state=True)
    xd = [t.detach().double() for t in x]
    assert rel_err(rest, gau_attention_ref(*xd, c)[:, p:]) <= TOL
    # n = 41: the state after the last complete chunk covers tokens 0..39
    want = xd[3][:, :40].transpose(-1, -2) @ xd[4][:, :40] / c
    assert rel_err(S_end, want) <= TOL
    if grad:  # the gradient flows through the carried state into the prefix's inputs
        g = torch.autograd.grad(rest.sum(), x[3])[0]
        assert g[:, :p].abs().sum() > 0


def test_block_size_does_not_change_the_output():
    x = inputs(b=1, n=64, dtype=torch.float64)
    outs = [gau_mixed_chunk(*x, 4, block_chunks=g) for g in (1, 2, 3, 7, 16, None)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) <= 1e-12
    with pytest.raises(ValueError, match="block_chunks"):
        gau_mixed_chunk(*x, 4, block_chunks=0)
