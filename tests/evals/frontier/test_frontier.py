"""`bsbr-eval frontier`: the Pareto rule, the joined table (nothing dropped), and the command end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from evals.frontier import recall as fr

# the settings a recall sidecar records, as much of them as a configuration is built from
SIDE = {"settings": dict(vocab_size=32, num_layers=2, num_heads=2, ff_mult=2, qk_dim=32)}


def _dominated(p, q) -> bool:
    """q dominates p: no slower, no less accurate, better in one."""
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 100), st.floats(0, 1)), min_size=1, max_size=12))
def test_pareto_keeps_exactly_the_undominated_points(pts):
    df = pd.DataFrame(pts, columns=["time", "acc"])
    front = fr.pareto(df)
    for i, p in enumerate(pts):
        dominated = any(_dominated(p, q) for j, q in enumerate(pts) if j != i)
        assert bool(front.iloc[i]) == (not dominated), (p, pts)
    assert front.any(), "a non-empty set always has a front"


def _summary(models=("Standard", "Linear"), status=("ok", "ok")):
    return pd.DataFrame([dict(model=m, seq_len=64, num_pairs=16, hidden_dim=32, size=8, lr=1e-3, seeds=3,
                              test_acc=0.9, test_acc_min=0.8, state_bytes=100.0, status=s)
                         for m, s in zip(models, status)])


def _timed(model, n, status="ok", ms=1.0):
    return dict(model=model, hidden_dim="32", chunk_size="8", seq_len=str(n), status=status,
                time_ms=str(ms) if status == "ok" else "", error="" if status == "ok" else "out of memory")


def _states(models, lengths, status="ok"):
    return pd.DataFrame([dict(model=m, hidden_dim=32, size=8, seq_len=n, state_bytes=10.0 * n, status=status,
                              error="") for m in models for n in lengths])


def test_the_table_keeps_every_configuration_and_names_what_failed():
    summary = _summary(("Standard", "Linear", "GAU"), ("ok", "ok", "error"))
    timed = [_timed("Standard", 64), _timed("Standard", 128, "oom"), _timed("Linear", 64, ms=0.5),
             _timed("Linear", 128, ms=0.5), _timed("GAU", 64), _timed("GAU", 128)]
    t = fr.frontier_table(summary, SIDE, pd.DataFrame(timed), _states(["Standard", "Linear", "GAU"], (64, 128)),
                          (64, 128)).set_index("model")
    assert list(t.index) == ["Standard", "Linear", "GAU"], "no configuration is dropped"
    assert t.loc["Standard", "status"] == "128:oom" and pd.isna(t.loc["Standard", "decode_ms_128"])
    assert t.loc["Standard", "decode_ms_64"] == 1.0 and t.loc["Standard", "error"] == "out of memory"
    assert t.loc["Linear", "status"] == "ok" and t.loc["Linear", "state_bytes_128"] == 1280.0
    assert t.loc["GAU", "status"] == "recall_error"


def test_a_missing_measurement_is_a_status_not_a_gap():
    t = fr.frontier_table(_summary(), SIDE, pd.DataFrame([_timed("Standard", 64)]),
                          _states(["Standard", "Linear"], (64,)), (64,))
    assert t.set_index("model").loc["Linear", "status"] == "64:missing"


# ----------------------------------------------------------------------------- the command


def _cli(*args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    """A real (tiny, untrained) recall run: two models, one width, two steps."""
    out = tmp_path_factory.mktemp("frontier") / "run"
    res = _cli("recall", "--preset", "quick", "--models", "Standard", "Linear", "--seq-lengths", "32",
               "--num-pairs", "4", "--hidden-dims", "32", "--max-steps", "2", "--lrs", "1e-3", "--seeds", "1",
               "--output-dir", str(out))
    assert (out / "recall.csv").is_file(), res.output
    return out


FAST = ("--lengths", "24", "40", "--repeats", "1", "--min-run-time", "0.001", "--decode-tokens", "2")


def test_frontier_end_to_end_then_resume_and_refusals(recall_run):
    res = _cli("frontier", str(recall_run), *FAST)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(recall_run / "frontier_table.csv")
    assert sorted(table["model"]) == ["Linear", "Standard"] and (table["status"] == "ok").all()
    for col in ("acc_mean", "acc_min", "state_bytes_24", "state_bytes_40", "decode_ms_24", "decode_ms_40"):
        assert table[col].notna().all(), col
    st_ = table.set_index("model")
    assert st_.loc["Standard", "state_bytes_40"] > st_.loc["Standard", "state_bytes_24"], "a KV cache grows"
    assert st_.loc["Linear", "state_bytes_40"] == st_.loc["Linear", "state_bytes_24"], "a fixed state does not"
    assert (recall_run / "frontier.md").read_text().count("| Standard |") == 1
    assert (recall_run / "frontier.png").is_file()
    rows = len(pd.read_csv(recall_run / "frontier.csv"))
    assert rows == 4  # 2 configurations x 2 lengths

    again = _cli("frontier", str(recall_run), *FAST)
    assert again.exit_code == 2 and "pass --resume" in again.output and "--output" not in again.output
    resumed = _cli("frontier", str(recall_run), *FAST, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len(pd.read_csv(recall_run / "frontier.csv")) == rows, "a finished run resumes to the same rows"
    other = _cli("frontier", str(recall_run), "--lengths", "24", "48", "--resume", *FAST[3:])
    assert other.exit_code == 2 and "other settings" in other.output and "lengths" in other.output
    assert json.loads((recall_run / "frontier.json").read_text())["settings"]["lengths"] == [24, 40]


@pytest.mark.parametrize("args, needle", [
    (["--lengths", "0"], "--lengths: '0' is not a positive integer"),
    (["--lengths", "x"], "--lengths: 'x' is not a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--decode-tokens", "-1"], "--decode-tokens must be a positive integer"),
])
def test_bad_flags_exit_2_with_one_line(recall_run, args, needle):
    res = _cli("frontier", str(recall_run), *args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


def test_a_recall_run_still_writing_is_refused(recall_run):
    from evals.locking import holding

    with holding(recall_run / "recall.lock"):  # as a running `bsbr-eval recall --resume` holds it
        res = _cli("frontier", str(recall_run), *FAST, "--resume")
    assert res.exit_code == 2 and "still writing" in res.output, res.output
    assert not (recall_run / "recall.lock").exists(), "the lock goes with its holder"


def test_a_folder_without_a_recall_run_is_refused(tmp_path):
    for target in (tmp_path / "missing", tmp_path):
        res = _cli("frontier", str(target))
        assert res.exit_code == 2 and "RUN_DIR" in res.output and len(res.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [], "a refused run writes nothing"
