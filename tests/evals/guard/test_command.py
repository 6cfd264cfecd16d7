"""The guard's baseline, its exact metrics, its harness pieces, and what it hands on (JSON,
Markdown, ``$GITHUB_STEP_SUMMARY``), on tiny real configurations and on findings we set."""

import io
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from evals.guard import baseline as bl
from evals.guard import report
from evals.guard import runner
from evals.guard.findings import AB_TIME_METRIC, ABResult, ab_findings, exact_checks
from evals.guard.rule import CHANGED, FASTER, OK, REGRESSION, paired_verdict, ratio_interval
from evals.guard.timing import case_from_row, steady_memory, timed_once


def tiny_rows():
    from evals.grid import GridSpec, expand_grid
    from evals.registry import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=64, chunk_size=16)
    cases = expand_grid(["BSBR", "Standard"], [64], modes=["forward"], spec=GridSpec(config=cfg))
    return pd.DataFrame([dict(c.fields(), threads=1) for c in cases])


@pytest.fixture(scope="module")
def measured():
    return bl.measure_baseline(tiny_rows())


# ----------------------------------------------------------------------------- exact metrics


@pytest.mark.parametrize("column", ["flops", "params", "peak_memory_mb"])
def test_a_changed_exact_metric_fails_to_the_unit(measured, column):
    row = measured.iloc[0]
    same = {c: row[c] for c in ("flops", "params", "peak_memory_mb", "memory_method")}
    assert {v for *_, v in exact_checks(row, same)} == {OK}
    got = dict(same, **{column: row[column] + 1})
    assert [m for m, *_, v in exact_checks(row, got) if v == CHANGED] == [column]


def test_regress_says_which_metrics_are_exact_and_which_are_only_shown(measured):
    from evals.guard.findings import exactness

    line = exactness(measured)
    assert "peak_memory_mb (cpu_alloc_trace_steady)" in line and "shown" not in line
    mixed = measured.copy()
    mixed.loc[mixed.index[0], "memory_method"] = "cpu_profiler_trace_steady"  # an older harness's
    assert "shown, never failing: peak_memory_mb (cpu_profiler_trace_steady)" in exactness(mixed)


def test_the_first_call_trace_is_shown_but_never_fails(measured):
    row = measured.iloc[0].copy()
    row["memory_method"] = "cpu_alloc_trace"
    got = dict(flops=row["flops"], params=row["params"], peak_memory_mb=row["peak_memory_mb"] * 2,
               memory_method="cpu_alloc_trace")
    assert {v for *_, v in exact_checks(row, got)} == {OK}


def test_case_round_trips_through_a_row():
    from evals.grid import GridSpec, expand_grid
    from evals.registry import ModelConfig

    cfg = ModelConfig(hidden_dim=32, compression_factor=2, hopfield_beta=0.5)
    for case in expand_grid(["BSBR", "Hopfield"], [64], modes=["forward", "decode"], spec=GridSpec(config=cfg)):
        row = pd.read_csv(io.StringIO(pd.DataFrame([case.fields()]).to_csv(index=False))).iloc[0]
        assert case_from_row(row) == case


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_steady_memory_is_reproducible(mode):
    from evals.grid import GridSpec, expand_grid
    from evals.registry import ModelConfig
    from evals.workload import build_workload

    (case,) = expand_grid(["Standard"], [64], modes=[mode], spec=GridSpec(config=ModelConfig(
        vocab_size=64, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=64)))
    a = steady_memory(build_workload(case), "cpu", 1)
    b = steady_memory(build_workload(case), "cpu", 1)
    assert a == b and a[1] == "cpu_alloc_trace_steady" and a[0] > 0


def test_runqueue_wait_is_subtracted_from_each_sample(monkeypatch):
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
        FakeWait()()
        sum(range(20000))

    assert timed_once(work, FakeWait(), device="cpu", threads=1) == pytest.approx(seen[0] - 2.0, abs=1e-9)


# ----------------------------------------------------------------------------- the rule's symmetry


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.5, 5.0), min_size=8, max_size=24), st.floats(0.3, 3.0),
       st.integers(0, 2 ** 31 - 1))
def test_swapping_the_sides_mirrors_the_verdict_and_the_interval(a, factor, seed):
    rng = np.random.default_rng(seed)
    a = np.asarray(a)
    b = a * factor * np.exp(rng.normal(0, 0.05, len(a)))
    change, p, verdict = paired_verdict(a, b, threshold=0.2, alpha=0.01)
    back, p_back, mirror = paired_verdict(b, a, threshold=0.2, alpha=0.01)
    assert {verdict, mirror} in ({OK}, {REGRESSION, FASTER}), (verdict, mirror)
    assert (1 + change) * (1 + back) == pytest.approx(1.0)
    lo, hi = ratio_interval(a, b)
    assert lo <= 1 + change <= hi
    lo_b, hi_b = ratio_interval(b, a)
    assert lo_b == pytest.approx(1 / hi) and hi_b == pytest.approx(1 / lo)


# ----------------------------------------------------------------------------- --update


def _invoke(*args, env=None):
    from cli import app

    return CliRunner().invoke(app, ["regress", *map(str, args)], env=env)


def test_update_writes_a_baseline_whose_exact_metrics_reproduce(tmp_path, measured):
    path = tmp_path / "base.csv"
    tiny_rows().to_csv(path, index=False)  # configurations only: no sidecar, so not yet a baseline
    assert _invoke("--baseline", path, "--update").exit_code == 2
    path.unlink()
    src = tmp_path / "src.csv"
    tiny_rows().to_csv(src, index=False)
    bl.write_baseline(path, tiny_rows().assign(status="ok", flops=0, params=0), start="t", source="test")
    r = _invoke("--baseline", path, "--update")
    assert r.exit_code == 0, r.output
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == "baseline" and meta["rows"] == 2 and "time" not in ",".join(pd.read_csv(path).columns)
    got = pd.read_csv(path)
    for col in ("flops", "params", "peak_memory_mb"):
        assert got[col].tolist() == pytest.approx(measured[col].tolist(), rel=1e-12)


def test_update_refuses_a_file_that_is_not_a_baseline_and_leaves_it_whole(tmp_path):
    # issue 23 item 3: a compare CSV was rewritten as a baseline, exit 0
    from evals.output.files import write_sidecar

    path = tmp_path / "compare.csv"
    tiny_rows().assign(status="ok", flops=1, params=1).to_csv(path, index=False)
    for meta in (dict(command="bsbr-eval compare --models BSBR"), dict(kind="compare")):
        write_sidecar(path, meta)
        before = (path.read_bytes(), path.with_suffix(".json").read_bytes())
        r = _invoke("--baseline", path, "--update")
        assert r.exit_code == 2 and "is not a guard baseline" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
        assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.csv", "compare.json"]


def test_the_committed_baseline_is_a_baseline():
    from evals.output.files import read_sidecar

    assert bl.sidecar_kind(read_sidecar(runner.WORKING_TREE / "results" / "baselines" / "cpu.csv")) == "baseline"


def test_update_refuses_a_configuration_that_does_not_measure(tmp_path, monkeypatch):
    path = tmp_path / "base.csv"
    bl.write_baseline(path, tiny_rows().assign(status="ok", flops=0, params=0), start="t", source="test")
    before = path.read_bytes()
    broken = lambda row: dict(row, status="error", error="RuntimeError: boom")  # noqa: E731
    monkeypatch.setattr(bl, "exact_row", broken)
    r = _invoke("--baseline", path, "--update")
    assert r.exit_code == 1 and "not writing" in r.output and path.read_bytes() == before


# ----------------------------------------------------------------------------- --json and the summaries


def fake_against(slow_rows=()):
    """``runner.against`` on findings we set: rows in ``slow_rows`` are 2x slower on B."""
    def against(ref, rows, plan, **_):
        kw = dict(rounds=plan.rounds, threshold=plan.threshold, alpha=plan.alpha, inject=plan.inject)
        built = {s: [dict(status="ok", error="") for _ in range(len(rows))] for s in "AB"}
        for i, r in enumerate(rows.itertuples()):
            built["B"][i].update(flops=r.flops, params=r.params)
        rng = np.random.default_rng(0)
        prs = {}
        for i in range(len(rows)):
            a = 2.0 * np.exp(rng.normal(0, 0.03, kw["rounds"]))
            prs[i] = (a, a * (2.0 if i in slow_rows else 1.0) * np.exp(rng.normal(0, 0.03, kw["rounds"])))
        f = ab_findings(rows, built, prs, threshold=kw["threshold"], alpha=kw["alpha"])
        return runner.Against(ABResult(f, prs, []), ref, "f" * 40, dict(sha="e" * 40, dirty=False), kw["inject"],
                              kw["rounds"], kw["threshold"], kw["alpha"])
    return against


@pytest.mark.parametrize("slow, code", [((), 0), ((1,), 1)])
def test_against_writes_the_json_and_both_summaries(tmp_path, monkeypatch, slow, code):
    base = tmp_path / "base.csv"
    rows = tiny_rows().assign(status="ok", flops=[10, 20], params=[1, 2])
    bl.write_baseline(base, rows, start="t", source="test")
    monkeypatch.setattr(runner, "against", fake_against(slow))
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    out, md = tmp_path / "out" / "v.json", tmp_path / "s.md"
    r = _invoke("--baseline", base, "--against", "good", "--rounds", "12", "--json", out, "--summary", md,
                env={"GITHUB_STEP_SUMMARY": str(step)})
    assert r.exit_code == code, r.output
    v = json.loads(out.read_text())
    assert v["exit_code"] == code and v["passed"] is (code == 0) and v["ref"] == "good"
    assert [c["config"] for c in v["configurations"]] == ["BSBR forward n=64", "Standard forward n=64"]
    for c, want in zip(v["configurations"], (0 in slow, 1 in slow)):
        assert set(c) >= {"ratio", "interval", "p", "verdict", "machine"}
        assert c["verdict"] == (REGRESSION if want else OK) and c["pairs"] == 12
        assert c["interval"][0] <= c["ratio"] <= c["interval"][1]
        assert (c["ratio"] > 1.8) is want and c["machine"] == v["machine"]["name"]
        assert (c["p"] is not None) is want  # p is only computed past the threshold
    text = step.read_text()
    assert text.startswith("earlier step\n") and ("PASS" if code == 0 else "FAIL") in text
    assert md.read_text().strip() == text[len("earlier step\n"):].strip()
    assert "| Standard forward n=64 |" in md.read_text()


def test_without_a_step_summary_nothing_else_is_written(tmp_path, monkeypatch):
    base = tmp_path / "base.csv"
    bl.write_baseline(base, tiny_rows().assign(status="ok", flops=1, params=1), start="t", source="test")
    monkeypatch.setattr(runner, "against", fake_against())
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _invoke("--baseline", base, "--against", "good", "--rounds", "8", env={"GITHUB_STEP_SUMMARY": ""})
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["ok", "slow", "changed", "missing", "a_error"]), min_size=1, max_size=6))
def test_the_json_has_a_verdict_for_every_configuration(kinds):
    rows = pd.DataFrame([dict(tiny_rows().iloc[0], seq_len=64 + k, status="ok", flops=5, params=3)
                         for k in range(len(kinds))])
    built = {s: [dict(status="ok", error="") for _ in kinds] for s in "AB"}
    prs = {}
    for i, kind in enumerate(kinds):
        built["B"][i].update(flops=6 if kind == "changed" else 5, params=3)
        if kind == "missing":
            built["B"][i] = dict(status="error", error="boom")
        if kind == "a_error":
            built["A"][i] = dict(status="error", error="old")
        a = np.linspace(1.0, 1.2, 10)
        prs[i] = (a, a * (2.0 if kind == "slow" else 1.0))
    f = ab_findings(rows, built, prs, threshold=0.2, alpha=0.01)
    rep = report.verdicts(f, rows, prs, env=dict(cpu_model="x", cpu_count=2, torch_version="t"), header={},
                          exit_code=0, summary="")
    json.dumps(rep, allow_nan=False)
    want = {"ok": "ok", "slow": "regression", "changed": "changed", "missing": "missing", "a_error": "new"}
    assert [c["verdict"] for c in rep["configurations"]] == [want[k] for k in kinds]
    assert all(set(c) >= {"ratio", "interval", "p", "verdict", "machine"} for c in rep["configurations"])
    assert AB_TIME_METRIC not in {ch["metric"] for c in rep["configurations"] for ch in c["checks"]}


def test_regress_is_still_the_guard():
    """The command was called ``regress``; the old name still runs it, hidden from --help."""
    from typer.testing import CliRunner

    from cli import app

    top = CliRunner().invoke(app, ["--help"]).output
    assert " guard " in top and " regress " not in top
    a, b = (CliRunner().invoke(app, [name, "--help"]).output for name in ("guard", "regress"))
    assert "Usage: root guard " in a and a.replace("Usage: root guard ", "Usage: root X ") == \
        b.replace("Usage: root regress ", "Usage: root X ")
