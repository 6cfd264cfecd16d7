"""Sliding-window attention: blocked op vs the token-loop oracle, ring-buffer decoding, w >= n == Standard.
Bad hyperparameters and ring-buffer streaming with a mask: tests/bsbr/test_models.py."""

import pytest
import torch

import bsbr_extras.sliding_window as sw_module
from bsbr_extras.sliding_window import (SlidingWindowAttention, SlidingWindowTransformerModel,
                                        sliding_window_attention)
from bsbr_extras.standard import StandardTransformerModel, causal_softmax_attention
from tests.conftest import rel_err
from tests.reference_softmax import softmax_attention_loop
from tests.bsbr_extras.test_standard import at_real, pad_mask, qkv

CASES = [(29, 8), (37, 5), (16, 8), (29, 1), (6, 8)]  # (n, w): n not a multiple of w, exact, w=1, w > n


@pytest.mark.parametrize("n, w", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_parallel_matches_oracle(n, w, masked):
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, max(1, n - 11)]) if masked else None
    if masked and n > 12:
        mask[0, 3:12] = False  # a gap longer than the window: some real rows see only themselves
    out = sliding_window_attention(q, k, v, w, mask)
    assert out.shape == q.shape
    assert rel_err(at_real(out, mask), softmax_attention_loop(q, k, v, window=w, mask=mask)) <= 1e-5


def assert_matches_oracle_with_gradients(q, k, v, w, mask):
    """Outputs at real positions and the gradients of a random projection of them, against the loop oracle."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = at_real(sliding_window_attention(*leaves, w, mask), mask)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = softmax_attention_loop(*ref_leaves, window=w, mask=mask)
    assert rel_err(out, ref) <= 1e-5
    wt = torch.randn_like(ref)
    (out * wt).sum().backward()
    (ref * wt).sum().backward()
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) <= 1e-5, f"d/d{name}"


@pytest.mark.parametrize("block", [1, 3, 64], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_query_blocks_smaller_than_the_window_match_oracle(monkeypatch, block, masked):
    # QUERY_BLOCK < w (the path taken for w > 64) must give the same numbers; 3 does not divide w = 7
    monkeypatch.setattr(sw_module, "QUERY_BLOCK", block)
    n, w = 31, 7
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, 20]) if masked else None
    if masked:
        mask[0, 9:18] = False
    assert_matches_oracle_with_gradients(q, k, v, w, mask)


@pytest.mark.parametrize("block, w, n", [(2, 5, 47), (3, 7, 64), (4, 4, 41)], ids=lambda x: str(x))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_many_segments_match_oracle(monkeypatch, block, w, n, masked):
    # A one-byte budget makes every segment the minimum (ceil(w / B) blocks), so the w keys before a
    # segment come from the part before it and there are many seams; outputs and gradients must not see them.
    monkeypatch.setattr(sw_module, "QUERY_BLOCK", block)
    monkeypatch.setattr(sw_module, "SEGMENT_BYTES", 1)
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, n - 13]) if masked else None
    if masked:
        mask[0, 10:19] = False
    assert_matches_oracle_with_gradients(q, k, v, w, mask)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_gradients_match_oracle(masked):
    n, w = 23, 6
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, 15]) if masked else None
    wt = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (lambda *a: at_real(sliding_window_attention(*a, w, mask), mask),
               lambda *a: softmax_attention_loop(*a, window=w, mask=mask)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * wt).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip("qkv", *grads):
        assert rel_err(a, b) <= 1e-5, f"d/d{name}"


@pytest.mark.parametrize("m", [1, 4, 7, 20], ids=lambda m: f"m{m}")
def test_queries_shorter_than_keys(m):
    # the cached form: m queries after n - m prefix keys, through the dense (m <= w) and blocked paths
    n, w = 26, 7
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, 19])
    ref = softmax_attention_loop(q, k, v, window=w, mask=mask)[:, :, -m:]
    out = sliding_window_attention(q[:, :, -m:], k, v, w, mask)
    assert rel_err(at_real(out, mask[:, -m:]), ref) <= 1e-5


def test_window_covering_the_sequence_equals_standard_op():
    q, k, v = qkv(n=29)
    mask = pad_mask(2, 29, [29, 20])
    for w in (29, 64):
        assert rel_err(sliding_window_attention(q, k, v, w), causal_softmax_attention(q, k, v)) <= 1e-6
        a = at_real(sliding_window_attention(q, k, v, w, mask), mask)
        assert rel_err(a, at_real(causal_softmax_attention(q, k, v, mask), mask)) <= 1e-6
    # and a window shorter than the sequence really does forget
    assert rel_err(sliding_window_attention(q, k, v, 8), causal_softmax_attention(q, k, v)) > 1e-2


def test_model_with_window_covering_the_sequence_equals_standard_model():
    torch.manual_seed(0)
    std = StandardTransformerModel(50, 32, 2, 4, 64, dropout=0.0).eval()
    sw = SlidingWindowTransformerModel(50, 32, 2, 4, 64, dropout=0.0, window_size=40).eval()
    sw.load_state_dict(std.state_dict())  # same parameter names: same projections
    x = torch.randint(0, 50, (2, 33))
    with torch.no_grad():
        assert rel_err(sw(x), std(x)) <= 1e-6
        short = SlidingWindowTransformerModel(50, 32, 2, 4, 64, dropout=0.0, window_size=8).eval()
        short.load_state_dict(std.state_dict())
        assert rel_err(short(x), std(x)) > 1e-3


def test_decode_memory_is_constant():
    torch.manual_seed(0)
    model = SlidingWindowTransformerModel(50, 32, 2, 4, 64, dropout=0.0, window_size=8).eval()
    cache = model.init_cache(1)
    sizes = []
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 5)), cache=cache)
        for _ in range(30):
            model(torch.randint(0, 50, (1, 1)), cache=cache)
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    assert cache.layers[0].pos == 35


@pytest.mark.parametrize("w", [0, -3, 2.5, True, None])
def test_op_rejects_bad_window_size(w):
    q, k, v = qkv(n=5)
    with pytest.raises(ValueError, match="window_size"):
        sliding_window_attention(q, k, v, w)


@pytest.mark.parametrize("b", [1, 2], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_strided_head_views_match_oracle(b, masked):
    # op_inputs hands over strided views of one fused projection; the blocked form uses them as-is
    torch.manual_seed(0)
    mixer = SlidingWindowAttention(24, 3, window_size=5).eval()
    x = torch.randn(b, 23, 24)
    mask = pad_mask(b, 23, [23, 14][:b]) if masked else None
    with torch.no_grad():
        q, k, v = mixer.op_inputs(x)
        assert not k.is_contiguous()
        out = sliding_window_attention(q, k, v, 5, mask)
    assert rel_err(at_real(out, mask), softmax_attention_loop(q, k, v, window=5, mask=mask)) <= 1e-5
