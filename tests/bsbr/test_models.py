"""What every registered model must do the same way, parametrised from the registry with a
per-model table where the models differ: one dropout per residual branch, bad hyperparameters,
edge inputs (batch 0, length 0, generate's sampling options, norm_eps, dropout), mixer streaming
with a padding mask, the registry passing only the arguments each model takes, and ``forms``
derived from the mixer.

A new architecture gets all of this by adding its registry entry and one row to each table below
(see tests/README.md).
"""

import inspect
import math

import pytest
import torch

from bsbr.causal_lm import sample_token
from evals.registry import MODEL_NAMES, REGISTRY
from tests.conftest import TINY, public_model


def build(name, cfg=TINY, **shell_kwargs):
    torch.manual_seed(0)
    return REGISTRY[name].build(cfg, **shell_kwargs)


# ----------------------------------------------------------------------------- dropout


class _Zero(torch.nn.Module):
    """Stands in for one branch of a block so the other branch's output can be read alone."""

    def forward(self, x, mask=None, cache=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("branch", ["mixer", "ffn"])
def test_exactly_one_dropout_on_each_residual_branch(name, branch):
    # In training a block adds drop(branch(norm(x))) to x. With one inverted dropout of rate p every
    # element of the added term is either 0 or (the eval-mode branch output) / (1 - p); a second
    # dropout inside the mixer would give 1 / (1 - p)^2 on the kept elements, none would give no zeros.
    p = 0.5
    # x is tiny so that block(x) - x loses no digits of the branch; the pre-norm still feeds the
    # branch unit-scale inputs (hence the tiny norm_eps)
    block = build(name, TINY.with_(dropout=p, num_layers=1), norm_eps=1e-30).double().layers[0]
    if hasattr(block.mixer, "dropout"):  # attention-probability dropout (Standard, SlidingWindow,
        block.mixer.dropout = 0.0        # Hopfield) is not on the output: switched off to isolate it
    other = "ffn" if branch == "mixer" else "mixer"
    setattr(block, other, _Zero())
    x = 1e-9 * torch.randn(2, 29, TINY.hidden_dim, dtype=torch.float64)
    with torch.no_grad():
        want = block.eval()(x) - x                                    # the branch, no dropout
        torch.manual_seed(1)
        got = block.train()(x) - x
    kept = got != 0
    frac = kept.double().mean().item()
    assert 0.4 < frac < 0.6, f"{name}: {frac:.2f} of the {branch} branch kept at p = {p}"
    ratio = got[kept] / want[kept]
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / (1 - p)), rtol=1e-6), \
        f"{name}: the {branch} branch is scaled by {ratio.mean():.3f}, not 1/(1-p) = {1 / (1 - p)}"


# ----------------------------------------------------------------------------- hyperparameters

COMMON_BAD = [
    (dict(hidden_dim=-4), "hidden_dim"), (dict(vocab_size=0), "vocab_size"), (dict(num_layers=0), "num_layers"),
    (dict(ff_dim=0), "ff_dim"), (dict(dropout=1.5), "dropout"), (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
]
HEADS_BAD = [(dict(num_heads=5), "num_heads"), (dict(num_heads=0), "num_heads")]  # hidden_dim 32
# per model: the ModelConfig fields its registry entry passes, and the values each must reject
BAD = {
    "BSBR": HEADS_BAD + [(dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-4), "chunk_size"),
                         (dict(compression_factor=3), "compression_factor"),
                         (dict(compression_factor=0), "compression_factor"),
                         (dict(chunk_overlap=-1), "chunk_overlap"), (dict(chunk_overlap=9), "chunk_overlap")],
    "Standard": HEADS_BAD,
    "Linear": HEADS_BAD + [(dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-3), "chunk_size"),
                           (dict(chunk_size=2.5), "chunk_size")],
    "DeltaNet": HEADS_BAD + [(dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-1), "chunk_size"),
                             (dict(chunk_size=None), "chunk_size")],
    "SlidingWindow": HEADS_BAD + [(dict(window_size=w), "window_size") for w in (0, -3, 2.5, True, None)],
    "Hopfield": HEADS_BAD + [(dict(hopfield_beta=b), "beta") for b in (0, -0.5, math.nan, math.inf, "1", True)]
                          + [(dict(update_steps=s), "update_steps") for s in (0, -1, 1.5, None)],
    "GAU": [(dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-4), "chunk_size"),
            (dict(expansion_factor=0), "expansion_factor"), (dict(expansion_factor=-1), "expansion_factor"),
            (dict(expansion_factor=1.5), "expansion_factor"), (dict(qk_dim=0), "qk_dim"), (dict(qk_dim=-8), "qk_dim")],
}
CASES = [(name, kw, word) for name in MODEL_NAMES for kw, word in COMMON_BAD + BAD[name]]


def test_the_bad_hyperparameter_table_covers_the_registry():
    assert set(BAD) == set(MODEL_NAMES)


@pytest.mark.parametrize("name, kw, word", CASES, ids=[f"{n}-{w}={list(k.values())[0]!r}" for n, k, w in CASES])
def test_bad_hyperparameters_raise_one_value_error_naming_them(name, kw, word):
    with pytest.raises(ValueError, match=word):
        build(name, TINY.with_(**kw))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("eps", [-1.0, 0.0, math.nan, math.inf, "1e-5"])
def test_bad_norm_eps_raises(name, eps):
    with pytest.raises(ValueError, match="norm_eps"):
        build(name, norm_eps=eps)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_registry_builds_what_the_librarys_own_model_class_builds(name, dropout):
    """The registry builds every architecture one way (the shell around ``Mixer.from_config``); for
    the built-ins that is bit for bit the library's own model class: the same weights from the same
    seed, the same outputs. Settings that reach each mixer differently are off their defaults."""
    cfg = TINY.with_(dropout=dropout, compression_factor=2, chunk_overlap=1, hopfield_beta=0.3, update_steps=2)
    torch.manual_seed(0)
    ours = REGISTRY[name].build(cfg).eval()
    torch.manual_seed(0)
    theirs = public_model(name, cfg).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, cfg.vocab_size, (2, 21))
    assert torch.equal(ours(x), theirs(x))


def test_the_built_ins_declared_modes_and_forms_are_their_classes():
    from evals.registry import modes_of

    for name, spec in REGISTRY.items():
        cls = spec.mixer_class()
        assert spec.declared_modes == modes_of(cls) and spec.declared_forms == cls.forms(), name


def test_forms_are_derived_from_the_mixer():
    for name, spec in REGISTRY.items():
        mixer = spec.build_mixer(TINY)
        assert spec.forms == (("parallel", "recurrent") if callable(getattr(mixer, "op_recurrent", None))
                              else ("parallel",)), name
    assert [n for n, s in REGISTRY.items() if "recurrent" in s.forms] == ["Linear", "DeltaNet"]


# ----------------------------------------------------------------------------- edge inputs


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_empty_batch_and_empty_sequence_raise(name):
    model = build(name).eval()
    with pytest.raises(ValueError, match="batch >= 1"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        model.init_cache(0)
    with pytest.raises(ValueError, match="batch >= 1"):
        model.generate(torch.zeros(0, 5, dtype=torch.long), 3)


GENERATE_BAD = [(dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"),
                (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
                (dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
                (dict(temperature=math.inf), "temperature"), (dict(max_new_tokens=-1), "max_new_tokens")]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generate_rejects_bad_sampling_options_and_samples_validly(name):
    model = build(name).eval()
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    for kw, word in GENERATE_BAD:
        args = dict(max_new_tokens=3, temperature=1.0) | kw
        with pytest.raises(ValueError, match=word):
            model.generate(prompt, **args)
    greedy = model.generate(prompt, 6)
    # top_k=1 and a tiny top_p keep only the most likely token: sampling then is greedy decoding
    g = torch.Generator().manual_seed(1)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_p=1e-6, generator=g), greedy)
    sampled = model.generate(prompt, 6, temperature=1.0, top_k=5, top_p=0.9, generator=g)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :5], prompt)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < TINY.vocab_size


def test_sampling_follows_the_filtered_distribution():
    # the exponential race picks index i with probability p_i; top-k and top-p renormalise the survivors
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])).expand(40000, 5)
    g = torch.Generator().manual_seed(0)
    for kw, want in [(dict(), [0.5, 0.25, 0.15, 0.07, 0.03]),
                     (dict(top_k=2), [2 / 3, 1 / 3, 0, 0, 0]),
                     (dict(top_p=0.8), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0])]:  # 0.5+0.25 < 0.8: third stays
        freq = torch.bincount(sample_token(logits, generator=g, **kw)[:, 0], minlength=5).double() / 40000
        assert torch.allclose(freq, torch.tensor(want, dtype=torch.float64), atol=0.01), (kw, freq)


# ----------------------------------------------------------------------------- streaming

# per model: configurations to stream (options that change the cached form), and what the cache
# may hold after n tokens (its size law)
STREAM = {
    "BSBR": ([dict(chunk_overlap=3, compression_factor=2), dict(chunk_overlap=8), dict(compression_factor=4)],
             lambda m, cache, n: cache.F.shape[2] == n // m.chunk_size and cache.cur_len == n % m.chunk_size),
    "Standard": ([dict()], lambda m, cache, n: cache.length == n),
    "Linear": ([dict(chunk_size=4)], lambda m, cache, n: [t.shape[-2:] for t in cache.state]
               == [(m.head_dim, m.head_dim), (m.num_heads, m.head_dim)]),
    "DeltaNet": ([dict(chunk_size=4)], lambda m, cache, n: cache.state[0].shape[-2:] == (m.head_dim, m.head_dim)),
    "SlidingWindow": ([dict(window_size=6)], lambda m, cache, n: cache.k.shape[-2] == m.window_size and cache.pos == n),
    "Hopfield": ([dict(update_steps=3, hopfield_beta=0.4)], lambda m, cache, n: cache.length == n),
    "GAU": ([dict(chunk_size=4)], lambda m, cache, n: cache.v.shape[1] == m.chunk_size and cache.length == n
            == int(cache.pos)),
}
STREAM_CASES = [(name, kw) for name in MODEL_NAMES for kw in STREAM[name][0]]


def test_the_streaming_table_covers_the_registry():
    assert set(STREAM) == set(MODEL_NAMES)


@pytest.mark.parametrize("name, kw", STREAM_CASES, ids=[f"{n}-{k}" for n, k in STREAM_CASES])
def test_mixer_streaming_with_padding_equals_one_shot(name, kw):
    # one token at a time, pieces shorter and longer than a chunk / window, and one long piece, with
    # holes and right padding; the cache obeys the model's size law after every piece
    mixer = REGISTRY[name].build_mixer(TINY.with_(**kw)).double().eval()
    if name == "GAU":  # the paper's init (gamma ~ N(0, 0.02^2)) makes attention negligible: enlarge it
        with torch.no_grad():
            mixer.scale_offset.gamma.normal_(0, 1.0)
    n = 31
    x = torch.randn(2, n, TINY.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 4:13] = False   # a gap longer than a chunk or window
    mask[1, 24:] = False    # right padding
    size_law = STREAM[name][1]
    with torch.no_grad():
        full = mixer(x, mask=mask)
        for cuts in ([*range(1, n)], [2, 3, 9, 10, 11, 26], [17]):
            cache = mixer.init_cache(2, dtype=torch.float64)
            pieces, prev = [], 0
            for c in cuts + [n]:
                pieces.append(mixer(x[:, prev:c], mask=mask[:, prev:c], cache=cache))
                prev = c
                assert size_law(mixer, cache, c), f"{name}: cache after {c} tokens"
            out = torch.cat(pieces, dim=1)
            assert torch.allclose(out[mask], full[mask], atol=1e-12, rtol=1e-10), f"{name}: split {cuts}"
            assert torch.isfinite(out).all()
