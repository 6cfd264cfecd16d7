"""Where a recall training step's time goes, against what its math costs (issue 21, item 5).

For each model at one recall configuration (default: the cpu preset's (64, 16), d = 64, batch 64,
1 thread) this times, with torch.utils.benchmark on the real training objects (the recall recipe's
model, AdamW + schedule, clipping, the query-only loss, the shuffled batches):

    data      next(batches)                      (index + copy of one batch)
    forward   query_loss(model, x, y)
    backward  loss.backward()
    update    clip_grad_norm_ + opt.step() + sched.step() + zero_grad
    step      all of it, as evals.train.fit runs it
    eval      one validation pass (256 sequences), amortised over eval_every steps

and the step's FLOPs (torch.utils.flop_counter, forward + backward) over a same-process matmul
rate (evals.measure.calibrate_matmul), i.e. the time the math alone would take at the machine's
matmul speed. Run it on an otherwise idle machine:

    python scripts/profile_recall_step.py --out results/recall_cpu/trainer_profile.csv
    # results/recall_cpu_d32/trainer_profile.csv was --point 64,16,32,8 under the vocabulary-64 preset
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tb
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.machine import machine as suite_machine  # noqa: E402
from evals.measure import calibrate_matmul  # noqa: E402
from evals.recall import PRESETS, RecallCase, Splits  # noqa: E402
from evals.recall.training import evaluate, query_loss
from evals.train import unit_variance_init  # noqa: E402
from evals.registry import MODEL_NAMES, resolve_model  # noqa: E402
from evals.train import make_optimizer, shuffled_batches  # noqa: E402


def median_ms(fn, min_run_time: float) -> float:
    return tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median * 1e3


def profile(model_name: str, n: int, P: int, D: int, size: int, preset, splits, min_run_time: float) -> dict:
    torch.manual_seed(0)
    case = RecallCase(model_name, n, P, D, size, preset.train.lr, 0, "tune")
    cfg = preset.model_config(case)
    model = resolve_model(model_name).build(cfg)
    unit_variance_init(model)
    model.train()
    train = preset.train
    params, opt, sched = make_optimizer(model, train)
    batches = shuffled_batches(*splits.train, train.batch_size, 1, "cpu")
    x, y = next(batches)

    def forward():
        return query_loss(model, x, y)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        query_loss(model, x, y).backward()

    def update():
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()

    def step():
        loss = query_loss(model, *next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step()
        loss.item()

    fwd_bwd()  # gradients exist for the update timing
    with FlopCounterMode(display=False) as fc:
        fwd_bwd()
    row = dict(model=model_name, seq_len=n, num_pairs=P, hidden_dim=D, size=size, batch=train.batch_size,
               data_ms=median_ms(lambda: next(batches), min_run_time), forward_ms=median_ms(forward, min_run_time))
    row["fwd_bwd_ms"] = median_ms(fwd_bwd, min_run_time)
    # the whole step before the bare update: hundreds of updates on one gradient drive the weights
    # to values whose arithmetic is slower (the first version of this script read that as overhead)
    row["step_ms"] = median_ms(step, min_run_time)
    row["update_ms"] = median_ms(update, min_run_time)
    row["eval_ms_per_step"] = median_ms(lambda: evaluate(model, splits.val, 256, "cpu"), min_run_time) / train.eval_every
    row["gflop_per_step"] = fc.get_total_flops() / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--point", default="64,16,64,8", help="seq_len,num_pairs,hidden_dim,size")
    ap.add_argument("--models", nargs="*", default=list(MODEL_NAMES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.out.exists():
        print(f"error: --out: {a.out} already exists; choose another path", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(a.threads)
    n, P, D, size = (int(v) for v in a.point.split(","))
    preset = PRESETS[a.preset]
    splits = Splits.make(preset.data(n, P), 4096, preset.train.num_val, 256, seed=0)
    gflops = calibrate_matmul("cpu", threads=a.threads)
    rows = []
    for m in a.models:
        r = profile(m, n, P, D, size, preset, splits, a.min_run_time)
        r["math_ms"] = r["gflop_per_step"] / gflops * 1e3
        r["overhead_ms"] = r["step_ms"] - r["fwd_bwd_ms"] - r["update_ms"] - r["data_ms"]
        rows.append(r)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    import pandas as pd

    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(a.out)
    a.out.with_suffix(".json").write_text(json.dumps(dict(
        machine=platform.machine(), cpu=suite_machine()["cpu_model"], torch=torch.__version__, threads=a.threads,
        matmul_gflops=gflops, preset=a.preset, point=a.point, command=" ".join(sys.argv)), indent=1) + "\n")


if __name__ == "__main__":
    main()
