"""Byte-level language modelling (``bsbr-eval lm``): the pinned corpus and its split, the windows
and their positions, bits per byte with padding left out, matched models, and the command's
resume, refusals and files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from evals.lm import corpus as cp
from evals.lm.data import check_context, eval_windows, position_buckets, train_batches
from evals.lm.sweep import PRESETS, LMCase, matched_config
from evals.lm.training import LN2, Evaluation, evaluate, lm_loss, parse_positions
from evals.registry import MODEL_NAMES

DOCS = cp.load_documents()


# ----------------------------------------------------------------------------- the corpus


def test_the_corpus_is_the_pinned_bytes_and_says_so_when_it_is_not(tmp_path):
    assert cp.sha256_of(cp.CORPUS_FILE) == cp.SHA256
    bad = tmp_path / "pydoc311.jsonl.xz"
    data = bytearray(cp.CORPUS_FILE.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(cp.CorpusError, match="fails its checksum"):
        cp.check_corpus(bad)


def test_the_split_puts_every_document_on_exactly_one_side():
    parts = cp.split_documents(DOCS)
    names = {s: {d.name for d in docs} for s, docs in parts.items()}
    assert sum(len(v) for v in names.values()) == len(DOCS) == len({d.name for d in DOCS})
    for a in cp.SPLITS:
        for b in cp.SPLITS:
            assert a == b or not names[a] & names[b], f"a document is in both {a} and {b}"
    # no text crosses either: a held-out document's opening bytes are in no training document
    train_text = b"\x00".join(d.data for d in parts["train"])
    for d in parts["test"] + parts["val"]:
        assert d.data[:200] not in train_text, d.name
    assert all(len(parts[s]) >= 10 for s in cp.SPLITS)


@settings(max_examples=30, deadline=None)
@given(st.permutations(list(range(len(DOCS)))))
def test_the_split_depends_on_the_name_alone_not_the_order(order):
    shuffled = [DOCS[i] for i in order]
    assert {s: sorted(d.name for d in v) for s, v in cp.split_documents(shuffled).items()} == \
        {s: sorted(d.name for d in v) for s, v in cp.split_documents(DOCS).items()}


def test_unigram_entropy_is_the_byte_distributions():
    two = [cp.Document("a", b"ab" * 50)]
    assert cp.unigram_entropy(two) == pytest.approx(1.0)
    assert cp.unigram_entropy([cp.Document("a", b"aaaa")]) == 0.0
    assert 4.0 < cp.unigram_entropy(DOCS) < 6.0


# ----------------------------------------------------------------------------- windows


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(2, 300), min_size=1, max_size=5), context=st.integers(1, 64))
def test_evaluation_windows_predict_every_byte_once_from_each_windows_start(lengths, context):
    docs = [cp.Document(f"d{i}", bytes((7 * i + j) % 251 for j in range(n))) for i, n in enumerate(lengths)]
    w = eval_windows(docs, context)
    assert w.tokens.shape[1] == context + 1
    assert w.predicted == sum(n - 1 for n in lengths), "every byte but a document's first, exactly once"
    # each window is a run of one document starting at a multiple of the context
    row = 0
    for d in docs:
        for start in range(0, len(d.data) - 1, context):
            piece = d.data[start:start + context + 1]
            assert bytes(w.tokens[row, :len(piece)].tolist()) == piece
            assert w.mask[row].sum() == len(piece) and w.mask[row, :len(piece)].all()
            row += 1
    assert row == w.tokens.shape[0]


def test_training_batches_are_whole_windows_of_one_document_and_a_function_of_the_seed():
    docs = [cp.Document("a", bytes(range(200))), cp.Document("b", bytes(range(100, 250)))]
    a = next(train_batches(docs, 32, 64, seed=3))
    b = next(train_batches(docs, 32, 64, seed=3))
    assert torch.equal(a, b) and a.shape == (64, 33)
    for row in a:  # consecutive bytes of one document: each step is +1
        assert ((row[1:] - row[:-1]) == 1).all()
    assert not torch.equal(a, next(train_batches(docs, 32, 64, seed=4)))


def test_a_context_longer_than_the_shortest_document_is_refused_with_the_limit():
    shortest = min(len(d.data) for d in DOCS)
    check_context(shortest - 1, DOCS)
    with pytest.raises(ValueError, match=f"at most|1 to {shortest - 1:,}"):
        check_context(shortest, DOCS)


def test_position_buckets_tile_the_context():
    for c in (1, 2, 7, 64, 512, 2048):
        b = position_buckets(c)
        assert b[0] == (0, 1) or c == 1
        assert b[0][0] == 0 and b[-1][1] == c
        assert all(hi > lo for lo, hi in b) and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))


# ----------------------------------------------------------------------------- bits per byte


class Unigram(torch.nn.Module):
    """A model whose logits at a position depend on that position only (a learned table): its
    loss at position p is known in closed form, so the evaluation can be checked exactly."""

    def __init__(self, context: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(context, 256, generator=g))

    def forward(self, ids, attention_mask=None):
        return self.table[: ids.shape[1]].expand(ids.shape[0], -1, -1)


def test_bits_per_byte_is_the_loss_over_ln2_per_real_byte_and_padding_counts_nowhere():
    docs = [cp.Document("a", bytes(range(40, 90))), cp.Document("b", bytes(range(10, 33)))]
    context = 16
    w = eval_windows(docs, context)
    model = Unigram(context)
    ev = evaluate(model, w, batch_size=3, device="cpu")
    # by hand: for every real target byte at window position p, -log softmax(table[p])[byte]
    logp = model.table.detach().double().log_softmax(-1)
    nats, count, per_pos = 0.0, 0, torch.zeros(context, dtype=torch.float64)
    for row, m in zip(w.tokens, w.mask):
        for p in range(context):
            if m[p + 1]:
                nats -= float(logp[p, row[p + 1]])
                per_pos[p] -= logp[p, row[p + 1]]
                count += 1
    assert count == 49 + 22 and ev.count == count
    assert ev.bits_per_byte == pytest.approx(nats / count / math.log(2), rel=1e-6)  # fp32 logits
    assert torch.allclose(ev.pos_nats, per_pos, rtol=1e-6)
    # padding: whatever bytes sit under the mask, nothing changes
    junk = w.tokens.clone()
    junk[~w.mask] = 255
    ev2 = evaluate(model, type(w)(junk, w.mask), batch_size=3, device="cpu")
    assert ev2.nats == pytest.approx(ev.nats) and ev2.count == ev.count


def test_the_loss_by_position_is_counted_from_each_windows_start():
    """A document whose byte j is j mod 8, cut into windows of 8 + 1: in every window the byte at
    position 4 is 4. A position-only model that is sure of byte 4 at table row 3 (and uniform
    elsewhere) must show zero loss at position 3 of the window and ln 256 everywhere else; if
    positions were counted from anywhere but each window's start, the low bucket would move."""
    docs = [cp.Document("a", bytes(j % 8 for j in range(8 * 12 + 1)))]
    w = eval_windows(docs, 8)
    model = Unigram(8)
    with torch.no_grad():
        model.table.zero_()
        model.table[3, 4] = 80.0
    ev = evaluate(model, w, batch_size=5, device="cpu")
    per = (ev.pos_nats / ev.pos_count).tolist()
    assert per[3] == pytest.approx(0.0, abs=1e-6)
    assert [p for i, p in enumerate(per) if i != 3] == pytest.approx([math.log(256)] * 7, rel=1e-6)
    bits = ev.bucket_bits(position_buckets(8))
    assert [lo for (lo, _), b in zip(position_buckets(8), bits) if b < 1e-9] == [3]


def test_lm_loss_is_the_mean_next_byte_cross_entropy():
    model = Unigram(10)
    batch = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    logp = model.table.detach().log_softmax(-1)
    by_hand = -sum(float(logp[p, batch[b, p + 1]]) for b in range(3) for p in range(10)) / 30
    assert float(lm_loss(model, batch).detach()) == pytest.approx(by_hand, rel=1e-6)


def test_a_loss_by_position_cell_round_trips():
    ev = Evaluation(0.0, 1, torch.arange(8, dtype=torch.float64) * LN2, torch.ones(8, dtype=torch.float64))
    from evals.lm.training import loss_by_position

    cell = loss_by_position(ev, 8)
    got = parse_positions(cell, 8)
    assert [lo for lo, _, _ in got] == [lo for lo, _ in position_buckets(8)]
    assert got[1][2] == pytest.approx(1.0) and parse_positions(cell, 16) is None


# ----------------------------------------------------------------------------- matched models


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_is_matched_to_the_target_parameter_count(name):
    p = PRESETS["quick"]
    cfg, n = matched_config(name, p.base_config(64), p.target_params)
    from evals.registry import resolve_model

    built = resolve_model(name).build(cfg)
    assert n == sum(t.numel() for t in {id(t): t for t in built.parameters()}.values())
    per_unit = 2 * cfg.hidden_dim * cfg.num_layers + cfg.num_layers  # one more feed-forward unit
    assert abs(n - p.target_params) <= per_unit


# ----------------------------------------------------------------------------- the command


def _run(args):
    return CliRunner().invoke(app, ["lm", *args])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    res = _run(["--preset", "quick", "--models", "Standard", "SlidingWindow", "--output-dir", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_the_quick_preset_writes_rows_tables_figures_and_a_sidecar(quick_run):
    import pandas as pd

    rows = pd.read_csv(quick_run / "lm.csv")
    assert list(rows["model"]) == ["Standard", "SlidingWindow"] and (rows["status"] == "ok").all()
    assert (rows["corpus_sha256"] == cp.SHA256).all()
    assert rows["tokens_seen"].nunique() == 1
    side = json.loads((quick_run / "lm.json").read_text())
    assert side["corpus"]["sha256"] == cp.SHA256 and side["cpu_model"] and "command" in side
    pos = pd.read_csv(quick_run / "loss_by_position.csv")
    assert len(pos) == 2 * len(position_buckets(64))
    assert set(pos.groupby("model").size()) == {len(position_buckets(64))}
    assert (quick_run / "lm_loss_by_position.png").stat().st_size > 0


def test_a_spot_rerun_of_a_row_reproduces_it(quick_run, tmp_path):
    import pandas as pd

    res = _run(["--preset", "quick", "--models", "SlidingWindow", "--output-dir", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    a = pd.read_csv(quick_run / "lm.csv").set_index("model").loc["SlidingWindow"]
    b = pd.read_csv(tmp_path / "again" / "lm.csv").set_index("model").loc["SlidingWindow"]
    assert a["test_bpb"] == b["test_bpb"] and a["test_loss_by_position"] == b["test_loss_by_position"]


def test_resume_with_other_settings_is_refused_naming_them_and_the_folder_is_untouched(quick_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    res = _run(["--preset", "quick", "--max-steps", "31", "--output-dir", str(copy), "--resume"])
    assert res.exit_code == 2 and "train.max_steps 30 -> 31" in res.output, res.output
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_resume_trains_only_what_is_missing(quick_run, tmp_path):
    import pandas as pd

    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    res = _run(["--preset", "quick", "--models", "Standard", "SlidingWindow", "Linear", "--output-dir", str(copy),
                "--resume"])
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(copy / "lm.csv")
    assert list(rows["model"]) == ["Standard", "SlidingWindow", "Linear"]


@pytest.mark.parametrize("args, says", [
    (["--preset", "nope"], "--preset: unknown value 'nope'; valid: quick"),
    (["--contexts", "999999"], "longer than a document"),
    (["--models", "Nope"], "--models"),
    (["--lrs", "-1"], "--lrs"),
    (["--seeds", "0"], "seeds"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_folder(args, says, tmp_path):
    out = tmp_path / "out"
    res = _run([*args, "--output-dir", str(out)])
    assert res.exit_code == 2, res.output
    assert says in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_corpus_that_fails_its_checksum_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(cp, "SHA256", "0" * 64)
    cp.load_documents.cache_clear()
    try:
        res = _run(["--output-dir", str(tmp_path / "out")])
    finally:
        cp.load_documents.cache_clear()
    assert res.exit_code == 2 and "fails its checksum" in res.output, res.output
    assert not (tmp_path / "out").exists()
