"""The conformance check: the invariants every architecture of the suite is held to, for any mixer.

Each property is a function ``(subject) -> Result``: it builds what it needs from the subject (an
architecture and a small configuration in which several chunks and windows fit in ~30 tokens),
measures one error, and compares it with a stated bound. The suite's own tests run the seven
built-ins through these same functions (tests/evals/check/test_conformance.py), and a user's pytest can too::

    from evals.check.conformance import PROPERTIES, Subject
    @pytest.mark.parametrize("prop", PROPERTIES)
    def test_my_mixer(prop):
        result = PROPERTIES[prop](Subject.of("mypkg.mixer:MyMixer"))
        assert result.status != "fail", result.line()

A property the mixer cannot take part in (decode without ``init_cache``, the op level without
``op``, a state formula it does not declare) is ``n/a``, never a failure. Float64 is used where
"unchanged" must hold to round-off; the bf16 property compares bf16 with fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from evals.registry import ModelConfig, resolve_model

# several chunks (8) and windows (8) in the ~30 tokens the properties use; heads divide the width
CONFIG = ModelConfig(vocab_size=53, hidden_dim=32, num_layers=2, num_heads=4, ff_dim=48, dropout=0.0,
                     chunk_size=8, window_size=8, qk_dim=16, expansion_factor=2)
N = 29  # not a multiple of the chunk or the window
BOUNDS = dict(causal=1e-12, jacobian=1e-12, op=1e-12, stream=1e-9, decode=1e-9, padding=1e-10, bf16=5e-2,
              compile=1e-4)


@dataclass(frozen=True)
class Result:
    name: str
    status: str          # "pass", "fail" or "n/a"
    error: float         # the measured error (nan when not measured)
    bound: float         # what it must not exceed (nan when not a bound)
    detail: str = ""

    def line(self) -> str:
        err = "" if math.isnan(self.error) else f"error {self.error:.3g}"
        # the comparison as measured: a failure reads "error 0.0011 > 1e-12", a pass "<="
        over = self.status == "fail" and not math.isnan(self.error) and self.error > self.bound
        bound = "" if math.isnan(self.bound) else f"{'>' if over else '<='} {self.bound:.3g}"
        measured = " ".join(p for p in (err, bound) if p)
        return f"{self.status.upper():4s}  {self.name:30s} {measured:24s} {self.detail}".rstrip()


@dataclass(frozen=True)
class Subject:
    """What is checked: an architecture (registry name or import path) at a configuration."""

    spec: object
    config: ModelConfig = CONFIG

    @classmethod
    def of(cls, arch: str, config: ModelConfig = CONFIG) -> "Subject":
        return cls(resolve_model(arch), config)

    def model(self, dtype=torch.float64, seed: int = 0, **kw):
        torch.manual_seed(seed)
        return self.spec.build(self.config.with_(**kw)).to(dtype).eval()

    def mixer(self, dtype=torch.float64, **kw):
        torch.manual_seed(0)
        return self.spec.build_mixer(self.config.with_(**kw)).to(dtype).eval()

    def has(self, name: str) -> bool:
        return callable(getattr(self.spec.mixer_class(), name, None))


def ids(n: int = N, b: int = 1, seed: int = 1, vocab: int = CONFIG.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def _bounded(name: str, error: float, bound: float, detail: str = "") -> Result:
    ok = math.isfinite(error) and error <= bound
    return Result(name, "pass" if ok else "fail", float(error), bound, detail)


def _na(name: str, why: str) -> Result:
    return Result(name, "n/a", float("nan"), float("nan"), why)


# ----------------------------------------------------------------------------- causality


def causal_perturbation(s: Subject) -> Result:
    """Changing token t leaves every output before t unchanged, and changes its own: at a chunk's
    first, middle and last position and at the final token."""
    model, x = s.model(), ids()
    worst, deaf = 0.0, []
    for t in (8, 12, 15, 16, N - 1):
        y = x.clone()
        y[0, t] = (y[0, t] + 1) % s.config.vocab_size
        with torch.no_grad():
            a, b = model(x), model(y)
        worst = max(worst, float((a[:, :t] - b[:, :t]).abs().max()))
        if torch.equal(a[:, t], b[:, t]):
            deaf.append(t)
    if deaf:
        return Result("causality (perturbation)", "fail", worst, BOUNDS["causal"],
                      f"changing token(s) {deaf} did not change their own output")
    return _bounded("causality (perturbation)", worst, BOUNDS["causal"], "max |change| of outputs before the token")


def causal_jacobian(s: Subject) -> Result:
    """d y_t / d x_s of the mixer is zero for every s > t (the full Jacobian, float64)."""
    mixer, n = s.mixer(), 19
    x = torch.randn(1, n, s.config.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    jac = torch.autograd.functional.jacobian(lambda t: mixer(t), x, vectorize=True)  # (1, n, D, 1, n, D)
    per_pair = jac[0, :, :, 0].abs().amax(dim=(1, 3))  # (n_out, n_in)
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    if per_pair[~future].max() == 0:
        return Result("causality (Jacobian)", "fail", 0.0, BOUNDS["jacobian"], "the output depends on no input")
    return _bounded("causality (Jacobian)", float(per_pair[future].max()), BOUNDS["jacobian"],
                    "max |d y_t / d x_s|, s > t")


def op_form(s: Subject) -> Result:
    """The op level: ``forward(x, mask) == output(op(*op_inputs(x, mask), mask=mask), x)``, with and
    without a padding mask, and the mask reaches the op."""
    if not (s.has("op") and s.has("op_inputs")):
        return _na("forward == output(op(...))", "no op / op_inputs: the op level is unsupported")
    mixer = s.mixer()
    x = torch.randn(2, 13, s.config.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:], mask[0, 3] = False, False
    worst, outs = 0.0, []
    with torch.no_grad():
        for m in (None, mask):
            y = mixer(x, mask=m)
            worst = max(worst, float((y - mixer.output(mixer.op(*mixer.op_inputs(x, m), mask=m), x)).abs().max()))
            outs.append(y)
    if torch.equal(outs[0][0, 4:], outs[1][0, 4:]):
        return Result("forward == output(op(...))", "fail", worst, BOUNDS["op"], "the mask does not reach the op")
    return _bounded("forward == output(op(...))", worst, BOUNDS["op"])


# ----------------------------------------------------------------------------- the cache


def streaming(s: Subject) -> Result:
    """Feeding a sequence through the cache in pieces (one token at a time, and random splits)
    gives the one-shot forward's outputs."""
    if not s.has("init_cache"):
        return _na("streaming == one-shot", "no init_cache: decode is unsupported")
    model, n = s.model(), 37
    x = ids(n=n, b=2)
    worst = 0.0
    with torch.no_grad():
        full = model(x)
        g = torch.Generator().manual_seed(3)
        for trial in range(3):
            cuts = list(range(1, n)) if trial == 0 else sorted(set(torch.randint(1, n, (6,), generator=g).tolist()))
            cache, pieces, prev = model.init_cache(2), [], 0
            for c in cuts + [n]:
                pieces.append(model(x[:, prev:c], cache=cache))
                prev = c
            worst = max(worst, float((torch.cat(pieces, dim=1) - full).abs().max()))
    return _bounded("streaming == one-shot", worst, BOUNDS["stream"], "1-token and random splits, batch 2")


def decode_step(s: Subject) -> Result:
    """After a prefill, each one-token cached step's logits equal the full forward's at that position,
    from a cache sized up front (``max_len``) as ``generate`` makes it."""
    if not s.has("init_cache"):
        return _na("decode step == forward", "no init_cache: decode is unsupported")
    model, x = s.model(), ids(n=N, b=2)
    with torch.no_grad():
        full = model(x)
        cache = model.init_cache(2, max_len=N)
        steps = [model(x[:, :20], cache=cache)[:, -1]]
        steps += [model(x[:, t:t + 1], cache=cache)[:, -1] for t in range(20, N)]
    worst = float((torch.stack(steps, 1) - full[:, 19:]).abs().max())
    return _bounded("decode step == forward", worst, BOUNDS["decode"], "prefill 20, then 9 one-token steps")


def generate_greedy(s: Subject) -> Result:
    """``generate`` (greedy, cached) gives the tokens repeated full forwards pick."""
    if not s.has("init_cache"):
        return _na("generate == repeated forwards", "no init_cache: decode is unsupported")
    model, prompt = s.model(), ids(n=11)
    out = model.generate(prompt, max_new_tokens=12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    differ = int((out != seq).sum())
    return Result("generate == repeated forwards", "pass" if differ == 0 else "fail", float(differ), 0.0,
                  "tokens that differ, of 12 generated")


def padding(s: Subject) -> Result:
    """Right padding (masked out, whatever ids it holds) changes no real position's output."""
    model, lens = s.model(), [N, 17, 9]
    seqs = [ids(n=L, seed=10 + i) for i, L in enumerate(lens)]
    batch = torch.zeros(len(lens), N, dtype=torch.long)
    mask = torch.zeros(len(lens), N, dtype=torch.long)
    for i, (q, L) in enumerate(zip(seqs, lens)):
        batch[i, :L], batch[i, L:], mask[i, :L] = q[0], (i * 7 + 5) % s.config.vocab_size, 1
    worst = 0.0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        for i, (q, L) in enumerate(zip(seqs, lens)):
            worst = max(worst, float((padded[i, :L] - model(q)[0]).abs().max()))
    return _bounded("right-padding invariance", worst, BOUNDS["padding"], "lengths 29, 17, 9 in one batch")


# ----------------------------------------------------------------------------- training and numerics


def gradients(s: Subject) -> Result:
    """A training step (dropout on) gives every parameter a finite gradient, not all zero."""
    torch.manual_seed(0)
    model = s.spec.build(s.config.with_(dropout=0.1)).train()
    x = ids(n=N, b=2)
    logits = model(x)
    F.cross_entropy(logits[:, :-1].reshape(-1, s.config.vocab_size), x[:, 1:].reshape(-1)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    missing = sum(g is None for g in grads)
    bad = sum(g is not None and not bool(torch.isfinite(g).all()) for g in grads)
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    ok = missing == 0 and bad == 0 and total > 0
    return Result("finite gradients", "pass" if ok else "fail", float(missing + bad), 0.0,
                  f"{len(grads)} parameters: {missing} without a gradient, {bad} non-finite")


def bf16(s: Subject) -> Result:
    """The bf16 model's logits against fp32's, relative RMS error (bf16 keeps 8 bits of mantissa)."""
    x = ids(n=N, b=2)
    with torch.no_grad():
        ref = s.model(torch.float32)(x).double()
        low = s.model(torch.bfloat16)(x).double()
    err = float((low - ref).norm() / ref.norm().clamp_min(1e-30))
    return _bounded("bf16 against fp32", err, BOUNDS["bf16"], "relative RMS error of the logits")


def device_clean(s: Subject) -> Result:
    """Forward (with a mask), a training step and decoding run on the ``meta`` device: no tensor is
    made on another device and no value is read on the host (either fails on ``meta``)."""
    failed = []
    for what in ("forward", "train", "decode"):
        try:
            with torch.device("meta"):
                model = s.spec.build(s.config)
            x = torch.randint(0, s.config.vocab_size, (2, N), device="meta")
            if what == "forward":
                with torch.no_grad():
                    model(x, attention_mask=torch.ones(2, N, dtype=torch.bool, device="meta"))
            elif what == "train":
                model.train()
                model(x).float().sum().backward()
            elif s.has("init_cache"):
                cache = model.init_cache(2, device="meta", max_len=N + 2)
                with torch.no_grad():
                    model(x, cache=cache)
                    model(x[:, :1], cache=cache)
        except Exception as e:  # noqa: BLE001 - what failed, and why, is the result
            failed.append(f"{what}: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
    if failed:
        return Result("device-clean (meta)", "fail", float(len(failed)), 0.0, "; ".join(failed))
    return Result("device-clean (meta)", "pass", 0.0, 0.0, "forward, train, decode on meta")


def state_formula(s: Subject) -> Result:
    """The bytes the cache holds after n tokens (batch 1, float32) equal the mixer's declared
    ``state_bytes(n)``, summed over the layers."""
    if not s.has("init_cache"):
        return _na("state bytes == formula", "no init_cache: no decoding state")
    if not s.has("state_bytes"):
        return _na("state bytes == formula", "the mixer declares no state_bytes(n)")
    from evals.recall.training import decoding_state_bytes

    model = s.model(torch.float32)
    worst, at = 0.0, []
    for n in (5, 13, N, 64):
        got = decoding_state_bytes(model, ids(n=n))
        want = sum(int(blk.mixer.state_bytes(n)) for blk in model.layers)
        worst = max(worst, abs(got - want))
        if got != want:
            at.append(f"n={n}: {got} measured, {want} declared")
    return Result("state bytes == formula", "pass" if not at else "fail", float(worst), 0.0,
                  "; ".join(at) or "n = 5, 13, 29, 64")


def compiles(s: Subject) -> Result:
    """``torch.compile(model, fullgraph=True)`` gives one graph whose logits match eager (fp32)."""
    model, x = s.model(torch.float32), ids(n=N, b=2)
    try:
        with torch.no_grad():
            got = torch.compile(model, fullgraph=True)(x)
            ref = model(x)
    except Exception as e:  # noqa: BLE001 - a graph break or a compile error is the result
        return Result("torch.compile(fullgraph=True)", "fail", float("nan"), BOUNDS["compile"],
                      f"{type(e).__name__}: {' '.join(str(e).split())[:160]}")
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return _bounded("torch.compile(fullgraph=True)", err, BOUNDS["compile"], "max |compiled - eager| / max |eager|")


PROPERTIES: dict[str, Callable[[Subject], Result]] = {
    "causal_perturbation": causal_perturbation,
    "causal_jacobian": causal_jacobian,
    "op_form": op_form,
    "streaming": streaming,
    "decode_step": decode_step,
    "generate": generate_greedy,
    "padding": padding,
    "gradients": gradients,
    "bf16": bf16,
    "device_clean": device_clean,
    "state_formula": state_formula,
}
OPTIONAL: dict[str, Callable[[Subject], Result]] = {"compile": compiles}


def run(arch: str, *, compile: bool = False, config: Optional[ModelConfig] = None) -> list:
    """Every property of ``arch`` (a registered name or an import path), in order; a property that
    raises is a ``fail`` naming the exception."""
    subject = Subject.of(arch, config or CONFIG)
    props = dict(PROPERTIES, **(OPTIONAL if compile else {}))
    out = []
    for key, fn in props.items():
        try:
            out.append(fn(subject))
        except Exception as e:  # noqa: BLE001 - a crash in a property is that property failing
            out.append(Result(key, "fail", float("nan"), float("nan"),
                              f"raised {type(e).__name__}: {' '.join(str(e).split())[:160]}"))
    return out
