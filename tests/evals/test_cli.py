"""Issue 27: the holes a hostile new user found, closed by class. One output layer (paths, whole-file
writes, claims), one interrupt path, options checked up front. Every case is one line on stderr and
exit 2 (130 / 143 on an interrupt), no traceback, and no file the user did not ask for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
TINY_COMPARE = ["--models", "Standard", "--seq-lengths", "8", "--hidden-dim", "16", "--num-heads", "2",
                "--num-layers", "1", "--ff-dim", "16", "--vocab-size", "32", "--repeats", "1", "--min-run-time", "0",
                "--warmup", "0"]


def cli(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_line(res, code: int = 2) -> str:
    text = res.output.strip()
    assert res.exit_code == code, res.output
    assert len(text.splitlines()) == 1 and "Traceback" not in text, res.output
    return text


def run(*args, cwd=ROOT, env=None, **kw):
    """The command line as a user runs it: a fresh process through ``cli.main``."""
    return subprocess.Popen([sys.executable, "-c", "from cli import main; main()", *map(str, args)], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def lines(text: str) -> list:
    return [ln for ln in text.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- paths and files


LONG_TARGETS = [
    ("compare", "--output", "{}.csv"),
    ("analyze", "CSV", "{}.csv"),
    ("analyze", "--output-dir", "{}"),
    ("recall", "--output-dir", "{}"),
    ("lm", "--output-dir", "{}"),
    ("frontier", "RUN_DIR", "{}"),
    ("convert", "--output-dir", "{}"),
]


@pytest.mark.parametrize("command, where, shape", LONG_TARGETS, ids=lambda v: v if isinstance(v, str) else "")
def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, command, where, shape):
    long = tmp_path / shape.format("n" * 300)
    args = {"compare": ["compare", *TINY_COMPARE, "--output", long],
            "analyze": (["analyze", long] if where == "CSV" else
                        ["analyze", ROOT / "results/cpu_default/compare.csv", "--output-dir", long]),
            "recall": ["recall", "--output-dir", long], "lm": ["lm", "--output-dir", long],
            "frontier": ["frontier", long], "convert": ["convert", "--experiment", "--output-dir", long]}[command]
    line = one_line(cli(*args))
    assert "bytes long" in line and "at most" in line, line
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 600))
def test_any_name_length_is_written_or_refused_in_one_line(n):
    from evals.errors import ResultsError
    from evals.output.paths import _name_max, check_target

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x" * n + ".csv")
        if n + 4 <= _name_max(Path(tmp)):
            assert check_target(path, "--output", folder=False, suffix=".csv") == path
        else:
            with pytest.raises(ResultsError, match="bytes long"):
                check_target(path, "--output", folder=False, suffix=".csv")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_whole_file_outputs_take_the_umasks_mode(tmp_path, mask):
    from evals.output.files import write_text, write_sidecar

    old = os.umask(mask)
    try:
        write_text(tmp_path / "a.md", "x")
        write_sidecar(tmp_path / "b.csv", {"k": 1})
        res = cli("compare", *TINY_COMPARE, "--output", tmp_path / "c.csv")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for name in ("a.md", "b.json", "c.csv", "c.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize("target", ["/dev/full", "loop"])
def test_an_output_that_is_a_symbolic_link_is_refused_and_left_alone(tmp_path, target):
    link = tmp_path / "run.csv"
    link.symlink_to(tmp_path / "run.csv" if target == "loop" else target)
    line = one_line(cli("compare", *TINY_COMPARE, "--output", link))
    assert "symbolic link" in line and link.is_symlink()
    (tmp_path / "out").symlink_to("/dev/null")
    assert "symbolic link" in one_line(cli("recall", "--output-dir", tmp_path / "out"))


def test_an_input_that_is_a_device_says_so(tmp_path):
    line = one_line(cli("analyze", "/dev/null"))
    assert "/dev/null is a device, not a regular file" in line


def test_a_torn_run_csv_is_named_in_one_line(tmp_path):
    run_dir = tmp_path / "r"
    res = cli("lm", "--models", "Standard", "--max-steps", "2", "--output-dir", run_dir)
    assert res.exit_code == 0, res.output
    csv = run_dir / "lm.csv"
    csv.write_text(csv.read_text()[:-25])  # a machine died mid-write
    line = one_line(cli("frontier", run_dir, "--lengths", "16"))
    assert str(csv) in line and "torn" in line


def test_refused_input_leaves_no_folder_behind(tmp_path):
    os.chdir(tmp_path)
    try:
        for args in (["forms", "--hidden-dim", "0"], ["compare", "--seq-lengths", "0"], ["lm", "--preset", "nope"],
                     ["recall", "--preset", "nope"]):
            one_line(cli(*args))
    finally:
        os.chdir(ROOT)
    assert list(tmp_path.iterdir()) == [], "no results/ folder for a refused run"


def test_convert_without_an_output_dir_says_nothing_was_saved(monkeypatch):
    from evals.convert import run as conv

    monkeypatch.setattr(conv, "run_convert", lambda c, out: dict(agreement=[], speed=[]))
    res = cli("convert", "--experiment")
    assert res.exit_code == 0 and "nothing saved: pass --output-dir" in res.output, res.output


@pytest.mark.parametrize("args", [["models"], ["--help"], ["compare", "--help"]])
def test_standard_output_that_cannot_be_written_is_one_line(args):
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-c", "from cli import main; main()", *args], cwd=ROOT, stdout=full,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 2 and lines(p.stderr) == [lines(p.stderr)[0]], p.stderr
    assert "cannot write to standard output" in p.stderr


# ----------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_by_a_signal_says_what_it_kept_and_how_to_go_on(tmp_path, sig, code):
    out = tmp_path / "lm"
    p = run("lm", "--preset", "quick", "--max-steps", "400", "--models", "Standard", "--output-dir", out)
    t0 = time.time()
    while not (out / "lm.lock").exists():
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    last = lines(err)[-1]
    assert last.startswith("interrupted: ") and "--resume" in last and "Traceback" not in err, err
    assert not (out / "lm.lock").exists()


@pytest.mark.parametrize("delay", [0.1, 0.4, 1.0])
def test_ctrl_c_while_starting_up_is_one_line(delay, tmp_path):
    """From the command line's first line on (typer, the commands, torch still loading): one line,
    exit 130. Before that line Python itself is starting, and nothing of ours runs yet."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; print('up', file=sys.stderr, flush=True); "
                          "from cli import main; main()", "compare", "--models", "Standard", "--seq-lengths", "8",
                          "--output", str(tmp_path / "x.csv")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr.readline().strip() == "up"
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:  # it finished first: nothing to check at this delay
        return
    assert p.returncode == 130 and "Traceback" not in err, err
    assert lines(err)[-1].startswith("interrupted: "), err
    assert not (tmp_path / "x.csv").exists() or (tmp_path / "x.csv").stat().st_size


def test_an_analysis_stopped_part_way_leaves_nothing_and_a_rerun_works(tmp_path, monkeypatch):
    from evals.analyze import report

    real = report.write_analysis

    def half(an, out_dir, command=None):
        (Path(out_dir) / "fits.csv").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_analysis", half)
    out = tmp_path / "an"
    res = cli("analyze", ROOT / "results/cpu_default/compare.csv", "--output-dir", out)
    assert res.exit_code == 130 and "interrupted:" in res.output
    assert list(tmp_path.iterdir()) == [], "no half-written folder, no staging folder, no lock"
    monkeypatch.setattr(report, "write_analysis", real)
    res = cli("analyze", ROOT / "results/cpu_default/compare.csv", "--output-dir", out)
    assert res.exit_code == 0 and (out / "report.md").is_file(), res.output


# ----------------------------------------------------------------------------- data and resources


@settings(max_examples=6, deadline=None)
@given(change=st.sampled_from([("--hidden-dim", "32", "hidden_dim"), ("--num-heads", "4", "num_heads"),
                               ("--ff-dim", "32", "ff_dim"), ("--batch-size", "2", "batch_size"),
                               ("--dtype", "float64", "dtype"), ("--repeats", "2", "repeats")]))
def test_a_resume_that_changes_a_setting_is_refused_naming_it(tmp_path_factory, change):
    out = tmp_path_factory.mktemp("resume") / "r.csv"
    assert cli("compare", *TINY_COMPARE, "--output", out).exit_code == 0
    before = out.read_bytes(), out.with_suffix(".json").read_bytes()
    flag, value, name = change
    args = list(TINY_COMPARE)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    line = one_line(cli("compare", *args, "--output", out, "--resume"))
    assert "other settings" in line and name in line, line
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before


def test_more_jobs_than_cpus_on_the_local_executor_is_refused(tmp_path):
    line = one_line(cli("recall", "--jobs", "100000", "--output-dir", tmp_path / "r"))
    assert "--jobs 100000" in line and "this machine lets this process use" in line
    line = one_line(cli("lm", "--jobs", "100000", "--output-dir", tmp_path / "l"))
    assert "--executor ray" in line


def test_a_length_whose_cache_cannot_fit_memory_is_refused_with_the_estimate(tmp_path):
    run_dir = tmp_path / "r"
    res = cli("lm", "--models", "Standard", "--max-steps", "2", "--output-dir", run_dir)
    assert res.exit_code == 0, res.output
    t0 = time.time()
    line = one_line(cli("frontier", run_dir, "--lengths", "2147483647"))
    assert time.time() - t0 < 60 and "GB" in line and "the cache alone" in line and "memory available" in line
    assert not (run_dir / "frontier.csv").exists()


@settings(max_examples=40, deadline=None)
@given(value=st.sampled_from([2.0, 0.5, -1.0, float("nan"), float("inf"), 3.0, -0.0001]),
       pos=st.integers(0, 11), name=st.sampled_from(["BSBR", "Standard", "Linear", "DeltaNet", "SlidingWindow",
                                                     "Hopfield", "GAU"]))
def test_every_model_refuses_a_mask_that_is_not_zeros_and_ones(value, pos, name):
    import torch

    from evals.registry import REGISTRY
    from tests.conftest import TINY

    model = REGISTRY[name].build(TINY)
    mask = torch.ones(2, 12)
    mask[1, pos] = value
    with pytest.raises(ValueError, match="attention_mask must be bool or hold only 0/1 numbers"):
        model(torch.randint(0, TINY.vocab_size, (2, 12)), attention_mask=mask)


def test_a_compression_factor_that_does_not_divide_the_head_is_refused_up_front(tmp_path):
    line = one_line(cli("compare", "--models", "BSBR", "--compression-factor", "3", "--output", tmp_path / "x.csv"))
    assert "--compression-factor 3 must divide the head size" in line and not (tmp_path / "x.csv").exists()


def test_a_bad_sizing_policy_in_the_environment_is_one_line(tmp_path):
    line = one_line(cli("compare", *TINY_COMPARE, "--output", tmp_path / "x.csv", env={"BSBR_SIZING": "huge"}))
    assert "BSBR_SIZING" in line


# ----------------------------------------------------------------------------- messages


def test_resume_of_a_run_that_is_starting_says_in_use(tmp_path):
    from evals.locking import holding

    out = tmp_path / "r"
    out.mkdir()
    with holding(out / "recall.lock"):  # a run has claimed it and has no row yet
        line = one_line(cli("recall", "--output-dir", out, "--resume"))
    assert "is in use" in line


def test_a_corrupt_sidecar_is_a_warning_on_stderr(tmp_path):
    import shutil

    csv = tmp_path / "run.csv"
    shutil.copy(ROOT / "results/cpu_default/compare.csv", csv)
    csv.with_suffix(".json").write_text("{not json")
    p = subprocess.run([sys.executable, "-c", "from cli import main; main()", "analyze", str(csv)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stderr and "corrupt" in p.stderr and "warning:" not in p.stdout


def test_an_unknown_command_is_one_line():
    p = subprocess.run([sys.executable, "-c", "from cli import main; main()", "comapre"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert p.returncode == 2 and lines(p.stderr) == ["error: No such command 'comapre'. Did you mean 'compare'?"], \
        p.stderr


def test_one_row_is_one_row(tmp_path):
    res = cli("compare", *TINY_COMPARE, "--output", tmp_path / "one.csv")
    assert "wrote 1 row to" in res.output and "1 rows" not in res.output


def test_help_names_every_preset_and_no_placeholder():
    from evals.lm.sweep import PRESETS as LM
    from evals.recall.sweep import PRESETS as RECALL

    for command, presets in (("recall", RECALL), ("lm", LM)):
        text = " ".join(cli(command, "--help").output.split())
        assert all(p in text for p in presets), (command, [p for p in presets if p not in text])
    for command in ("frontier", "check", "compare", "analyze"):
        assert "{" not in cli(command, "--help").output


def test_analyze_says_which_csv_it_picked(tmp_path):
    import shutil

    (tmp_path / "results").mkdir()
    shutil.copy(ROOT / "results/cpu_default/compare.csv", tmp_path / "results" / "a.csv")
    p = subprocess.run([sys.executable, "-c", "from cli import main; main()", "analyze"], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "analyzing results/a.csv (the newest results CSV under results/)" in p.stderr


def test_help_loads_no_torch_matplotlib_pandas_or_scipy():
    code = ("import sys\nfrom cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'pandas', 'scipy') if m in sys.modules),"
            " file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert p.stderr.strip().splitlines()[-1] == "[]", p.stderr


def test_log_axes_are_labelled_at_a_sweeps_lengths_and_densely_on_a_narrow_range():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evals.figures import log_axes

    fig, ax = plt.subplots()
    ax.plot([128, 256, 512], [0.3, 1.2, 4.6])
    log_axes(ax, at=[128, 256, 512])
    fig.canvas.draw()
    xs = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    ys = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert xs == ["128", "256", "512"]
    assert {"0.5", "1", "2", "3"} <= set(ys), ys


def test_a_signal_during_a_deferred_block_is_raised_when_the_block_ends():
    # torch's import runs Python from C++: a KeyboardInterrupt raised there aborted the process
    # ("terminate called after throwing an instance of 'pybind11::error_already_set'"), so the
    # command line imports torch in a deferred block: the signal waits for the block's end.
    from evals import interrupts

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    reached = []
    try:
        with pytest.raises(interrupts.Interrupted) as stop:
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now (main thread, between bytecodes)
                reached.append("end of block")
        assert reached == ["end of block"] and stop.value.exit_code == 143
    finally:
        for s, h in old.items():
            signal.signal(s, h)
