"""The measurement module: FLOP counts against analytic formulas, memory from a real allocation
trace, timing samples (setup outside the timed region, injected slowdown), failure rows.

Toy architectures registered here (``register_toys``) follow the mixer protocol with naive
``n x n`` attention, so these tests do not depend on any one architecture's speed or progress.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


from bsbr.mixer import TokenMixer, merge_heads, split_heads
from evals import measure as M
from evals.grid import Case
from evals.registry import REGISTRY, ModelConfig, ModelSpec

TOY_CFG = ModelConfig(vocab_size=37, hidden_dim=16, num_layers=1, num_heads=2, ff_dim=16, chunk_size=8,
                      window_size=8, qk_dim=8)
FAST = dict(how=M.Measurement(repeats=2, warmup=0, min_run_time=0.0))


# ----------------------------------------------------------------------------- toy architectures


class NaiveAttention(TokenMixer):
    """Causal softmax attention that builds the full (b, h, n, n) score matrix (a memory oracle).

    ``oom_above``: raise torch.OutOfMemoryError for inputs longer than this (an injected OOM);
    ``broken``: raise RuntimeError on every call (an injected failure).
    """

    seen_cache_lengths: list = []  # cache length at the start of each timed decode call

    def __init__(self, hidden_dim, num_heads, oom_above=None, broken=False):
        super().__init__()
        self.h, self.oom_above, self.broken = num_heads, oom_above, broken
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def op_inputs(self, x, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return split_heads(q, self.h), split_heads(k, self.h), split_heads(v, self.h)  # (b, h, n, d)

    @classmethod
    def forms(cls):
        return ("parallel",)

    def op(self, q, k, v, mask=None):
        n = q.shape[-2]
        if self.broken:
            raise RuntimeError("injected failure")
        if self.oom_above is not None and k.shape[-2] > self.oom_above:
            raise torch.OutOfMemoryError(f"CPU out of memory (injected at n={n})")
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, n, n_k)
        start = k.shape[-2] - n
        allowed = torch.ones(n, k.shape[-2], dtype=torch.bool).tril(diagonal=start)
        return att.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (b, h, n, d)

    def init_cache(self, batch_size, device=None, dtype=None, max_len=None):
        return {"k": None, "v": None}

    def forward(self, x, mask=None, cache=None):
        q, k, v = self.op_inputs(x)
        if cache is not None:
            if x.shape[1] == 1:
                NaiveAttention.seen_cache_lengths.append(cache["k"].shape[-2])
            if cache["k"] is not None:
                k, v = torch.cat([cache["k"], k], dim=-2), torch.cat([cache["v"], v], dim=-2)
            cache["k"], cache["v"] = k, v
        return self.out_proj(merge_heads(self.op(q, k, v)))


class ToyOOM(NaiveAttention):
    def __init__(self, hidden_dim, num_heads):
        super().__init__(hidden_dim, num_heads, oom_above=32)


class ToyBroken(NaiveAttention):
    def __init__(self, hidden_dim, num_heads):
        super().__init__(hidden_dim, num_heads, broken=True)


TOYS = {"Toy": "tests.evals.test_measure:NaiveAttention", "ToyOOM": "tests.evals.test_measure:ToyOOM",
        "ToyBroken": "tests.evals.test_measure:ToyBroken", "ToyMissing": "tests.no_such_module:Nope"}


def register_toys(monkeypatch):
    """Add the toy architectures to the registry for one test (monkeypatch undoes it), as entries
    like the built-ins: a name, a mixer class's import path and a description."""
    for name, target in TOYS.items():
        monkeypatch.setitem(REGISTRY, name, ModelSpec(name, target, "test toy", method="naive causal softmax",
                                                      complexity="O(n^2 d)", time_class="n^2"))


def case(model="Toy", n=16, mode="forward", level="model", cfg=TOY_CFG, **kw) -> Case:
    return Case(model, "cpu", mode, level, "float32", kw.pop("batch_size", 1), n, cfg, **kw)


# ----------------------------------------------------------------------------- FLOPs


def test_cpu_sdpa_flops_match_analytic_full_matrix_convention():
    # Convention: the full n x n score matrix is counted even with is_causal=True (as torch does
    # for the CUDA kernels); 2 FLOPs per multiply-add. forward = 2 matmuls, backward = 5.
    b, h, n, d = 2, 3, 40, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert plain.get_total_flops() == 0, "torch now counts CPU SDPA itself; revisit FLOP_FORMULAS"
    with FlopCounterMode(display=False, custom_mapping=M.FLOP_FORMULAS) as fwd:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fwd.get_total_flops() == 4 * b * h * n * n * d
    with FlopCounterMode(display=False, custom_mapping=M.FLOP_FORMULAS) as bwd:
        out.sum().backward()
    assert bwd.get_total_flops() == 10 * b * h * n * n * d


@pytest.mark.parametrize("mode, per_bhn2d", [("forward", 4), ("train", 14)])
def test_standard_op_flops_match_analytic(mode, per_bhn2d):
    cfg = ModelConfig(hidden_dim=32, num_heads=4, num_layers=1, vocab_size=50, ff_dim=32)
    b, n, h, d = 2, 48, 4, 8
    row = M.measure(case("Standard", n=n, mode=mode, level="op", cfg=cfg, batch_size=b), **FAST)
    assert row["status"] == "ok", row["error"]
    assert row["flops"] == per_bhn2d * b * h * n * n * d


def test_standard_layer_flops_add_the_projections():
    cfg = ModelConfig(hidden_dim=32, num_heads=4, num_layers=1, vocab_size=50, ff_dim=32)
    b, n, D = 1, 40, 32
    row = M.measure(case("Standard", n=n, level="layer", cfg=cfg, batch_size=b), **FAST)
    # qkv (D -> 3D) and out (D -> D) projections, then SDPA.
    assert row["flops"] == 2 * b * n * D * 4 * D + 4 * b * n * n * D


@pytest.mark.parametrize("n, f", [(100, None), (77, 2)], ids=["n100", "n77-compressed"])
def test_bsbr_op_flops_match_analytic(n, f):
    ops = pytest.importorskip("bsbr.ops")
    if not hasattr(ops, "bsbr_attention_flops"):
        pytest.skip("bsbr.ops.bsbr_attention_flops is not there yet")
    cfg = ModelConfig(hidden_dim=32, num_heads=4, num_layers=1, vocab_size=50, ff_dim=32, chunk_size=16,
                      compression_factor=f)
    row = M.measure(case("BSBR", n=n, level="op", cfg=cfg), **FAST)
    assert row["status"] == "ok", row["error"]
    assert row["flops"] == ops.bsbr_attention_flops(1, 4, n, 8, 16, 0, f)


# ----------------------------------------------------------------------------- memory


def test_cpu_memory_trace_sees_quadratic_attention(monkeypatch):
    register_toys(monkeypatch)
    cfg = TOY_CFG.with_(hidden_dim=32, num_heads=4)
    peaks = {}
    for n in (256, 512):
        row = M.measure(case(n=n, level="op", cfg=cfg), **FAST)
        assert row["memory_method"] == "cpu_alloc_trace"
        peaks[n] = row["peak_memory_mb"]
        # the (1, 4, n, n) fp32 scores exist at least once
        assert peaks[n] * 2**20 >= 4 * n * n * 4
    assert 3.5 <= peaks[512] / peaks[256] <= 4.5, peaks


def test_memory_is_not_parameter_bytes(monkeypatch):
    # A layer with 16M parameters but tiny activations: its peak must be far below 64 MiB.
    big = nn.Linear(4096, 4096)
    x = torch.randn(1, 4096)
    mb, method = M.peak_memory(lambda: big(x))
    assert method == "cpu_alloc_trace"
    assert 0 < mb < 1.0


def test_memory_counts_a_known_allocation():
    mb, _ = M.peak_memory(lambda: torch.empty(3 * 2**20, dtype=torch.uint8).fill_(1))
    assert mb == pytest.approx(3.0, abs=0.05)


# ----------------------------------------------------------------------------- timing


def test_time_fn_keeps_every_sample_and_runs_setup_untimed():
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1
        time.sleep(0.02)

    def fn():
        calls["fn"] += 1
        time.sleep(0.001)

    samples = M.time_fn(fn, device="cpu", repeats=5, warmup=1, min_run_time=0.0, setup=setup)
    assert len(samples) == 5
    assert calls["setup"] == calls["fn"] == 6  # one per warm-up and per sample
    assert statistics.median(samples) < 15  # the 20 ms setup is outside the timed region


def test_time_fn_blocks_fast_calls_after_warmup():
    calls = []
    fn = lambda: calls.append(1)  # noqa: E731  (~1 us: one call alone is below the clock's resolution)
    assert len(M.time_fn(fn, repeats=3, warmup=0, min_run_time=0)) == 3 and len(calls) == 3
    calls.clear()
    samples = M.time_fn(fn, repeats=3, warmup=1, min_run_time=0)
    assert len(samples) == 3 and len(calls) > 30  # blocks of many calls, each sample a per-call mean
    assert all(s < 0.5 for s in samples)


def test_time_fn_min_run_time_adds_samples():
    samples = M.time_fn(lambda: time.sleep(0.002), repeats=2, warmup=0, min_run_time=0.05)
    assert len(samples) >= 10 and all(s >= 1.9 for s in samples)


def test_time_fn_pins_threads_and_restores():
    before = torch.get_num_threads()
    seen = []
    M.time_fn(lambda: seen.append(torch.get_num_threads()), repeats=2, warmup=0, min_run_time=0, threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_injected_slowdown_scales_the_calls_cpu_work(monkeypatch):
    # The injection burns (f - 1) x the call's own CPU time (evals.measure._injected). Checked on the
    # thread's CPU clock, which pre-emption does not move: a wall-clock version of this test failed
    # whenever other processes shared the cores.
    fn = lambda: M._spin(0.004)  # noqa: E731  (4 ms of CPU work)
    slowed = M._injected(fn, "cpu", 3.0)
    took = []
    for _ in range(5):
        c0 = time.thread_time()
        slowed()
        took.append(time.thread_time() - c0)
    assert 2.9 * 0.004 <= min(took) <= 3.3 * 0.004, took
    assert M._injected(fn, "cpu", 1.0) is fn  # no injection: the call itself, unwrapped
    # and time_fn times the injected call, with the factor it was given
    seen = []
    monkeypatch.setattr(M, "_injected", lambda f, device, factor: seen.append(factor) or f)
    M.time_fn(fn, repeats=1, warmup=0, min_run_time=0, inject=3.0)
    assert seen == [3.0]


def test_inject_env_is_parsed_and_recorded(monkeypatch):
    register_toys(monkeypatch)
    monkeypatch.setenv(M.INJECT_ENV, "toy=2.5")
    assert M.parse_inject() == {"Toy": 2.5}
    row = M.measure(case(n=8), **FAST)
    assert row["status"] == "ok" and row["inject_factor"] == 2.5
    for bad in ("Toy", "Toy=0.5", "Toy=x", "Nope=2"):
        with pytest.raises(ValueError):
            M.parse_inject(bad)


@pytest.mark.parametrize("bad", ["BSBR=inf", "BSBR=1e309", "BSBR=nan", "BSBR=-inf", "BSBR=0", "BSBR=-2",
                                 "Standard=2,BSBR=inf"])
def test_a_non_finite_or_non_positive_factor_is_refused_naming_what_is_valid(bad):
    # issue 23 item 1: inf passed ">= 1" and then busy-waited forever
    with pytest.raises(ValueError, match="finite number >= 1") as err:
        M.parse_inject(bad)
    assert bad.split(",")[-1] in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("seconds", [math.inf, math.nan, -1.0])
def test_the_busy_wait_refuses_an_unbounded_or_negative_request(seconds):
    with pytest.raises(ValueError, match="finite, non-negative"):
        M._spin(seconds)


def test_the_busy_wait_is_capped(monkeypatch):
    monkeypatch.setattr(M, "MAX_SPIN_S", 0.01)
    t0 = time.thread_time()
    M._spin(1e6)  # without the cap: eleven days of CPU
    assert time.thread_time() - t0 < 1.0


def test_an_infinite_factor_in_the_environment_is_one_line_exit_2_in_compare_and_regress(monkeypatch):
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.setenv(M.INJECT_ENV, "BSBR=inf")
    for args in (["compare", "--models", "BSBR", "--seq-lengths", "16"],
                 ["regress", "--against", "HEAD", "--self-test", "1e309"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert "finite number" in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_calibrate_matmul_is_a_plausible_rate():
    gflops = M.calibrate_matmul("cpu", n=128)
    assert 0.01 < gflops < 1e5


# ----------------------------------------------------------------------------- rows


@pytest.mark.parametrize("mode", ["forward", "train", "decode"])
@pytest.mark.parametrize("level", ["model", "layer", "op"])
def test_row_is_consistent(monkeypatch, mode, level):
    register_toys(monkeypatch)
    row = M.measure(case(n=24, mode=mode, level=level, decode_tokens=3), **FAST)
    assert row["status"] == "ok", row["error"]
    samples = [float(s) for s in row["samples_ms"].split()]
    assert row["repeats"] == len(samples) >= 2
    assert row["time_ms"] == pytest.approx(statistics.median(samples), rel=1e-5)
    assert row["time_ms_p20"] <= row["time_ms"] <= row["time_ms_p80"]
    assert row["timer"] == "cpu_wall" and row["flops"] > 0 and row["peak_memory_mb"] > 0
    assert row["decode_tokens"] == (0 if mode != "decode" else 1 if level == "op" else 3)
    module = REGISTRY["Toy"].build(TOY_CFG) if level == "model" else REGISTRY["Toy"].build_mixer(TOY_CFG)
    assert row["params"] == sum(p.numel() for p in module.parameters())


def test_decode_restores_the_prefilled_cache_before_every_sample(monkeypatch):
    register_toys(monkeypatch)
    NaiveAttention.seen_cache_lengths.clear()
    row = M.measure(case(n=20, mode="decode", level="layer", decode_tokens=4), M.Measurement(repeats=3, warmup=1, min_run_time=0))
    assert row["status"] == "ok"
    seen = NaiveAttention.seen_cache_lengths
    # every call (flops, memory, warm-up, samples) starts from the 20-token prefill, then grows by 1
    assert len(seen) % 4 == 0 and len(seen) >= 4 * 6
    assert all(seen[i:i + 4] == [20, 21, 22, 23] for i in range(0, len(seen), 4))


def test_decode_flops_are_per_token(monkeypatch):
    register_toys(monkeypatch)
    one = M.measure(case(n=20, mode="decode", level="layer", decode_tokens=1), **FAST)["flops"]
    four = M.measure(case(n=20, mode="decode", level="layer", decode_tokens=4), **FAST)["flops"]
    # per-token FLOPs grow only with the cache (20 -> 23 keys), not with the number of steps
    assert one <= four < 1.2 * one


def test_failures_become_rows(monkeypatch):
    register_toys(monkeypatch)
    oom = M.measure(case("ToyOOM", n=64), **FAST)
    assert oom["status"] == "oom" and "OutOfMemoryError" in oom["error"]
    ok = M.measure(case("ToyOOM", n=16), **FAST)
    assert ok["status"] == "ok"
    broken = M.measure(case("ToyBroken", n=16), **FAST)
    assert broken["status"] == "error" and "injected failure" in broken["error"] and "\n" not in broken["error"]
    missing = M.measure(case("ToyMissing", n=16), **FAST)
    assert missing["status"] == "error" and "ModuleNotFoundError" in missing["error"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path(monkeypatch):
    a = torch.randn(512, 512, device="cuda")
    samples = M.time_fn(lambda: a @ a, device="cuda", repeats=3, warmup=1, min_run_time=0)
    assert len(samples) >= 3 and all(s > 0 for s in samples)
    mb, method = M.peak_memory(lambda: torch.empty(2**20, device="cuda", dtype=torch.uint8), device="cuda")
    assert method == "cuda_max_allocated" and mb == pytest.approx(1.0, abs=0.01)
    register_toys(monkeypatch)
    row = M.measure(Case("Toy", "cuda", "forward", "op", "float32", 1, 64, TOY_CFG), **FAST)
    assert row["status"] == "ok" and row["timer"] == "cuda_event"
