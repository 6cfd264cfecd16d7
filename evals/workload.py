"""Build what one case runs: the timed callable, its untimed setup and its size facts.

What is timed comes from the registry and the mixer protocol only (no per-model branch):

- ``model`` level: ``spec.build(cfg)`` on token ids ``(b, n)``;
- ``layer`` level: ``spec.build_mixer(cfg)`` on ``x`` of shape ``(b, n, hidden)``;
- ``op`` level: ``mixer.op(*inputs)`` with ``inputs = mixer.op_inputs(x)`` computed beforehand.

Modes: ``forward`` (no grad); ``train`` (forward + backward of the next-token cross-entropy at
model level, of ``out.sum()`` at layer and op level); ``decode`` (prefill ``n`` tokens into a
cache outside the timed region, then ``k`` one-token steps per call from a fresh copy of that
cache). Nothing here reads a clock: ``evals.measure`` times what this builds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from evals.grid import Case
from evals.registry import resolve_model

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass
class Workload:
    """What one case runs: the timed callable, an untimed per-call setup, and its size facts.

    ``eager`` is the same work without ``torch.compile``: FLOPs are counted on it (the count is
    the model's, not the compiler's). Without ``--compile`` both are the same callable."""

    fn: Callable[[], object]
    setup: Optional[Callable[[], None]]
    params: int
    tokens_per_call: int  # decode: the k steps one call makes (time and FLOPs are per token)
    eager: Optional[Callable[[], object]] = None

    @property
    def counted(self) -> Callable[[], object]:
        return self.eager or self.fn


def _unique_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _total(out) -> torch.Tensor:
    """Sum of every floating tensor in an op's output (a tensor or a tuple of them)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    return sum(_total(o) for o in out if isinstance(o, (torch.Tensor, tuple, list)))


def _cached_steps(module, cache0, steps: torch.Tensor, eager=None) -> tuple[Callable, Callable, Optional[Callable]]:
    """Time ``k`` one-token calls ``module(step, cache=cache)`` from a fresh copy of ``cache0``;
    with ``eager`` also the same steps through it (sharing the one cache that ``setup`` renews)."""
    holder = {}

    def setup():
        holder["cache"] = copy.deepcopy(cache0)

    def steps_of(m):
        def fn():
            with torch.no_grad():
                for t in range(steps.shape[1]):
                    m(steps[:, t:t + 1], cache=holder["cache"])
        return fn

    return steps_of(module), setup, (steps_of(eager) if eager is not None else None)


def _both(make: Callable[[Callable], Callable], module: Callable, compile: bool) -> tuple[Callable, Callable]:
    """``(timed, eager)`` callables from ``make(module)``: the timed one calls ``torch.compile(module)``
    when ``compile`` (compiled lazily, at its first call, which ``measure`` times as compile_ms)."""
    eager = make(module)
    return (make(torch.compile(module)) if compile else eager), eager


def build_workload(case: Case) -> Workload:
    """Build the model or layer and its inputs for ``case`` (seeded); nothing here is timed."""
    torch.manual_seed(case.seed)  # the weights
    g = torch.Generator().manual_seed(case.seed)  # the inputs
    return (_model_workload if case.level == "model" else _mixer_workload)(case, g)


def _model_workload(case: Case, g: torch.Generator) -> Workload:
    """The model level: token ids in; forward, train (next-token loss) or cached decode steps."""
    spec, cfg = resolve_model(case.model), case.config
    device, dtype = case.device, DTYPES[case.dtype]
    b, n, k = case.batch_size, case.seq_len, case.effective_decode_tokens
    model = spec.build(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (b, n), generator=g).to(device)
    params = _unique_params(model)
    if case.mode == "forward":
        model.eval()
        return _workload(_no_grad_call(ids), model, case, params)
    if case.mode == "train":
        model.train()
        targets = ids.roll(-1, dims=1)  # next-token targets (the last wraps; cost is what counts)

        def make(m):
            def fn():
                model.zero_grad(set_to_none=True)
                logits = m(ids)  # (b, n, V)
                F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
            return fn
        return _workload(make, model, case, params)
    model.eval()
    cache0 = model.init_cache(b, device=device, dtype=dtype, **_max_len(model, n + k, case))
    with torch.no_grad():
        model(ids, cache=cache0)  # prefill outside the timed region
    steps = torch.randint(0, cfg.vocab_size, (b, k), generator=g).to(device)
    return _decode_workload(model, cache0, steps, params, k, case)


def _mixer_workload(case: Case, g: torch.Generator) -> Workload:
    """The layer and op levels: one mixer on (b, n, D) inputs; forward, train or cached decode steps."""
    spec, cfg = resolve_model(case.model), case.config
    device, dtype = case.device, DTYPES[case.dtype]
    b, n, k = case.batch_size, case.seq_len, case.effective_decode_tokens
    mixer = spec.build_mixer(cfg).to(device=device, dtype=dtype)
    params = _unique_params(mixer)
    x = torch.randn(b, n, cfg.hidden_dim, generator=g).to(device=device, dtype=dtype)  # (b, n, D)
    if case.mode == "decode":  # layer and op level: cached steps of the mixer (op: k = 1)
        mixer.eval()
        cache0 = mixer.init_cache(b, device, dtype, **_max_len(mixer, n + k, case))
        with torch.no_grad():
            mixer(x, cache=cache0)
        steps = torch.randn(b, k, cfg.hidden_dim, generator=g).to(device=device, dtype=dtype)
        return _decode_workload(mixer, cache0, steps, params, k, case)

    train = case.mode == "train"
    mixer.train(train)
    if case.level == "layer":
        x.requires_grad_(train)
        if not train:
            return _workload(_no_grad_call(x), mixer, case, params)

        def make(m):
            def fn():
                mixer.zero_grad(set_to_none=True)
                x.grad = None
                _total(m(x)).backward()
            return fn
        return _workload(make, mixer, case, params)

    fn, eager = _both(lambda op: op_call(mixer, op, x, train), mixer.op, _compiled(case))
    return Workload(fn, None, params, 1, eager)


def _no_grad_call(inp: torch.Tensor) -> Callable[[Callable], Callable]:
    """``make`` for a forward workload: ``m(inp)`` without autograd."""
    def make(m):
        def fn():
            with torch.no_grad():
                return m(inp)
        return fn
    return make


def _compiled(case) -> bool:
    # getattr: regress --against builds the accepted commit's cases with that commit's grid,
    # which may predate the field
    return bool(getattr(case, "compile", False))


def _workload(make, module, case: Case, params: int) -> Workload:
    fn, eager = _both(make, module, _compiled(case))
    return Workload(fn, None, params, 1, eager)


def _max_len(module, length: int, case: Case) -> dict:
    """``max_len=`` for ``init_cache`` with ``--compile``: a preallocated cache gives the fixed-shape
    decode step a compiled graph needs (gpt-fast's KVCache). Eager decoding keeps each model's
    default cache, which grows (for BSBR, one state per completed chunk, folded once per chunk)."""
    import inspect

    if not _compiled(case) or "max_len" not in inspect.signature(module.init_cache).parameters:
        return {}
    return {"max_len": length}


def _decode_workload(module, cache0, steps, params: int, k: int, case: Case) -> Workload:
    if _compiled(case):
        fn, setup, eager = _cached_steps(torch.compile(module), cache0, steps, eager=module)
    else:
        fn, setup, eager = _cached_steps(module, cache0, steps)
    return Workload(fn, setup, params, k, eager)


def op_call(mixer, op: Callable, x: torch.Tensor, train: bool) -> Callable[[], object]:
    """The op level: ``op(*mixer.op_inputs(x))`` with the projections made here, outside anything
    timed. ``train``: forward plus backward of the outputs' sum, into fresh leaf inputs."""
    with torch.no_grad():
        inputs = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in mixer.op_inputs(x))
    if not train:
        def fn():
            with torch.no_grad():
                return op(*inputs)
        return fn
    leaves = [t.requires_grad_(True) for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]

    def fn():
        for t in leaves:
            t.grad = None
        _total(op(*inputs)).backward()
    return fn
