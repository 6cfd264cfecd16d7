"""BSBR-specific correctness: the fast path against the oracle, equivalence with standard
attention, causality and streaming for every option, the cache's size law, and input errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bsbr import BSBRAttention, BSBRLayer, BSBRModel, bsbr_attention, bsbr_attention_flops
from tests.conftest import rel_err
from tests.reference_bsbr import bsbr_last_chunk_reference, bsbr_layer_reference, bsbr_reference

VARIANTS = [
    dict(overlap=0, f=None),
    dict(overlap=3, f=None),
    dict(overlap=0, f=2),
    dict(overlap=5, f=4),
    dict(overlap=8, f=2),  # overlap == chunk_size
]
VID = lambda p: f"o{p['overlap']}-f{p['f']}"  # noqa: E731


def _inputs(b=2, H=2, n=45, d=8, c=8, f=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = -(-n // c)
    q, k, v = (torch.randn(b, H, n, d, generator=g, dtype=dtype) for _ in range(3))
    r, h = (torch.randn(b, H, C, d, generator=g, dtype=dtype) for _ in range(2))
    A = torch.randn(H, d, d // f, generator=g, dtype=dtype) / math.sqrt(d) if f else None
    return q, k, v, r, h, A


def _masks(b, n):
    right = torch.ones(b, n, dtype=torch.bool)
    right[1, 30:] = False  # right padding, ending mid-chunk
    holes = torch.rand(b, n, generator=torch.Generator().manual_seed(5)) > 0.3
    holes[:, 0] = True
    holes[0, 8:16] = False  # one whole chunk masked: it must drop out of the retrieval softmax
    return {"none": None, "right": right, "holes": holes}


@pytest.mark.parametrize("p", VARIANTS, ids=VID)
@pytest.mark.parametrize("mask_kind", ["none", "right", "holes"])
def test_op_matches_oracle_fp32(p, mask_kind):
    # n = 45 is not a multiple of c = 8; fp32 relative error <= 1e-5 (design invariant 3)
    q, k, v, r, h, A = _inputs(f=p["f"])
    mask = _masks(2, 45)[mask_kind]
    got = bsbr_attention(q, k, v, r, h, chunk_size=8, overlap=p["overlap"], mask=mask, compress=A)
    ref = bsbr_reference(*(t.double() for t in (q, k, v, r, h)), chunk_size=8, overlap=p["overlap"], mask=mask,
                         compress=None if A is None else A.double())
    real = torch.ones(2, 45, dtype=torch.bool) if mask is None else mask
    sel = real[:, None, :, None].expand_as(got)
    assert rel_err(got[sel], ref[sel]) <= 1e-5
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("p", [VARIANTS[0], VARIANTS[3]], ids=VID)
def test_op_gradients_match_oracle(p):
    q, k, v, r, h, A = _inputs(n=27, f=p["f"], dtype=torch.float64)
    mask = _masks(2, 27)["holes"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, r, h) + ((A,) if A is not None else ())]
    leaves_ref = [t.detach().clone().requires_grad_() for t in leaves]
    w = torch.randn(q.shape, dtype=torch.float64) * mask[:, None, :, None]  # loss on real positions only

    def run(fn, ls):
        out = fn(*ls[:5], chunk_size=8, overlap=p["overlap"], mask=mask, compress=ls[5] if len(ls) > 5 else None)
        (out * w).sum().backward()
        return [t.grad for t in ls]

    got = run(bsbr_attention, leaves)
    ref = run(bsbr_reference, leaves_ref)
    for name, a, b in zip("q k v r h A".split(), got, ref):
        assert rel_err(a, b) <= 1e-10, f"grad of {name}"


@pytest.mark.parametrize("p", VARIANTS, ids=VID)
def test_layer_matches_layer_oracle(p):
    torch.manual_seed(0)
    attn = BSBRAttention(16, 2, 8, dropout=0.0, compression_factor=p["f"], chunk_overlap=p["overlap"]).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 21:] = False
    got = attn(x, mask=mask)
    ref = bsbr_layer_reference(attn, x, mask)
    assert rel_err(got[mask], ref[mask]) <= 1e-10


def test_single_chunk_equals_standard_causal_attention():
    # invariant 1: chunk_size >= n (no overlap) is exactly causal softmax attention
    torch.manual_seed(0)
    attn = BSBRAttention(32, 4, chunk_size=64).eval()
    x = torch.randn(2, 50, 32)
    heads = lambda t: t.view(2, 50, 4, 8).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x)),
                                         is_causal=True)
    ref = attn.out_proj(ref.transpose(1, 2).reshape(2, 50, 32))
    assert rel_err(attn(x), ref) <= 1e-6


def test_retrieval_is_active_across_chunks():
    # The retrieved term must actually contribute from the second chunk on (guards against a
    # "retrieval" that is silently zero): scaling the meta keys changes chunk >= 1 outputs only.
    q, k, v, r, h, _ = _inputs(n=32, c=8)
    a = bsbr_attention(q, k, v, r, h, chunk_size=8)
    b = bsbr_attention(q, k, v, r, 3 * h, chunk_size=8)
    assert torch.equal(a[:, :, :8], b[:, :, :8])
    assert not torch.allclose(a[:, :, 8:], b[:, :, 8:])


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=41, hidden_dim=16, num_layers=2, num_heads=2, chunk_size=8, ff_dim=32, dropout=0.0)
    cfg.update(kw)
    return BSBRModel(**cfg).double().eval()


@pytest.mark.parametrize("p", VARIANTS[1:], ids=VID)
def test_causality_with_options(p):
    model = _model(chunk_overlap=p["overlap"], compression_factor=p["f"])
    x = torch.randint(0, 41, (1, 30))
    base = model(x)
    for s in (8, 12, 15, 29):  # a chunk's first, middle and last position; the final token
        y = x.clone()
        y[0, s] = (y[0, s] + 1) % 41
        assert torch.allclose(model(y)[:, :s], base[:, :s], atol=1e-12, rtol=0), f"leak at {s}"
    attn = model.layers[0].mixer
    xs = torch.randn(1, 20, 16, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: attn(t), xs)[0, :, :, 0].abs().amax(dim=(1, 3))
    assert jac.triu(diagonal=1).max() == 0


def test_cache_grows_per_chunk_not_per_token():
    model = _model(compression_factor=2)
    D, H, c, layers = 16, 2, 8, 2
    d, e = D // H, D // H // 2
    sizes = {}
    for n in (16, 24, 32, 40, 47):
        cache = model.init_cache(1)
        model(torch.randint(0, 41, (1, n)), cache=cache)
        sizes[n] = cache.nbytes()
    per_chunk = sizes[24] - sizes[16]
    assert sizes[32] - sizes[24] == per_chunk == sizes[40] - sizes[32]  # constant cost per completed chunk
    # one (d/f) x d state + one meta key per head, and a validity flag, per layer, in float64
    assert per_chunk == layers * (H * (e * d + d) * 8 + 1)
    # an open chunk of 7 tokens costs its k, v, x, mask buffers plus its retrieval state S, per layer
    assert sizes[47] - sizes[40] == layers * (7 * (2 * D * 8 + D * 8 + 1) + H * e * d * 8)
    kv_cache = 47 * layers * 2 * D * 8
    assert sizes[47] < kv_cache


def test_preallocated_cache_size_law():
    # init_cache(max_len): P = ceil(max_len / c) chunk slots, allocated once. Bytes are an affine
    # function of P (and of min(c, max_len) open-chunk rows) and never change as tokens arrive.
    D, H, c, o, layers = 16, 2, 8, 3, 2
    model = _model(compression_factor=2, chunk_overlap=o)
    d, e = D // H, D // H // 2
    per_chunk = layers * (H * (e * d + d) * 8 + 1)      # a state and a meta key per head, a valid flag

    def fixed(rows):  # rows = min(c, max_len): a chunk longer than max_len never fills
        return layers * (D * 8                          # last summary
                         + 2 * H * (o + rows) * d * 8 + (o + rows)  # open chunk's [tail | rows] keys, values, mask
                         + rows * D * 8                 # its layer inputs, for its summary
                         + H * e * d * 8                # its retrieval state S
                         + 8)                           # the position counter
    for max_len in (1, 8, 9, 47, 48, 200):
        cache = model.init_cache(1, max_len=max_len)
        before = cache.nbytes()
        assert before == fixed(min(c, max_len)) + -(-max_len // c) * per_chunk, max_len
        with torch.no_grad():
            model(torch.randint(0, 41, (1, max_len - 1)) if max_len > 1 else torch.randint(0, 41, (1, 1)), cache=cache)
            if max_len > 1:
                model(torch.randint(0, 41, (1, 1)), cache=cache)
        assert cache.nbytes() == before  # filled to max_len: not one byte more
        with pytest.raises(ValueError, match="max_len=%d" % max_len):
            model(torch.randint(0, 41, (1, 1)), cache=cache)
    # the growing cache (max_len=None) pays the same per completed chunk: see the test above
    grown = model.init_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 41, (1, 48)), cache=grown)
    assert grown.nbytes() - model.init_cache(1).nbytes() == 6 * per_chunk + layers * (2 * H * o * d * 8 + o)  # + tail


@pytest.mark.parametrize("p", VARIANTS, ids=VID)
def test_preallocated_cache_streaming_with_padding_equals_one_shot(p):
    # the shape-static cache (max_len) against the one-shot forward: one token at a time (every
    # chunk closed by the step's where), pieces ending on and across boundaries,
    # a hole longer than a chunk and right padding
    attn = BSBRAttention(16, 2, 8, compression_factor=p["f"], chunk_overlap=p["overlap"]).double().eval()
    n = 37
    x = torch.randn(2, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 3:14] = False
    mask[1, 29:] = False
    with torch.no_grad():
        full = attn(x, mask=mask)
        for cuts in ([*range(1, n)], [8, 16, 24, 32], [1, 8, 9, 17, 19, 33], [5, 30]):
            static = attn.init_cache(2, dtype=torch.float64, max_len=n)
            got, prev = [], 0
            for cut in cuts + [n]:
                got.append(attn(x[:, prev:cut], mask=mask[:, prev:cut], cache=static))
                prev = cut
            got = torch.cat(got, 1)
            assert torch.allclose(got[mask], full[mask], atol=1e-12, rtol=1e-10), f"split {cuts}"
            assert static.length == n == int(static.pos) and static.F.shape[2] == -(-n // 8)


def test_preallocated_cache_decodes_bf16_with_fp32_states():
    # bf16 inputs: the chunk states and S are held in fp32 (sizing.acc_dtype); token-by-token decode
    # stays within bf16's rounding of the one-shot bf16 forward (measured 0.004; bound 1e-2)
    torch.manual_seed(0)
    attn = BSBRAttention(16, 2, 8, compression_factor=2, chunk_overlap=3).to(torch.bfloat16).eval()
    x = torch.randn(2, 37, 16, dtype=torch.bfloat16)
    cache = attn.init_cache(2, dtype=torch.bfloat16, max_len=37)
    assert cache.F.dtype == cache.S.dtype == torch.float32
    with torch.no_grad():
        got = torch.cat([attn(x[:, t:t + 1], cache=cache) for t in range(37)], 1)
        assert got.dtype == torch.bfloat16
        assert rel_err(got, attn(x)) <= 1e-2


def test_decode_step_cost_does_not_depend_on_prefix_length():
    model = _model()
    flops = []
    for prefix in (2 * 8 + 3, 6 * 8 + 3):  # both steps land mid-chunk
        cache = model.init_cache(1)
        model(torch.randint(0, 41, (1, prefix)), cache=cache)
        with FlopCounterMode(display=False) as fc:
            model(torch.randint(0, 41, (1, 1)), cache=cache)
        flops.append(fc.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_compression_divides_state_and_retrieval_flops():
    n, d, c = 512, 64, 64
    base = bsbr_attention_flops(1, 1, n, d, c)
    comp = bsbr_attention_flops(1, 1, n, d, c, compression_factor=4)
    C = n // c
    retrieval = lambda e: 2 * n * e * d + 2 * C * C * e * d + 2 * n * e * d  # noqa: E731 states, mixing, readout
    assert base - retrieval(d) == comp - retrieval(d // 4) - 2 * 2 * n * d * (d // 4)
    attn = BSBRAttention(128, 2, 16, compression_factor=4)
    cache = attn.init_cache(1)
    attn(torch.randn(1, 32, 128), cache=cache)
    assert cache.F.shape == (1, 2, 2, 16, 64)  # (b, h, chunks, d/f, d)


def test_flop_counter_agrees_with_analytic_count():
    q, k, v, r, h, A = _inputs(b=1, H=2, n=64, d=16, c=16, f=2)
    with FlopCounterMode(display=False) as fc:
        bsbr_attention(q, k, v, r, h, chunk_size=16, compress=A)
    assert fc.get_total_flops() == bsbr_attention_flops(1, 2, 64, 16, 16, compression_factor=2)


def test_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    x = torch.randint(0, 41, (2, 30))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = BSBRModel(41, 16, 2, 2, 8, 32, dropout=0.0, use_checkpointing=ckpt).train()
        m(x).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_long_sequence_last_chunk_matches_chunk_loop_reference():
    # 65k tokens (511 full chunks of 128 and a partial one): the last chunk, which retrieves over
    # every earlier chunk, against a loop over chunks written from the formulas
    n, c = 65500, 128
    q, k, v, r, h, A = _inputs(b=1, H=2, n=n, d=16, c=c, f=2, seed=3)
    with torch.no_grad():
        out = bsbr_attention(q, k, v, r, h, chunk_size=c, overlap=16, compress=A)
    last = (n // c) * c
    ref = bsbr_last_chunk_reference(*(t.double() for t in (q, k, v, r, h)), chunk_size=c, overlap=16,
                                    compress=A.double())
    assert rel_err(out[:, :, last:], ref) <= 1e-5


def test_seed_quick_start_runs_as_written():
    model = BSBRModel(vocab_size=10000, hidden_dim=512, num_layers=4, num_heads=8, chunk_size=128, ff_dim=2048,
                      dropout=0.1, compression_factor=4)
    input_ids = torch.randint(0, 10000, (2, 256))
    attention_mask = torch.ones(2, 256)
    outputs = model(input_ids, attention_mask)
    assert outputs.shape == (2, 256, 10000) and torch.isfinite(outputs).all()


def test_seed_signatures_and_positional_orders():
    # BSBRModel keeps the earlier package's order (chunk_size fifth, ff_dim sixth); the other models take ff_dim fifth
    m = BSBRModel(41, 16, 1, 2, 8, 32, 0.0)
    assert (m.chunk_size, m.layers[0].ffn.fc_in.out_features) == (8, 32)
    assert m.layers[0].mixer.chunk_size == 8
    from bsbr_extras import StandardTransformerModel
    assert StandardTransformerModel(41, 16, 1, 2, 32, 0.0).layers[0].ffn.fc_in.out_features == 32
    layer = BSBRLayer(16, 2, 8, 32, 0.0, compression_factor=2)  # (hidden, heads, chunk_size, ff_dim, dropout)
    assert (layer.attention.chunk_size, layer.ffn.fc_in.out_features) == (8, 32)
    # seed signature forward(query, key, value, mask): separate keys/values are really used, causally
    torch.manual_seed(0)
    attn = BSBRAttention(16, 2, 8, 0.0).double()
    x, y = torch.randn(2, 20, 16, dtype=torch.float64), torch.randn(2, 20, 16, dtype=torch.float64)
    cross = attn(x, y, y)
    assert not torch.allclose(cross, attn(x))
    y2 = y.clone()
    y2[:, 13] += 1.0
    assert torch.equal(attn(x, y2, y2)[:, :13], cross[:, :13])


def test_attention_applies_no_dropout_and_warns_when_given_one():
    with pytest.warns(UserWarning, match="no dropout"):
        attn = BSBRAttention(16, 2, 8, 0.5).train()
    x = torch.randn(2, 20, 16)
    assert torch.equal(attn(x), attn.eval()(x))


def _bad(**over):
    q, k, v, r, h, A = _inputs(b=2, H=2, n=20, d=8, c=8, f=2)
    args = dict(q=q, k=k, v=v, r=r, hk=h, chunk_size=8, overlap=0, compress=A, mask=None, gamma=None) | over
    return args


@pytest.mark.parametrize("over, word", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-3), "chunk_size"), (dict(chunk_size=2.0), "chunk_size"),
    (dict(overlap=-1), "overlap"), (dict(overlap=9), "overlap"), (dict(overlap=1.5), "overlap"),
    (dict(q=torch.randn(2, 20, 8)), "q must be a 4-D"), (dict(k=torch.randn(2, 2, 19, 8)), "k shape"),
    (dict(v=torch.randn(2, 2, 20, 4)), "v shape"), (dict(r=torch.randn(2, 2, 2, 8)), "r must have shape"),
    (dict(hk=torch.randn(2, 2, 3, 4)), "hk must have shape"), (dict(q=torch.randint(0, 3, (2, 2, 20, 8))), "q must have a floating"),
    (dict(v=torch.randn(2, 2, 20, 8, dtype=torch.float64)), "v must match q's dtype"),
    (dict(q=torch.randn(2, 2, 0, 8), k=torch.randn(2, 2, 0, 8), v=torch.randn(2, 2, 0, 8)), "at least one token"),
    (dict(compress=torch.randn(2, 8, 16)), "compress"), (dict(compress=torch.randn(3, 8, 4)), "compress"),
    (dict(compress=torch.randn(2, 8, 4, dtype=torch.float64)), "compress must match"),
    (dict(mask=torch.ones(2, 19, dtype=torch.bool)), "mask"), (dict(mask=torch.full((2, 20), 2)), "0/1"),
    (dict(mask=[[1] * 20] * 2), "mask"), (dict(gamma=0.0), "gamma"), (dict(gamma=float("nan")), "gamma"),
])
def test_op_rejects_bad_arguments_naming_them(over, word):
    a = _bad(**over)
    with pytest.raises(ValueError, match=word):
        bsbr_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("r"), a.pop("hk"), **a)


def test_op_takes_a_numeric_0_1_mask_as_the_bool_mask():
    q, k, v, r, h, A = _inputs(n=45, f=2)
    mask = _masks(2, 45)["holes"]
    want = bsbr_attention(q, k, v, r, h, chunk_size=8, overlap=3, mask=mask, compress=A)
    for m in (mask.long(), mask.float()):
        assert torch.equal(bsbr_attention(q, k, v, r, h, chunk_size=8, overlap=3, mask=m, compress=A), want)


@pytest.mark.parametrize("make, needle", [
    (lambda: (torch.rand(2, 10), None), "integer dtype"),
    (lambda: (torch.randint(0, 41, (2, 10, 1)), None), "rank 2"),
    (lambda: (torch.randint(0, 41, (2, 10)), torch.ones(2, 9)), "attention_mask shape"),
    (lambda: (torch.randint(0, 41, (2, 10)) + 100, None), "vocab_size"),
])
def test_bad_forward_inputs(make, needle):
    model = _model()
    ids, mask = make()
    with pytest.raises(ValueError, match=needle):
        model(ids, attention_mask=mask)
