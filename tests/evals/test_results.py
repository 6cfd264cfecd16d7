"""The results layer through the commands: outputs are checked before any work, locked for the
whole run, never replaced or truncated without ``--resume``; write failures keep the rows and leave
no temporary file; untrustworthy input is refused (regress) or left out and listed (analyze).

Measuring runs use the tiny toy architectures of ``tests.evals.test_measure`` in-process; the one test
with two real processes uses a real model at a toy size.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import cli
from evals.output import claims
from evals.output import files
from evals import errors
from evals.compare import sweep as C
from evals import results as R
from tests.evals.test_measure import register_toys

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
TOY = ["--models", "Toy", "--hidden-dim", "16", "--num-heads", "2", "--repeats", "1", "--min-run-time", "0"]


@pytest.fixture(autouse=True)
def _toys(monkeypatch):
    register_toys(monkeypatch)
    monkeypatch.setattr(C, "calibrate", lambda cases, **kw: {"cpu": 1.0})


def one_error_line(res) -> str:
    text = res.output.strip()
    assert len(text.splitlines()) == 1 and text.startswith("error:") and "Traceback" not in text, res.output
    return text


def compare(out, *args):
    return runner.invoke(cli.app, ["compare", *TOY, "--seq-lengths", "8", *args, "--output", str(out)])


def tmp_files(folder: Path) -> list:
    return [p.name for p in folder.rglob("*.tmp")]


# ----------------------------------------------------------------------------- checked before any work


@pytest.mark.parametrize("command", [["compare", *TOY, "--seq-lengths", "8"], ["forms", "--seq-lengths", "8"]],
                         ids=["compare", "forms"])
def test_an_output_that_is_not_a_csv_is_refused(tmp_path, command):
    # run.json as the CSV would have its sidecar written over it: the data lost
    out = tmp_path / "run.json"
    res = runner.invoke(cli.app, [*command, "--output", str(out)])
    assert res.exit_code == 2 and ".csv" in one_error_line(res)
    assert list(tmp_path.iterdir()) == []


def test_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    res = compare(tmp_path / "notes.txt" / "sub" / "run.csv")
    assert res.exit_code == 2 and "notes.txt is a file" in one_error_line(res)
    res = runner.invoke(cli.app, ["analyze", str(ROOT / "results/cpu_default/compare.csv"),
                                  "--output-dir", str(tmp_path / "notes.txt")])
    assert res.exit_code == 2 and "is a file" in one_error_line(res)
    res = runner.invoke(cli.app, ["convert", "--experiment", "--output-dir", str(tmp_path / "notes.txt" / "x")])
    assert res.exit_code == 2 and "is a file" in one_error_line(res)
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_a_directory_where_the_csv_goes_is_refused(tmp_path):
    (tmp_path / "run.csv").mkdir()
    res = compare(tmp_path / "run.csv")
    assert res.exit_code == 2 and "is a directory" in one_error_line(res)


def test_an_unwritable_location_is_refused_before_any_work(tmp_path, monkeypatch):
    # We run as root, for whom chmod does not make a folder read-only; so the OS's refusal is
    # simulated where every write starts: os.open of anything inside the folder fails with EACCES.
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def refuse(path, *a, **kw):
        if str(path).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **kw)
    measured = []
    monkeypatch.setattr(C, "measure", lambda *a, **kw: measured.append(a) or {})
    monkeypatch.setattr(os, "open", refuse)
    res = compare(ro / "run.csv")
    monkeypatch.undo()
    assert res.exit_code == 2 and "Permission denied" in one_error_line(res) and str(ro) in res.output
    assert measured == [] and list(ro.iterdir()) == []


def test_an_existing_sidecar_is_never_replaced(tmp_path):
    (tmp_path / "run.json").write_text('{"mine": 1}\n')
    res = compare(tmp_path / "run.csv")
    assert res.exit_code == 2 and "run.json already exists" in one_error_line(res)
    assert (tmp_path / "run.json").read_text() == '{"mine": 1}\n' and not (tmp_path / "run.csv").exists()


# ----------------------------------------------------------------------------- --resume on a file that is not ours


@pytest.mark.parametrize("content", [b"my notes\nline two without newline", bytes(range(256)) * 4,
                                     b"run_id,model\n1,2\n"], ids=["text", "binary", "other_csv"])
def test_resume_on_a_foreign_file_refuses_and_leaves_it_byte_identical(tmp_path, content):
    out = tmp_path / "notes.csv"
    out.write_bytes(content)
    res = compare(out, "--resume")
    assert res.exit_code == 2 and "not a bsbr-eval results file" in one_error_line(res)
    assert out.read_bytes() == content and not out.with_suffix(".json").exists()


def test_resume_repairs_only_our_own_torn_last_line(tmp_path):
    out = tmp_path / "run.csv"
    assert compare(out).exit_code == 0
    good = out.read_bytes()
    out.write_bytes(good + good.splitlines(keepends=True)[1][:20])  # a row cut off by a crash
    res = compare(out, "--resume", "--seq-lengths", "8,16")
    assert res.exit_code == 0, res.output
    rows = R.read_rows(out)
    assert [int(r["seq_len"]) for r in rows] == [8, 16] and out.read_bytes().startswith(good)


# ----------------------------------------------------------------------------- one writer at a time


def test_a_second_writer_is_refused_naming_the_lock(tmp_path):
    out = tmp_path / "run.csv"
    with claims.locked(out):  # another run holds it
        res = compare(out)
    assert res.exit_code == 2 and "run.csv.lock" in one_error_line(res) and not out.exists()


def test_two_real_compare_processes_on_one_output(tmp_path):
    """Both start together; one gets the lock and measures, the other exits 2 naming the lock."""
    out = tmp_path / "run.csv"
    args = [sys.executable, "-m", "cli", "compare", "--models", "Linear", "GAU", "--seq-lengths", "16", "32",
            "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1", "--ff-dim", "16", "--vocab-size", "32",
            "--repeats", "1", "--min-run-time", "0.5", "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in done)
    assert codes == [0, 2], done
    loser = next(err for code, _, err in done if code == 2)
    assert "run.csv.lock" in loser and "being written by another run" in loser, loser
    rows = R.read_rows(out)
    keys = [R.case_key(r) for r in rows]
    assert len(rows) == 4 and len(set(keys)) == 4


# ----------------------------------------------------------------------------- failures mid-run


def test_disk_full_mid_run_keeps_the_rows_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "run.csv"
    real_write = os.write
    calls = []

    def full(fd, data):
        if b"Toy" in data:  # a row of the sweep
            calls.append(data)
            if len(calls) == 2:  # the second row: half of it lands, then the disk is full
                real_write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", full)
    res = compare(out, "--seq-lengths", "8,16,24")
    monkeypatch.undo()
    assert res.exit_code == 1, res.output
    assert "No space left on device" in res.output and "Traceback" not in res.output
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and out.read_bytes().endswith(b"\n")  # header + the first whole row
    assert R.read_rows(out)[0]["seq_len"] == "8"
    assert tmp_files(tmp_path) == []


def test_a_failed_whole_file_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def no_rename(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(errors.OutputError, match="Read-only file system"):
        files.write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- exit codes of a run


def test_a_sweep_in_which_nothing_succeeded_exits_1_with_the_first_error(tmp_path):
    res = runner.invoke(cli.app, ["compare", "--models", "ToyMissing", "--seq-lengths", "8", "16", "--repeats", "1",
                                  "--min-run-time", "0", "--output", str(tmp_path / "r.csv")], env={"COLUMNS": "250"})
    assert res.exit_code == 1
    assert "no configuration succeeded (2 of 2 not ok)" in res.output and "ModuleNotFoundError" in res.output
    assert len(R.read_rows(tmp_path / "r.csv")) == 2  # the error rows are kept


def test_a_mixed_sweep_exits_0_and_says_how_many_failed(tmp_path):
    res = runner.invoke(cli.app, ["compare", "--models", "Toy", "ToyMissing", "--seq-lengths", "8", "--repeats", "1",
                                  "--hidden-dim", "16", "--num-heads", "2", "--min-run-time", "0",
                                  "--output", str(tmp_path / "r.csv")], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "1 of 2 failed" in res.output, res.output


def test_outcome_counts_only_this_runs_rows():
    ok, err = {"status": "ok"}, {"status": "error", "model": "M", "seq_len": 8, "error": "boom"}
    assert R.outcome([]) == (0, "")
    assert R.outcome([ok, ok]) == (0, "")
    assert R.outcome([ok, err])[0] == 0 and "1 of 2 failed" in R.outcome([ok, err])[1]
    code, text = R.outcome([{"status": "skipped", "seq_len": 16}, err])
    assert code == 1 and "boom" in text


# ----------------------------------------------------------------------------- reading: regress refuses


BASELINE = ROOT / "results" / "baselines" / "cpu.csv"


def _baseline_copy(tmp_path, text: str, sidecar: dict | None = None) -> Path:
    p = tmp_path / "base.csv"
    p.write_text(text)
    meta = json.loads(BASELINE.with_suffix(".json").read_text())
    p.with_suffix(".json").write_text(json.dumps(dict(meta, **(sidecar or {}))))
    return p


def _regress(*args):
    return runner.invoke(cli.app, ["regress", *map(str, args)])


def test_a_torn_baseline_is_refused_never_passed(tmp_path):
    lines = BASELINE.read_text().splitlines(keepends=True)
    torn = _baseline_copy(tmp_path, "".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    res = _regress("--baseline", torn, "--against", "HEAD")  # refused before anything is measured
    assert res.exit_code == 2 and "torn row" in one_error_line(res) and "PASS" not in res.output


def test_a_baseline_cut_between_rows_is_refused_by_its_sidecar_count(tmp_path):
    lines = BASELINE.read_text().splitlines(keepends=True)
    cut = _baseline_copy(tmp_path, "".join(lines[:5]), sidecar={"rows": len(lines) - 1})
    res = _regress("--baseline", cut, "--against", "HEAD")
    assert res.exit_code == 2 and f"sidecar records {len(lines) - 1}" in one_error_line(res)


@pytest.mark.parametrize("edit, says", [
    (lambda df: df.assign(flops=df["flops"].astype(str).where(df.index != 2, "lots")), "flops 'lots' is not a number"),
    (lambda df: df.drop(columns="params"), "lacks column(s) params"),
    (lambda df: df.assign(status=df["status"].where(df.index != 0, "fine")), "unknown status 'fine'"),
], ids=["non_numeric", "missing_column", "bad_status"])
def test_a_baseline_that_cannot_be_trusted_is_refused(tmp_path, edit, says):
    base = tmp_path / "base.csv"
    edit(pd.read_csv(BASELINE)).to_csv(base, index=False)
    res = _regress("--baseline", base, "--against", "HEAD")
    assert res.exit_code == 2 and says in one_error_line(res), res.output


def test_update_refuses_a_file_that_is_not_a_baseline(tmp_path):
    compare_run = tmp_path / "compare.csv"
    compare_run.write_bytes((ROOT / "results" / "cpu_default" / "compare.csv").read_bytes())
    sidecar = ROOT / "results" / "cpu_default" / "compare.json"
    if sidecar.is_file():
        compare_run.with_suffix(".json").write_bytes(sidecar.read_bytes())
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    res = _regress("--baseline", compare_run, "--update")
    assert res.exit_code == 2 and "is not a guard baseline" in one_error_line(res)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before


def test_update_writes_the_baseline_whole_with_its_row_count(tmp_path):
    # two configurations of the committed baseline, re-measured: their exact metrics reproduce
    lines = BASELINE.read_text().splitlines(keepends=True)
    base = _baseline_copy(tmp_path, "".join(lines[:3]), sidecar={"rows": 2})
    res = _regress("--baseline", base, "--update")
    assert res.exit_code == 0, res.output
    meta = json.loads(base.with_suffix(".json").read_text())
    assert meta["rows"] == 2 and meta["kind"] == "baseline"
    new, old = pd.read_csv(base), pd.read_csv(BASELINE).head(2)
    assert new["flops"].tolist() == old["flops"].tolist() and new["params"].tolist() == old["params"].tolist()
    assert tmp_files(tmp_path) == []


# ----------------------------------------------------------------------------- reading: analyze lists what it left out


def _run_csv(tmp_path) -> Path:
    src = pd.read_csv(ROOT / "results" / "cpu_default" / "compare.csv")
    src = src[src["model"].isin(["Standard", "BSBR"])]
    p = tmp_path / "run.csv"
    text = src.to_csv(index=False)
    lines = text.splitlines(keepends=True)
    lines[3] = lines[3].replace(",ok,", ",ok,", 1)
    bad_time = lines[3].split(",")
    bad_time[R.REQUIRED_COLUMNS.index("time_ms")] = "fast"
    lines[3] = ",".join(bad_time)
    p.write_text("".join(lines) + lines[4][:30])  # and a torn last row
    return p


def test_analyze_lists_every_dropped_row_and_counts_only_used_ones(tmp_path):
    p = _run_csv(tmp_path)
    used = len(pd.read_csv(ROOT / "results" / "cpu_default" / "compare.csv").query("model in ['Standard', 'BSBR']")) - 1
    res = runner.invoke(cli.app, ["analyze", str(p), "--output-dir", str(tmp_path / "an")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "2 row(s) left out" in res.output and f"used {used} rows, left out 2" in res.output
    assert "time_ms 'fast' is not a number" in res.output and "torn row" in res.output
    md = (tmp_path / "an" / "report.md").read_text()
    assert "time_ms 'fast' is not a number" in md and "torn row" in md
    assert f"**rows**: {used} (" in md


def test_analyze_reports_a_corrupt_sidecar_as_corrupt(tmp_path):
    p = tmp_path / "run.csv"
    shutil.copy(ROOT / "results" / "cpu_default" / "compare.csv", p)
    p.with_suffix(".json").write_text('{"device_name": "x", ')
    res = runner.invoke(cli.app, ["analyze", str(p), "--output-dir", str(tmp_path / "an")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "is corrupt" in res.output
    md = (tmp_path / "an" / "report.md").read_text()
    assert "sidecar is corrupt" in md and "No JSON sidecar" not in md


def test_analyze_never_writes_into_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "fits.csv").write_text("my own\n")
    res = runner.invoke(cli.app, ["analyze", str(ROOT / "results/cpu_default/compare.csv"),
                                  "--output-dir", str(tmp_path / "mine")])
    assert res.exit_code == 2 and "not an earlier analysis" in one_error_line(res)
    assert (tmp_path / "mine" / "fits.csv").read_text() == "my own\n"


def test_case_key_is_one_identity_for_memory_and_csv_spellings():
    assert R.case_key({"seq_len": 8, "chunk_size": None}) == R.case_key({"seq_len": "8.0", "chunk_size": ""})
    assert R.case_key({"seq_len": float("nan")}) == R.case_key({"seq_len": ""})
    assert R.case_key({"seq_len": 8}) != R.case_key({"seq_len": 16})
