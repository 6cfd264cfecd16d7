"""The device-aware sizing policy (bsbr/sizing.py): how a policy is chosen, that the cpu policy
keeps the cache-sized pieces the ops used before it existed (pinned by counting the pieces at the
real budgets), that the cuda policy makes one piece (one block, one segment, one SDPA call), and
that both give the same numbers. The oracle tests over both policies are in test_dtypes.py."""

import pytest
import torch
import torch.nn.functional as F

import bsbr_extras.deltanet as deltanet_module
from bsbr import sizing
from bsbr.ops import bsbr_attention
from bsbr_extras.deltanet import delta_rule_chunkwise
from bsbr_extras.gau import gau_mixed_chunk
from bsbr_extras.linear import linear_attention
from bsbr_extras.sliding_window import sliding_window_attention
from tests.conftest import rel_err
from tests.reference_bsbr import bsbr_reference

# ----------------------------------------------------------------------------- choosing a policy


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda"), ("meta", "cpu")])
def test_policy_follows_the_device_type(monkeypatch, device, expected):
    monkeypatch.delenv(sizing.ENV_VAR, raising=False)
    assert sizing.policy(torch.device(device)) == expected


@pytest.fixture(autouse=True)
def _fresh_environment():
    # autouse, so it is torn down after monkeypatch has restored the environment: the policy read
    # from $BSBR_SIZING is then re-read, and no test leaves its override behind
    yield
    sizing.refresh()


def test_use_forces_and_nests(monkeypatch):
    monkeypatch.setenv(sizing.ENV_VAR, "cpu")
    sizing.refresh()
    with sizing.use("cuda"):
        assert sizing.policy(torch.device("cpu")) == "cuda"
        with sizing.use("cpu"):
            assert sizing.policy(torch.device("cuda")) == "cpu"
        assert sizing.whole(torch.device("cpu"))
    assert sizing.policy(torch.device("cuda")) == "cpu"  # the environment, once no block forces
    monkeypatch.setenv(sizing.ENV_VAR, "cuda")
    assert sizing.policy(torch.device("cpu")) == "cpu"  # an op call does not read the environment ...
    sizing.refresh()
    assert sizing.policy(torch.device("cpu")) == "cuda"  # ... refresh (and building a model) does


def test_the_environment_is_read_when_a_model_is_built(monkeypatch):
    from evals.registry import REGISTRY
    from tests.conftest import TINY
    monkeypatch.setenv(sizing.ENV_VAR, "cuda")
    REGISTRY["Linear"].build(TINY)
    assert sizing.policy(torch.device("cpu")) == "cuda"
    monkeypatch.setenv(sizing.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"\$BSBR_SIZING: unknown sizing policy 'gpu'; valid: cpu, cuda"):
        REGISTRY["Linear"].build(TINY)


def test_unknown_policy_is_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown sizing policy 'tpu'; valid: cpu, cuda"):
        with sizing.use("tpu"):
            pass
    monkeypatch.setenv(sizing.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"\$BSBR_SIZING: unknown sizing policy 'gpu'; valid: cpu, cuda"):
        sizing.refresh()


def test_per_block_and_accumulation_dtype():
    cpu = torch.device("cpu")
    with sizing.use("cpu"):
        assert sizing.per_block(cpu, 100, 3000, 10_000) == 3   # budget // bytes
        assert sizing.per_block(cpu, 100, 30_000, 10_000) == 1  # never below one
    with sizing.use("cuda"):
        assert sizing.per_block(cpu, 100, 3000, 10_000) == 100  # everything in one block
    assert sizing.acc_dtype(torch.bfloat16) == sizing.acc_dtype(torch.float16) == torch.float32
    assert sizing.acc_dtype(torch.float64) == torch.float64
    x = torch.ones(3)
    assert sizing.upcast(x, None)[0] is x  # fp32 inputs are not copied: CPU fp32 runs are unchanged


# ----------------------------------------------------------------------------- pieces per op


def count_calls(monkeypatch, owner, name):
    """Count calls of owner.name (the ops look these up at call time); returns a list of kwargs."""
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def both_policies(run):
    with sizing.use("cpu"):
        a = run()
    with sizing.use("cuda"):
        b = run()
    return a, b


def test_linear_blocks(monkeypatch):
    # today's cpu budget: 2 MiB of [S | z] states -> 2 MiB // (8 heads * 64 * 65 * 4 B) = 15 chunks per block
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 16 * 64 + 5, 64, generator=g) for _ in range(3))  # 17 chunks -> 2 blocks
    elu = count_calls(monkeypatch, F, "elu")  # the feature map: twice per block
    with torch.no_grad():
        with sizing.use("cpu"):
            a = linear_attention(q, k, v, 64)
        assert len(elu) == 4
        with sizing.use("cuda"):
            b = linear_attention(q, k, v, 64)
    assert len(elu) == 6  # one block for the whole sequence
    assert rel_err(a, b) <= 1e-5


def test_deltanet_segments(monkeypatch):
    # today's cpu budget: 2 MiB // (8 heads * 64 * (64 + 64) * 4 B) = 8 chunks per segment
    g = torch.Generator().manual_seed(0)
    n = 9 * 64 + 7  # 10 chunks -> 2 segments
    q, k = (F.normalize(torch.randn(1, 8, n, 64, generator=g), dim=-1) for _ in range(2))
    v, beta = torch.randn(1, 8, n, 64, generator=g), torch.rand(1, 8, n, generator=g)
    inverses = count_calls(monkeypatch, deltanet_module, "unit_lower_inverse")  # one UT transform per segment
    a, b = both_policies(lambda: delta_rule_chunkwise(q, k, v, beta, 64, output_final_state=True))
    assert len(inverses) == 2 + 1  # cpu: 2 segments; cuda: every chunk's UT transform in one pass
    assert rel_err(a[0], b[0]) <= 1e-5 and rel_err(a[1], b[1]) <= 1e-5


def test_gau_blocks(monkeypatch):
    # today's cpu budget: 4 MiB of states -> 4 MiB // (s 128 * e 1024 * 4 B) = 8 chunks per block
    g = torch.Generator().manual_seed(0)
    n = 8 * 128 + 40  # 9 chunks of 128 -> 2 blocks
    qq, qk, lq, lk = (0.3 * torch.randn(1, n, 128, generator=g) for _ in range(4))
    v = torch.randn(1, n, 1024, generator=g)
    relu = count_calls(monkeypatch, F, "relu")  # the quadratic kernel: once per block
    with torch.no_grad():
        a, b = both_policies(lambda: gau_mixed_chunk(qq, qk, lq, lk, v, 128, output_final_state=True))
    assert len(relu) == 2 + 1
    assert rel_err(a[0], b[0]) <= 1e-5 and rel_err(a[1], b[1]) <= 1e-5


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_sliding_window_segments(monkeypatch, masked):
    # today's cpu budget: 2 MiB of queries per segment -> 2 MiB // (2 x 8 heads * 64 queries * 64 * 4 B) = 8 blocks
    g = torch.Generator().manual_seed(0)
    w, n = 64, 64 + 15 * 64 + 50  # the first w, then 16 blocks of 64 -> 2 segments
    q, k, v = (torch.randn(2, 8, n, 64, generator=g) for _ in range(3))
    mask = (torch.arange(n)[None] < torch.tensor([[n], [n - 300]])) if masked else None
    sdpa = count_calls(monkeypatch, F, "scaled_dot_product_attention")
    with torch.no_grad():
        with sizing.use("cpu"):
            a = sliding_window_attention(q, k, v, w, mask)
        # the first w queries, then per segment one call (with a mask one per sequence: 2)
        assert len(sdpa) == 1 + 2 * (2 if masked else 1)
        with sizing.use("cuda"):
            b = sliding_window_attention(q, k, v, w, mask)
    assert len(sdpa) - (1 + 2 * (2 if masked else 1)) == 2  # the first w, then every block in one call
    real = mask[:, None, :, None] if masked else 1
    assert rel_err(a * real, b * real) <= 1e-5


@pytest.mark.parametrize("n, masked, overlap", [(24, False, 0), (24, True, 0), (21, False, 0), (24, False, 3)],
                         ids=["aligned-causal", "aligned-mask", "ragged", "overlap"])
def test_bsbr_local_term_is_one_sdpa_call_under_cuda(monkeypatch, n, masked, overlap):
    # cpu: the tiled baddbmm path, no SDPA; cuda: one SDPA call, and the plain causal square (the
    # flash kernel's case) exactly when nothing but causality restricts the blocks
    g = torch.Generator().manual_seed(0)
    b, H, d, c = 2, 2, 8, 8
    q, k, v = (torch.randn(b, H, n, d, generator=g) for _ in range(3))
    r, hk = (torch.randn(b, H, -(-n // c), d, generator=g) for _ in range(2))
    mask = torch.arange(n)[None] < torch.tensor([[n], [n - 5]]) if masked else None
    sdpa = count_calls(monkeypatch, F, "scaled_dot_product_attention")
    run = lambda: bsbr_attention(q, k, v, r, hk, chunk_size=c, overlap=overlap, mask=mask)  # noqa: E731
    with sizing.use("cpu"):
        a = run()
    assert sdpa == []
    with sizing.use("cuda"):
        out = run()
    assert len(sdpa) == 1
    assert sdpa[0].get("is_causal", False) == (n % c == 0 and not masked and overlap == 0)
    ref = bsbr_reference(*(t.double() for t in (q, k, v, r, hk)), chunk_size=c, overlap=overlap, mask=mask)
    real = mask[:, None, :, None] if masked else 1
    assert rel_err(out * real, ref) <= 1e-5 and rel_err(a * real, ref) <= 1e-5


def test_bsbr_cuda_policy_gradients_on_the_causal_square():
    # the is_causal branch (n a multiple of c, no mask, no overlap) is not reached by test_dtypes' n = 21
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    r, hk = (torch.randn(1, 2, 2, 8, generator=g, requires_grad=True) for _ in range(2))
    cot = torch.randn(1, 2, 16, 8, generator=g)
    with sizing.use("cuda"):
        out = bsbr_attention(q, k, v, r, hk, chunk_size=8)
    grads = torch.autograd.grad((out * cot).sum(), (q, k, v, r, hk))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, r, hk)]
    ref = bsbr_reference(*leaves, chunk_size=8)
    ref_grads = torch.autograd.grad((ref * cot.double()).sum(), leaves)
    assert rel_err(out, ref) <= 1e-5
    for name, a, e in zip(["q", "k", "v", "r", "h"], grads, ref_grads):
        assert rel_err(a, e) <= 1e-5, name
