"""Invariants every registered architecture must satisfy, parametrised from the registry.

Run in float64 so "unchanged" can be asserted to round-off; the fp32 oracle comparisons live
in each architecture's own test module.
"""

import pytest
import torch

from evals.registry import MODEL_NAMES, REGISTRY
from tests.conftest import TINY

N = 29  # deliberately not a multiple of TINY.chunk_size / window_size


def build(name, cfg=TINY):
    torch.manual_seed(0)
    return REGISTRY[name].build(cfg).double().eval()


def ids(n=N, b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (b, n), generator=g)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("s", [8, 12, 15, 16, 28], ids=lambda s: f"pos{s}")
def test_causal_under_perturbation(name, s):
    # 8, 16: a chunk's first position; 12: middle; 15: last (chunk_size 8); 28: final token.
    model = build(name)
    x = ids()
    y = x.clone()
    y[0, s] = (y[0, s] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :s], b[:, :s], atol=1e-12, rtol=0), f"{name}: output before {s} changed"
    assert not torch.allclose(a[:, s], b[:, s]), f"{name}: changing token {s} did not change its own output"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_causal_jacobian(name):
    mixer = REGISTRY[name].build_mixer(TINY.with_(hidden_dim=16, num_heads=2, qk_dim=8)).double().eval()
    n = 19
    x = torch.randn(1, n, 16, dtype=torch.float64)
    # the full Jacobian; vectorize=True batches its n*D backward passes with vmap
    jac = torch.autograd.functional.jacobian(lambda t: mixer(t), x, vectorize=True)  # (1, n, D, 1, n, D)
    per_pair = jac[0, :, :, 0].abs().amax(dim=(1, 3))  # (n_out, n_in)
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    assert per_pair[future].max() == 0, f"{name}: d o_t / d x_s != 0 for some s > t"
    assert per_pair[~future].max() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_is_output_of_op(name):
    # the mixer protocol: the layer is its projections around the public op, so benchmarking the op
    # measures what the layer computes: forward(x, mask) == output(op(*op_inputs(x, mask), mask=mask), x)
    mixer = REGISTRY[name].build_mixer(TINY).double().eval()
    x = torch.randn(2, 13, TINY.hidden_dim, dtype=torch.float64)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    mask[0, 3] = False
    outs = []
    for m in (None, mask):
        y = mixer(x, mask=m)
        assert torch.equal(y, mixer.output(mixer.op(*mixer.op_inputs(x, m), mask=m), x))
        outs.append(y)
    assert not torch.equal(outs[0][0, 4:], outs[1][0, 4:])  # the mask reaches the op


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_streaming_equals_one_shot(name):
    model = build(name)
    x = ids(n=37, b=2)
    with torch.no_grad():
        full = model(x)
        g = torch.Generator().manual_seed(3)
        for trial in range(3):
            if trial == 0:
                cuts = list(range(1, 37))  # one token at a time
            else:
                cuts = sorted(set(torch.randint(1, 37, (6,), generator=g).tolist()))
            cache = model.init_cache(2)
            pieces, prev = [], 0
            for c in cuts + [37]:
                pieces.append(model(x[:, prev:c], cache=cache))
                prev = c
            streamed = torch.cat(pieces, dim=1)
            assert torch.allclose(streamed, full, atol=1e-9, rtol=1e-9), f"{name}: split {cuts} differs"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generate_matches_repeated_full_forward(name):
    model = build(name)
    prompt = ids(n=11)
    out = model.generate(prompt, max_new_tokens=12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_right_padding_invariance(name):
    model = build(name)
    lens = [N, 17, 9]
    seqs = [ids(n=L, seed=10 + i) for i, L in enumerate(lens)]
    batch = torch.zeros(len(lens), N, dtype=torch.long)
    mask = torch.zeros(len(lens), N, dtype=torch.long)
    for i, (s, L) in enumerate(zip(seqs, lens)):
        batch[i, :L] = s[0]
        batch[i, L:] = (i * 7 + 5) % TINY.vocab_size  # arbitrary pad ids: they must not matter
        mask[i, :L] = 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        for i, (s, L) in enumerate(zip(seqs, lens)):
            alone = model(s)
            assert torch.allclose(padded[i, :L], alone[0], atol=1e-10, rtol=1e-10), f"{name}: row {i} differs"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_step_has_finite_gradients(name):
    torch.manual_seed(0)
    model = REGISTRY[name].build(TINY.with_(dropout=0.1)).train()
    x = ids(n=N, b=2)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, TINY.vocab_size), x[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: missing or non-finite grads"
    assert sum(float(g.abs().sum()) for g in grads) > 0
