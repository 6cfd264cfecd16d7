"""The retention plugin: its three forms give the same numbers and gradients, its decays are the
paper's, and the suite's conformance check passes it and catches a non-causal variant.

Run from the bsbr checkout: ``PYTHONPATH=.:examples/retnet python -m pytest examples/retnet/tests``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("retnet") is None:  # not installed and not on PYTHONPATH: the package beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retnet.mixer import (MultiScaleRetention, retention_chunkwise, retention_parallel,  # noqa: E402
                          retention_recurrent)

B, H, D = 2, 4, 8
BOUND = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b||."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def qkv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, dtype=torch.float64, generator=g) for _ in range(3))


def right_padding(n: int) -> torch.Tensor:
    """(B, n) bool: row 0 all real, row 1 real for its first ~2/3 (then padding)."""
    lens = torch.tensor([n, max(1, 2 * n // 3)])
    return torch.arange(n)[None] < lens[:, None]


def forms(chunk_size: int):
    return {
        "parallel": lambda q, k, v, mask: retention_parallel(q, k, v, mask),
        "chunkwise": lambda q, k, v, mask: retention_chunkwise(q, k, v, chunk_size, mask),
        "recurrent": lambda q, k, v, mask: retention_recurrent(q, k, v, mask),
    }


# ----------------------------------------------------------------------------- the three forms


@pytest.mark.parametrize("n", [1, 7, 13, 29, 41])      # none but 1 a multiple of the chunk
@pytest.mark.parametrize("chunk_size", [8, 3, 64])      # 64: one chunk longer than the sequence
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "rightpad"])
def test_parallel_chunkwise_and_recurrent_forms_agree(n, chunk_size, masked):
    q, k, v = qkv(n)
    mask = right_padding(n) if masked else None
    out = {name: f(q, k, v, mask) for name, f in forms(chunk_size).items()}
    ref = out["parallel"]
    assert ref.abs().max() > 0
    for name in ("chunkwise", "recurrent"):
        assert rel_err(out[name], ref) <= BOUND, name


@pytest.mark.parametrize("n", [13, 29])
def test_the_forms_train_to_the_same_gradients(n):
    q, k, v = qkv(n, seed=1)
    mask = right_padding(n)
    cot = torch.randn(B, H, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name, f in forms(8).items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grads[name] = torch.autograd.grad((f(*leaves, mask) * cot).sum(), leaves)
    for name in ("chunkwise", "recurrent"):
        for which, a, b in zip("qkv", grads[name], grads["parallel"]):
            assert rel_err(a, b) <= BOUND, f"{name} d/d{which}"
    # a padded key or value reaches nothing: its gradient is exactly zero
    pad = ~mask
    for which in (1, 2):
        assert grads["chunkwise"][which][1][:, pad[1]].abs().max() == 0


def test_right_padding_changes_no_real_position():
    n, L = 29, 17
    q, k, v = qkv(n, seed=3)
    mask = torch.arange(n)[None].expand(B, n) < L
    k_junk, v_junk = k.clone(), v.clone()
    k_junk[:, :, L:], v_junk[:, :, L:] = 1e3, -1e3                     # whatever the padding holds
    for name, f in forms(8).items():
        padded = f(q, k_junk, v_junk, mask)[:, :, :L]
        alone = f(q[:, :, :L], k[:, :, :L], v[:, :, :L], None)
        assert rel_err(padded, alone) <= BOUND, name


def test_chunkwise_continues_from_a_state():
    # the decoding cache's prefill path: op over [0, m) then over [m, n) from its final state
    n, m = 29, 11
    q, k, v = qkv(n, seed=4)
    whole, final = retention_chunkwise(q, k, v, 8, output_final_state=True)
    a, s = retention_chunkwise(q[:, :, :m], k[:, :, :m], v[:, :, :m], 8, output_final_state=True)
    b, s2 = retention_chunkwise(q[:, :, m:], k[:, :, m:], v[:, :, m:], 8, initial_state=s, output_final_state=True)
    assert rel_err(torch.cat([a, b], dim=2), whole) <= BOUND
    assert rel_err(s2, final) <= BOUND


def test_mixer_forms_agree_and_the_layer_is_the_op_plus_output():
    torch.manual_seed(0)
    mixer = MultiScaleRetention(32, 4, chunk_size=8).double()
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    mask = right_padding(29)
    inputs = mixer.op_inputs(x, mask)
    par = mixer.op_parallel(*inputs, mask=mask)
    assert rel_err(mixer.op(*inputs, mask=mask), par) <= BOUND
    assert rel_err(mixer.op_recurrent(*inputs, mask=mask), par) <= BOUND
    assert mixer.forms() == ("parallel", "recurrent")
    assert torch.equal(mixer(x, mask=mask), mixer.output(mixer.op(*inputs, mask=mask), x))


# ----------------------------------------------------------------------------- the decays


def test_the_decays_are_one_minus_two_to_the_minus_five_minus_h():
    mixer = MultiScaleRetention(64, 8)
    want = [1 - 2.0 ** (-5 - h) for h in range(8)]
    assert list(mixer.decays) == want
    # and the op uses them: one key at token 0, queries equal to it; o_t / o_0 = gamma_h^t per head
    n, h = 40, 8
    k = torch.zeros(1, h, n, 4, dtype=torch.float64)
    k[:, :, 0] = 1.0
    q = torch.ones(1, h, n, 4, dtype=torch.float64)
    v = torch.ones(1, h, n, 1, dtype=torch.float64)
    t = torch.arange(n, dtype=torch.float64)
    expect = torch.tensor(want, dtype=torch.float64)[:, None] ** t      # (h, n)
    for name, f in forms(8).items():
        o = f(q, k, v, None)[0, :, :, 0]                                # (h, n)
        assert rel_err(o / o[:, :1], expect) <= BOUND, name


def test_state_is_fp32_for_a_half_precision_model_and_sized_as_declared():
    mixer = MultiScaleRetention(32, 4)
    (S,) = mixer.init_cache(1, dtype=torch.bfloat16).state
    assert S.dtype == torch.float32 and S.shape == (1, 4, 8, 8)
    assert S.nbytes == mixer.state_bytes(100)


def test_bad_arguments_are_one_line_value_errors():
    with pytest.raises(ValueError, match="chunk_size"):
        MultiScaleRetention(32, 4, chunk_size=0)
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleRetention(30, 4)
    q, k, v = qkv(5)
    with pytest.raises(ValueError, match="mask"):
        retention_chunkwise(q, k, v, 8, torch.ones(B, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- the suite's check


@pytest.fixture(scope="module")
def conformance():
    pytest.importorskip("evals.check.conformance", reason="needs the bsbr checkout's evals on the path")
    from evals.check.conformance import run

    return run


def test_conformance_check_passes(conformance):
    results = conformance("retnet.mixer:MultiScaleRetention")
    failed = [r.line() for r in results if r.status == "fail"]
    print("\n".join(r.line() for r in results))
    assert not failed, "\n".join(failed)
    assert all(r.status == "pass" for r in results)  # nothing n/a: every property applies


def test_conformance_check_catches_a_peek_at_the_next_token(conformance):
    results = conformance("retnet.leaky:LeakyRetention")
    failed = [r.name for r in results if r.status == "fail"]
    assert any("causality" in name for name in failed), failed
