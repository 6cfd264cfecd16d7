"""The sweep, the results files and the ``compare`` / ``models`` commands.

Sweeps run on the toy architectures of ``tests.evals.test_measure`` (tiny, naive attention); CLI tests
that only check parsing replace the sweep by a recorder so they measure nothing.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

import cli
from evals.compare import sweep as C
from evals import results as R
from evals.grid import Case, GridSpec, expand_grid, parse_shard, shard
from evals.results import KEY_COLUMNS, case_key
from evals.registry import LEVELS, MODEL_NAMES, MODES, ModelConfig
from tests.evals.test_measure import TOY_CFG, register_toys

runner = CliRunner()

# The contract's required columns, in order (docs/evaluation.md, "The CSV"), written out independently.
CONTRACT = ("run_id model device mode level dtype batch_size seq_len hidden_dim num_layers num_heads chunk_size "
            "status time_ms time_ms_p20 time_ms_p80 repeats timer peak_memory_mb memory_method flops params "
            "error").split()
FAST = dict(how=C.Measurement(repeats=2, warmup=0, min_run_time=0.0), show_progress=False)


@pytest.fixture(autouse=True)
def _fast_calibration(monkeypatch):
    monkeypatch.setattr(C, "calibrate", lambda cases, **kw: {"cpu": 1.0})


def toy_cases(models=("Toy",), lengths=(8, 16, 24), modes=("forward",)):
    return expand_grid(list(models), lengths, ["cpu"], list(modes), spec=GridSpec(config=TOY_CFG, decode_tokens=2))


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ----------------------------------------------------------------------------- schema


def test_required_columns_first_in_contract_order(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    assert R.REQUIRED_COLUMNS == tuple(CONTRACT)
    out = tmp_path / "r.csv"
    C.run_sweep(toy_cases(lengths=(8,)), out, **FAST)
    header, row = read(out)
    assert header[: len(CONTRACT)] == CONTRACT
    for extra in ("samples_ms", "seed", "threads", "decode_tokens", "inject_factor", "ff_dim", "window_size",
                  "compression_factor", "chunk_overlap", "vocab_size"):
        assert extra in header
    rec = dict(zip(header, row))
    assert rec["status"] == "ok" and rec["timer"] == "cpu_wall" and rec["memory_method"] == "cpu_alloc_trace"
    assert len(rec["samples_ms"].split()) == int(rec["repeats"])


def test_sidecar_records_software_machine_code_and_run(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    out = tmp_path / "r.csv"
    C.run_sweep(toy_cases(lengths=(8,)), out, **FAST)
    info = json.loads(out.with_suffix(".json").read_text())
    for key in ("torch_version", "cuda_version", "device_name", "cpu_model", "torch_num_threads", "git_sha",
                "git_dirty", "command", "started_utc", "ended_utc", "calibration_matmul_gflops", "run_id"):
        assert key in info, key
    assert info["ended_utc"] >= info["started_utc"]
    assert info["run_id"] == read(out)[1][0]


def test_sidecar_records_allocator_and_thread_settings(monkeypatch, tmp_path):
    # glibc's mmap threshold alone moved BSBR's 32k-token op time by 25%: such settings must be on record
    register_toys(monkeypatch)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "17179869184")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # PyTorch's huge-page switch for large CPU tensors
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")
    out = tmp_path / "r.csv"
    C.run_sweep(toy_cases(lengths=(8,)), out, **FAST)
    env = json.loads(out.with_suffix(".json").read_text())["perf_env"]
    assert env["MALLOC_MMAP_THRESHOLD_"] == "17179869184" and env["OMP_NUM_THREADS"] == "2"
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "UNRELATED_VARIABLE" not in env


def test_rows_are_validated(tmp_path):
    with pytest.raises(ValueError, match="status"):
        R.append_row(tmp_path / "r.csv", {"status": "fine"})
    with pytest.raises(ValueError, match="unknown column"):
        R.append_row(tmp_path / "r.csv", {"status": "ok", "speed": 1})
    assert not (tmp_path / "r.csv").exists()


# ----------------------------------------------------------------------------- grid and shards


def test_grid_is_deterministic_and_lengths_ascend():
    a = expand_grid(MODEL_NAMES, [256, 64, 128], ["cpu"], ["forward", "decode"])
    assert a == expand_grid(MODEL_NAMES, [256, 64, 128], ["cpu"], ["forward", "decode"])
    assert len(a) == len(MODEL_NAMES) * 2 * 3
    assert [c.seq_len for c in a[:3]] == [64, 128, 256]
    assert len({case_key(c.fields()) for c in a}) == len(a)


@pytest.mark.parametrize("bad", ["0/3", "4/3", "1/0", "a/b", "2", "1/2/3", ""])
def test_malformed_shard_is_a_value_error(bad):
    with pytest.raises(ValueError, match="i/N"):
        parse_shard(bad)


def test_shards_cover_the_grid_exactly_once():
    grid = expand_grid(MODEL_NAMES, [64, 128, 256, 512, 1024], ["cpu", "cuda"], list(MODES))
    parts = [shard(grid, *parse_shard(f"{i}/3")) for i in (1, 2, 3)]
    keys = [case_key(c.fields()) for p in parts for c in p]
    assert sorted(keys) == sorted(case_key(c.fields()) for c in grid)
    assert len(set(keys)) == len(grid)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_cli_shards_concatenate_to_the_whole_grid(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    args = ["compare", "--models", "Toy", "--seq-lengths", "8", "16", "24", "32", "--modes", "forward,decode",
            "--level", "op", "--repeats", "2", "--min-run-time", "0", "--hidden-dim", "16", "--num-heads", "2"]
    whole = tmp_path / "whole.csv"
    assert runner.invoke(cli.app, args + ["--output", str(whole)]).exit_code == 0
    keys = []
    for i in (1, 2, 3):
        res = runner.invoke(cli.app, args + ["--shard", f"{i}/3", "--output", str(tmp_path / f"s{i}.csv")])
        assert res.exit_code == 0, res.output
        keys += [case_key(r) for r in R.read_rows(tmp_path / f"s{i}.csv")]
    assert len(keys) == 8 and sorted(keys) == sorted(case_key(r) for r in R.read_rows(whole))


# ----------------------------------------------------------------------------- resume


def test_resume_measures_only_the_missing_cases(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    out = tmp_path / "r.csv"
    cases = toy_cases(lengths=(8, 16, 24, 32))
    C.run_sweep(cases, out, **FAST)
    lines = out.read_text().splitlines(keepends=True)
    # an interrupted run: two complete rows, then a row torn mid-write
    out.write_text("".join(lines[:3]) + lines[3][:25])

    measured = []
    real = C.measure
    monkeypatch.setattr(C, "measure", lambda case, *a, **kw: measured.append(case.seq_len) or real(case, *a, **kw))
    with pytest.raises(ValueError, match="--resume"):
        C.run_sweep(cases, out, **FAST)
    rows = C.run_sweep(cases, out, resume=True, **FAST)
    assert measured == [24, 32]
    assert out.read_text().splitlines(keepends=True)[:3] == lines[:3]  # kept rows untouched
    keys = [case_key(r) for r in R.read_rows(out)]
    assert sorted(keys) == sorted(case_key(c.fields()) for c in cases) and len(rows) == 4
    assert len({r["run_id"] for r in R.read_rows(out)}) == 1  # one run, resumed
    assert len(json.loads(out.with_suffix(".json").read_text())["sessions"]) == 2

    measured.clear()
    C.run_sweep(cases, out, resume=True, **FAST)
    assert measured == []  # nothing left to do


def test_case_key_matches_after_a_csv_round_trip(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    cfg = TOY_CFG.with_(compression_factor=2, hopfield_beta=0.125)
    cases = expand_grid(["Toy"], [8], ["cpu"], ["decode"], spec=GridSpec(config=cfg, decode_tokens=3, seed=7))
    out = tmp_path / "r.csv"
    C.run_sweep(cases, out, **FAST)
    assert case_key(R.read_rows(out)[0]) == case_key(cases[0].fields())
    assert KEY_COLUMNS[:6] == ("model", "device", "mode", "level", "dtype", "batch_size")


# ----------------------------------------------------------------------------- failures


def test_oom_skips_longer_lengths_and_errors_do_not_stop_the_sweep(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    out = tmp_path / "r.csv"
    cases = toy_cases(models=("ToyOOM", "ToyBroken", "ToyMissing", "Toy"), lengths=(16, 32, 64, 128),
                      modes=("forward", "decode"))
    C.run_sweep(cases, out, **FAST)
    got = {(r["model"], r["mode"], int(r["seq_len"])): r for r in R.read_rows(out)}
    for mode in ("forward", "decode"):
        # ToyOOM fails above 32 keys; decode reaches 33 keys already at n = 32 (prefill + a step)
        first_oom = 64 if mode == "forward" else 32
        assert [got["ToyOOM", mode, n]["status"] for n in (16, 32, 64, 128)] == (
            ["ok", "ok", "oom", "skipped"] if mode == "forward" else ["ok", "oom", "skipped", "skipped"])
        assert f"n={first_oom}" in got["ToyOOM", mode, 128]["error"]
        assert {got["ToyBroken", mode, n]["status"] for n in (16, 32, 64, 128)} == {"error"}
        assert {got["Toy", mode, n]["status"] for n in (16, 32, 64, 128)} == {"ok"}
    assert "injected failure" in got["ToyBroken", "forward", 16]["error"]
    assert "ModuleNotFoundError" in got["ToyMissing", "forward", 16]["error"]


def test_oom_in_kept_rows_still_skips_on_resume(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    out = tmp_path / "r.csv"
    cases = toy_cases(models=("ToyOOM",), lengths=(16, 64, 128))
    C.run_sweep(cases[:2], out, **FAST)
    C.run_sweep(cases, out, resume=True, **FAST)
    assert [r["status"] for r in R.read_rows(out)] == ["ok", "oom", "skipped"]


def test_a_monkeypatched_oom_anywhere_in_measurement_is_an_oom_row(monkeypatch, tmp_path):
    register_toys(monkeypatch)

    def boom(*a, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    from evals import measure as M
    monkeypatch.setattr(M, "peak_memory", boom)
    rows = C.run_sweep(toy_cases(lengths=(8, 16)), tmp_path / "r.csv", **FAST)
    assert [r["status"] for r in rows] == ["oom", "skipped"]


# ----------------------------------------------------------------------------- CLI


class Recorder:
    """Stands in for run_sweep: records the cases the CLI built."""

    def __init__(self):
        self.cases, self.kwargs = None, None

    def __call__(self, cases, output, **kw):
        self.cases, self.output, self.kwargs = list(cases), output, kw
        return C.Rows()


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(C, "run_sweep", rec)
    return rec


def test_default_compare_is_the_embedded_grid(recorder, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli.app, ["compare"])
    assert res.exit_code == 0, res.output
    assert [c.model for c in recorder.cases[::5]] == list(MODEL_NAMES)
    assert {c.seq_len for c in recorder.cases} == {64, 128, 256, 512, 1024} and len(recorder.cases) == 35
    assert {(c.device, c.mode, c.level, c.dtype) for c in recorder.cases} == {("cpu", "forward", "model", "float32")}
    assert recorder.cases[0].config == ModelConfig()
    assert recorder.output.parent.name == "results" and recorder.output.name.startswith("compare_")


@pytest.mark.parametrize("form", [
    ["--models", "bsbr", "STANDARD", "--seq-lengths", "64", "128", "256", "--modes", "forward", "train"],
    ["--models", "bsbr,standard", "--seq-lengths", "64,128,256", "--modes", "forward,train"],
    ["--models=bsbr", "standard", "--seq-lengths", "64,128", "256", "--modes", "forward", "--modes", "train"],
], ids=["spaces", "commas", "mixed"])
def test_list_flags_accept_spaces_and_commas(recorder, form):
    res = runner.invoke(cli.app, ["compare", *form, "--output", "x.csv"])
    assert res.exit_code == 0, res.output
    assert [(c.model, c.mode, c.seq_len) for c in recorder.cases] == [
        (m, mode, n) for m in ("BSBR", "Standard") for mode in ("forward", "train") for n in (64, 128, 256)]


def test_options_reach_the_cases(recorder):
    res = runner.invoke(cli.app, ["compare", "--models", "GAU", "--seq-lengths", "32", "--level", "op",
                                  "--hidden-dim", "512", "--num-heads", "8", "--num-layers", "3", "--ff-dim", "64",
                                  "--vocab-size", "256", "--chunk-size", "128", "--window-size", "512", "--compression-factor", "4",
                                  "--batch-size", "2", "--dtype", "float64", "--decode-tokens", "5", "--seed", "3",
                                  "--threads", "1", "--repeats", "4", "--min-run-time", "0.5", "--output", "x.csv"])
    assert res.exit_code == 0, res.output
    (c,) = recorder.cases
    assert (c.level, c.batch_size, c.dtype, c.decode_tokens, c.seed) == ("op", 2, "float64", 5, 3)
    assert c.config == ModelConfig(hidden_dim=512, num_heads=8, num_layers=3, ff_dim=64, vocab_size=256, chunk_size=128,
                                   window_size=512, compression_factor=4)
    how = recorder.kwargs["how"]
    assert how.repeats == 4 and how.min_run_time == 0.5 and how.threads == 1


@pytest.mark.parametrize("args, says", [
    (["--models", "Bogus"], "BSBR, Standard"),
    (["--modes", "fwd"], "forward, train, decode"),
    (["--devices", "tpu"], "cpu, cuda"),
    (["--level", "block"], "--level: unknown value 'block'; valid: model, layer, op"),
    (["--dtype", "int8"], "--dtype: unknown value 'int8'; valid: float32, float64, float16, bfloat16"),
    (["--seq-lengths", "0"], "positive integer"),
    (["--seq-lengths", "64", "-8"], "positive integer"),
    (["--seq-lengths", "64,abc"], "positive integer"),
    (["--seq-lengths", "1.5"], "positive integer"),
    (["--shard", "4/3"], "i/N"),
    (["--shard", "x"], "i/N"),
    (["--hidden-dim", "30", "--num-heads", "4"], "divisible"),
    (["--batch-size", "0"], "positive integer"),
    (["--vocab-size", "0"], "positive integer"),
    (["--resume"], "--output"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_bad_input_exits_2_with_one_line(recorder, args, says):
    res = runner.invoke(cli.app, ["compare", *args])
    assert res.exit_code == 2
    text = res.output.strip()
    assert len(text.splitlines()) == 1 and says in text and "Traceback" not in text
    assert recorder.cases is None


def test_bad_inject_env_exits_2(recorder, monkeypatch):
    monkeypatch.setenv("BSBR_EVAL_INJECT_SLOWDOWN", "Standard=fast")
    res = runner.invoke(cli.app, ["compare", "--output", "x.csv"])
    assert res.exit_code == 2 and "MODEL=FACTOR" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_cuda_without_a_gpu(recorder):
    res = runner.invoke(cli.app, ["compare", "--devices", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli.app, ["compare", "--devices", "cpu", "cuda", "--models", "BSBR", "--output", "x.csv"])
    assert res.exit_code == 0 and {c.device for c in recorder.cases} == {"cpu", "cuda"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_cuda_rows_are_skipped_without_a_gpu(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    cases = expand_grid(["Toy"], [8], ["cpu", "cuda"], ["forward"], spec=GridSpec(config=TOY_CFG))
    rows = C.run_sweep(cases, tmp_path / "r.csv", **FAST)
    assert [(r["device"], r["status"]) for r in rows] == [("cpu", "ok"), ("cuda", "skipped")]
    assert "CUDA" in rows[1]["error"]


def test_existing_output_needs_resume(monkeypatch, tmp_path):
    register_toys(monkeypatch)
    out = tmp_path / "r.csv"
    args = ["compare", "--models", "Toy", "--seq-lengths", "8", "--repeats", "2", "--min-run-time", "0",
            "--hidden-dim", "16", "--num-heads", "2", "--output", str(out)]
    first = runner.invoke(cli.app, args)
    assert first.exit_code == 0, first.output
    assert "wrote 1 row to" in first.output and "Toy" in first.output
    again = runner.invoke(cli.app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    assert runner.invoke(cli.app, args + ["--resume"]).exit_code == 0
    assert len(R.read_rows(out)) == 1


def test_models_command_lists_the_registry():
    res = runner.invoke(cli.app, ["models"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for name in MODEL_NAMES:
        assert name in res.output
    assert "Vaswani" in res.output and "Katharopoulos" in res.output
    # piped (the runner is not a terminal): a Markdown table, one whole line per model, nothing cut
    rows = [line for line in res.output.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[2:]] == list(MODEL_NAMES)
    deltanet_row = next(r for r in rows if r.startswith("| DeltaNet |"))
    assert "recurrent" in deltanet_row and "Schlag" in deltanet_row  # the op forms column, whole


def test_levels_and_modes_come_from_the_registry():
    assert LEVELS == ("model", "layer", "op") and MODES == ("forward", "train", "decode")
    assert Case("BSBR", "cpu", "decode", "op", "float32", 1, 8, ModelConfig()).effective_decode_tokens == 1
