"""The GPU-honest parts of the harness, proved on the CPU: ``--compile`` keeps compilation out
of the figures, ``--warmup`` counts untimed calls, the calibration is per (device, dtype), the
sidecar records the numerics switches and the CUDA/PyTorch environment, SDPA can be pinned to
one backend, and ``forms`` / ``convert`` take a device and a dtype.
"""

from __future__ import annotations

import time

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import cli
from evals import machine
from evals.compare import sweep as C
from evals import measure as M
from evals import results as R
from evals.analyze import analysis as A
from evals.grid import Case, GridSpec, expand_grid
from evals.registry import ModelConfig
from tests.evals.test_measure import FAST, TOY_CFG, case, register_toys

OP_CFG = ModelConfig(hidden_dim=16, num_heads=2, num_layers=1, vocab_size=37, ff_dim=16, chunk_size=8,
                     window_size=8, qk_dim=8)


class SlowFirstCall:
    """A stand-in for ``torch.compile``: the first call of the wrapped callable "compiles" (sleeps
    ``delay`` s); later calls go straight through. Counts calls, so warm-up can be checked too."""

    def __init__(self, delay: float):
        self.delay, self.calls = delay, 0

    def __call__(self, fn, **kw):
        def compiled(*a, **k):
            self.calls += 1
            if self.calls == 1:
                time.sleep(self.delay)
            return fn(*a, **k)
        return compiled


def test_compile_time_is_its_own_column_and_never_a_sample(monkeypatch):
    register_toys(monkeypatch)
    fake = SlowFirstCall(0.3)
    monkeypatch.setattr(M.torch, "compile", fake)
    row = M.measure(case("Toy", n=16, compile=True), M.Measurement(repeats=3, warmup=0, min_run_time=0.0))
    assert row["status"] == "ok", row["error"]
    assert row["compile"] is True and row["compile_ms"] >= 300
    samples = [float(s) for s in row["samples_ms"].split()]
    assert max(samples) < 150, "the compiling call leaked into the samples"
    # FLOPs are counted on the eager model: the fake compiled callable was called only by
    # the compile pass, the memory pass and the timed samples
    assert row["flops"] > 0


@pytest.mark.parametrize("warmup", [0, 3])
def test_warmup_counts_untimed_calls(monkeypatch, warmup):
    register_toys(monkeypatch)
    # one call per sample: a block is otherwise sized from the warm-up's timing, so the call count
    # would depend on the machine's load (it made this test flaky on a busy box)
    monkeypatch.setattr(M, "_MIN_SAMPLE_S", 0.0)
    fake = SlowFirstCall(0.0)
    monkeypatch.setattr(M.torch, "compile", fake)
    row = M.measure(case("Toy", n=16, compile=True), M.Measurement(repeats=2, warmup=warmup, min_run_time=0.0), memory=False)
    assert row["status"] == "ok" and row["warmup"] == warmup and row["repeats"] == 2
    # exactly: one compiling call, `warmup` untimed calls, then one call per sample
    assert fake.calls == 1 + warmup + 2


def test_real_compile_of_an_op_matches_and_records(tmp_path):
    # one real torch.compile (the slowest thing here): Linear's op at n=24, forward
    out = tmp_path / "c.csv"
    from evals.compare.command import Options, plan

    p = plan(Options(models=("Linear",), seq_lengths=("24",), level="op", compile=True, warmup=1, repeats=2,
                     min_run_time=0.0, output=out, hidden_dim=16, num_heads=2, chunk_size=8))
    rows = C.run_sweep(p.cases, p.output, how=p.how, settings=p.settings, show_progress=False)
    assert rows[0]["status"] == "ok", rows[0]["error"]
    df = pd.read_csv(out)
    assert bool(df["compile"].iloc[0]) and df["compile_ms"].iloc[0] > 0 and df["warmup"].iloc[0] == 1
    eager = M.measure(Case("Linear", "cpu", "forward", "op", "float32", 1, 24,
                           ModelConfig(hidden_dim=16, num_heads=2, chunk_size=8, num_layers=1)), **FAST)
    assert eager["flops"] == rows[0]["flops"], "FLOPs are the model's, compiled or not"


def test_compiled_and_eager_rows_are_different_cases(tmp_path):
    a = expand_grid(["Linear"], [16], spec=GridSpec(config=OP_CFG))[0]
    b = expand_grid(["Linear"], [16], spec=GridSpec(config=OP_CFG, compile=True))[0]
    assert R.case_key(a.fields()) != R.case_key(b.fields())
    # and a compiled row read back from a CSV keeps its identity (resume would skip it)
    row = dict(b.fields(), status="ok")
    path = tmp_path / "r.csv"
    R.append_row(path, row)
    back = R.read_rows(path)[0]
    assert R.case_key(back) == R.case_key(b.fields())


def test_calibration_is_per_device_and_dtype(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "calibrate_matmul", lambda device, threads=None, dtype="float32": calls.append(
        (device, dtype)) or 1.0)
    cases = expand_grid(["Linear"], [16], spec=GridSpec(config=OP_CFG, dtype="bfloat16"))
    cal = M.calibrate(cases, threads=1)
    assert set(cal) == {"cpu", "cpu/bfloat16"} and set(calls) == {("cpu", "float32"), ("cpu", "bfloat16")}


def test_calibrate_matmul_runs_in_the_dtype_it_is_given():
    assert M.calibrate_matmul("cpu", n=64, dtype="bfloat16") > 0
    assert M.CALIBRATION_N["cuda"] >= 4096, "a GPU calibration must be large enough to saturate it"


def test_flop_fraction_uses_the_rows_dtype_and_never_the_fp32_rate_for_bf16():
    meta = {"calibration_matmul_gflops": {"cpu": 100.0, "cpu/bfloat16": 400.0}}
    assert A.calibration_gflops(meta, "cpu") == 100.0
    assert A.calibration_gflops(meta, "cpu", "bfloat16") == 400.0
    assert pd.isna(A.calibration_gflops({"calibration_matmul_gflops": {"cpu": 100.0}}, "cpu", "bfloat16"))
    assert pd.isna(A.calibration_gflops({"matmul_gflops": 100.0}, "cuda", "bfloat16"))


def test_sidecar_records_numerics_gpu_and_cuda_variables(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "0")
    env = machine.environment()
    assert env["perf_env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["perf_env"]["CUDA_LAUNCH_BLOCKING"] == "0"
    num = env["numerics"]
    assert num["cuda_matmul_allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
    assert num["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    for k in ("sdpa_flash_enabled", "sdpa_mem_efficient_enabled", "sdpa_math_enabled", "sdpa_cudnn_enabled"):
        assert isinstance(num[k], bool)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 on: the sidecar must say so
        assert machine.environment()["numerics"]["float32_matmul_precision"] == "high"
    finally:
        torch.set_float32_matmul_precision(old)
    if torch.cuda.is_available():
        assert env["gpu"]["name"] == torch.cuda.get_device_name(0) and env["gpu"]["cuda_runtime"]
    else:
        assert env["gpu"] is None


def test_sdpa_backend_is_really_restricted():
    # the math backend gives Standard's result; the efficient kernel does not exist on the CPU,
    # so restricting to it must fail the row instead of silently using another backend
    c = dict(model="Standard", device="cpu", mode="forward", level="op", dtype="float32", batch_size=1,
             seq_len=16, config=OP_CFG)
    ok = M.measure(Case(**c, sdpa_backend="math"), **FAST)
    assert ok["status"] == "ok" and ok["sdpa_backend"] == "math"
    bad = M.measure(Case(**c, sdpa_backend="efficient"), **FAST)
    assert bad["status"] == "error" and "backend" in bad["error"].lower()


def test_compare_cli_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.csv"
    res = runner.invoke(cli.app, ["compare", "--models", "Standard", "--seq-lengths", "16", "--level", "op",
                                  "--hidden-dim", "16", "--num-heads", "2", "--repeats", "2", "--min-run-time", "0",
                                  "--warmup", "0", "--sdpa-backend", "math", "--output", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert df["sdpa_backend"].tolist() == ["math"] and df["warmup"].tolist() == [0]
    bad = runner.invoke(cli.app, ["compare", "--sdpa-backend", "tpu", "--output", str(tmp_path / "x.csv")])
    assert bad.exit_code == 2 and "tpu" in bad.output
    neg = runner.invoke(cli.app, ["compare", "--warmup", "-1", "--output", str(tmp_path / "y.csv")])
    assert neg.exit_code == 2 and "--warmup" in neg.output


def test_forms_takes_device_and_dtype(tmp_path):
    runner = CliRunner()
    out = tmp_path / "f.csv"
    res = runner.invoke(cli.app, ["forms", "--models", "Linear", "--seq-lengths", "16", "--modes", "forward",
                                  "--hidden-dim", "16", "--num-heads", "2", "--chunk-size", "8", "--repeats", "1",
                                  "--dtype", "bfloat16", "--output", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert set(df["dtype"]) == {"bfloat16"} and set(df["device"]) == {"cpu"} and set(df["status"]) == {"ok"}
    if not torch.cuda.is_available():
        res = runner.invoke(cli.app, ["forms", "--device", "cuda", "--output", str(tmp_path / "g.csv")])
        assert res.exit_code == 2 and "CUDA is not available" in res.output


def test_convert_speed_rows_take_device_and_dtype():
    from bsbr_extras.linear import LinearTransformerModel
    from evals.convert.comparison import SpeedTiming, speed_rows

    model = LinearTransformerModel(37, 16, 1, 2, 16)
    before = next(model.parameters()).dtype
    rows = speed_rows({"m": model}, [16], 37, SpeedTiming(repeats=1, min_run_time=0.0, dtype="bfloat16"))
    assert rows[0]["dtype"] == "bfloat16" and rows[0]["device"] == "cpu" and rows[0]["timer"] == "cpu_wall"
    assert next(model.parameters()).dtype == before, "the original model must not be cast"
