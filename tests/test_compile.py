"""A sync-free, compile-clean forward and decode (issue 14, item 2), proved on the CPU with
``torch.compile(model, fullgraph=True)``: any host read of a tensor's value (``int(t.max())``,
``bool(mask.all())``, ``.item()``) or other graph break makes ``fullgraph=True`` raise.

- every model's forward, with a padding mask, compiles as one graph and matches eager;
- every model's one-token decode step compiles as one graph and matches eager, step after step,
  across chunk / window boundaries;
- 20 decode steps across a chunk boundary compile at most 3 graphs (counted by a backend that
  records each graph it is handed). BSBR does not reach this yet: its open-chunk cache grows by
  concatenation and closes a chunk under a Python branch, so for it the count is reported as an
  xfail after its outputs have been checked.
"""

import pytest
import torch

from evals.registry import MODEL_NAMES, REGISTRY
from tests.conftest import TINY, rel_err

NOT_YET_STATIC = {"BSBR"}  # decode caches that still grow per token: see the module docstring


def build(name):
    torch.manual_seed(0)
    return REGISTRY[name].build(TINY).eval()


def counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_compiles_as_one_graph_and_matches_eager(name):
    torch._dynamo.reset()
    model = build(name)
    ids = torch.randint(0, TINY.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, 21:] = 0
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))
    with torch.no_grad():
        got, want = compiled(ids, attention_mask=mask), model(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(got[real], want[real]) <= 1e-5
    assert len(graphs) == 1


def _decode(name, steps=20, prefill=10):
    """Prefill ``prefill`` tokens, then ``steps`` one-token steps, compiled and eager side by side.
    With TINY (chunk and window 8) the steps cross the boundaries at 16 and 24."""
    torch._dynamo.reset()
    model = build(name)
    ids = torch.randint(0, TINY.vocab_size, (2, prefill + steps), generator=torch.Generator().manual_seed(2))
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))
    cache = model.init_cache(2, max_len=prefill + steps)
    ref_cache = model.init_cache(2)
    errs = []
    with torch.no_grad():
        compiled(ids[:, :prefill], cache=cache)
        model(ids[:, :prefill], cache=ref_cache)
        for t in range(prefill, prefill + steps):
            got = compiled(ids[:, t:t + 1], cache=cache)
            errs.append(rel_err(got, model(ids[:, t:t + 1], cache=ref_cache)))
    return errs, len(graphs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_twenty_decode_steps_compile_at_most_three_graphs_and_match_eager(name):
    errs, graphs = _decode(name, steps=20)
    assert max(errs) <= 1e-5  # every step, each one a single graph (fullgraph=True)
    if name in NOT_YET_STATIC and graphs > 3:
        pytest.xfail(f"{name}: {graphs} graphs; its open-chunk cache grows per token and closing a chunk "
                     f"is a Python branch")  # GAU's fixed buffers and where-fold show the way
    assert graphs <= 3, f"{name}: {graphs} graphs for a prefill and 20 decode steps"


def test_generate_compiles_its_decode_step():
    # generate() sizes the cache (max_len) and samples without a host sync (an exponential race)
    torch._dynamo.reset()
    model = build("Standard")
    prompt = torch.randint(0, TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))
    want = model.generate(prompt, 12, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(4))
    got = type(model).generate(compiled, prompt, 12, temperature=0.8, top_k=10,
                               generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want)
    assert len(graphs) <= 3
