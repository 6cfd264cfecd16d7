"""GPT-2 -> BSBR converter: exactness, causality, accounting of every weight, save/load, bad input.

The GPT-2 is a randomly initialised transformers GPT2LMHeadModel with a large init range and
perturbed layer norms, so a swapped q/k, a missing transpose or a lost layer-norm bias changes
the logits by far more than the 1e-4 tolerance (a default 0.02 init would make attention almost
uniform and hide such mistakes).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from bsbr import BSBRModel  # noqa: E402
from bsbr_extras.convert import (  # noqa: E402
    DROPPED, WEIGHT_MAP, TransformerToBSBRConverter, convert_to_bsbr, load_converted, map_state_dict,
    save_converted,
)

V, P, D, L, H = 61, 40, 32, 2, 4  # vocab, n_positions, hidden, layers, heads


def gpt2_config(**kw) -> GPT2Config:
    base = dict(vocab_size=V, n_positions=P, n_embd=D, n_layer=L, n_head=H, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    return GPT2Config(**{**base, **kw})


def random_gpt2(cls=GPT2LMHeadModel, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = cls(gpt2_config(**kw)).eval()
    with torch.no_grad():  # layer norms away from (1, 0) so a lost LN weight/bias is visible
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2 saved with save_pretrained: conversion goes through the same loading path as a hub name."""
    path = tmp_path_factory.mktemp("gpt2")
    random_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


def ids(n: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def gpt2_logits(model, x):
    return model(x).logits


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("chunk_size", [P, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("compression_factor", [None, 2], ids=lambda f: f"f{f}")
def test_chunk_covering_sequence_equals_gpt2(gpt2_dir, gpt2, chunk_size, compression_factor):
    bsbr = convert_to_bsbr(str(gpt2_dir), chunk_size=chunk_size, compression_factor=compression_factor)
    x = ids(P)  # the whole position table
    with torch.no_grad():
        diff = (bsbr(x) - gpt2_logits(gpt2, x)).abs().max().item()
    assert diff <= 1e-4, diff


def test_bare_gpt2model_converts_with_tied_head():
    base = random_gpt2(GPT2Model)
    bsbr = convert_to_bsbr(base, chunk_size=P)
    x = ids(P)
    with torch.no_grad():
        ref = base(x).last_hidden_state @ base.wte.weight.t()  # GPT-2's head is wte transposed
        diff = (bsbr(x) - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert bsbr.lm_head.weight is bsbr.embed.weight


def test_untied_head_is_mapped():
    gpt2 = random_gpt2(tie_word_embeddings=False)
    with torch.no_grad():
        gpt2.lm_head.weight.normal_()  # make it clearly differ from wte
    assert gpt2.lm_head.weight.data_ptr() != gpt2.transformer.wte.weight.data_ptr()
    bsbr = convert_to_bsbr(gpt2, chunk_size=P)
    assert bsbr.lm_head.weight is not bsbr.embed.weight
    x = ids(P)
    with torch.no_grad():
        assert (bsbr(x) - gpt2_logits(gpt2, x)).abs().max().item() <= 1e-4


def test_small_chunks_first_chunk_exact_later_chunks_retrieve(gpt2):
    c, n = 8, 30  # n not a multiple of c
    bsbr = convert_to_bsbr(gpt2, chunk_size=c)
    x = ids(n)
    with torch.no_grad():
        out, ref = bsbr(x), gpt2_logits(gpt2, x)
    assert (out[:, :c] - ref[:, :c]).abs().max().item() <= 1e-4
    # Later chunks see the past only through retrieval: they must differ from full attention,
    # otherwise the "conversion" would be silently running standard attention.
    assert (out[:, c:] - ref[:, c:]).abs().amax(dim=(0, 2)).min().item() > 1e-3


@pytest.mark.parametrize("s", [8, 12, 15], ids=["chunk_first", "chunk_middle", "chunk_last"])
def test_small_chunks_causal(gpt2, s):
    bsbr = convert_to_bsbr(gpt2, chunk_size=8)
    x = ids(30)
    y = x.clone()
    y[:, s] = (y[:, s] + 1) % V
    with torch.no_grad():
        a, b = bsbr(x), bsbr(y)
    assert torch.equal(a[:, :s], b[:, :s])
    assert (a[:, s] - b[:, s]).abs().max().item() > 1e-4  # and the changed token does matter


def test_legacy_class_api_matches_function(gpt2):
    a = TransformerToBSBRConverter(8, 2).convert_gpt2_model_to_bsbr(gpt2)
    torch.manual_seed(0)  # `compress` is new and drawn by BSBRModel: same seed, same draw
    b = convert_to_bsbr(gpt2, chunk_size=8, compression_factor=2)
    assert a.chunk_size == 8 and a.compression_factor == 2
    assert not a.training  # eval mode, like from_pretrained
    assert a.bsbr_config == b.bsbr_config


def test_gpt2_hyperparameters_carried_over(gpt2):
    cfg = TransformerToBSBRConverter(16).bsbr_kwargs(gpt2_config(activation_function="gelu_new",
                                                                 layer_norm_epsilon=1e-3, n_inner=24))
    assert cfg["activation"] == "gelu_tanh" and cfg["norm_eps"] == 1e-3 and cfg["ff_dim"] == 24
    assert cfg["position"] == "learned" and cfg["max_positions"] == P and cfg["tie_embeddings"]
    bsbr = convert_to_bsbr(gpt2, chunk_size=16)
    assert bsbr.layers[0].norm1.eps == gpt2.config.layer_norm_epsilon


# ----------------------------------------------------------------------------- the weight map


def test_every_weight_accounted_for(gpt2):
    bsbr = convert_to_bsbr(gpt2, chunk_size=8)
    src = {k.removeprefix("transformer."): v for k, v in gpt2.state_dict().items()}
    dst = bsbr.state_dict()
    # each mapped tensor is where the map says, with the declared transform
    for i in range(L):
        w, b = src[f"h.{i}.attn.c_attn.weight"], src[f"h.{i}.attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            assert torch.equal(dst[f"layers.{i}.mixer.{name}_proj.weight"], w[:, j * D:(j + 1) * D].t())
            assert torch.equal(dst[f"layers.{i}.mixer.{name}_proj.bias"], b[j * D:(j + 1) * D])
        assert torch.equal(dst[f"layers.{i}.mixer.out_proj.weight"], src[f"h.{i}.attn.c_proj.weight"].t())
        assert torch.equal(dst[f"layers.{i}.ffn.fc_in.weight"], src[f"h.{i}.mlp.c_fc.weight"].t())
        assert torch.equal(dst[f"layers.{i}.ffn.fc_out.weight"], src[f"h.{i}.mlp.c_proj.weight"].t())
        # documented meta initialisation: r = projected mean query, h = projected mean key
        assert torch.equal(dst[f"layers.{i}.mixer.meta_query.weight"], dst[f"layers.{i}.mixer.q_proj.weight"])
        assert torch.equal(dst[f"layers.{i}.mixer.meta_key.bias"], dst[f"layers.{i}.mixer.k_proj.bias"])
    assert torch.equal(dst["pos_embed.weight"], src["wpe.weight"])
    assert torch.equal(dst["norm.bias"], src["ln_f.bias"])
    # the GPT-2 element count is preserved exactly: only the meta projections are added
    meta = sum(p.numel() for n, p in bsbr.named_parameters() if ".meta_" in n)
    assert bsbr.num_parameters() == gpt2.num_parameters() + meta


def test_unknown_source_key_rejected_and_dropped_buffers_accepted(gpt2):
    src = {k.removeprefix("transformer."): v for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    target = BSBRModel(**TransformerToBSBRConverter(8).bsbr_kwargs(gpt2.config)).state_dict()
    old = dict(src, **{"h.0.attn.bias": torch.ones(1, 1, P, P), "h.0.attn.masked_bias": torch.tensor(-1e4)})
    map_state_dict(old, target)  # old checkpoints' mask buffers are listed in DROPPED
    assert any("attn.bias" in k for k in DROPPED)
    with pytest.raises(ValueError, match="neither mapped nor listed"):
        map_state_dict(dict(src, **{"h.0.attn.rotary.weight": torch.zeros(3)}), target)
    with pytest.raises(ValueError, match="not filled"):
        map_state_dict({k: v for k, v in src.items() if k != "h.1.ln_2.bias"}, target)
    with pytest.raises(ValueError, match="shape mismatch"):
        map_state_dict(dict(src, **{"h.0.mlp.c_fc.weight": src["h.0.mlp.c_fc.weight"].t()}), target)
    assert len({r.source for r in WEIGHT_MAP}) == len(WEIGHT_MAP)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("compression_factor", [None, 2], ids=lambda f: f"f{f}")
def test_save_load_round_trip_is_exact(gpt2, tmp_path, compression_factor):
    bsbr = convert_to_bsbr(gpt2, chunk_size=8, compression_factor=compression_factor)
    save_converted(bsbr, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["bsbr_model_kwargs"] == bsbr.bsbr_config
    torch.manual_seed(123)  # a different seed: nothing may come from re-initialisation
    again = load_converted(tmp_path / "m")
    x = ids(30)
    with torch.no_grad():
        assert torch.equal(again(x), bsbr(x))
    assert again.lm_head.weight is again.embed.weight
    a, b = bsbr.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_converted_rejects_other_directories(tmp_path):
    with pytest.raises(ValueError, match="not a converted-BSBR directory"):
        load_converted(tmp_path)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("chunk_size", [0, -8, 2.5, "8", True])
def test_bad_chunk_size(gpt2, chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        convert_to_bsbr(gpt2, chunk_size=chunk_size)


def test_bad_compression_factor(gpt2):
    with pytest.raises(ValueError, match="compression_factor"):
        convert_to_bsbr(gpt2, chunk_size=8, compression_factor=3)  # head size 8


def test_not_a_gpt2_model():
    with pytest.raises(ValueError, match="expected a transformers GPT2Model or GPT2LMHeadModel"):
        convert_to_bsbr(torch.nn.Linear(4, 4), chunk_size=8)


def test_not_a_gpt2_checkpoint(tmp_path):
    transformers.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=H,
                            intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model; only GPT-2"):
        convert_to_bsbr(str(tmp_path), chunk_size=8)


def test_missing_checkpoint(tmp_path):
    # a local path that does not exist is named as such, not sent to the hub ("Repo id ...")
    with pytest.raises(ValueError, match="nowhere: no such folder, and not a hub name"):
        convert_to_bsbr(str(tmp_path / "nowhere"), chunk_size=8)


@pytest.mark.parametrize("bad", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False),
                                 dict(activation_function="gelu_fast")], ids=["inv_layer_idx", "unscaled", "act"])
def test_unsupported_gpt2_variants(bad):
    with pytest.raises(ValueError, match="not supported"):
        convert_to_bsbr(GPT2LMHeadModel(gpt2_config(**bad)), chunk_size=8)


def test_sequence_longer_than_position_table(gpt2):
    bsbr = convert_to_bsbr(gpt2, chunk_size=8)
    with pytest.raises(ValueError, match=f"max_positions={P}"):
        bsbr(ids(P + 1))


# ----------------------------------------------------------------------------- the comparison and the CLI

from typer.testing import CliRunner  # noqa: E402

from evals.convert import comparison as ce  # noqa: E402

BYTES_N = 64  # position table of the byte-level GPT-2 below


@pytest.fixture(scope="module")
def byte_gpt2_dir(tmp_path_factory):
    """A byte-level GPT-2 (vocab 256, no tokenizer files): the comparison feeds it UTF-8 bytes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("byte_gpt2")
    GPT2LMHeadModel(gpt2_config(vocab_size=256, n_positions=BYTES_N)).save_pretrained(path)
    return path


def test_corpus_is_split_without_overlap_and_encoded_as_bytes():
    train, held = ce.corpus_text()
    assert len(held) == pytest.approx(0.1 * (len(train) + len(held)), abs=1)
    assert "assert" in train and len(held) > 10_000
    ids = ce.encode(held[:500])
    assert bytes(ids.tolist()).decode("utf-8") == held[:500]
    assert ce.windows(ids, 64, 3).shape == (3, 64)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ce.windows(ids[:10], 64)


def test_compare_logits_against_direct_computation(byte_gpt2_dir):
    gpt2 = GPT2LMHeadModel.from_pretrained(byte_gpt2_dir).eval()
    data = ce.windows(ce.encode(ce.corpus_text()[1]), BYTES_N, 3)
    models = {"full": convert_to_bsbr(gpt2, chunk_size=BYTES_N), "c16": convert_to_bsbr(gpt2, chunk_size=16)}
    rows = {r["variant"]: r for r in ce.compare_logits(gpt2, models, data, batch_size=2,
                                                      first_chunk={"c16": 16})}
    with torch.no_grad():
        ref, out = gpt2(data).logits, models["c16"](data)
    # oracles written independently of compare_logits
    ppl = torch.exp(torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 256), data[:, 1:].reshape(-1)))
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="sum") / data.numel()
    assert rows["original"]["ppl"] == pytest.approx(float(ppl), rel=1e-5)
    assert rows["c16"]["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert rows["c16"]["top1_agreement"] == pytest.approx(float((out.argmax(-1) == ref.argmax(-1)).float().mean()))
    assert rows["full"]["max_abs_diff"] <= 1e-4 and rows["full"]["top1_agreement"] == 1.0
    assert abs(rows["full"]["kl"]) < 1e-6 and rows["full"]["ppl"] == pytest.approx(rows["original"]["ppl"], rel=1e-5)
    assert rows["c16"]["first_chunk_max_abs_diff"] <= 1e-4 < rows["c16"]["max_abs_diff"]
    assert rows["c16"]["kl"] > 0


def test_cli_convert_writes_results_and_models(byte_gpt2_dir, tmp_path):
    from cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["convert", "--model-name", str(byte_gpt2_dir), "--chunk-sizes", "64,16",
                                   "--seq-len", str(BYTES_N), "--output-dir", str(out), "--save-model"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    rows = pd.read_csv(out / "convert.csv").set_index("variant")
    assert list(rows.index) == ["original", "bsbr-c64", "bsbr-c16"]
    assert rows.loc["bsbr-c64", "max_abs_diff"] <= 1e-4 and rows.loc["bsbr-c16", "max_abs_diff"] > 1e-3
    speed = pd.read_csv(out / "convert_speed.csv")
    assert set(speed["variant"]) == set(rows.index) and (speed["time_ms"] > 0).all()
    assert json.loads((out / "convert.json").read_text())["model"] == str(byte_gpt2_dir)
    assert (out / "convert.png").stat().st_size > 10_000  # the figure (evals.convert.plots.plot_conversion)
    gpt2 = GPT2LMHeadModel.from_pretrained(byte_gpt2_dir).eval()
    x = ids(BYTES_N)
    with torch.no_grad():
        assert (load_converted(out / "bsbr-c64")(x) - gpt2(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("args, message", [
    (["--chunk-sizes", "0"], "--chunk-sizes"),
    (["--chunk-sizes", "16,abc"], "--chunk-sizes"),
    ([], "give --model-name"),
    (["--seq-len", str(BYTES_N + 1)], "n_positions"),
    (["--compression-factor", "3", "--seq-len", "32"], "compression_factor"),
    (["--save-model"], "--save-model needs --output-dir"),
], ids=["chunk0", "chunk_text", "no_model", "too_long", "bad_compression", "save_without_dir"])
def test_cli_convert_bad_input_exits_2_with_one_line(byte_gpt2_dir, args, message):
    from cli import app

    model = [] if message == "give --model-name" else ["--model-name", str(byte_gpt2_dir)]
    res = CliRunner().invoke(app, ["convert", *model, *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert "Traceback" not in res.output


def test_example_module_bad_input_returns_2(tmp_path, capsys):
    from bsbr_extras import convert_example

    assert convert_example.main(["--model_name", str(tmp_path / "missing"), "--chunk_size", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "no such folder" in err
