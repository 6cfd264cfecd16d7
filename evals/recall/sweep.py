"""The recall sweep: its cases, its presets, the learning-rate protocol, and one run -> one row.

The protocol (zoology's, Arora et al. 2023, plus seeds): for every model and configuration
(a *configuration*: model, length, pairs, width, chunk/window size),

1. *tune*: train once per learning rate in ``preset.lrs`` at the first seed;
2. choose the rate with the best validation accuracy (ties: fewer steps, then the smaller rate);
3. *seeds*: train at that rate with every other seed in ``preset.seeds``.

Every raw row (every rate, every seed) is kept in the CSV; the report reads the rows at the chosen
rate (mean, standard deviation and minimum over seeds). The test set is never used to choose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import torch

from evals.recall.data import MQARConfig, Splits
from evals.recall.training import decoding_state_bytes, train_and_evaluate
from evals.registry import ModelConfig, resolve_model
from evals.train import TrainConfig, deterministic

PHASES = ("tune", "seed")


@dataclass(frozen=True)
class RecallCase:
    """One training run: a (model, task, size) point at one learning rate and one seed.

    ``size`` is the memory knob: it sets both ``chunk_size`` (BSBR, Linear, DeltaNet, GAU) and
    ``window_size`` (SlidingWindow) of the ``ModelConfig``; each builder reads the field it uses,
    so there is no per-model branch here. Standard and Hopfield ignore it.
    """

    model: str
    seq_len: int
    num_pairs: int
    hidden_dim: int
    size: int
    lr: float
    seed: int
    phase: str = "tune"

    def config(self) -> tuple:
        """The configuration this run belongs to (everything but the rate and the seed)."""
        return (self.model, self.seq_len, self.num_pairs, self.hidden_dim, self.size)

    def key(self) -> tuple:
        return self.config() + (float(self.lr), int(self.seed))

    def label(self) -> str:
        return (f"{self.model} n={self.seq_len} P={self.num_pairs} d={self.hidden_dim} size={self.size} "
                f"lr={self.lr:g} seed={self.seed}")


def row_key(row: dict) -> tuple:
    """``RecallCase.key`` of a CSV row (strings or numbers)."""
    return (str(row["model"]), int(row["seq_len"]), int(row["num_pairs"]), int(row["hidden_dim"]),
            int(row["size"]), float(row["lr"]), int(row["seed"]))


@dataclass(frozen=True)
class RecallPreset:
    """A sweep in two parts, so that accuracy can be read against length, pairs and state size:

    - the task points: ``task_pairs`` if given, else sequence lengths and pair counts around the
      base point (or their cross product with ``cross``), at the base width and chunk/window size;
    - the state points: widths ``d`` and chunk/window sizes at the base task.

    With ``cross=True`` every task point meets every (width, size) point: zoology's full grid.
    Each point is trained at every rate in ``lrs`` (first seed), then at the best rate for every
    other seed in ``seeds``.
    """

    vocab_size: int
    seq_lens: tuple
    num_pairs: tuple
    base_seq_len: int
    base_num_pairs: int
    hidden_dims: tuple
    sizes: tuple
    base_hidden_dim: int
    base_size: int
    num_layers: int
    num_heads: int
    ff_mult: int
    qk_dim: int
    train: TrainConfig
    lrs: tuple = (1e-3,)
    seeds: tuple = (0,)
    task_pairs: Optional[tuple] = None   # explicit (seq_len, num_pairs) points, as zoology lists them
    cross: bool = False
    gap_power: float = 1.0
    batch_by_len: Optional[tuple] = None  # ((max_seq_len, batch_size), ...): zoology's batch per length
    jobs: int = 1                         # trainings at once (local executor) unless --jobs says otherwise
    compression_factor: Optional[int] = None  # BSBR's chunk states (dh/f) x dh; the other models ignore it

    def data(self, seq_len: int, num_pairs: int) -> MQARConfig:
        return MQARConfig(vocab_size=self.vocab_size, seq_len=seq_len, num_pairs=num_pairs,
                          gap_power=self.gap_power)

    def model_config(self, case: RecallCase) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, hidden_dim=case.hidden_dim, num_layers=self.num_layers,
                           num_heads=self.num_heads, ff_dim=self.ff_mult * case.hidden_dim, dropout=0.0,
                           chunk_size=case.size, window_size=case.size, qk_dim=min(self.qk_dim, case.hidden_dim),
                           compression_factor=self.compression_factor)

    def train_for(self, case: RecallCase) -> TrainConfig:
        """The optimisation settings of one run: the preset's, at the case's rate and batch size."""
        batch = self.train.batch_size
        for max_len, b in self.batch_by_len or ():
            if case.seq_len <= max_len:
                batch = b
                break
        return self.train.with_(lr=float(case.lr), batch_size=batch)

    def with_(self, **kw) -> "RecallPreset":
        return replace(self, **kw)

    def task_points(self) -> list:
        """(seq_len, num_pairs) points: ``task_pairs``, or every length at the base pair count and
        every pair count at the base length ("axes"), or with ``cross`` the whole product of
        lengths and pairs; those whose pairs do not fit the length are left out."""
        if self.task_pairs:
            pts = [tuple(p) for p in self.task_pairs]
        elif self.cross:
            pts = [(n, P) for n in self.seq_lens for P in self.num_pairs]
        else:
            pts = [(n, self.base_num_pairs) for n in self.seq_lens] + [(self.base_seq_len, P) for P in self.num_pairs]
        return [pt for pt in dict.fromkeys(pts) if _fits(self, *pt)]

    def state_points(self) -> list:
        """(hidden_dim, size) points, "axes" around the base or the cross product like ``task_points``."""
        pts = ([(D, s) for D in self.hidden_dims for s in self.sizes] if self.cross else
               [(self.base_hidden_dim, s) for s in self.sizes] + [(D, self.base_size) for D in self.hidden_dims])
        return list(dict.fromkeys(pts))

    def points(self) -> list:
        """Every (seq_len, num_pairs, hidden_dim, size) configuration, deduplicated, in a fixed order."""
        if self.cross:
            pts = [(n, P, D, s) for n, P in self.task_points() for D, s in self.state_points()]
        else:
            pts = [(n, P, self.base_hidden_dim, self.base_size) for n, P in self.task_points()]
            pts += [(self.base_seq_len, self.base_num_pairs, D, s) for D, s in self.state_points()]
        return list(dict.fromkeys(pts))

    def check(self) -> "RecallPreset":
        """One-line ValueError on a sweep with a value that cannot be used.

        The base task must fit, the vocabulary must hold the largest pair count, and every given
        length and pair count must take part in at least one point that fits.
        """
        from bsbr.checks import check_heads

        self.train.validate()
        for name in ("seq_lens", "num_pairs", "hidden_dims", "sizes"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in vals):
                raise ValueError(f"{name} must be positive integers, got {vals!r}")
        if not self.lrs or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 for v in self.lrs):
            raise ValueError(f"lrs must be numbers > 0, got {self.lrs!r}")
        if not self.seeds or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {self.seeds!r}")
        if self.task_pairs:
            for n, P in self.task_pairs:
                self.data(n, P).validate()
        else:
            big = max(self.num_pairs)
            MQARConfig(self.vocab_size, 3 * big, big).validate()  # the length fits; this checks the vocabulary
            self.data(self.base_seq_len, self.base_num_pairs).validate()
            pts = self.task_points()
            for n in self.seq_lens:
                if not any(m == n for m, _ in pts):
                    raise ValueError(f"seq_len={n} fits no requested pair count: P pairs and P queries need "
                                     f"seq_len >= 3P; the largest P that fits is {n // 3}")
            for P in self.num_pairs:
                if not any(q == P for _, q in pts):
                    lens = [n for n, _ in pts] or list(self.seq_lens)
                    raise ValueError(f"num_pairs={P} fits none of the sequence lengths it is paired with "
                                     f"({', '.join(map(str, sorted(set(lens))))}): it needs seq_len >= {3 * P}")
        for D in self.hidden_dims:
            dh = check_heads(D, self.num_heads)
            f = self.compression_factor
            if f is not None and (not isinstance(f, int) or isinstance(f, bool) or f <= 0 or dh % f):
                raise ValueError(f"--compression-factor must be a positive integer dividing every head size "
                                 f"(d / heads = {dh} at d = {D}), got {f!r}")
        return self


def _fits(preset: RecallPreset, n: int, P: int) -> bool:
    try:
        preset.data(n, P).validate()
        return True
    except ValueError:
        return False


# zoology's figure-2 learning rates: np.logspace(-4, -2, 4)
ZOOLOGY_LRS = (1e-4, 10 ** (-4 + 2 / 3), 10 ** (-4 + 4 / 3), 1e-2)

PRESETS: dict = {
    # Smoke run: all seven models in a few minutes on 2 cores; proves the pipeline, not the protocol.
    "quick": RecallPreset(
        vocab_size=32, seq_lens=(32, 64), num_pairs=(4, 8), base_seq_len=32, base_num_pairs=4,
        hidden_dims=(64,), sizes=(8,), base_hidden_dim=64, base_size=8,
        num_layers=2, num_heads=2, ff_mult=2, qk_dim=32, jobs=2, lrs=(3e-3,), seeds=(0,),
        train=TrainConfig(max_steps=600, schedule_steps=1500, batch_size=64, lr=3e-3, weight_decay=0.0,
                          warmup_steps=30, num_train=8192, num_val=256, num_test=1024, eval_every=50,
                          target_acc=0.995)),
    # The protocol on a 2-core CPU, chosen to separate the models: vocabulary 128 (63 keys), (32, 8)
    # at widths 64 and 128 and (64, 16) at width 64, chunk/window 8, 3 rates, 3 seeds. The axis
    # that moves state against demand is keys against the head size: a d x d state keeps at most
    # ~d keys apart, so at d_head = 32 (width 64) 63 keys do not fit and at d_head = 64 (width 128)
    # they do. The pilots and earlier runs that chose it: docs/recall.md, "The cpu preset".
    "cpu": RecallPreset(
        vocab_size=128, seq_lens=(32, 64), num_pairs=(8, 16), base_seq_len=32, base_num_pairs=8,
        hidden_dims=(64, 128), sizes=(8,), base_hidden_dim=64, base_size=8,
        num_layers=2, num_heads=2, ff_mult=2, qk_dim=32, jobs=2, lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2),
        # axes through (32, 8, d=64): (64, 16) at width 64, and width 128 at (32, 8). The cross point
        # (64, 16, d=128) is left out to fit a 2-core session (105 trainings, about an hour)
        task_pairs=((32, 8), (64, 16)), cross=False,
        # a truncated cosine (schedule longer than the budget) keeps the rate high through the whole
        # run: MQAR progress comes in a jump after a plateau
        train=TrainConfig(max_steps=2000, schedule_steps=3000, batch_size=64, lr=3e-3, weight_decay=0.0,
                          warmup_steps=30, num_train=32_768, num_val=256, num_test=1024, eval_every=50,
                          target_acc=0.995)),
    # Issue 16's protocol at vocabulary 1024, (64, 4) and (128, 8) at widths 64 and 128: opt-in; on
    # a 2-core CPU Standard does not reach 99% in this budget (docs/recall.md), so it is no recall point.
    "cpu-v1024": RecallPreset(
        vocab_size=1024, seq_lens=(64, 128), num_pairs=(4, 8), base_seq_len=128, base_num_pairs=8,
        hidden_dims=(64, 128), sizes=(16,), base_hidden_dim=64, base_size=16,
        num_layers=2, num_heads=2, ff_mult=2, qk_dim=64, jobs=2, lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2),
        task_pairs=((64, 4), (128, 8)), cross=True,
        # 100k training sequences, as zoology: 8,192 let Standard memorise them at vocabulary 1,024
        # (train loss 1.06 against 28% held-out accuracy after 1,500 steps; docs/recall.md)
        train=TrainConfig(max_steps=500, schedule_steps=1000, batch_size=32, lr=3e-3, weight_decay=0.0,
                          warmup_steps=30, num_train=100_000, num_val=256, num_test=1024, eval_every=50,
                          target_acc=0.99)),
    # Zoology's figure-2 grid exactly (HazyResearch/zoology, zoology/experiments/paper_configs/
    # iclr24_zoology_figure2/configs.py): vocabulary 8192; (64, 4), (128, 8), (256, 16), (512, 64);
    # widths 64-512; 2 layers; rates logspace(-4, -2, 4); 100k training / 3k test sequences; batch
    # 512 up to length 128, 256 at 256, 128 at 512; 64 epochs; early stop at 0.99 validation
    # accuracy; query gaps from numpy's power(a=0.01), density x^(a-1) = x^-0.99. For GPUs.
    "zoology": RecallPreset(
        vocab_size=8192, seq_lens=(64, 128, 256, 512), num_pairs=(4, 8, 16, 64), base_seq_len=256,
        base_num_pairs=16, hidden_dims=(64, 128, 256, 512), sizes=(32,), base_hidden_dim=128, base_size=32,
        num_layers=2, num_heads=1, ff_mult=2, qk_dim=128, jobs=1, lrs=ZOOLOGY_LRS, seeds=(0, 1, 2),
        task_pairs=((64, 4), (128, 8), (256, 16), (512, 64)), cross=True, gap_power=0.99,
        batch_by_len=((128, 512), (256, 256), (512, 128)),
        # 64 epochs of 100k sequences at batch 512 = 12,500 steps (more at the smaller batches, fewer
        # when early stopping fires); the schedule is zoology's cosine over the whole budget
        train=TrainConfig(max_steps=12_500, batch_size=512, lr=1e-3, weight_decay=0.1, warmup_steps=300,
                          num_train=100_000, num_val=1000, num_test=3000, eval_every=250, target_acc=0.99)),
}


def recall_grid(models: Sequence[str], preset: RecallPreset) -> list:
    """The *tune* cases of ``preset`` for ``models``: every configuration at every rate and the
    first seed, ordered by task then model, so that one task's data is held at a time."""
    names = [resolve_model(m).name for m in models]
    return [RecallCase(m, n, P, D, sz, float(lr), preset.seeds[0], "tune")
            for (n, P, D, sz) in preset.points() for m in names for lr in preset.lrs]


def best_lr(rows: Sequence[dict]) -> Optional[float]:
    """The rate of the best *ok* row by validation accuracy (ties: fewer steps, then the smaller
    rate); None when no row is ok."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    best = min(ok, key=lambda r: (-float(r["val_acc"]), int(r["steps"]), float(r["lr"])))
    return float(best["lr"])


def seed_cases(tune_cases: Sequence[RecallCase], rows_by_key: dict, preset: RecallPreset) -> list:
    """The *seed* cases: each configuration of ``tune_cases`` once per further seed, at its best rate
    (from the tune rows in ``rows_by_key``). Groups whose tune rows are incomplete or all failed
    get none."""
    out = []
    for config in dict.fromkeys(c.config() for c in tune_cases):
        rows = [rows_by_key.get(config + (float(lr), preset.seeds[0])) for lr in preset.lrs]
        if any(r is None for r in rows):
            continue
        lr = best_lr(rows)
        if lr is not None:
            out += [RecallCase(*config, lr, s, "seed") for s in preset.seeds[1:]]
    return out


def shard_configs(cases: Sequence[RecallCase], i: int, n: int) -> list:
    """The i-th of N disjoint round-robin slices (1-based) of the *configurations* of ``cases``: a configuration's
    rates and seeds stay together, because its seed runs depend on its tune runs."""
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"shard index must satisfy 1 <= i <= N, got {i}/{n}")
    configs = list(dict.fromkeys(c.config() for c in cases))
    mine = set(configs[i - 1::n])
    return [c for c in cases if c.config() in mine]


COLUMNS = (
    "run_id", "task", "model", "device", "status", "phase", "test_acc", "val_acc", "reached_target", "steps",
    "train_time_s", "final_loss",
    "seq_len", "num_pairs", "num_queries", "vocab_size", "hidden_dim", "num_layers", "num_heads", "size",
    "chunk_size", "window_size", "state_bytes", "params",
    "lr", "seed", "data_seed", "max_steps", "batch_size", "weight_decay", "warmup_steps", "num_train", "num_val",
    "num_test", "target_acc", "gap_power", "init", "threads", "error",
)
# what differs between two runs of one case however deterministic the training is
VOLATILE_COLUMNS = ("run_id", "train_time_s")
INIT = "recipe: Linear N(0,1/fan_in), embedding N(0,1), GAU gamma N(0,1), final norm gain d^-1/2"


_SPLITS: dict = {}  # per process: the data of the task being trained (grids are ordered by task)


def splits_for(preset: RecallPreset, case: RecallCase, data_seed: int) -> Splits:
    """The task's train/val/test sets, a pure function of the preset, the task and ``data_seed``
    (identical in every process); one task's data is cached at a time."""
    tr = preset.train
    key = (preset.data(case.seq_len, case.num_pairs), tr.num_train, tr.num_val, tr.num_test, data_seed)
    if key not in _SPLITS:
        _SPLITS.clear()
        _SPLITS[key] = Splits.make(key[0], *key[1:])
    return _SPLITS[key]


def run_case(case: RecallCase, preset: RecallPreset, *, data_seed: int = 0, device: str = "cpu",
             threads: int = 1, on_step=None) -> dict:
    """Train and evaluate one case deterministically; a failure becomes a row with status
    ``error``, never a crash. Runs the same in this process, a worker process or a Ray task."""
    cfg = preset.model_config(case)
    data = preset.data(case.seq_len, case.num_pairs)
    tr = preset.train_for(case)
    row = dict(task="mqar", model=case.model, device=device, phase=case.phase, seq_len=case.seq_len,
               num_pairs=case.num_pairs, num_queries=data.queries, vocab_size=preset.vocab_size,
               hidden_dim=case.hidden_dim, num_layers=preset.num_layers, num_heads=preset.num_heads,
               size=case.size, chunk_size=cfg.chunk_size, window_size=cfg.window_size, lr=float(case.lr),
               seed=case.seed, data_seed=data_seed, max_steps=tr.max_steps, batch_size=tr.batch_size,
               weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps, num_train=tr.num_train,
               num_val=tr.num_val, num_test=tr.num_test, target_acc=tr.target_acc, gap_power=preset.gap_power,
               init=INIT if tr.reinit else "model's own", threads=threads, error="")
    try:
        splits = splits_for(preset, case, data_seed)
        with deterministic(case.seed, threads):
            model = resolve_model(case.model).build(cfg)  # initial weights: a function of the seed
            row["params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            res = train_and_evaluate(model, splits, tr, seed=case.seed, device=device, on_step=on_step)
            # measured after training: the cache's bytes do not depend on the weights' values
            row["state_bytes"] = decoding_state_bytes(model, splits.test[0][:1].to(device))
        row.update(status="ok", test_acc=round(res.test_acc, 6), val_acc=round(res.val_acc, 6),
                   reached_target=res.reached_target, steps=res.steps, train_time_s=round(res.train_time_s, 2),
                   final_loss=round(res.train_loss, 5))
    except Exception as e:  # noqa: BLE001 - recorded in the row, the sweep goes on
        row.update(status="error", error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:300])
    return row


def settings(preset: RecallPreset) -> dict:
    """The preset as plain data, for the JSON sidecar."""
    return asdict(preset)
