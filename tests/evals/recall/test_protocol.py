"""The recall protocol and its output folder: the learning-rate sweep keeps every raw row and
picks the rate on validation accuracy only; seeds run at that rate; the report's mean/std/min; a
broken Standard is flagged; a run is deterministic; the folder is locked, never replaced without
--resume, and --resume refuses what is not a recall run, leaving it byte-identical."""

import statistics

import pandas as pd
import pytest
import torch

from evals.executors import LocalExecutor
from evals.recall import launch, report
from evals.recall.sweep import PRESETS
from evals.recall.sweep import VOLATILE_COLUMNS, RecallCase, best_lr, run_case

TINY = PRESETS["quick"].with_(
    vocab_size=17, seq_lens=(12,), num_pairs=(2,), base_seq_len=12, base_num_pairs=2, hidden_dims=(16,), sizes=(4,),
    base_hidden_dim=16, base_size=4, lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2), jobs=1,
    train=PRESETS["quick"].train.with_(max_steps=3, batch_size=8, num_train=64, num_val=16, num_test=16,
                                       eval_every=2))

# a fake training: validation accuracy peaks at lr 3e-3 for every model, test accuracy depends on the
# seed, and Linear's test accuracy is deliberately *best* at 1e-2 (the rate must not be chosen on it)
VAL = {1e-3: 0.5, 3e-3: 0.9, 1e-2: 0.7}


def fake_run_case(case, preset, **kw):
    test = 0.3 + 0.1 * case.seed + (0.5 if case.model == "Linear" and case.lr == 1e-2 else 0.0)
    if case.model == "Standard":
        test = 0.5  # below report.BROKEN_BELOW: the run must be flagged
    return dict(task="mqar", model=case.model, status="ok", phase=case.phase, seq_len=case.seq_len,
                num_pairs=case.num_pairs, hidden_dim=case.hidden_dim, size=case.size, lr=case.lr, seed=case.seed,
                val_acc=VAL[case.lr], test_acc=test, steps=3, state_bytes=100, vocab_size=17, num_layers=2)


def test_protocol_tunes_on_validation_then_runs_the_seeds_at_the_best_rate(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "run_case", fake_run_case)
    rows = launch.run_recall(["Linear", "Standard"], TINY, tmp_path / "run", executor=LocalExecutor(1))
    df = pd.read_csv(tmp_path / "run" / "recall.csv")
    assert len(df) == len(rows) == 2 * (3 + 2)
    tune, seed = df[df["phase"] == "tune"], df[df["phase"] == "seed"]
    # every raw tune row is kept: each model at each rate, seed 0
    assert sorted(zip(tune["model"], tune["lr"], tune["seed"])) == sorted(
        (m, lr, 0) for m in ("Linear", "Standard") for lr in TINY.lrs)
    # the seeds run at the best *validation* rate, 3e-3, although Linear's test accuracy is best at 1e-2
    assert set(seed["lr"]) == {3e-3} and sorted(seed["seed"]) == [1, 1, 2, 2]
    s = report.summarize(df.to_dict("records")).set_index("model")
    lin = s.loc["Linear"]
    accs = [0.3, 0.4, 0.5]  # seeds 0, 1, 2 at 3e-3
    assert lin["lr"] == 3e-3 and lin["seeds"] == 3
    assert lin["test_acc"] == pytest.approx(statistics.mean(accs))
    assert lin["test_acc_std"] == pytest.approx(statistics.stdev(accs))
    assert lin["test_acc_min"] == pytest.approx(0.3)
    assert report.broken_configs(s.reset_index()) == ["n=12 P=2 d=16 size=4"]


def test_best_lr_ties_and_failures():
    rows = [dict(status="ok", val_acc=0.99, steps=400, lr=1e-3), dict(status="ok", val_acc=0.99, steps=200, lr=1e-2),
            dict(status="ok", val_acc=0.99, steps=200, lr=3e-3), dict(status="error", val_acc="", steps="", lr=0.1)]
    assert best_lr(rows) == 3e-3  # equal accuracy: fewer steps, then the smaller rate
    assert best_lr(rows[3:]) is None


def test_a_run_is_deterministic_and_the_seed_matters():
    case = RecallCase("GAU", 12, 2, 16, 4, 3e-3, 0)
    a, b = run_case(case, TINY), run_case(case, TINY)
    c = run_case(RecallCase("GAU", 12, 2, 16, 4, 3e-3, 1), TINY)
    assert a["status"] == "ok", a["error"]
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE_COLUMNS}  # noqa: E731
    assert strip(a) == strip(b)
    assert a["final_loss"] != c["final_loss"], "another seed, other initial weights"
    assert torch.get_num_threads() >= 1


# ----------------------------------------------------------------------------- the output folder

def _cli(*args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, ["recall", "--models", "Standard", "--seq-lengths", "12", "--num-pairs", "2",
                                    "--hidden-dims", "16", "--sizes", "4", "--vocab-size", "17", "--max-steps", "2",
                                    "--batch-size", "8", "--jobs", "1", "--lrs", "1e-3", "--seeds", "1", *args])


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _finished(res) -> bool:
    """The run went to its end: exit 0, or exit 1 because Standard, the sanity anchor, did not learn
    in the few steps these tiny runs take (a BROKEN RUN fails the command, issue 23)."""
    return res.exit_code == 0 or (res.exit_code == 1 and "BROKEN RUN" in res.output)


def _one_line(res):
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_existing_folder_is_never_replaced_without_resume(tmp_path):
    out = tmp_path / "run"
    assert _finished(_cli("--output-dir", str(out)))
    before = _snapshot(out)
    line = _one_line(_cli("--output-dir", str(out)))
    assert "already exists and is not empty; pass --resume" in line
    assert _snapshot(out) == before


def test_a_second_run_into_a_locked_folder_exits_2_naming_the_lock(tmp_path):
    from evals.locking import holding

    out = tmp_path / "run"
    assert _finished(_cli("--output-dir", str(out)))
    before = _snapshot(out)
    assert "recall.lock" not in before  # a finished run leaves no lock file
    with holding(out / "recall.lock"):  # another run holds it (and removes its lock file after)
        for extra in ([], ["--resume"]):
            line = _one_line(_cli("--output-dir", str(out), *extra))
            assert "is in use: another recall run holds" in line and str(out / "recall.lock") in line
    assert _snapshot(out) == before


@pytest.mark.parametrize("content", [b"a,b\n1,2\n", b"\x00\x01binary\xff", b""])
def test_resume_refuses_a_foreign_folder_and_leaves_it_byte_identical(tmp_path, content):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "recall.csv").write_bytes(content)   # named like ours, but not ours
    (foreign / "notes.txt").write_bytes(b"keep me")
    before = _snapshot(foreign)
    line = _one_line(_cli("--output-dir", str(foreign), "--resume"))
    assert "is not a bsbr-eval results file" in line
    assert _snapshot(foreign) == before, "not even a lock file is added"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_bytes(content)
    line = _one_line(_cli("--output-dir", str(other), "--resume"))
    assert "holds no recall.csv; it is not a recall run" in line and _snapshot(other) == {"data.csv": content}


def test_output_under_a_file_exits_2(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file" in _one_line(_cli("--output-dir", str(tmp_path / "f")))
    assert "is a file, so nothing can be written under it" in _one_line(_cli("--output-dir", str(tmp_path / "f" / "run")))


def test_shards_split_configurations_not_their_rates():
    from evals.recall.sweep import recall_grid, shard_configs

    p = TINY.with_(seq_lens=(12, 24), hidden_dims=(16, 32), cross=True)
    cases = recall_grid(["Standard", "GAU", "BSBR"], p)
    parts = [shard_configs(cases, i, 3) for i in (1, 2, 3)]
    assert sorted(c.key() for part in parts for c in part) == sorted(c.key() for c in cases), "a partition"
    groups = [{c.config() for c in part} for part in parts]
    assert all(g for g in groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    for part in parts:  # each configuration in a shard carries every rate
        for g in {c.config() for c in part}:
            assert sorted(c.lr for c in part if c.config() == g) == sorted(p.lrs)


@pytest.mark.parametrize("name", ["Standard", "GAU", "BSBR", "DeltaNet"])
def test_the_recipe_starts_every_model_with_unit_variance_logits(name):
    # the recipe's rule: unit-variance outputs for every map, the logits included. A tied N(0, 1)
    # embedding read by the final norm's unit-variance output gives logits of variance d (std 8
    # at d = 64, initial loss ~34 at vocabulary 1,024) unless the norm's gain starts at d^-1/2
    from evals.train import unit_variance_init
    from evals.registry import ModelConfig, resolve_model

    torch.manual_seed(0)
    d = 64
    model = resolve_model(name).build(ModelConfig(vocab_size=1024, hidden_dim=d, num_layers=2, num_heads=2,
                                                  ff_dim=2 * d, dropout=0.0, chunk_size=16, qk_dim=64))
    unit_variance_init(model)
    assert model.lm_head.weight is model.embed.weight and float(model.embed.weight.std()) == pytest.approx(1, abs=0.02)
    with torch.no_grad():
        logits = model(torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(1)))
    assert 0.5 < float(logits.std()) < 2.0
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 1024, (8 * 64,)))
    assert float(loss) < 2 * torch.log(torch.tensor(1024.0))  # near ln V, not ~34
