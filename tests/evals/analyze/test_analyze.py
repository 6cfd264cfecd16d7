"""``bsbr-eval analyze``: fits on synthetic laws with known exponents, ratios, I/O, plots, CLI.

The oracles are the laws the synthetic CSVs are generated from (t = a n, a n^2, a + b n^2, ...
with multiplicative log-normal noise), independent closed forms (OLS standard error, exact
speedup ratios, the crossover of two known curves) and the rows that went in (what is plotted).
"""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from evals import figures
from evals.analyze import analysis, plots, report
from evals.analyze.analysis import REQUIRED_COLUMNS, UNDERDETERMINED, AnalysisInputError, fit_one

LENGTHS = 2 ** np.arange(8, 17)          # 256 .. 65536: 9 lengths spanning 256x
NOISE = 0.05                             # 5% multiplicative noise

# name -> (law, exponent the slope must recover, which slope, class the fit must choose)
LAWS = {
    "a*n":       (lambda n: 2e-3 * n,                1.0, "slope",       "n"),
    "a*n^2":     (lambda n: 3e-7 * n * n,            2.0, "slope",       "n^2"),
    # the constant dominates the short lengths: only the upper half shows the exponent
    "a+b*n^2":   (lambda n: 1.0 + 6e-6 * n * n,      2.0, "upper_slope", "n^2"),
    "a*n*log n": (lambda n: 1e-4 * n * np.log(n),    None, None,         "n log n"),
    "const":     (lambda n: 5.0 + 0 * n,             0.0, "slope",       "1"),
}


def noisy(law, n, seed, noise=NOISE):
    rng = np.random.default_rng(seed)
    return law(n) * np.exp(rng.normal(0.0, noise, len(n)))


def rows(laws: dict, lengths=LENGTHS, seed=0, mode="forward", device="cpu", failures=(), noise=NOISE):
    """A compare-shaped DataFrame: one row per model and length; ``failures``: (model, n, status)."""
    out = []
    for i, (model, law) in enumerate(laws.items()):
        t = noisy(law, np.asarray(lengths, float), seed + i, noise)
        for n, ti in zip(lengths, t):
            status = next((s for m, L, s in failures if m == model and L == n), "ok")
            ok = status == "ok"
            # a failed row carries the time it took to fail: only its status keeps it out of fits and plots
            ti = ti if ok else 1e-3
            out.append(dict(run_id="synthetic", model=model, device=device, mode=mode, level="model",
                            dtype="float32", batch_size=1, seq_len=int(n), hidden_dim=64, num_layers=2,
                            num_heads=4, chunk_size=64, status=status, time_ms=ti,
                            time_ms_p20=ti * 0.95 if ok else np.nan, time_ms_p80=ti * 1.05 if ok else np.nan,
                            repeats=7, timer="cpu_wall", peak_memory_mb=2 * ti if ok else np.nan,
                            memory_method="profiler", flops=1e9 * ti if ok else np.nan,
                            params=100_000 + 1000 * i, error="" if ok else f"{status} at n={n}"))
    return pd.DataFrame(out, columns=list(REQUIRED_COLUMNS))


MODELS = {"Standard": lambda n: 1.0 + 6e-6 * n * n, "BSBR": lambda n: 5.0 + 2e-3 * n,
          "Linear": lambda n: 1.5e-3 * n}


def write_run(tmp_path, df, name="run", sidecar=True, gflops=40.0):
    p = tmp_path / f"{name}.csv"
    df.to_csv(p, index=False)
    if sidecar:
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"matmul_gflops": gflops, "torch": {"version": "2.13.0"}, "cpu_model": "SyntheticCPU 9000",
             "command": "bsbr-eval compare --seq-lengths 256,65536"}))
    return p


# ---- the fits ----

@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("law", [k for k, v in LAWS.items() if v[1] is not None])
def test_slope_recovers_exponent(law, seed):
    f, p, which, _ = LAWS[law]
    r = fit_one(LENGTHS, noisy(f, LENGTHS.astype(float), seed))
    assert abs(r[which] - p) <= 0.05, f"{law}: {which} {r[which]:.3f}, expected {p}"
    if which == "slope":
        assert r["slope_ci_low"] <= p <= r["slope_ci_high"], (law, r["slope_ci_low"], r["slope_ci_high"])


@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("law", list(LAWS))
def test_best_class(law, seed):
    f, _, _, cls = LAWS[law]
    r = fit_one(LENGTHS, noisy(f, LENGTHS.astype(float), seed))
    assert r["best_class"] == cls, f"{law}: chose {r['best_class']} (runner-up {r['runner_up']})"


def test_a_plus_bn2_is_bent_over_the_whole_range():
    # the whole-range slope is visibly below 2 here; that is what the upper-half slope is for
    r = fit_one(LENGTHS, LAWS["a+b*n^2"][0](LENGTHS.astype(float)))
    assert r["slope"] < 1.9 and abs(r["upper_slope"] - 2) < 0.05


def test_slope_ci_matches_the_ols_formula():
    n = LENGTHS.astype(float)
    y = noisy(LAWS["a*n"][0], n, seed=5, noise=0.2)
    x, ly = np.log(n), np.log(y)
    b = np.polyfit(x, ly, 1)
    resid = ly - np.polyval(b, x)
    se = np.sqrt(resid @ resid / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
    half = 2.364624251592785 * se          # t(0.975, df=7)
    r = fit_one(n, y)
    assert r["slope"] == pytest.approx(b[0], rel=1e-10)
    assert r["slope_ci_high"] - r["slope"] == pytest.approx(half, rel=1e-6)


def test_fitted_coefficients_reproduce_a_noise_free_law():
    n = LENGTHS.astype(float)
    r = fit_one(n, 1.0 + 6e-6 * n * n)
    assert r["coef_1"] == pytest.approx(1.0, rel=1e-6) and r["coef_n2"] == pytest.approx(6e-6, rel=1e-6)
    assert np.allclose(analysis.evaluate_class(r, n), 1.0 + 6e-6 * n * n, rtol=1e-6)


@pytest.mark.parametrize("lengths", [[256, 1024, 4096], [256, 320, 400, 512, 640, 800, 1024]],
                         ids=["3-lengths", "span-4x"])
def test_underdetermined(lengths):
    n = np.asarray(lengths, float)
    r = fit_one(n, noisy(LAWS["a*n^2"][0], n, 0))
    assert r["best_class"] == UNDERDETERMINED and str(len(lengths)) in r["note"]
    assert np.isfinite(r["slope"])         # the slope is still reported, with its (wide) interval


def test_complexity_fits_table_uses_only_ok_rows():
    df = rows(MODELS, failures=[("Standard", 65536, "oom"), ("Standard", 32768, "error")])
    fits = analysis.complexity_fits(df)
    assert {"model", "device", "mode", "level", "metric", "slope", "slope_ci_low", "slope_ci_high",
            "upper_slope", "best_class", "n_lengths"} <= set(fits.columns)
    assert len(fits) == 2 * len(MODELS)
    std = fits[(fits.model == "Standard") & (fits.metric == "time_ms")].iloc[0]
    assert std["n_lengths"] == len(LENGTHS) - 2 and std["max_len"] == 16384
    assert list(fits[fits.metric == "time_ms"].model) == ["BSBR", "Standard", "Linear"]  # registry order


# ---- relative figures ----

def test_speedup_memory_ratio_and_crossover_are_exact():
    df = rows(MODELS, noise=0.0)
    rel = analysis.relative_to_standard(df)
    n = rel["seq_len"].to_numpy(float)
    b = rel[rel.model == "BSBR"]
    nb = b["seq_len"].to_numpy(float)
    assert np.allclose(b["speedup"], MODELS["Standard"](nb) / MODELS["BSBR"](nb), rtol=1e-12)
    assert np.allclose(b["memory_ratio"], MODELS["BSBR"](nb) / MODELS["Standard"](nb), rtol=1e-12)
    assert np.allclose(rel.loc[rel.model == "Standard", "speedup"], 1.0) and len(n) == 3 * len(LENGTHS)

    cross = analysis.crossover(rel).set_index("model")
    # BSBR: 5 + 2e-3 n = 1 + 6e-6 n^2 at n ~ 1000, between the measured 512 and 1024
    true = (2e-3 + np.sqrt(4e-6 + 4 * 6e-6 * 4)) / (2 * 6e-6)
    assert cross.loc["BSBR", "verdict"] == "crosses" and cross.loc["BSBR", "first_faster_len"] == 1024
    assert 512 < cross.loc["BSBR", "crossover_len"] < 1024 and abs(np.log(cross.loc["BSBR", "crossover_len"] / true)) < 0.1
    assert cross.loc["Linear", "verdict"] == "faster throughout"


def test_crossover_when_never_faster():
    df = rows({"Standard": lambda n: 1e-3 * n, "Linear": lambda n: 2e-3 * n}, noise=0.0)
    cross = analysis.crossover(analysis.relative_to_standard(df))
    assert cross.iloc[0]["verdict"] == "never faster" and np.isnan(cross.iloc[0]["crossover_len"])


def test_no_standard_gives_empty_relative_tables():
    rel = analysis.relative_to_standard(rows({"BSBR": MODELS["BSBR"]}))
    assert rel.empty and analysis.crossover(rel).empty


# ---- loading ----

def test_flop_fraction_from_the_sidecar(tmp_path):
    df = rows(MODELS)
    ok = (df.status == "ok").to_numpy()
    a = analysis.flop_rate(analysis.load_results([write_run(tmp_path, df, "a", gflops=40.0)]))
    expect = df["flops"] / (df["time_ms"] * 1e-3) / 1e9
    assert np.allclose(a["achieved_gflops"], expect) and np.allclose(a["flop_fraction"], expect / 40.0)
    b = analysis.flop_rate(analysis.load_results([write_run(tmp_path, df, "b", sidecar=False)]))
    assert b["flop_fraction"].isna().all() and np.allclose(b["achieved_gflops"], expect)
    # compare's layout: one calibration per device; a device without one gets NaN
    two = pd.concat([df, df.assign(device="cuda:0")], ignore_index=True)
    p = write_run(tmp_path, two, "c", sidecar=False)
    (tmp_path / "c.json").write_text(json.dumps({"calibration_matmul_gflops": {"cpu": 20.0}}))
    c = analysis.flop_rate(analysis.load_results([p]))
    assert np.allclose(c.loc[c.device == "cpu", "flop_fraction"], expect / 20.0)
    assert c.loc[c.device == "cuda:0", "flop_fraction"].isna().all() and ok.all()


def test_shards_concatenate_to_the_whole_run(tmp_path):
    df = rows(MODELS)
    whole = analysis.complexity_fits(analysis.load_results([write_run(tmp_path, df, "whole")]))
    shards = [write_run(tmp_path, df.iloc[i::3], f"shard{i}") for i in range(3)]
    # a shard passed twice is read once: verbatim duplicate rows are dropped
    parts = analysis.complexity_fits(analysis.load_results(shards + shards[:1]))
    cols = ["slope", "upper_slope", "n_points"]
    pd.testing.assert_frame_equal(whole[cols], parts[cols])


@pytest.mark.parametrize("case", ["missing-file", "missing-column", "header-only", "empty-file", "bad-status"])
def test_bad_input_is_a_one_line_value_error(tmp_path, case):
    df = rows(MODELS)
    p = tmp_path / "x.csv"
    if case == "missing-column":
        df.drop(columns=["time_ms"]).to_csv(p, index=False)
    elif case == "header-only":
        df.iloc[:0].to_csv(p, index=False)
    elif case == "empty-file":
        p.write_text("")
    elif case == "bad-status":
        df.assign(status="crashed").to_csv(p, index=False)
    with pytest.raises(ValueError) as e:
        analysis.load_results([p])
    assert isinstance(e.value, AnalysisInputError) and "\n" not in str(e.value) and "x.csv" in str(e.value)
    if case == "missing-column":
        assert "time_ms" in str(e.value)


def test_newest_results_csv_skips_analysis_tables(tmp_path):
    import os
    (tmp_path / "sub").mkdir()
    old = write_run(tmp_path, rows(MODELS), "old", sidecar=False)
    new = write_run(tmp_path / "sub", rows(MODELS), "new", sidecar=False)
    fits = tmp_path / "fits.csv"
    fits.write_text("model,slope\nBSBR,1.0\n")          # the newest CSV, but not a results CSV
    for i, p in enumerate([old, new, fits]):           # explicit mtimes: no reliance on clock resolution
        os.utime(p, (1e9 + i, 1e9 + i))
    assert analysis.newest_results_csv(tmp_path) == new
    assert analysis.newest_results_csv(tmp_path / "nothing") is None


# ---- plots ----

def test_scaling_plot_draws_ok_points_and_marks_failures(tmp_path, monkeypatch):
    failures = [("Standard", 65536, "oom"), ("BSBR", 256, "error")]
    df = rows(MODELS, failures=failures)
    drawn = []
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: (drawn.append(fig), real_save(fig, path))[1])
    paths = plots.plot_scaling(df, analysis.complexity_fits(df), tmp_path)
    assert [p.name for p in paths] == ["time_ms_model.png", "peak_memory_mb_model.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    ax = drawn[0].axes[0]
    from matplotlib.collections import PathCollection     # the scatter points (error bars are LineCollections)
    pts = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    ok = df[df.status == "ok"]
    # exactly the ok measurements are plotted as values, nothing at 0 or NaN
    assert sorted(map(tuple, np.asarray(pts))) == sorted(zip(ok.seq_len.astype(float), ok.time_ms))
    marks = {(float(line.get_xdata()[0]), line.get_marker()) for line in ax.lines if line.get_marker() in ("X", "P")}
    assert marks == {(65536.0, "X"), (256.0, "P")}
    assert ax.get_xscale() == ax.get_yscale() == "log" and "tokens" in ax.get_xlabel() and "ms" in ax.get_ylabel()


def test_speedup_and_params_plots(tmp_path):
    df = rows(MODELS)
    paths = plots.plot_speedup(analysis.relative_to_standard(df), tmp_path) + plots.plot_params(df, tmp_path)
    assert [p.name for p in paths] == ["speedup_model.png", "memory_ratio_model.png", "params.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert plots.plot_speedup(analysis.relative_to_standard(rows({"BSBR": MODELS["BSBR"]})), tmp_path) == []


def test_palette_follows_the_registry():
    from evals.registry import MODEL_NAMES
    pal = figures.model_palette(["Linear", "BSBR"])
    assert list(pal)[:len(MODEL_NAMES)] == list(MODEL_NAMES) and len(set(pal.values())) == len(pal)


# ---- the report and the CLI ----

def run_cli(*args):
    from cli import app
    # Typer runs an app that has a single command without its name; with the suite's other
    # commands registered (the normal case) the name is required.
    name = ["analyze"] if len(app.registered_commands) > 1 else []
    return CliRunner().invoke(app, [*name, *map(str, args)])


def test_cli_writes_report_tables_and_figures(tmp_path):
    csv = write_run(tmp_path, rows(MODELS, failures=[("Standard", 65536, "oom")]))
    res = run_cli(csv)
    assert res.exit_code == 0, res.output
    out = tmp_path / "run_analysis"
    for name in ("report.md", "fits.csv", "relative.csv", "crossover.csv", "time_ms_model.png",
                 "peak_memory_mb_model.png", "speedup_model.png", "memory_ratio_model.png", "params.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "SyntheticCPU 9000" in md and "bsbr-eval compare --seq-lengths 256,65536" in md  # from the sidecar
    assert "| BSBR | cpu | forward | model |" in md and "oom" in md
    for link in [line.split("(")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]:
        assert (out / link).is_file(), link
    fits = pd.read_csv(out / "fits.csv")
    assert set(fits.best_class) <= set(analysis.CLASSES) | {UNDERDETERMINED}
    assert "Complexity fit" in res.output and "Standard" in res.output


def test_cli_default_is_the_newest_csv_under_results(tmp_path, monkeypatch):
    (tmp_path / "results" / "a").mkdir(parents=True)
    write_run(tmp_path / "results" / "a", rows(MODELS, lengths=[256, 512, 1024]), sidecar=False)
    monkeypatch.chdir(tmp_path)
    res = run_cli("--output-dir", "out")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "report.md").is_file()
    assert UNDERDETERMINED in pd.read_csv(tmp_path / "out" / "fits.csv").best_class.unique()


@pytest.mark.parametrize("case", ["missing-file", "missing-column", "empty-csv", "no-results"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    args = {"missing-file": ["nope.csv"], "missing-column": ["bad.csv"], "empty-csv": ["empty.csv"],
            "no-results": []}[case]
    rows(MODELS).drop(columns=["status"]).to_csv(tmp_path / "bad.csv", index=False)
    rows(MODELS).iloc[:0].to_csv(tmp_path / "empty.csv", index=False)
    res = run_cli(*args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output


def test_render_markdown_without_sidecar_says_so(tmp_path):
    an = analysis.analyze(analysis.load_results([write_run(tmp_path, rows(MODELS), sidecar=False)]))
    md = report.render_markdown(an, [], tmp_path)
    assert "No JSON sidecar" in md and "## Complexity fits: time" in md


def test_noisy_timings_are_flagged_in_the_fit():
    quiet = rows(MODELS)
    loud = quiet.assign(time_ms_p20=quiet.time_ms * 0.5, time_ms_p80=quiet.time_ms * 1.5)   # 100% spread
    f_quiet = analysis.complexity_fits(quiet).query("metric == 'time_ms'")
    f_loud = analysis.complexity_fits(loud).query("metric == 'time_ms'")
    assert np.allclose(f_quiet.p20_p80_spread, 0.10) and not f_quiet.note.str.contains("noisy").any()
    assert np.allclose(f_loud.p20_p80_spread, 1.0) and f_loud.note.str.contains("noisy").all()


def test_one_figure_per_level_and_fits_per_level(tmp_path):
    df = pd.concat([rows(MODELS), rows(MODELS, seed=9).assign(level="op")], ignore_index=True)
    fits = analysis.complexity_fits(df)
    assert len(fits) == 2 * 2 * len(MODELS) and set(fits.level) == {"model", "op"}
    names = [p.name for p in plots.plot_scaling(df, fits, tmp_path)]
    assert names == ["time_ms_model.png", "time_ms_op.png", "peak_memory_mb_model.png", "peak_memory_mb_op.png"]


def test_five_lengths_of_a_growing_time_are_not_called_constant():
    # The default sweep has 5 lengths. With the variance counted in K, AICc's small-sample term let
    # only the constant win there, even for times growing 25x over the range.
    n = np.array([64, 128, 256, 512, 1024], float)
    for seed in range(5):
        r = fit_one(n, noisy(lambda n: 0.5 + 0.013 * n, n, seed, noise=0.1))
        assert r["best_class"] in ("n", "n log n"), (seed, r["best_class"])


def test_crossover_on_par_is_not_a_crossing():
    # Hopfield with one update step is Standard: speedups 0.99 .. 1.01 must not be called a crossover
    df = rows({"Standard": lambda n: 1e-3 * n, "Hopfield": lambda n: 1e-3 * n * (1 + 0.01 * np.cos(n))}, noise=0.0)
    cross = analysis.crossover(analysis.relative_to_standard(df))
    assert cross.iloc[0]["verdict"].startswith("on par") and np.isnan(cross.iloc[0]["crossover_len"])


def test_an_immaterial_growth_term_does_not_name_the_class():
    # a flat per-token decode time with a 1% drift at the longest length (as measured for DeltaNet)
    n = np.array([1024, 2048, 4096, 8192, 16384], float)
    for seed in range(3):
        r = fit_one(n, noisy(lambda n: 0.344 + 1.6e-11 * n * n, n, seed, noise=0.002))
        assert r["best_class"] == "1", (seed, r["best_class"])


# ----------------------------------------------------------------------------- readable axes


def _visible_labels(fig, axis) -> list:
    """(text, window extent) of the tick labels drawn inside the axis' limits."""
    fig.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    return [(t.get_text(), t.get_window_extent()) for tick, t in zip(axis.get_major_ticks(), axis.get_ticklabels())
            if lo <= tick.get_loc() <= hi and t.get_text()]


def test_wide_length_range_tick_labels_do_not_collide(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig) or path)
    lengths = [64 * 2 ** i for i in range(11)]  # 64 .. 65536: three decades
    df = pd.DataFrame([dict(model=m, device="cpu", mode="forward", level="op", dtype="float32", batch_size=1,
                            hidden_dim=64, num_layers=1, num_heads=2, seq_len=n,
                            speedup=n / 1000 if m == "BSBR" else 1.0, memory_ratio=1.0)
                       for m in ("BSBR", "Standard") for n in lengths])
    plots.plot_speedup(df, tmp_path)
    labels = _visible_labels(figs[0], figs[0].axes[0].xaxis)
    assert len(labels) >= 3
    boxes = [b for _, b in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), [t for t, _ in labels]


def test_conversion_time_panel_has_numbered_y_ticks(tmp_path, monkeypatch):
    # forward times between 20 and 130 ms: less than a decade, which a bare log axis labels once
    from evals.convert import plots as convert_plots

    figs = []
    monkeypatch.setattr(convert_plots, "save", lambda fig, path: figs.append(fig) or path)
    agree = pd.DataFrame([dict(variant=v, chunk_size=c, finetuned=False, finetune_steps=0, ppl=12.0, kl=0.01,
                               top1_agreement=0.9) for v, c in (("original", ""), ("bsbr-c64", 64), ("bsbr-c32", 32))])
    speed = pd.DataFrame([dict(variant=v, seq_len=n, time_ms=t, time_ms_p20=t * 0.9, time_ms_p80=t * 1.1)
                          for v, f in (("original", 1.0), ("bsbr-c64", 1.3)) for n, t in ((64, 20 * f), (512, 100 * f))])
    convert_plots.plot_conversion(agree, speed, tmp_path)
    labels = [t for t, _ in _visible_labels(figs[0], figs[0].axes[2].yaxis)]
    assert len(labels) >= 3 and all(t.replace(".", "").isdigit() for t in labels), labels
