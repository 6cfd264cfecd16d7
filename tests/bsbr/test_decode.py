"""Eager decode costs what the context costs, not what the buffer holds (issue 22, item 1).

Proved without a clock (CPU timings are not comparable while other jobs share the machine):

- a cached step's FLOPs (``FlopCounterMode``) and the tensor elements its ops read and write
  (every non-view aten op: its inputs, and its outputs that are not an in-place destination) are
  the same at ``max_len`` 400 and 16,384 with the same tokens in the cache, for every model;
- the cheap eager step and the shape-static step (``static=True``, the one ``torch.compile`` takes)
  both give the one-shot forward's logits, at both sizes, in fp32 and bf16;
- the static step *does* touch the whole buffer, so the first test can tell the two apart.

The timed check of the same claim is scripts/decode_bench.py (see docs/decoding.md).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from evals.registry import MODEL_NAMES, REGISTRY
from tests.conftest import TINY, rel_err

SMALL_LEN, LARGE_LEN = 400, 16384
CONFIG = {"BSBR": TINY.with_(chunk_overlap=3, compression_factor=2)}  # the fold's every part


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    return REGISTRY[name].build(CONFIG.get(name, TINY)).to(dtype).eval()


class Touched(TorchDispatchMode):
    """Counts the elements every non-view aten op reads (its tensor inputs) and writes (its outputs
    that do not alias an input); an in-place or ``out=`` destination counts only what is written
    into it, as the source's size."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        schema = func._schema
        named = dict(zip((a.name for a in schema.arguments), args), **kwargs)
        for arg in schema.arguments:
            written = arg.alias_info is not None and arg.alias_info.is_write
            if arg.name in named and not written:
                self.elements += _numel(named[arg.name])
        returns = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(schema.returns, returns):
            if ret.alias_info is None:
                self.elements += _numel(value)
        return out


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (tuple, list)):
        return sum(_numel(t) for t in x)
    return 0


def step_cost(name, max_len, prefill, steps, static=False):
    """(FLOPs, elements touched) of ``steps`` one-token calls after a ``prefill``-token prompt."""
    model = build(name)
    ids = torch.randint(0, TINY.vocab_size, (1, prefill + steps), generator=torch.Generator().manual_seed(1))
    cache = model.init_cache(1, max_len=max_len, static=static)
    with torch.no_grad():
        model(ids[:, :prefill], cache=cache)
        flops, touched = FlopCounterMode(display=False), Touched()
        with flops, touched:
            for t in range(prefill, prefill + steps):
                model(ids[:, t:t + 1], cache=cache)
    return flops.get_total_flops(), touched.elements


@pytest.mark.parametrize("name", MODEL_NAMES)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefill=st.integers(1, 60), steps=st.integers(9, 12))
def test_eager_step_work_does_not_depend_on_max_len(name, prefill, steps):
    # 9+ steps always cross a chunk boundary (chunk 8), so BSBR's fold over the chunk slots is counted
    small = step_cost(name, SMALL_LEN, prefill, steps)
    large = step_cost(name, LARGE_LEN, prefill, steps)
    assert small == large, f"{name}: (flops, elements) {small} at max_len {SMALL_LEN}, {large} at {LARGE_LEN}"
    assert small[0] > 0


@pytest.mark.parametrize("name", ["BSBR", "Standard", "Hopfield"])
def test_static_step_touches_the_whole_buffer(name):
    # the counter sees the difference the eager path removes: the shape-static step reads all of
    # max_len (its price for one graph), so an eager step that fell back to it would fail above
    small = step_cost(name, SMALL_LEN, 20, 9, static=True)
    large = step_cost(name, LARGE_LEN, 20, 9, static=True)
    assert large[1] > 10 * small[1], (name, small, large)


def _decode_logits(model, ids, prefill, max_len, static):
    cache = model.init_cache(ids.shape[0], max_len=max_len, static=static)
    outs = [model(ids[:, :prefill], cache=cache)]
    outs += [model(ids[:, t:t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_len", [SMALL_LEN, LARGE_LEN])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_both_step_forms_equal_the_one_shot_forward(name, max_len, dtype, tol):
    model = build(name, dtype)
    ids = torch.randint(0, TINY.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).float()
        eager = _decode_logits(model, ids, 11, max_len, static=False).float()
        static = _decode_logits(model, ids, 11, max_len, static=True).float()
    assert rel_err(eager, want) <= tol, f"{name} eager step"
    assert rel_err(static, want) <= tol, f"{name} static step"
    if dtype == torch.float32:
        assert rel_err(eager, static) <= 1e-5


def test_static_needs_max_len():
    model = build("Standard")
    with pytest.raises(ValueError, match="static=True needs max_len"):
        model.init_cache(1, static=True)
    with pytest.raises(ValueError, match="static must be True or False"):
        model.init_cache(1, max_len=8, static="yes")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk=st.integers(2, 9), overlap=st.integers(0, 4), max_len=st.integers(1, 24),
       prefill=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_bsbr_streaming_equals_one_shot_for_any_buffer(chunk, overlap, max_len, prefill, seed):
    """Any chunk size, overlap and buffer, a buffer shorter than a chunk among them (its o + max_len
    slots hold no slot c + o - 1): both step forms give the one-shot forward's logits."""
    from bsbr import BSBRModel
    overlap = min(overlap, chunk - 1)
    torch.manual_seed(seed)
    model = BSBRModel(vocab_size=50, hidden_dim=16, num_layers=1, num_heads=2, chunk_size=chunk,
                      ff_dim=16, chunk_overlap=overlap).eval()
    ids = torch.randint(0, 50, (1, max_len), generator=torch.Generator().manual_seed(seed))
    prefill = min(prefill, max_len)
    with torch.no_grad():
        want = model(ids)
        for static in (False, True):
            cache = model.init_cache(1, max_len=max_len, static=static)
            outs = [model(ids[:, :prefill], cache=cache)] if prefill else []
            outs += [model(ids[:, t:t + 1], cache=cache) for t in range(prefill, max_len)]
            assert rel_err(torch.cat(outs, dim=1), want) <= 1e-5, f"static={static}"
