"""A sync-free, compile-clean forward and decode (issue 14, item 2), proved on the CPU with
``torch.compile(model, fullgraph=True)``: any host read of a tensor's value (``int(t.max())``,
``bool(mask.all())``, ``.item()``) or other graph break makes ``fullgraph=True`` raise.

- every model's forward, with a padding mask, compiles as one graph and matches eager;
- every model's one-token decode step compiles as one graph and matches eager, step after step,
  across chunk / window boundaries;
- 20 decode steps across a chunk boundary compile at most 3 graphs (counted by a backend that
  records each graph it is handed), and the step's graph has no tensor of symbolic shape: every
  cache made with ``max_len`` keeps one shape per step (BSBR's: fixed open-chunk and chunk-slot
  buffers, a chunk closed by ``torch.where``; Standard's and Hopfield's: the whole buffer under a
  key mask);
- every ``max_len`` cache, eager, streams with padding exactly as the one-shot forward computes;
- on CUDA (skipped without one), a forward and 20 decode steps of every model run under
  ``torch.cuda.set_sync_debug_mode("error")``: no host synchronisation at all.

BSBR is built with overlap and compression, so the compiled step also folds the overlap tail
and the compressed state.
"""

import pytest
import torch

from evals.registry import MODEL_NAMES, REGISTRY
from tests.conftest import TINY, rel_err

# per model: the TINY options that exercise the most of its decode path
CONFIG = {"BSBR": TINY.with_(chunk_overlap=3, compression_factor=2)}


def build(name, device="cpu"):
    torch.manual_seed(0)
    return REGISTRY[name].build(CONFIG.get(name, TINY)).to(device).eval()


def counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def symbolic_shapes(gm) -> list:
    """The graph's tensors whose shape is symbolic (a cache slice that grows with the position)."""
    return [(node.name, tuple(v.shape)) for node in gm.graph.nodes
            if isinstance(v := node.meta.get("example_value"), torch.Tensor)
            and any(isinstance(dim, torch.SymInt) for dim in v.shape)]


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
    return errs, graphs


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_max_len_caches_stream_with_padding_equal_to_one_shot(name):
    # eager, per mixer: the max_len cache (preallocated, the path the compiled step takes) streams
    # one token at a time and in pieces across boundaries, with a hole and right padding, exactly
    # as the one-shot forward computes; filled to max_len, one more token is refused
    mixer = REGISTRY[name].build_mixer(CONFIG.get(name, TINY)).double().eval()
    if name == "GAU":  # the paper's init makes its attention negligible (see test_models.py): enlarge it
        with torch.no_grad():
            mixer.scale_offset.gamma.normal_(0, 1.0)
    n = 27
    x = torch.randn(2, n, TINY.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 3:13] = False
    mask[1, 22:] = False
    with torch.no_grad():
        full = mixer(x, mask=mask)
        for cuts in ([*range(1, n)], [5, 6, 16, 17, 20]):
            cache = mixer.init_cache(2, dtype=torch.float64, max_len=n)
            pieces, prev = [], 0
            for cut in cuts + [n]:
                pieces.append(mixer(x[:, prev:cut], mask=mask[:, prev:cut], cache=cache))
                prev = cut
            out = torch.cat(pieces, dim=1)
            assert torch.allclose(out[mask], full[mask], atol=1e-12, rtol=1e-10), f"{name}: split {cuts}"
        if name in ("BSBR", "Standard", "Hopfield"):  # the caches that hold max_len tokens
            with pytest.raises(ValueError, match=f"max_len={n}"):
                mixer(x[:, :1], mask=mask[:, :1], cache=cache)


@pytest.mark.parametrize("static", [False, True], ids=["sliced-eager-step", "shape-static-step"])
def test_gau_both_step_forms_stream_equal_to_one_shot(static, monkeypatch):
    # GAU's one-token step has two forms: eager calls slice the filled rows by the host-side length,
    # compiled calls take the shape-static masked form. Both stream exactly as the one-shot forward
    # (the static one forced here by making the step believe it is being compiled)
    if static:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    mixer = REGISTRY["GAU"].build_mixer(TINY).double().eval()
    with torch.no_grad():
        mixer.scale_offset.gamma.normal_(0, 1.0)
    n = 27
    x = torch.randn(2, n, TINY.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.init_cache(2, dtype=torch.float64, max_len=n)
        out = torch.cat([mixer(x[:, :5], cache=cache)] + [mixer(x[:, t:t + 1], cache=cache) for t in range(5, n)], 1)
    assert torch.allclose(out, full, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_twenty_decode_steps_compile_at_most_three_graphs_and_match_eager(name):
    errs, graphs = _decode(name, steps=20)
    assert max(errs) <= 1e-5  # every step, each one a single graph (fullgraph=True)
    assert len(graphs) <= 3, f"{name}: {len(graphs)} graphs for a prefill and 20 decode steps"
    # shape-static: the step's graph (the last one) holds no tensor whose shape follows the position
    # (a cache sliced to its length would compile once with a symbolic length and pass the count)
    assert symbolic_shapes(graphs[-1]) == [], name


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode is a CUDA feature")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_and_decode_never_synchronise_on_cuda(name):
    # everything moved to the device first (a pageable host-to-device copy is itself a sync); then
    # any .item(), int(t), bool(t), nonzero or device-to-host copy inside the loop raises
    model = build(name, "cuda")
    ids = torch.randint(0, TINY.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5)).cuda()
    mask = torch.ones(2, 30, dtype=torch.long, device="cuda")
    mask[1, 25:] = 0
    cache = model.init_cache(2, max_len=30)
    outs = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            outs.append(model(ids, attention_mask=mask))      # a padded forward
            outs.append(model(ids[:, :10], cache=cache))      # a prefill
            for t in range(10, 30):                           # 20 steps across chunk / window boundaries
                outs.append(model(ids[:, t:t + 1], cache=cache))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        want = model(ids)[:, 10:]
    assert rel_err(torch.cat(outs[2:], dim=1), want) <= 1e-4  # the steps did decode (TF32 may be on)
