"""Check once, at the edge (issue 22, items 2 and 3) and the classes of issue 23, items 13-15.

- a model call checks its ids once, and nothing below the edge (mixers, ops) runs an argument
  check: every checker any module holds is counted while a model prefills and decodes;
- ``generate`` checks its prompt once and sizes its cache to prompt + new tokens;
- every float hyperparameter of every model is refused unless finite and in range (hypothesis
  draws the bad values), the ints of the public flops helper likewise;
- memory follows min(chunk, n) for every chunked model: a huge chunk or window on a 9-token input
  makes no tensor larger than the input's own scale, and GAU's output for one partial chunk is
  the dense formula.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import bsbr.attention
import bsbr.causal_lm
import bsbr.checks
import bsbr.mixer
import bsbr.ops
import bsbr_extras.deltanet
import bsbr_extras.gau
import bsbr_extras.hopfield
import bsbr_extras.linear
import bsbr_extras.sliding_window
import bsbr_extras.standard
from bsbr import bsbr_attention_flops
from bsbr_extras.gau import gau_mixed_chunk
from evals.registry import MODEL_NAMES
from tests.conftest import TINY, public_model

MODULES = (bsbr.causal_lm, bsbr.mixer, bsbr.checks, bsbr.attention, bsbr.ops, bsbr_extras.standard,
           bsbr_extras.hopfield, bsbr_extras.sliding_window, bsbr_extras.linear, bsbr_extras.deltanet, bsbr_extras.gau)
CHECKERS = ("check_input_ids", "normalize_mask", "check_positive_int", "check_float", "check_heads",
            "check_qkv", "check_qkv_aligned", "check_bsbr_inputs", "check_beta", "_check_inputs", "check_dropout")


def build(name, cfg=TINY, **kw):
    torch.manual_seed(0)
    return public_model(name, cfg, **kw).eval()


@pytest.fixture
def calls(monkeypatch):
    """Counts, per checker name, the calls made through any module's binding of it."""
    counts = {}
    for module in MODULES:
        for name in CHECKERS:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            def counted(*a, _fn=fn, _name=name, **k):
                counts[_name] = counts.get(_name, 0) + 1
                return _fn(*a, **k)
            monkeypatch.setattr(module, name, counted)
    return counts


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_model_call_checks_its_ids_once_and_nothing_below(name, calls):
    model = build(name)
    ids = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = model.init_cache(2, max_len=20)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 10:] = 0
    calls.clear()
    with torch.no_grad():
        model(ids[:, :12], attention_mask=mask, cache=cache)
        for t in range(12, 20):
            model(ids[:, t:t + 1], cache=cache)
    assert calls == {"check_input_ids": 9, "normalize_mask": 9}, name


@pytest.mark.parametrize("name", ["BSBR", "Standard", "GAU"])
def test_generate_checks_its_prompt_once_and_sizes_its_cache(name, calls, monkeypatch):
    model = build(name)
    sizes = []
    real_init = type(model).init_cache
    monkeypatch.setattr(type(model), "init_cache",
                        lambda self, b, **kw: sizes.append(kw.get("max_len")) or real_init(self, b, **kw))
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    calls.clear()
    out = model.generate(prompt, 7)
    assert out.shape == (2, 12)
    assert calls.get("check_input_ids") == 1 and sizes == [5 + 7]
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=53\), got range \[0, 53\]"):
        model.generate(torch.tensor([[0, 53]]), 3)


def test_generate_equals_stepping_the_checked_forward():
    # the trusted per-token calls change nothing but the checks
    model = build("BSBR")
    prompt = torch.randint(0, TINY.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    got = model.generate(prompt, 10)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, ids)


# ----------------------------------------------------------------------------- float hyperparameters

# per model: its float constructor arguments, (lower bound, upper bound, lower end closed)
FLOATS = {name: {"dropout": (0.0, 1.0, True), "norm_eps": (0.0, math.inf, False)} for name in MODEL_NAMES}
FLOATS["BSBR"]["gamma"] = (0.0, math.inf, False)
FLOATS["Hopfield"]["beta"] = (0.0, math.inf, False)
BAD_FLOATS = st.one_of(st.sampled_from([math.inf, -math.inf, math.nan, True, "0.1", None]),
                       st.floats(allow_nan=False, allow_infinity=False))


def _in_range(value, lo, hi, closed):
    return (not isinstance(value, bool) and isinstance(value, float) and math.isfinite(value)
            and (value >= lo if closed else value > lo) and value < hi)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(MODEL_NAMES), data=st.data())
def test_every_float_hyperparameter_is_finite_and_in_range(name, data):
    arg = data.draw(st.sampled_from(sorted(FLOATS[name])))
    value = data.draw(BAD_FLOATS)
    lo, hi, closed = FLOATS[name][arg]
    if _in_range(value, lo, hi, closed) or (value is None and arg in ("gamma", "beta")):
        return  # a valid value: nothing to refuse (the valid side is every other test in this suite)
    with pytest.raises(ValueError, match=rf"^{arg} must be .*, got "):
        build(name, TINY.with_(num_layers=1), **{arg: value})


def test_infinite_gamma_is_refused_and_a_finite_one_keeps_logits_finite():
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0 .*got inf"):
        build("BSBR", gamma=float("inf"))
    logits = build("BSBR", gamma=1e3)(torch.randint(0, TINY.vocab_size, (1, 20)))
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- the flops helper

GOOD = dict(batch=1, heads=2, n=9, head_dim=8, chunk_size=8, overlap=0, compression_factor=None)


@settings(max_examples=60, deadline=None)
@given(arg=st.sampled_from(["batch", "heads", "n", "head_dim", "chunk_size", "overlap", "compression_factor"]),
       value=st.one_of(st.integers(-3, 0), st.sampled_from([1.5, True, "8", math.inf, 3])))
def test_the_flops_helper_validates_its_ints(arg, value):
    kw = dict(GOOD, **{arg: value})
    valid = (isinstance(value, int) and not isinstance(value, bool)
             and (0 <= value <= 8 if arg == "overlap" else value > 0)
             and not (arg == "compression_factor" and 8 % value))
    if valid:
        assert bsbr_attention_flops(**kw) > 0
    else:
        with pytest.raises(ValueError, match=rf"bsbr_attention_flops: {arg} must be"):
            bsbr_attention_flops(**kw)


def test_chunk_size_zero_is_a_clear_error_not_zero_division():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        bsbr_attention_flops(1, 2, 9, 8, chunk_size=0)


# ----------------------------------------------------------------------------- memory follows min(chunk, n)


class Largest(TorchDispatchMode):
    """The largest number of elements any aten op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


HUGE = {"BSBR": dict(chunk_size=10**6), "Linear": dict(chunk_size=10**6), "DeltaNet": dict(chunk_size=10**6),
        "GAU": dict(chunk_size=10**6), "SlidingWindow": dict(window_size=10**6)}


@pytest.mark.parametrize("name", sorted(HUGE))
def test_a_huge_chunk_costs_what_the_input_costs(name):
    # 9 tokens: every tensor stays near the model's own scale (embedding table, weights), far from
    # the 10^6-row blocks or caches a chunk-sized allocation would make
    model = build(name, TINY.with_(**HUGE[name]))
    ids = torch.randint(0, TINY.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    largest = Largest()
    with torch.no_grad(), largest:
        want = model(ids)
        cache = model.init_cache(1, max_len=9)
        got = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)], 1)
    assert largest.numel <= 10**5, f"{name}: a tensor of {largest.numel} elements"
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 24), extra=st.integers(0, 10**9))
def test_gau_one_partial_chunk_is_the_dense_formula(n, extra):
    c = n + extra  # any chunk at least as long as the call: one partial chunk, scale 1/c
    g = torch.Generator().manual_seed(n)
    qq, qk, lq, lk = (torch.randn(1, n, 4, generator=g, dtype=torch.float64) for _ in range(4))
    v = torch.randn(1, n, 6, generator=g, dtype=torch.float64)
    got = gau_mixed_chunk(qq, qk, lq, lk, v, c)
    want = (F.relu(qq @ qk.transpose(-1, -2) / c).square().tril()) @ v  # no earlier chunk: no linear term
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)
