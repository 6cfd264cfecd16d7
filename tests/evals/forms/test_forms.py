"""``bsbr-eval forms``: the registry's recurrent forms exist and equal the parallel ones; the command
writes whole rows, turns failures into rows and rejects bad input in one line."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

import cli
from evals.forms import forms as fm
from evals.results import FORMS_COLUMNS
from evals.registry import REGISTRY, MODEL_NAMES, ModelConfig
from tests.conftest import rel_err

runner = CliRunner()
SMALL = ModelConfig(hidden_dim=32, num_heads=4, chunk_size=8, num_layers=1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_forms_match_the_mixers(name):
    mixer = REGISTRY[name].build_mixer(SMALL)
    assert ("recurrent" in REGISTRY[name].forms) == hasattr(mixer, "op_recurrent")
    assert "parallel" in REGISTRY[name].forms


@pytest.mark.parametrize("name", fm.models_with_recurrence())
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_recurrent_form_equals_parallel_form(name, masked):
    torch.manual_seed(0)
    mixer = REGISTRY[name].build_mixer(SMALL)
    x = torch.randn(2, 29, SMALL.hidden_dim)  # 29: three chunks of 8 and a ragged tail
    mask = (torch.arange(29)[None] < torch.tensor([[29], [20]])) if masked else None
    inputs = mixer.op_inputs(x, mask)
    par, rec = mixer.op(*inputs, mask=mask), mixer.op_recurrent(*inputs, mask=mask)
    keep = mask[:, None, :, None] if masked else torch.ones(1, dtype=torch.bool)
    assert rel_err(par * keep, rec * keep) <= 1e-5


@pytest.mark.parametrize("name", fm.models_with_recurrence())
def test_recurrent_form_trains_to_the_same_gradients(name):
    # `forms --modes train` backpropagates through the recurrence: it must be differentiable and agree
    torch.manual_seed(1)
    mixer = REGISTRY[name].build_mixer(SMALL)
    with torch.no_grad():
        inputs = [t.clone() for t in mixer.op_inputs(torch.randn(1, 19, SMALL.hidden_dim))]
    grads = []
    for op in (mixer.op, mixer.op_recurrent):
        leaves = [t.clone().requires_grad_() for t in inputs]
        cot = torch.randn(op(*leaves).shape, generator=torch.Generator().manual_seed(2))
        grads.append(torch.autograd.grad((op(*leaves) * cot).sum(), leaves))
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-5


def test_the_recurrent_models_are_the_registry_order_default(tmp_path):
    assert fm.models_with_recurrence() == ("Linear", "DeltaNet")
    res, out = _invoke(tmp_path, "--seq-lengths", "16", "--modes", "forward")
    assert res.exit_code == 0, res.output
    assert [(r["model"], r["form"]) for r in csv.DictReader(out.open())] == [
        (m, f) for m in ("Linear", "DeltaNet") for f in ("parallel", "recurrent")]


def _invoke(tmp_path, *args):
    out = tmp_path / "f.csv"
    res = runner.invoke(cli.app, ["forms", "--hidden-dim", "32", "--num-heads", "4", "--chunk-size", "8",
                                  "--repeats", "2", "--output", str(out), *args])
    return res, out


def test_command_times_both_forms_and_reports_the_ratio(tmp_path):
    res, out = _invoke(tmp_path, "--models", "deltanet", "--seq-lengths", "16,40", "--modes", "forward", "train")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [(r["mode"], int(r["seq_len"]), r["form"]) for r in rows] == [
        (mode, n, form) for mode in ("forward", "train") for n in (16, 40) for form in ("parallel", "recurrent")]
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 and r["model"] == "DeltaNet" for r in rows)
    assert tuple(rows[0]) == FORMS_COLUMNS
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["settings"]["seq_lengths"] == [16, 40] and "ended_utc" in side
    ratios = fm.speedups(rows)
    assert len(ratios) == 4
    for s in ratios:
        assert s["speedup"] == pytest.approx(s["recurrent_ms"] / s["parallel_ms"])
    assert "faster" in res.output


def test_a_failing_configuration_is_a_row_not_a_crash(tmp_path, monkeypatch):
    real = fm.build

    def broken(model, form, *a, **kw):
        if form == "recurrent":
            raise RuntimeError("boom")
        return real(model, form, *a, **kw)
    monkeypatch.setattr(fm, "build", broken)
    res, out = _invoke(tmp_path, "--models", "DeltaNet", "--seq-lengths", "16", "--modes", "forward")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [(r["form"], r["status"]) for r in rows] == [("parallel", "ok"), ("recurrent", "error")]
    assert "RuntimeError: boom" in rows[1]["error"]


@pytest.mark.parametrize("args, says", [
    (["--models", "Standard"], "DeltaNet"),
    (["--models", "Bogus"], "DeltaNet"),
    (["--modes", "decode"], "forward, train"),
    (["--seq-lengths", "0"], "positive integer"),
    (["--hidden-dim", "30", "--num-heads", "4"], "divisible"),
    (["--repeats", "0"], "positive integer"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_bad_input_exits_2_with_one_line(tmp_path, args, says):
    res = runner.invoke(cli.app, ["forms", "--output", str(tmp_path / "x.csv"), *args])
    assert res.exit_code == 2
    text = res.output.strip()
    assert len(text.splitlines()) == 1 and says in text and "Traceback" not in text
    assert not (tmp_path / "x.csv").exists()


def test_refuses_to_overwrite_a_results_file(tmp_path):
    out = tmp_path / "x.csv"
    out.write_text("keep me\n")
    res = runner.invoke(cli.app, ["forms", "--output", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output
    assert out.read_text() == "keep me\n"


def test_options_reach_the_run(tmp_path, monkeypatch):
    seen = {}

    def record(plan, output, **kw):
        seen.update(models=list(plan.models), lengths=list(plan.seq_lengths), modes=list(plan.modes),
                    config=plan.config, batch_size=plan.batch_size, repeats=plan.repeats,
                    min_run_time=plan.min_run_time, threads=plan.threads, seed=plan.seed)
        return []
    monkeypatch.setattr(fm, "run", record)
    res = runner.invoke(cli.app, ["forms", "--models", "linear", "--seq-lengths", "32", "64", "--modes", "forward",
                                  "--hidden-dim", "48", "--num-heads", "3", "--chunk-size", "16", "--batch-size", "2",
                                  "--repeats", "4", "--min-run-time", "0.25", "--threads", "1", "--seed", "7",
                                  "--output", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert (seen["models"], seen["lengths"], seen["modes"]) == (["Linear"], [32, 64], ["forward"])
    cfg = seen["config"]
    assert (cfg.hidden_dim, cfg.num_heads, cfg.chunk_size) == (48, 3, 16)
    assert (seen["batch_size"], seen["repeats"], seen["min_run_time"], seen["threads"], seen["seed"]) == (2, 4, 0.25, 1, 7)
