"""The one trainer (evals/train.py): its schedule and optimiser options, and that the conversion
experiment's loop is this trainer."""

from __future__ import annotations

import math

import pytest
import torch

from evals.convert import experiment as CE
from evals.train import TrainConfig, fit, make_optimizer, warmup_cosine


def test_warmup_cosine_shape_and_floor():
    f = warmup_cosine(4, 24)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(14) == pytest.approx(0.5) and f(24) == pytest.approx(0.0) and f(100) == pytest.approx(0.0)
    g = warmup_cosine(4, 24, floor=0.1)
    assert g(3) == 1.0 and g(24) == pytest.approx(0.1) and g(14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(g(s) >= 0.1 for s in range(4, 200))


def test_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    _, opt, _ = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}, "matrices only by default"
    _, opt, _ = make_optimizer(model, TrainConfig(weight_decay=0.1, decay_all=True, betas=(0.9, 0.95)))
    assert {id(p) for g in opt.param_groups for p in g["params"] if g["weight_decay"] > 0} == \
        {id(p) for p in model.parameters()}
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=1.5).validate()


def test_conversion_experiment_trains_through_fit(monkeypatch):
    # train_lm is fit with the GPT-2 recipe: the optimiser fit builds sees the recipe's settings,
    # and the loss curve is fit's, step by step
    seen = {}
    real_fit = CE.fit

    def spy(model, next_batch, loss_fn, cfg, **kw):
        seen["cfg"] = cfg
        return real_fit(model, next_batch, loss_fn, cfg, **kw)

    monkeypatch.setattr(CE, "fit", spy)
    from bsbr.model import BSBRModel

    torch.manual_seed(0)
    model = BSBRModel(64, 16, 1, 2, 8, 32)
    tokens = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(0))
    curve = CE.train_lm(model, tokens, CE.Phase(steps=6, seq_len=16, batch_size=2, lr=1e-3, warmup=2, seed=0, name="t"))
    cfg = seen["cfg"]
    assert (cfg.betas, cfg.decay_all, cfg.min_lr_ratio, cfg.max_steps, cfg.warmup_steps) == ((0.9, 0.95), True,
                                                                                             0.1, 6, 2)
    assert [r["step"] for r in curve] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in curve)
