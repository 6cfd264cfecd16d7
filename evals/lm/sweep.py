"""The language-modelling sweep: its cases, its presets, matched models, and one run -> one row.

The protocol is recall's (``evals.recall.sweep``): for every model and context (a *configuration*), train
once per learning rate at the first seed, choose the rate with the best *validation* bits per
byte, then train every other seed at that rate. Test bits per byte is reported, never used to
choose.

Matching. Every model of a preset sees the same bytes (the batches are a function of the seed
alone) and the same number of them: ``tokens_per_step`` bytes a step at every context (batch =
tokens_per_step / context), for ``max_steps`` steps. And every model has about the same number of
parameters: its feed-forward width is solved for (``matched_config``) so that the whole model has
``target_params`` parameters to within one feed-forward unit; the count is in every row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

from evals.registry import ModelConfig, resolve_model
from evals.train import TrainConfig

VOCAB = 256  # bytes


@dataclass(frozen=True)
class LMCase:
    """One training run: a model at one context, one learning rate and one seed."""

    model: str
    context: int
    lr: float
    seed: int
    phase: str = "tune"

    def config(self) -> tuple:
        return (self.model, self.context)

    def key(self) -> tuple:
        return self.config() + (float(self.lr), int(self.seed))

    def label(self) -> str:
        return f"{self.model} context={self.context} lr={self.lr:g} seed={self.seed}"


def row_key(row: dict) -> tuple:
    return (str(row["model"]), int(row["context"]), float(row["lr"]), int(row["seed"]))


@dataclass(frozen=True)
class LMPreset:
    """A sweep: the contexts, the model shape, the budget in bytes, the rates and the seeds."""

    contexts: tuple
    hidden_dim: int
    num_layers: int
    num_heads: int
    target_params: int
    chunk_size: int               # BSBR, Linear, DeltaNet, GAU
    window_size: int              # SlidingWindow
    tokens_per_step: int          # bytes a step at every context (batch = tokens_per_step / context)
    train: TrainConfig            # max_steps, warm-up, decay, clip (batch_size is set per context)
    lrs: tuple = (1e-3,)
    seeds: tuple = (0,)
    eval_batch_tokens: int = 32_768  # bytes per evaluation batch
    eval_bytes: Optional[int] = None  # evaluate on the first documents of each held-out split up to this many bytes
    jobs: int = 1
    qk_dim: int = 64              # GAU

    def with_(self, **kw) -> "LMPreset":
        return replace(self, **kw)

    def batch_size(self, context: int) -> int:
        return max(1, self.tokens_per_step // context)

    def base_config(self, context: int) -> ModelConfig:
        return ModelConfig(vocab_size=VOCAB, hidden_dim=self.hidden_dim, num_layers=self.num_layers,
                           num_heads=self.num_heads, ff_dim=4 * self.hidden_dim, dropout=0.0,
                           chunk_size=self.chunk_size, window_size=self.window_size,
                           qk_dim=min(self.qk_dim, self.hidden_dim))

    def train_for(self, case: LMCase) -> TrainConfig:
        return self.train.with_(lr=float(case.lr), batch_size=self.batch_size(case.context),
                                eval_every=self.train.max_steps)

    def tokens_seen(self, context: int) -> int:
        return self.train.max_steps * self.batch_size(context) * context

    def check(self) -> "LMPreset":
        from bsbr.checks import check_heads

        self.train.validate()
        for name in ("hidden_dim", "num_layers", "num_heads", "target_params", "chunk_size", "window_size",
                     "tokens_per_step", "eval_batch_tokens", "jobs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        check_heads(self.hidden_dim, self.num_heads)
        if not self.contexts or any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in self.contexts):
            raise ValueError(f"contexts must be positive integers, got {self.contexts!r}")
        if not self.lrs or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 for v in self.lrs):
            raise ValueError(f"lrs must be numbers > 0, got {self.lrs!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in self.seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {self.seeds!r}")
        return self


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def matched_config(model: str, cfg: ModelConfig, target: int) -> tuple[ModelConfig, int]:
    """``cfg`` with the feed-forward width that brings ``model`` closest to ``target`` parameters,
    and that count. A model's count is linear in the width (every block's feed-forward layer has
    ``D * ff + ff + ff * D + D`` parameters), so two builds give the line and one more the check."""
    spec = resolve_model(model)
    a = _params(spec.build(cfg.with_(ff_dim=8)))
    b = _params(spec.build(cfg.with_(ff_dim=16)))
    per_unit = (b - a) / 8
    ff = max(1, round(8 + (target - a) / per_unit))
    built = cfg.with_(ff_dim=ff)
    return built, _params(spec.build(built))


def lm_grid(models: Sequence[str], preset: LMPreset) -> list:
    """The *tune* cases: every context x model x rate at the first seed, shortest context first."""
    names = [resolve_model(m).name for m in models]
    return [LMCase(m, c, float(lr), preset.seeds[0], "tune") for c in preset.contexts for m in names
            for lr in preset.lrs]


def best_lr(rows: Sequence[dict]) -> Optional[float]:
    """The rate of the ok row with the lowest validation bits per byte (ties: the smaller rate)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    return float(min(ok, key=lambda r: (float(r["val_bpb"]), float(r["lr"])))["lr"])


def seed_cases(tune: Sequence[LMCase], rows_by_key: dict, preset: LMPreset) -> list:
    """Each configuration once per further seed at its best rate, once all its tune rows are in."""
    out = []
    for config in dict.fromkeys(c.config() for c in tune):
        rows = [rows_by_key.get(config + (float(lr), preset.seeds[0])) for lr in preset.lrs]
        if any(r is None for r in rows):
            continue
        lr = best_lr(rows)
        if lr is not None:
            out += [LMCase(*config, lr, s, "seed") for s in preset.seeds[1:]]
    return out


def settings(preset: LMPreset) -> dict:
    return asdict(preset)


PRESETS: dict = {
    # Smoke run for tests and a first look: seconds per model.
    "quick": LMPreset(contexts=(64,), hidden_dim=32, num_layers=1, num_heads=2, target_params=24_000,
                      chunk_size=16, window_size=16, tokens_per_step=1024, lrs=(3e-3,), seeds=(0,),
                      eval_bytes=20_000, jobs=1, qk_dim=16,
                      train=TrainConfig(max_steps=30, batch_size=16, lr=3e-3, weight_decay=0.1,
                                        warmup_steps=5, eval_every=30)),
    # The committed run on a 2-core CPU (docs/lm.md): two contexts, 7 models matched at 400k
    # parameters (width 128, 2 layers, 4 heads), 8,192 bytes a step for 500 steps (4.1M bytes, a
    # little over half an epoch of the 7.4 MB training split), 3 rates on seed 0 and one more seed
    # at the best: 56 trainings, two at a time, one thread each. Chunk and window 64, so the
    # window's edge and BSBR's chunk both sit well inside either context. Validation and test are
    # each split's first documents up to 500 kB (scoring all 1.9 MB took as long as the training).
    # Rates around the best of a 150-step pilot (Standard, context 512: 1e-2 beat 3e-3).
    "cpu": LMPreset(contexts=(512, 2048), hidden_dim=128, num_layers=2, num_heads=4, target_params=400_000,
                    chunk_size=64, window_size=64, tokens_per_step=8192, lrs=(3e-3, 1e-2, 3e-2), seeds=(0, 1),
                    jobs=2, qk_dim=64, eval_bytes=500_000,
                    train=TrainConfig(max_steps=500, batch_size=16, lr=3e-3, weight_decay=0.1, warmup_steps=50,
                                      eval_every=500, betas=(0.9, 0.95), min_lr_ratio=0.1)),
    # For a GPU (not yet run): longer contexts and 25x the bytes, at 3.2M parameters (width 256, 4
    # layers, 8 heads); 16,384 is the longest context the corpus's shortest document (16,411 bytes)
    # holds. One training at a time per GPU.
    "gpu": LMPreset(contexts=(1024, 4096, 16384), hidden_dim=256, num_layers=4, num_heads=8, target_params=3_200_000,
                    chunk_size=128, window_size=128, tokens_per_step=65_536, lrs=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2),
                    jobs=1, qk_dim=128, eval_batch_tokens=262_144,
                    train=TrainConfig(max_steps=1600, batch_size=64, lr=1e-3, weight_decay=0.1, warmup_steps=100,
                                      eval_every=1600, betas=(0.9, 0.95), min_lr_ratio=0.1)),
}


COLUMNS = (
    "run_id", "task", "model", "device", "status", "phase", "context", "lr", "seed",
    "test_bpb", "val_bpb", "final_loss", "steps", "tokens_seen", "train_time_s", "tokens_per_s", "eval_time_s",
    "params", "hidden_dim", "num_layers", "num_heads", "ff_dim", "chunk_size", "window_size", "qk_dim",
    "batch_size", "max_steps", "warmup_steps", "weight_decay", "test_bytes", "val_bytes", "corpus_sha256",
    "init", "threads", "test_loss_by_position", "error",
)
INIT = "unit variance (evals.train.unit_variance_init): Linear N(0,1/fan_in), embedding N(0,1), final norm gain d^-1/2"
# what differs between two runs of one case however deterministic the training is
VOLATILE_COLUMNS = ("run_id", "train_time_s", "tokens_per_s", "eval_time_s")

_HELD: dict = {}  # per process: evaluation windows of the held-out splits, per (context, eval_bytes)


def _held_out(context: int, eval_bytes: Optional[int]) -> tuple:
    from evals.lm.corpus import load_documents, split_documents
    from evals.lm.data import eval_windows

    key = (context, eval_bytes)
    if key not in _HELD:
        _HELD.clear()
        parts = split_documents(load_documents())
        out = []
        for split in ("val", "test"):
            docs, total = [], 0
            for d in parts[split]:
                if eval_bytes is not None and total >= eval_bytes:
                    break
                docs.append(d)
                total += len(d.data)
            out.append(eval_windows(docs, context))
        _HELD[key] = tuple(out)
    return _HELD[key]


def run_case(case: LMCase, preset: LMPreset, *, device: str = "cpu", threads: int = 1, on_step=None) -> dict:
    """Train and evaluate one case deterministically; a failure is a row with status ``error``."""
    import torch

    from evals.lm.corpus import SHA256, load_documents, split_documents
    from evals.lm.data import train_batches
    from evals.lm.training import loss_by_position, train_and_evaluate
    from evals.train import deterministic, unit_variance_init

    tr = preset.train_for(case)
    row = dict(task="lm", model=case.model, device=device, phase=case.phase, context=case.context,
               lr=float(case.lr), seed=case.seed, hidden_dim=preset.hidden_dim, num_layers=preset.num_layers,
               num_heads=preset.num_heads, chunk_size=preset.chunk_size, window_size=preset.window_size,
               batch_size=tr.batch_size, max_steps=tr.max_steps, warmup_steps=tr.warmup_steps,
               weight_decay=tr.weight_decay, corpus_sha256=SHA256, init=INIT if tr.reinit else "model's own",
               threads=threads, error="")
    try:
        cfg, params = matched_config(case.model, preset.base_config(case.context), preset.target_params)
        row.update(ff_dim=cfg.ff_dim, qk_dim=cfg.qk_dim, params=params)
        val, test = _held_out(case.context, preset.eval_bytes)
        train_docs = split_documents(load_documents())["train"]
        batches = train_batches(train_docs, case.context, tr.batch_size, seed=case.seed)
        with deterministic(case.seed, threads):
            model = resolve_model(case.model).build(cfg)  # initial weights: a function of the seed
            if tr.reinit:
                unit_variance_init(model)
            res = train_and_evaluate(model, batches, val, test, tr, device=device, on_step=on_step,
                                     eval_batch=max(1, preset.eval_batch_tokens // case.context))
        seen = res.steps * tr.batch_size * case.context
        row.update(status="ok", test_bpb=round(res.test.bits_per_byte, 5), val_bpb=round(res.val.bits_per_byte, 5),
                   final_loss=round(res.train_loss, 5), steps=res.steps, tokens_seen=seen,
                   train_time_s=round(res.train_time_s, 2), tokens_per_s=round(seen / max(res.train_time_s, 1e-9)),
                   eval_time_s=round(res.eval_time_s, 2), test_bytes=res.test.count, val_bytes=res.val.count,
                   test_loss_by_position=loss_by_position(res.test, case.context))
        if not torch.isfinite(torch.tensor(res.train_loss)):
            row.update(status="error", error=f"training diverged: the final loss is {res.train_loss} "
                                             f"(lr {case.lr:g}); its bits per byte mean nothing")
    except Exception as e:  # noqa: BLE001 - recorded in the row, the sweep goes on
        row.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:300])
    return row
