"""Issue 23: what a hostile new user tried, and the class around each case, on every command that
takes that kind of input. Each bad input is one line and exit 2 (an error row and exit 1 where a
measurement failed); nothing is overwritten, and no .lock, .tmp or half-run sidecar is left."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

import cli
from evals import machine
from evals import errors
from evals.compare import sweep as C
from evals import results as R
from evals.options import check_finite
from tests.evals.test_measure import register_toys

runner = CliRunner()
TOY = ["--models", "Toy", "--hidden-dim", "16", "--num-heads", "2", "--repeats", "1", "--min-run-time", "0",
       "--warmup", "0"]


@pytest.fixture(autouse=True)
def _toys(monkeypatch, request):
    if "forms" in request.node.name:  # forms lists every registered model's op forms; the toys have none
        return
    register_toys(monkeypatch)
    monkeypatch.setattr(C, "calibrate", lambda cases, **kw: {"cpu": 1.0})


def one_error_line(res) -> str:
    text = res.output.strip()
    assert res.exit_code == 2, res.output
    assert len(text.splitlines()) == 1 and text.startswith("error:") and "Traceback" not in text, res.output
    return text


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob("*") if p.suffix in (".lock", ".tmp"))


def compare(out, *args):
    return runner.invoke(cli.app, ["compare", *TOY, "--seq-lengths", "8", "16", *args, "--output", str(out)])


# ----------------------------------------------------------------------------- numbers (items 9, 11, the class)

@given(st.one_of(st.sampled_from(["inf", "-inf", "nan", "1e309", "-1e400", "abc", ""]),
                 st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not math.isfinite(f)),
                 st.integers(min_value=2**63)))
def test_check_finite_refuses_every_non_finite_or_overflowing_value(value):
    with pytest.raises(errors.ResultsError, match="^x must be"):
        check_finite("x", value, high=2**63 - 1, integer=isinstance(value, int))


@given(st.floats(min_value=-1e6, max_value=1e6), st.floats(min_value=-1e6, max_value=1e6))
def test_check_finite_accepts_exactly_the_range(value, low):
    inside = value >= low
    if inside:
        assert check_finite("x", str(value), low=low) == value
    else:
        with pytest.raises(errors.ResultsError, match=f"x must be a finite number >= "):
            check_finite("x", value, low=low)


BAD_NUMBERS = [
    ("compare", ["--seed", "99999999999999999999999"], "--seed must be an integer"),
    ("compare", ["--threads", "99999999999"], "--threads must be a positive integer"),
    ("compare", ["--min-run-time", "inf"], "--min-run-time must be a finite number"),
    ("compare", ["--min-run-time", "nan"], "--min-run-time must be a finite number"),
    ("compare", ["--batch-size", "99999999999"], "--batch-size must be a positive integer"),
    ("forms", ["--seed", "99999999999999999999999"], "--seed must be an integer"),
    ("forms", ["--threads", "99999999999"], "--threads must be a positive integer"),
    ("forms", ["--min-run-time", "1e309"], "--min-run-time must be a finite number"),
    ("recall", ["--seed", "99999999999999999999999"], "--seed must be an integer"),
    ("recall", ["--threads", "99999999999"], "--threads must be a positive integer"),
    ("recall", ["--lrs", "inf"], "--lrs must be a finite number > 0"),
    ("recall", ["--lrs", "nan"], "--lrs must be a finite number > 0"),
    ("recall", ["--target-acc", "nan"], "--target-acc must be a finite number"),
    ("recall", ["--max-steps", "99999999999"], "--max-steps must be a positive integer"),
    ("convert", ["--model-name", "gpt2", "--seq-len", "99999999999"], "--seq-len must be a positive integer"),
]


@pytest.mark.parametrize("command,args,says", BAD_NUMBERS, ids=[f"{c}{a[0]}={a[-1]}" for c, a, _ in BAD_NUMBERS])
def test_a_bad_number_is_one_line_before_any_lock(tmp_path, command, args, says):
    out = ["--output-dir", str(tmp_path / "o")] if command in ("recall", "convert") else \
        ["--output", str(tmp_path / "o" / "run.csv")]
    extra = ["--models", "Standard", "--max-steps", "1"] if command == "recall" else []
    t = time.monotonic()
    res = runner.invoke(cli.app, [command, *extra, *args, *out])
    assert says in one_error_line(res)
    assert time.monotonic() - t < 30
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no .lock, no sidecar, no CSV


# ----------------------------------------------------------------------------- compare --resume (items 5, 6, 8)

def _run(tmp_path) -> Path:
    out = tmp_path / "run.csv"
    assert compare(out).exit_code == 0
    return out


def _edit(path: Path, line: int, column: str, value: str) -> None:
    rows = list(csv.reader(path.open(newline="")))
    if column == "*torn*":
        rows[line - 1] = rows[line - 1][:5]
    else:
        rows[line - 1][rows[0].index(column)] = value
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


@pytest.mark.parametrize("column,value,says", [
    ("*torn*", "", "line 2: torn row: 5 of"),
    ("status", "banana", "line 2: unknown status 'banana'"),
    ("seq_len", "abc", "line 2: seq_len 'abc' is not a number"),
    ("seq_len", "1e400", "line 2: seq_len '1e400' is not a finite number"),
    ("seq_len", "16.5", "line 2: seq_len '16.5' is not an integer"),
    ("peak_memory_mb", "-5", "line 2: peak_memory_mb '-5' is out of range"),
    ("time_ms", "1e308", "line 2: time_ms '1e308' is out of range"),
])
def test_resume_refuses_a_row_it_cannot_keep_and_leaves_the_file(tmp_path, column, value, says):
    out = _run(tmp_path)
    _edit(out, 2, column, value)
    before = out.read_bytes(), out.with_suffix(".json").read_bytes()
    line = one_error_line(compare(out, "--resume"))
    assert says in line and "left untouched" in line
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before and leftovers(tmp_path) == []


def test_resume_with_other_measurement_settings_is_refused_naming_them(tmp_path):
    out = _run(tmp_path)
    before = out.read_bytes(), out.with_suffix(".json").read_bytes()
    line = one_error_line(runner.invoke(cli.app, ["compare", *TOY[:-4], "--repeats", "2", "--min-run-time", "0",
                                                  "--warmup", "0", "--seq-lengths", "8", "16", "--resume",
                                                  "--output", str(out)]))
    assert "other settings (repeats 1 -> 2)" in line
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before
    assert compare(out, "--resume").exit_code == 0  # the same settings resume


def test_an_older_results_file_is_named_as_such(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text(",".join(R.REQUIRED_COLUMNS) + ",samples_ms,seed\n")
    line = one_error_line(compare(old, "--resume"))
    assert "older or other version of bsbr-eval" in line and "start a new output" in line


def test_a_run_stopped_before_its_first_row_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run.csv"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "measure", interrupted)
    res = compare(out)
    assert res.exit_code == 130 and "--resume continues it" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_row_less_sidecar_of_a_killed_run_is_replaced_by_rerun_and_resume(tmp_path):
    for extra in ([], ["--resume"]):
        out = tmp_path / f"run{len(extra)}.csv"
        out.with_suffix(".json").write_text(json.dumps(dict(machine.environment(), run_id="x", settings={})))
        assert compare(out, *extra).exit_code == 0, extra
        assert len(R.read_rows(out)) == 2
    foreign = tmp_path / "foreign.csv"
    foreign.with_suffix(".json").write_text('{"mine": true}')
    assert "would be replaced" in one_error_line(compare(foreign))
    assert foreign.with_suffix(".json").read_text() == '{"mine": true}'


# ----------------------------------------------------------------------------- Ray: a bounded wait (item 2)

@pytest.mark.parametrize("command", ["compare", "recall"])
def test_an_unreachable_ray_address_fails_in_one_line_at_once(tmp_path, command):
    pytest.importorskip("ray")
    out = ["--output", str(tmp_path / "o.csv")] if command == "compare" else ["--output-dir", str(tmp_path / "o")]
    t = time.monotonic()
    res = runner.invoke(cli.app, [command, "--models", "Standard", "--executor", "ray", "--address", "127.0.0.1:1",
                                  *out])
    assert "127.0.0.1:1: cannot connect" in one_error_line(res)
    assert time.monotonic() - t < 30 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["nonsense", "host:0", "host:99999", ":80"])
def test_a_malformed_address_is_named(address):
    from evals.executors import probe_address

    with pytest.raises(ValueError, match="is not host:port"):
        probe_address(address)


# ----------------------------------------------------------------------------- analyze (items 12, 16)

def test_analyze_of_a_folder_says_folder(tmp_path):
    assert "is a directory, not a regular file; give a results CSV" in one_error_line(
        runner.invoke(cli.app, ["analyze", str(tmp_path)]))


def test_a_refused_analyze_output_dir_leaves_no_lock(tmp_path):
    out = _run(tmp_path / "r")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    line = one_error_line(runner.invoke(cli.app, ["analyze", str(out), "--output-dir", str(busy)]))
    assert "not an earlier analysis" in line and sorted(p.name for p in busy.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("column,value", [("peak_memory_mb", "-5"), ("seq_len", "16.5"), ("time_ms", "1e308")])
def test_analyze_leaves_out_an_implausible_value_with_why(column, value):
    row = {c: "" for c in R.COLUMNS} | dict(status="ok", seq_len="16", time_ms="1.0", model="BSBR")
    row[column] = value
    assert R.row_problem(row, R.NUMERIC_COLUMNS) is not None
    row[column] = {"peak_memory_mb": "5", "seq_len": "16", "time_ms": "2.5"}[column]
    assert R.row_problem(row, R.NUMERIC_COLUMNS) is None


# ----------------------------------------------------------------------------- recall (items 4, 11)

def test_a_diverged_training_is_an_error_row():
    from evals.recall.launch import diverged_as_error

    for loss in (float("nan"), float("inf"), "nan"):
        row = diverged_as_error(dict(status="ok", final_loss=loss, lr=1e9))
        assert row["status"] == "error" and "diverged" in row["error"]
    assert diverged_as_error(dict(status="ok", final_loss=0.5, lr=1e-3))["status"] == "ok"


def test_recall_resume_with_other_settings_is_refused(tmp_path):
    from evals.recall import launch
    from evals.recall.command import Options

    base = dict(models=("Standard",), seq_lengths=("12",), num_pairs=("2",), hidden_dims=("16",), sizes=("4",),
                vocab_size=17, max_steps=1, batch_size=8, lrs=("1e-3",), seeds=1, jobs=1, output_dir=tmp_path / "o")
    launch.recall_command(Options(**base))
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    for change, says in ((dict(vocab_size=33), "vocab_size 17 -> 33"), (dict(max_steps=2), "train.max_steps 1 -> 2")):
        with pytest.raises(errors.ResultsError, match=f"other settings .*{says}"):
            launch.recall_command(Options(**(base | change), resume=True))
        assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert "recall.lock" not in before


# ----------------------------------------------------------------------------- convert (item 10)

@pytest.mark.parametrize("make,says", [
    ("noweights", "holds config.json but no weights"),
    ("corrupt", "cannot load the weights in"),
    ("missing", "no such folder, and not a hub name"),
])
def test_convert_of_a_broken_local_model_is_one_line(tmp_path, make, says):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "m"
    if make != "missing":
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50,
                                bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    if make == "corrupt":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    assert says in one_error_line(runner.invoke(cli.app, ["convert", "--model-name", str(folder)]))


@pytest.mark.slow
def test_sigterm_stops_convert_like_ctrl_c_and_leaves_no_lock(tmp_path):
    # a scheduler's SIGTERM mid-run: one line, exit 143, the lock gone, nothing half-written or left behind
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "conv"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", "from cli import main; main()", "convert", "--experiment",
                             "--output-dir", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not list(tmp_path.glob("*.lock")):  # the lock (beside the folder) is held: the run is under way
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < 120, "convert never took its folder's lock"
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert lines[-1].startswith("interrupted: nothing was written"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no folder, no staging folder, no lock"
