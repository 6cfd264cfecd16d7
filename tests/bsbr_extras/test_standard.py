"""Standard causal softmax attention: parallel op vs the token-loop oracle, KV-cache decoding, masks.
Bad hyperparameters and streaming through the cache with a mask: tests/bsbr/test_models.py."""

import pytest
import torch

from bsbr_extras.standard import StandardTransformerModel, causal_softmax_attention
from tests.conftest import rel_err
from tests.reference_softmax import softmax_attention_loop


def qkv(b=2, h=3, n=29, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def pad_mask(b, n, lens, left=False):
    """(b, n) bool: row i has lens[i] real tokens, on the right (default) or left of the padding."""
    m = torch.zeros(b, n, dtype=torch.bool)
    for i, L in enumerate(lens):
        if left:
            m[i, n - L:] = True
        else:
            m[i, :L] = True
    return m


def at_real(x, mask):
    """Zero the (unspecified) outputs at padded positions of x (b, h, n, d)."""
    return x if mask is None else x * mask[:, None, :, None]


@pytest.mark.parametrize("n", [1, 8, 29, 37], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_parallel_matches_oracle(n, masked):
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, max(1, n // 2)]) if masked else None
    if masked and n > 4:
        mask[0, 2] = False  # a hole in the middle of a sequence too
    out = causal_softmax_attention(q, k, v, mask)
    assert out.shape == (2, 3, n, 8)
    assert rel_err(at_real(out, mask), softmax_attention_loop(q, k, v, mask=mask)) <= 1e-5


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
def test_gradients_match_oracle(masked):
    n = 21
    q, k, v = qkv(n=n)
    mask = pad_mask(2, n, [n, 13]) if masked else None
    w = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (lambda *a: at_real(causal_softmax_attention(*a, mask), mask),
               lambda *a: softmax_attention_loop(*a, mask=mask)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip("qkv", *grads):
        assert rel_err(a, b) <= 1e-5, f"d/d{name}"


def test_queries_shorter_than_keys_are_the_last_positions():
    # the cached form: m queries continue n - m cached keys (bottom-right causal alignment)
    q, k, v = qkv(n=30)
    mask = pad_mask(2, 30, [30, 22])
    full = at_real(softmax_attention_loop(q, k, v, mask=mask), mask)
    for m in (1, 5, 30):
        out = causal_softmax_attention(q[:, :, -m:], k, v, mask)
        assert rel_err(at_real(out, mask[:, -m:]), full[:, :, -m:]) <= 1e-5, m


def test_masked_keys_never_attended_and_masked_outputs_finite():
    q, k, v = qkv(n=17)
    mask = pad_mask(2, 17, [11, 6], left=True)  # left padding: the first rows have no real key at all
    out = causal_softmax_attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :, None].expand_as(k)] = 1e3  # garbage at padded positions
    v2[~mask[:, None, :, None].expand_as(v)] = -1e3
    out2 = causal_softmax_attention(q, k2, v2, mask)
    assert torch.equal(at_real(out, mask), at_real(out2, mask))


def test_decode_step_projects_only_the_new_token():
    # the cache holds past K, V: a step must not push the prefix through the projections again
    torch.manual_seed(0)
    model = StandardTransformerModel(50, 32, 2, 4, 64, dropout=0.0).eval()
    rows = []
    hook = model.layers[0].mixer.qkv.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[1]))
    cache = model.init_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 20)), cache=cache)
        for _ in range(3):
            model(torch.randint(0, 50, (1, 1)), cache=cache)
    hook.remove()
    assert rows == [20, 1, 1, 1]
    assert cache.layers[0].length == 23


def test_bad_op_inputs_raise():
    q, k, v = qkv(n=6)
    with pytest.raises(ValueError, match="mask"):
        causal_softmax_attention(q, k, v, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D"):
        causal_softmax_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="tokens"):
        causal_softmax_attention(q, k[:, :, :3], v[:, :, :3])
