"""The regression guard: it passes what is unchanged and fails what is not.

The comparison is tested on synthetic runs whose truth we set: every time sample is a
log-normal draw around a per-model ratio to the reference, so "unchanged but noisy", "5% slower"
and "1.5x slower" are known exactly. The CLI is driven through Typer's CliRunner.
"""

import io
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from evals.regress import (CHANGED, FASTER, MISSING, OK, REGRESSION, TRANSIENT, UNTESTABLE, _timed_once,
                           case_from_row, compare_runs, failures, format_samples, live_check, min_p_value,
                           measure_all, parse_samples, run_frame, steady_memory, time_verdict)
from evals.registry import MODEL_NAMES

LENGTHS = (128, 256)
MODES = ("forward", "train")
N_SAMPLES = 12


def synthetic_run(seed=0, *, slow=None, noise=0.05, machine=1.0, run_id="r"):
    """One run: a row per model x mode x length with raw samples and the reference next to it.

    ``slow``: {model: factor} multiplies that model's true time (not the reference's).
    ``machine``: multiplies every time *and* the reference (a uniformly slower machine).
    """
    slow = slow or {}
    rng = np.random.default_rng(seed)
    rows = []
    for i, model in enumerate(MODEL_NAMES):
        for mode in MODES:
            for n in LENGTHS:
                ratio = (1 + i) * (n / 128) * (3 if mode == "train" else 1)  # true time / reference
                ref = 0.5 * machine * float(np.exp(rng.normal(0, noise)))
                refs = ref * np.exp(rng.normal(0, noise / 4, N_SAMPLES))  # timed around each sample
                samples = ref * ratio * slow.get(model, 1.0) * np.exp(rng.normal(0, noise, N_SAMPLES))
                rows.append(dict(run_id=run_id, model=model, device="cpu", mode=mode, level="model",
                                 dtype="float32", batch_size=1, seq_len=n, hidden_dim=64, num_layers=2,
                                 num_heads=4, chunk_size=32, status="ok",
                                 time_ms=float(np.median(samples)), flops=1000 * (i + 1) * n,
                                 params=5000 + i, peak_memory_mb=0.25 * n / 128 + i,
                                 memory_method="cpu_profiler_trace_steady", error="",
                                 samples_ms=format_samples(samples), ref_samples_ms=format_samples(refs),
                                 ref_ms=ref))
    return pd.DataFrame(rows)


def verdicts(findings, metric_prefix="time"):
    t = findings[findings["metric"].str.startswith(metric_prefix)]
    return dict(zip(t["config"], t["verdict"]))


# ----------------------------------------------------------------------------- comparison


def test_identical_runs_pass():
    run = synthetic_run(0)
    f = compare_runs(run, run.copy())
    assert failures(f).empty
    assert set(f["verdict"]) == {OK}
    assert (f[f.metric == "time/ref"]["change"] == 0).all()


def test_independent_rerun_of_the_same_code_passes():
    # A different seed is a fresh, equally noisy measurement of unchanged code. 10% per-sample
    # noise is twice what the guard sees on a loaded 2-core box; medians still move by up to ~15%
    # here, and nothing may fail.
    moved = []
    for seed in range(1, 6):
        f = compare_runs(synthetic_run(0, noise=0.1), synthetic_run(seed, noise=0.1))
        assert failures(f).empty, failures(f)
        moved.append(f[f.metric == "time/ref"]["change"].abs().max())
    assert max(moved) > 0.08  # the noise was real


@pytest.mark.parametrize("column", ["flops", "params"])
def test_a_changed_exact_metric_fails(column):
    base = synthetic_run(0)
    cur = base.copy()
    cur.loc[(cur.model == "GAU") & (cur.seq_len == 256) & (cur["mode"] == "train"), column] += 1
    bad = failures(compare_runs(base, cur))
    assert list(bad["metric"]) == [column]
    assert list(bad["config"]) == ["GAU train n=256"]
    assert bad["verdict"].iloc[0] == CHANGED


def test_a_changed_steady_memory_fails_but_the_first_call_trace_only_shows():
    base = synthetic_run(0)
    cur = base.copy()
    cur.loc[cur.model == "Linear", "peak_memory_mb"] *= 1.01
    assert set(failures(compare_runs(base, cur))["model"]) == {"Linear"}
    base["memory_method"] = cur["memory_method"] = "cpu_profiler_trace"  # first call: shown only
    assert failures(compare_runs(base, cur)).empty


def test_a_1p5x_slowdown_of_one_model_fails_naming_that_model():
    f = compare_runs(synthetic_run(0), synthetic_run(1, slow={"BSBR": 1.5}))
    bad = failures(f)
    assert set(bad["model"]) == {"BSBR"}
    assert set(bad["verdict"]) == {REGRESSION}
    assert len(bad) == len(MODES) * len(LENGTHS)  # every BSBR configuration, nothing else
    assert bad["change"].between(0.3, 0.7).all()


def test_a_5pct_slowdown_passes():
    f = compare_runs(synthetic_run(0, noise=0.01), synthetic_run(1, slow={"BSBR": 1.05}, noise=0.01))
    assert failures(f).empty
    bsbr = f[(f.model == "BSBR") & f.metric.str.startswith("time")]
    assert bsbr["change"].between(0.02, 0.08).all()  # seen, measured, and let through


def test_the_threshold_option_moves_the_bar():
    base, cur = synthetic_run(0, noise=0.01), synthetic_run(1, slow={"DeltaNet": 1.15}, noise=0.01)
    assert failures(compare_runs(base, cur)).empty
    assert set(failures(compare_runs(base, cur, threshold=0.1))["model"]) == {"DeltaNet"}


def test_a_uniformly_slower_machine_cancels_out():
    # Everything, the reference included, 2x slower: no model changed relative to the machine.
    f = compare_runs(synthetic_run(0), synthetic_run(1, machine=2.0))
    assert failures(f).empty


def test_a_large_change_without_statistical_evidence_is_not_a_regression():
    # 2x the median on two-sample runs: 2 vs 2 samples can never reach p < 0.01.
    base, cur = synthetic_run(0), synthetic_run(1, slow={"Hopfield": 2.0})
    for df in (base, cur):
        df["samples_ms"] = [format_samples(parse_samples(s)[:2]) for s in df["samples_ms"]]
    f = compare_runs(base, cur)
    assert failures(f).empty
    assert set(verdicts(f).values()) == {UNTESTABLE}


def test_faster_is_reported_and_passes():
    f = compare_runs(synthetic_run(0), synthetic_run(1, slow={"Linear": 0.5}))
    assert failures(f).empty
    assert {v for c, v in verdicts(f).items() if c.startswith("Linear ")} == {FASTER}


def test_a_configuration_that_now_errors_fails():
    base = synthetic_run(0)
    cur = base.copy()
    cur.loc[(cur.model == "SlidingWindow") & (cur.seq_len == 128), ["status", "error"]] = ["error", "boom"]
    bad = failures(compare_runs(base, cur))
    assert set(bad["verdict"]) == {MISSING} and set(bad["model"]) == {"SlidingWindow"}
    assert len(bad) == len(MODES)


def test_standard_is_the_fallback_reference_for_stored_runs_without_ref_ms():
    # Standard was timed at another moment than each row, so the moment-to-moment noise of the
    # machine no longer cancels: keep it small here (this tests the mechanism, not robustness).
    base = synthetic_run(0, noise=0.02)
    cur = synthetic_run(1, slow={"BSBR": 1.5}, machine=1.7, noise=0.02)
    base, cur = base.drop(columns=["ref_ms", "ref_samples_ms"]), cur.drop(columns=["ref_ms", "ref_samples_ms"])
    f = compare_runs(base, cur)
    assert set(f[f.metric.str.startswith("time")]["metric"]) == {"time/Standard"}
    assert set(failures(f)["model"]) == {"BSBR"}


def test_one_reference_per_row_works_when_samples_are_not_paired():
    base, cur = synthetic_run(0), synthetic_run(1, slow={"GAU": 1.5}, machine=0.6)
    base, cur = base.drop(columns="ref_samples_ms"), cur.drop(columns="ref_samples_ms")
    f = compare_runs(base, cur)
    assert set(failures(f)["model"]) == {"GAU"}


def test_samples_round_trip_and_p_floor():
    x = np.array([1.0, 2.5, 3.25e-3])
    assert np.allclose(parse_samples(format_samples(x)), x)
    assert np.allclose(parse_samples("1 2.5;0.00325"), x)
    # the exact one-sided Mann-Whitney p of total separation is 1 / C(n+m, n)
    a, b = np.arange(5.0), np.arange(5.0) + 10
    _, p, verdict = time_verdict(a, b, threshold=0.25, alpha=0.01)
    assert p == pytest.approx(min_p_value(5, 5)) and verdict == REGRESSION


def test_bad_options_are_one_line_value_errors():
    run = synthetic_run(0)
    with pytest.raises(ValueError, match="threshold"):
        compare_runs(run, run, threshold=0)
    with pytest.raises(ValueError, match="lacks column"):
        compare_runs(run, run.drop(columns="flops"))


# ----------------------------------------------------------------------------- live mode logic


def _fake_measure(run: pd.DataFrame, slow_calls: dict):
    """A stand-in for ``measure_row``: serves rows of ``run``; the first ``slow_calls[model]``
    measurements of that model come back 2x slower (a transient, or a persistent regression)."""
    left = dict(slow_calls)
    calls = []

    def measure(row, run_id=""):
        calls.append(row["model"])
        out = run[(run.model == row["model"]) & (run["mode"] == row["mode"]) & (run.seq_len == row["seq_len"])]
        out = out.iloc[0].to_dict()
        if left.get(row["model"], 0) > 0:
            left[row["model"]] -= 1
            out["samples_ms"] = format_samples(2 * parse_samples(out["samples_ms"]))
        return out

    return measure, calls


def test_live_a_transient_slowdown_is_remeasured_and_passes():
    base, cur = synthetic_run(0), synthetic_run(1)
    measure, calls = _fake_measure(cur, {"GAU": 1})  # only GAU's first configuration is slow, once
    res = live_check(base, measure=measure)
    assert failures(res.findings).empty
    assert res.remeasured == ["GAU forward n=128"]
    assert len(calls) == len(base) + 1
    assert set(res.findings[res.findings.verdict == TRANSIENT]["config"]) == {"GAU forward n=128"}


def test_live_a_persistent_slowdown_fails_after_remeasuring():
    base, cur = synthetic_run(0), synthetic_run(1)
    measure, calls = _fake_measure(cur, {"DeltaNet": 99})
    res = live_check(base, measure=measure)
    bad = failures(res.findings)
    assert set(bad["model"]) == {"DeltaNet"} and set(bad["verdict"]) == {REGRESSION}
    assert len(res.remeasured) == len(MODES) * len(LENGTHS)
    assert calls.count("DeltaNet") == 2 * len(MODES) * len(LENGTHS)


def test_live_an_exact_change_is_not_remeasured():
    base = synthetic_run(0)
    cur = base.copy()
    cur.loc[cur.model == "BSBR", "flops"] *= 2
    measure, calls = _fake_measure(cur, {})
    res = live_check(base, measure=measure)
    assert set(failures(res.findings)["metric"]) == {"flops"}
    assert res.remeasured == [] and len(calls) == len(base)


def test_runqueue_wait_is_subtracted_from_each_sample(monkeypatch):
    # A fake counter that says every call waited exactly 2 ms for a CPU: what is left must be the
    # harness's own time minus 2 ms per timed call (the warm-up call's wait must not be counted).
    import evals.measure

    class FakeWait:
        ns = 0

        def __call__(self):
            FakeWait.ns += 1_000_000  # read twice per call -> +2 ms per call
            return FakeWait.ns

    seen = []
    real = evals.measure.time_fn

    def spy(fn, **kw):
        out = real(fn, **kw)
        seen.append(out[0])
        return out

    monkeypatch.setattr(evals.measure, "time_fn", spy)

    def work():
        FakeWait()()  # the second read, as if inside the call
        sum(range(20000))

    got = _timed_once(work, FakeWait(), device="cpu", threads=1)
    assert got == pytest.approx(seen[0] - 2.0, abs=1e-9)


def test_case_round_trips_through_a_row():
    from evals.grid import Case, expand_grid
    from evals.registry import ModelConfig

    for case in expand_grid(["BSBR", "Hopfield"], [64], modes=["forward", "decode"],
                            config=ModelConfig(hidden_dim=32, compression_factor=2, hopfield_beta=0.5)):
        row = pd.read_csv(io.StringIO(pd.DataFrame([case.fields()]).to_csv(index=False))).iloc[0]
        assert case_from_row(row) == case


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_steady_memory_is_reproducible(mode):
    # The exact-memory check is only sound if the trace gives the same bytes every time: build the
    # same case twice from scratch and trace each.
    from evals.grid import expand_grid
    from evals.measure import build_workload
    from evals.registry import ModelConfig

    (case,) = expand_grid(["Standard"], [64], modes=[mode], config=ModelConfig(
        vocab_size=64, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=64))
    a = steady_memory(build_workload(case), "cpu", 1)
    b = steady_memory(build_workload(case), "cpu", 1)
    assert a == b and a[1] == "cpu_profiler_trace_steady" and a[0] > 0


# ----------------------------------------------------------------------------- CLI


def _write(tmp_path, name, df):
    """A stored run and its sidecar, from this machine (stored times compare on one machine only)."""
    from evals.results import environment, write_sidecar

    path = tmp_path / name
    run_frame(df).to_csv(path, index=False)
    write_sidecar(path, environment())
    return path


def test_cli_exit_codes(tmp_path):
    from cli import app

    runner = CliRunner()
    base = _write(tmp_path, "base.csv", synthetic_run(0))
    same = _write(tmp_path, "same.csv", synthetic_run(1))
    slow = _write(tmp_path, "slow.csv", synthetic_run(1, slow={"BSBR": 1.5}))
    r = runner.invoke(app, ["regress", "--baseline", str(base), "--current", str(same)])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    r = runner.invoke(app, ["regress", "--baseline", str(base), "--current", str(slow)])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "BSBR" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("model,seq_len\nBSBR,12\n")
    for args, word in ((["--current", str(tmp_path / "nope.csv")], "does not exist"),
                       (["--current", str(same), "--threshold", "0"], "threshold"),
                       (["--current", str(same), "--alpha", "2"], "alpha"),
                       (["--current", str(bad)], "lacks column")):
        r = runner.invoke(app, ["regress", "--baseline", str(base), *args])
        assert r.exit_code == 2, (args, r.output)
        assert word in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["regress", "--baseline", str(tmp_path / "none.csv"), "--current", str(same)])
    assert r.exit_code == 2 and "--update" in r.output


def test_cli_update_rewrites_the_baseline(tmp_path):
    from cli import app

    runner = CliRunner()
    base = _write(tmp_path, "base.csv", synthetic_run(0))
    slow = _write(tmp_path, "slow.csv", synthetic_run(1, slow={"BSBR": 1.5}))
    assert runner.invoke(app, ["regress", "--baseline", str(base), "--current", str(slow)]).exit_code == 1
    r = runner.invoke(app, ["regress", "--baseline", str(base), "--current", str(slow), "--update"])
    assert r.exit_code == 0, r.output
    assert json.loads(base.with_suffix(".json").read_text())["source"] == str(slow)
    assert runner.invoke(app, ["regress", "--baseline", str(base), "--current", str(slow)]).exit_code == 0


def test_cli_update_refuses_a_run_with_failed_configurations(tmp_path):
    from cli import app

    broken = synthetic_run(1)
    broken.loc[broken.model == "Hopfield", ["status", "error"]] = ["error", "RuntimeError: boom"]
    base = _write(tmp_path, "base.csv", synthetic_run(0))
    before = base.read_text()
    r = CliRunner().invoke(app, ["regress", "--baseline", str(base), "--current",
                                 str(_write(tmp_path, "broken.csv", broken)), "--update"])
    assert r.exit_code == 1 and "Hopfield" in r.output and "not writing" in r.output
    assert base.read_text() == before


def test_live_end_to_end_catches_an_injected_slowdown_and_reproduces_exact_metrics(monkeypatch):
    # The real harness on two tiny configurations: measure a baseline, then check it with BSBR
    # made 3x slower by the harness's injection hook. Only the direction that cannot be noise is
    # asserted about time; the exact metrics must come out identical from a fresh measurement.
    from evals.grid import expand_grid
    from evals.registry import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=64, chunk_size=16)
    cases = expand_grid(["BSBR", "Standard"], [64], modes=["forward"], config=cfg)
    rows = pd.DataFrame([dict(c.fields(), threads=1) for c in cases])
    monkeypatch.setenv("BSBR_EVAL_INJECT_SLOWDOWN", "")
    base = measure_all(rows)
    assert (base["status"] == "ok").all(), base["error"].tolist()
    monkeypatch.setenv("BSBR_EVAL_INJECT_SLOWDOWN", "BSBR=3")
    res = live_check(base)
    f = res.findings
    assert not (f["verdict"] == CHANGED).any(), f[f.verdict == CHANGED]
    assert set(f[f.metric.isin(["flops", "params", "peak_memory_mb"])]["verdict"]) == {OK}
    bsbr = f[(f.model == "BSBR") & (f.metric == "time/ref")].iloc[0]
    assert bsbr["verdict"] == REGRESSION and bsbr["change"] > 1.0
