"""MQAR recall benchmark: the generator's invariants, the training loop's ability to learn, the
sweep grid, and the CLI's handling of bad input."""

import math

import pytest
import torch

from evals.recall.data import FILLER, IGNORE, MQARConfig, Splits, make_mqar, query_accuracy
from evals.recall.sweep import PRESETS, RecallCase, recall_grid
from evals.recall.training import decoding_state_bytes, train_and_evaluate
from evals.train import TrainConfig, warmup_cosine
from evals.recall.training import evaluate
from evals.registry import MODEL_NAMES, REGISTRY, ModelConfig

CFG = MQARConfig(vocab_size=41, seq_len=48, num_pairs=6)


def pairs_of(x, P):
    """{key: value} of one sequence's key-value block, read from the tokens themselves."""
    return {int(x[2 * i]): int(x[2 * i + 1]) for i in range(P)}


# ----------------------------------------------------------------------------- generator


def test_labels_only_at_queries():
    x, y = make_mqar(CFG, 200, seed=0)
    P, Q = CFG.num_pairs, CFG.queries
    labelled = y != IGNORE
    assert labelled[:, : 2 * P].sum() == 0, "no label inside the key-value block"
    assert (labelled.sum(1) == Q).all(), "exactly Q labelled positions per sequence"
    # a position is labelled iff it holds a re-issued key; every other query-region token is filler
    region_x, region_l = x[:, 2 * P:], labelled[:, 2 * P:]
    assert ((region_x != FILLER) == region_l).all()


def test_each_answer_is_the_value_paired_earlier():
    x, y = make_mqar(CFG, 200, seed=1)
    P = CFG.num_pairs
    for xi, yi in zip(x, y):
        kv = pairs_of(xi, P)
        assert len(kv) == P, "keys within a sequence are distinct, so each query has one answer"
        pos = (yi != IGNORE).nonzero().flatten().tolist()
        assert pos and min(pos) >= 2 * P
        for t in pos:
            assert int(yi[t]) == kv[int(xi[t])]
        assert len({int(xi[t]) for t in pos}) == len(pos), "each query re-issues a different key"


def test_keys_and_values_from_disjoint_halves():
    x, y = make_mqar(CFG, 300, seed=2)
    P = CFG.num_pairs
    (k_lo, k_hi), (v_lo, v_hi) = CFG.key_range, CFG.value_range
    assert k_lo == FILLER + 1 and k_hi == v_lo and v_hi == CFG.vocab_size  # a partition of [1, V)
    keys, values = x[:, 0:2 * P:2], x[:, 1:2 * P:2]
    assert ((keys >= k_lo) & (keys < k_hi)).all()
    assert ((values >= v_lo) & (values < v_hi)).all()
    lab = y[y != IGNORE]
    assert ((lab >= v_lo) & (lab < v_hi)).all()
    # the draws use the whole of each half, not a fixed subset
    assert keys.unique().numel() == k_hi - k_lo and values.unique().numel() == v_hi - v_lo


def test_deterministic_by_seed():
    a = make_mqar(CFG, 64, seed=7)
    b = make_mqar(CFG, 64, seed=7)
    c = make_mqar(CFG, 64, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    s = Splits.make(CFG, 32, 16, 16, seed=0)
    assert not torch.equal(s.train[0][:16], s.test[0]), "train and test are independent draws"


@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_query_gaps_follow_the_power_law(power):
    # With one query per sequence the gap g (1 = right after the block) has P(g) ∝ g^-power exactly.
    cfg = MQARConfig(vocab_size=41, seq_len=20, num_pairs=6, num_queries=1, gap_power=power)
    x, y = make_mqar(cfg, 20000, seed=3)
    t = (y != IGNORE).float().argmax(1)          # the query position of each sequence
    gaps = t - 2 * cfg.num_pairs + 1              # 1 .. R
    R = cfg.seq_len - 2 * cfg.num_pairs
    expected = torch.arange(1, R + 1, dtype=torch.float64).pow(-power)
    expected /= expected.sum()
    observed = torch.bincount(gaps, minlength=R + 1)[1:].double() / gaps.numel()
    assert (observed - expected).abs().max() < 0.015, (observed, expected)


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=20, num_pairs=8), r"does not fit seq_len=20: need seq_len >= 2\*num_pairs \+ num_queries = 24"),
    (dict(vocab_size=16, num_pairs=8), r"vocab_size=16 is too small for num_pairs=8.*vocab_size >= 17"),
    (dict(num_pairs=4, num_queries=5), r"num_queries must be an integer in \[1, num_pairs=4\]"),
    (dict(seq_len=0), r"seq_len must be a positive integer"),
    (dict(gap_power=-1.0), r"gap_power must be a finite number >= 0"),
])
def test_bad_input_is_a_one_line_value_error(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        make_mqar(MQARConfig(**{**dict(vocab_size=64, seq_len=64, num_pairs=8), **kw}), 4, seed=0)
    assert "\n" not in str(e.value)


def test_query_accuracy_counts_only_labelled_positions():
    labels = torch.tensor([[IGNORE, 3, IGNORE, 1]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 4] = logits[0, 2, 4] = 1  # wrong at unlabelled positions: must not count
    logits[0, 1, 3] = 1                    # right
    logits[0, 3, 2] = 1                    # wrong
    assert query_accuracy(logits, labels) == (1, 2)


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


# ----------------------------------------------------------------------------- training


def test_standard_learns_a_trivial_recall_task():
    """The loop must be able to learn: softmax attention solves a tiny MQAR to high accuracy."""
    torch.set_num_threads(1)
    data = MQARConfig(vocab_size=17, seq_len=12, num_pairs=2)
    tr = TrainConfig(max_steps=400, batch_size=32, lr=3e-3, weight_decay=0.0, warmup_steps=20, num_train=2048,
                     num_val=128, num_test=512, eval_every=25, target_acc=0.98)
    splits = Splits.make(data, tr.num_train, tr.num_val, tr.num_test, seed=0)
    torch.manual_seed(0)
    model = REGISTRY["Standard"].build(ModelConfig(vocab_size=17, hidden_dim=32, num_layers=2, num_heads=2,
                                                   ff_dim=64))
    res = train_and_evaluate(model, splits, tr, seed=0)
    assert res.test_acc >= 0.95, res.history
    assert res.reached_target and res.steps < tr.max_steps, "early stop at the target"


def test_untrained_model_is_at_chance():
    # the complement of the test above: accuracy is not inflated by unlabelled positions
    data = MQARConfig(vocab_size=41, seq_len=32, num_pairs=6)
    splits = Splits.make(data, 8, 8, 256, seed=0)

    model = REGISTRY["Standard"].build(ModelConfig(vocab_size=41, hidden_dim=32, num_layers=1, num_heads=2,
                                                   ff_dim=32))
    assert evaluate(model, splits.test, 128, "cpu") < 0.2


# ----------------------------------------------------------------------------- sweep


def test_grid_axes_and_cross_product():
    p = PRESETS["quick"].with_(seq_lens=(16, 64), num_pairs=(4, 8), base_seq_len=64, base_num_pairs=8,
                               hidden_dims=(32, 64), sizes=(8, 16), base_hidden_dim=64, base_size=16)
    cases = recall_grid(["standard", "BSBR"], p)
    keys = [c.key() for c in cases]
    assert len(keys) == len(set(keys)) and {c.model for c in cases} == {"Standard", "BSBR"}
    configs = {c.config()[1:] for c in cases}
    # axes through the base point (64 tokens, 8 pairs, d=64, size 16); 16 tokens x 8 pairs does not fit
    assert configs == {(64, 8, 64, 16), (64, 4, 64, 16), (64, 8, 64, 8), (64, 8, 32, 16)}
    with pytest.raises(ValueError, match="seq_len=16 fits no requested pair count"):
        p.check()
    cross = {c.config()[1:] for c in recall_grid(["Standard"], p.with_(cross=True))}
    assert {(16, 4, 64, 16), (64, 4, 64, 16), (64, 8, 32, 8)} <= cross and (16, 8, 64, 16) not in cross
    # zoology's full grid: 3 task points that fit x 4 (d, size) points
    assert cross == {(n, P, D, sz) for n, P in [(16, 4), (64, 4), (64, 8)] for D in (32, 64) for sz in (8, 16)}
    p.with_(cross=True).check()  # every length and pair count takes part in some point


def test_state_size_is_measured_from_the_cache():
    cfg = ModelConfig(vocab_size=41, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=32, chunk_size=8,
                      window_size=8)
    x32, x64 = torch.randint(1, 41, (1, 32)), torch.randint(1, 41, (1, 64))
    std = REGISTRY["Standard"].build(cfg)
    # Standard keeps K and V of every token: the cache doubles with the length
    assert decoding_state_bytes(std, x64) == 2 * decoding_state_bytes(std, x32)
    lin = REGISTRY["Linear"].build(cfg)
    assert decoding_state_bytes(lin, x64) == decoding_state_bytes(lin, x32), "a fixed-size recurrent state"


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, ["recall", *args])


@pytest.mark.parametrize("args, needle", [
    (["--seq-lengths", "16", "--num-pairs", "8"], "num_pairs=8 with 8 queries does not fit seq_len=16: need seq_len >= 2*num_pairs + num_queries = 24"),
    (["--seq-lengths", "32", "--num-pairs", "4", "12"], "num_pairs=12 fits none of the sequence lengths it is paired with (32): it needs seq_len >= 36"),
    (["--seq-lengths", "32", "8", "--num-pairs", "4"], "seq_len=8 fits no requested pair count"),
    (["--vocab-size", "9", "--num-pairs", "8"], "vocab_size=9 is too small for num_pairs=8"),
    (["--models", "Transformer"], "--models: unknown model 'Transformer'; valid: BSBR, Standard"),
    (["--preset", "huge"], "--preset: unknown value 'huge'; valid: quick, cpu, cpu-v1024, zoology"),
    (["--quick", "--preset", "cpu"], "--quick conflicts with --preset cpu"),
    (["--lrs", "fast"], "--lrs must be a finite number > 0, got 'fast'"),
    (["--lrs", "0"], "--lrs must be a finite number > 0"),
    (["--seeds", "0"], "--seeds must be a positive integer"),
    (["--executor", "slurm"], "--executor: unknown value 'slurm'; valid: local, ray"),
    (["--address", "auto"], "--address only applies to --executor ray"),
    (["--shard", "3/2"], "shard must look like i/N"),
    (["--threads", "0"], "threads must be a positive integer"),
    (["--num-pairs", "0"], "--num-pairs: '0' is not a positive integer"),
    (["--hidden-dims", "63"], "hidden_dim (63) must be divisible by num_heads (2)"),
    (["--target-acc", "1.5"], "--target-acc must be a finite number > 0 and <= 1"),
    (["--compression-factor", "0"], "--compression-factor must be a positive integer"),
    (["--compression-factor", "3"], "--compression-factor must be a positive integer dividing every head size "
                                    "(d / heads = 32 at d = 64), got 3"),
])
def test_cli_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    # --max-steps 1 --models Standard: should a case slip through, it costs a second, not a sweep
    res = _cli("--max-steps", "1", "--models", "Standard", *args, "--output-dir", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists(), "bad input writes nothing"


def _finished(res) -> bool:
    """The run went to its end: exit 0, or exit 1 because Standard, the sanity anchor, did not learn
    in the few steps these tiny runs take (a BROKEN RUN fails the command, issue 23)."""
    return res.exit_code == 0 or (res.exit_code == 1 and "BROKEN RUN" in res.output)


def test_cli_tiny_run_writes_csv_sidecar_and_figures(tmp_path):
    import json

    import pandas as pd

    out = tmp_path / "run"
    res = _cli("--models", "Standard", "Linear", "--seq-lengths", "12,16", "--num-pairs", "2", "--hidden-dims", "16",
               "--sizes", "4", "8", "--vocab-size", "17", "--max-steps", "3", "--batch-size", "8", "--jobs", "1",
               "--output-dir", str(out))
    assert _finished(res), res.output
    df = pd.read_csv(out / "recall.csv")
    # (12,2), (16,2) at the base width/size + size 4 and 8 at the base task (one of them is the base)
    assert len(df) == 2 * 3 and set(df["status"]) == {"ok"}
    assert df["test_acc"].between(0, 1).all() and (df["steps"] == 3).all()
    side = json.loads((out / "recall.json").read_text())
    for k in ("torch_version", "cpu_model", "git_sha", "command", "utc_start", "utc_end", "settings"):
        assert k in side
    assert (out / "recall_vs_task.png").stat().st_size > 0 and (out / "recall_n12_P2_vs_state.png").stat().st_size > 0
    # --resume keeps the rows and trains nothing new
    res = _cli("--models", "Standard", "Linear", "--seq-lengths", "12,16", "--num-pairs", "2", "--hidden-dims", "16",
               "--sizes", "4", "8", "--vocab-size", "17", "--max-steps", "3", "--batch-size", "8", "--jobs", "1",
               "--output-dir", str(out), "--resume")
    assert _finished(res), res.output
    assert pd.read_csv(out / "recall.csv").equals(df)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_cuda_without_gpu_exits_2(tmp_path):
    res = _cli("--device", "cuda", "--max-steps", "1", "--models", "Standard", "--output-dir", str(tmp_path / "o"))
    assert res.exit_code == 2 and "CUDA is not available on this machine; valid: cpu" in res.output


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_query_logits_equal_the_full_forward_at_the_queries(name):
    """The loss's shortcut (LM head at the query positions only) computes model(x)[sel] exactly."""
    from evals.recall.training import query_logits

    torch.manual_seed(0)
    model = REGISTRY[name].build(ModelConfig(vocab_size=41, hidden_dim=32, num_layers=2, num_heads=2, ff_dim=32,
                                             chunk_size=8, window_size=8, qk_dim=16)).eval()
    x, y = make_mqar(CFG, 4, seed=0)
    sel = y != IGNORE
    with torch.no_grad():
        got, want = query_logits(model, x, sel), model(x)[sel]
    assert got.shape == (int(sel.sum()), 41)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert isinstance(model.lm_head, torch.nn.Linear), "the head is restored"


def test_compression_factor_reaches_every_bsbr_it_trains_and_the_others_still_build():
    from evals.recall import launch
    from evals.recall.command import Options
    from evals.recall.sweep import RecallCase
    from evals.registry import resolve_model

    p = launch.configure(Options(compression_factor=4))
    assert p.compression_factor == 4 and launch.configure(Options()).compression_factor is None
    for model in ("BSBR", "Linear"):
        cfg = p.model_config(RecallCase(model, 32, 4, 64, 8, 1e-3, 0))
        m = resolve_model(model).build(cfg)
        if model == "BSBR":  # every layer's compression map A is (heads, d_head, d_head / 4)
            assert {tuple(blk.mixer.compress.shape) for blk in m.layers} == {(2, 32, 8)}
