"""Executors: a tiny grid on a local Ray cluster gives the local executor's rows exactly; a SIGKILL
of a local or Ray sweep leaves no process it started alive, and --resume completes it without a
duplicate; SIGTERM stops a sweep cleanly with its rows kept."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from evals.executors import LocalExecutor, alive, descendants
from evals.recall import launch
from evals.recall.command import Options as RecallOptions
from evals.recall.sweep import PRESETS
from evals.recall.sweep import VOLATILE_COLUMNS, row_key

ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra")

TINY = PRESETS["quick"].with_(
    vocab_size=17, seq_lens=(12,), num_pairs=(2,), base_seq_len=12, base_num_pairs=2, hidden_dims=(16,), sizes=(4,),
    base_hidden_dim=16, base_size=4, lrs=(1e-3, 1e-2), seeds=(0, 1), jobs=1,
    train=PRESETS["quick"].train.with_(max_steps=4, batch_size=8, num_train=64, num_val=16, num_test=16,
                                       eval_every=2))
MODELS = ["Standard", "GAU", "BSBR"]


class _Shared:
    """One Ray cluster for the module (start-up takes seconds): run_recall's ``with executor`` is a
    no-op on it."""

    def __init__(self, ex):
        self.ex = ex

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def map_unordered(self, fn, items):
        return self.ex.map_unordered(fn, items)


@pytest.fixture(scope="module")
def ray_executor():
    from evals.executors import RayExecutor

    with RayExecutor(threads=1, num_cpus=2) as ex:
        yield _Shared(ex)


def _table(path):
    df = pd.read_csv(path).drop(columns=list(VOLATILE_COLUMNS))
    return df.sort_values(["model", "lr", "seed"]).reset_index(drop=True)


@pytest.mark.slow
def test_ray_rows_equal_the_local_executors(tmp_path, ray_executor):
    launch.run_recall(MODELS, TINY, tmp_path / "local", executor=LocalExecutor(1))
    launch.run_recall(MODELS, TINY, tmp_path / "ray", executor=ray_executor)
    local, remote = _table(tmp_path / "local" / "recall.csv"), _table(tmp_path / "ray" / "recall.csv")
    assert len(local) == len(MODELS) * (2 + 1) and set(local["status"]) == {"ok"}, local["error"].tolist()
    pd.testing.assert_frame_equal(local, remote)  # every column, every digit


# ----------------------------------------------------------------------------- killing a sweep

ARGS = ["--models", "Standard", "GAU", "--seq-lengths", "12", "--num-pairs", "2", "--hidden-dims", "16", "--sizes",
        "4", "--vocab-size", "17", "--max-steps", "40", "--batch-size", "8", "--lrs", "1e-3", "1e-2", "--seeds", "2"]
TOTAL = 2 * (2 + 1)


def _start(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen([sys.executable, "-c", "from cli import main; main()", "recall", *ARGS,
                             "--output-dir", str(out), *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _rows(out):
    p = out / "recall.csv"
    return pd.read_csv(p) if p.exists() and p.stat().st_size else pd.DataFrame()


def _wait_for_a_row(proc, out, timeout=240):
    t = time.time()
    while len(_rows(out)) == 0:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t < timeout, "no row written in time"
        time.sleep(0.2)


def _all_dead(tree, timeout=20):
    t = time.time()
    while time.time() - t < timeout:
        left = [p for p, s in tree.items() if alive(p, s)]
        if not left:
            return []
        time.sleep(0.25)
    return [open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ")[:80] for p in left]


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigkill_leaves_no_worker_alive_and_resume_completes(tmp_path, executor):
    out = tmp_path / executor
    proc = _start(out, "--executor", executor, "--jobs", "2")
    _wait_for_a_row(proc, out)
    tree = descendants(proc.pid)
    assert tree, "the sweep runs in worker processes"
    proc.kill()
    proc.wait()
    assert _all_dead(tree) == []
    done = len(_rows(out))
    assert 1 <= done < TOTAL
    # the CLI's --resume, in this process (a second interpreter start-up costs more than the runs)
    preset = launch.configure(RecallOptions(seq_lengths=("12",), num_pairs=("2",), hidden_dims=("16",), sizes=("4",),
                                            vocab_size=17, max_steps=40, batch_size=8, lrs=("1e-3", "1e-2"), seeds=2,
                                            jobs=1))
    launch.run_recall(["Standard", "GAU"], preset, out, executor=LocalExecutor(1), resume=True)
    df = _rows(out)
    keys = [row_key(r) for r in df.to_dict("records")]
    assert len(keys) == len(set(keys)) == TOTAL, "completed, no duplicate"


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_rows_kept(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "--jobs", "2")
    _wait_for_a_row(proc, out)
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "interrupted: every finished run is in" in err.decode(), err.decode()
    assert _all_dead(tree) == []
    df = _rows(out)
    assert len(df) >= 1 and set(df["status"]) == {"ok"}
    assert len({row_key(r) for r in df.to_dict("records")}) == len(df)
