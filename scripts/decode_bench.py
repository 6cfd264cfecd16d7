"""Decode cost against the cache's max_len, side by side with another git ref (issue 22).

What it measures, per model (all seven; 2 layers, width 64, 2 heads, vocabulary 64, chunk and
window 8, the registry's defaults otherwise; eager, CPU, 1 thread, no grad):

- ``decode``: one cached one-token step with ~350 tokens in the cache (a 16-token prefill, then
  one token per call), for ``init_cache(1, max_len=L)`` with L = 400, 4,096, 16,384;
- ``forward``: a tiny forward of 32 tokens;
- ``step1``: a one-token decode step right after a 16-token prefill (max_len 64).

Each number is the median µs per call over blocks of ``--block`` calls timed with
``torch.utils.benchmark.Timer.timeit``; a decode block starts from a copy of the same cache (the
copy is made outside the timed region), so every block times the same tokens in the cache.
``forward`` uses ``Timer.blocked_autorange``.

With ``--ref REF`` (e.g. be14470) the same cases run in a temporary ``git worktree`` of REF, in a
second worker process; the two workers are asked case by case, alternating which goes first each
round (side by side, interleaved), so drift on the machine hits both. A ref whose
``init_cache`` has no ``max_len`` gets ``init_cache(1)`` (recorded as ``max_len_used=False``).

Output: a table on stdout (with the two checks of issue 22: decode at 16,384 over decode at 400
<= 1.15 per model; HEAD over REF <= 1.05 for ``forward`` and ``step1``), ``OUT.csv`` and
``OUT.json`` (the machine, both trees' commits, the settings, the load average before and after).

    python scripts/decode_bench.py --ref be14470 --out results/decode_bench/be14470

Run it on an otherwise idle machine: numbers taken beside other jobs are not comparable.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("BSBR", "Standard", "Linear", "DeltaNet", "SlidingWindow", "Hopfield", "GAU")
MAX_LENS = (400, 4096, 16384)
CONFIG = dict(vocab_size=64, hidden_dim=64, num_layers=2, num_heads=2, dropout=0.0, chunk_size=8, window_size=8)
PREFILL, CACHED, FORWARD_LEN, STEP1_MAX_LEN = 16, 350, 32, 64
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- worker (runs in a tree)


def _build(name):
    import dataclasses

    import torch
    from evals.registry import ModelConfig, resolve_model
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in CONFIG.items() if k in known})
    torch.manual_seed(0)
    return resolve_model(name).build(cfg).eval()


def _new_cache(model, max_len):
    import inspect
    if "max_len" in inspect.signature(model.init_cache).parameters:
        return model.init_cache(1, max_len=max_len), True
    return model.init_cache(1), False


def _filled_cache(model, max_len, tokens, ids):
    """A cache holding ``tokens`` tokens: the 16-token prefill, then one token per call."""
    cache, used = _new_cache(model, max_len)
    model(ids[:, :PREFILL], cache=cache)
    for t in range(PREFILL, tokens):
        model(ids[:, t:t + 1], cache=cache)
    return cache, used


def _time_steps(model, snapshot, tok, block, min_time):
    """Median µs per step over blocks of ``block`` steps, each block from a fresh copy of ``snapshot``."""
    from torch.utils.benchmark import Timer
    per_call, spent = [], 0.0
    while len(per_call) < 5 or spent < min_time:
        cache = copy.deepcopy(snapshot)  # outside the timed region
        m = Timer("model(tok, cache=cache)", globals=dict(model=model, tok=tok, cache=cache)).timeit(block)
        per_call.append(m.mean * 1e6)
        spent += m.mean * block
    return per_call


def measure(case: dict) -> dict:
    """One case: {"model", "kind": decode|forward|step1, "max_len", "block", "min_time"}."""
    import torch
    from torch.utils.benchmark import Timer
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    model = _build(case["model"])
    ids = torch.randint(0, CONFIG["vocab_size"], (1, CACHED + 1), generator=torch.Generator().manual_seed(1))
    used = None
    if case["kind"] == "forward":
        x = ids[:, :FORWARD_LEN]
        model(x)  # warm-up
        m = Timer("model(x)", globals=dict(model=model, x=x)).blocked_autorange(min_run_time=case["min_time"])
        samples = [t * 1e6 for t in m.times]
        tokens = FORWARD_LEN
    else:
        tokens = CACHED if case["kind"] == "decode" else PREFILL
        max_len = case["max_len"] if case["kind"] == "decode" else STEP1_MAX_LEN
        snapshot, used = _filled_cache(model, max_len, tokens, ids)
        tok = ids[:, tokens:tokens + 1]
        model(tok, cache=copy.deepcopy(snapshot))  # warm-up
        samples = _time_steps(model, snapshot, tok, case["block"], case["min_time"])
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return dict(case, median_us=statistics.median(samples), iqr_us=q[2] - q[0], samples=len(samples),
                tokens_cached=tokens, max_len_used=used, torch=torch.__version__)


def worker() -> None:
    """Answer one JSON case per stdin line with one JSON result line (after a hello line)."""
    import bsbr
    print(json.dumps(dict(hello=True, bsbr=bsbr.__file__)), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            print(json.dumps(measure(json.loads(line))), flush=True)
        except Exception as exc:  # reported, not fatal: the other cases still run
            print(json.dumps(dict(json.loads(line), error=f"{type(exc).__name__}: {exc}")), flush=True)


# ----------------------------------------------------------------------------- parent


class Worker:
    """A persistent worker process that imports bsbr and evals from ``tree``."""

    def __init__(self, label: str, tree: Path):
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.label, self.tree = label, tree
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=tree,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline())
        if not Path(hello["bsbr"]).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"{label}: the worker imported bsbr from {hello['bsbr']}, not from {tree}")

    def ask(self, case: dict) -> dict:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return dict(out, tree=self.label)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cases(models, max_lens, block, min_time) -> list:
    out = []
    for name in models:
        out += [dict(model=name, kind="decode", max_len=L, block=block, min_time=min_time) for L in max_lens]
        out += [dict(model=name, kind=k, max_len=None, block=block, min_time=min_time) for k in ("forward", "step1")]
    return out


def run(workers: list, todo: list, rounds: int) -> list:
    """Every case on every worker, ``rounds`` times, alternating which worker goes first."""
    rows = []
    for r in range(rounds):
        for i, case in enumerate(todo):
            order = workers if (r + i) % 2 == 0 else workers[::-1]
            for w in order:
                row = w.ask(case)
                row["round"] = r
                rows.append(row)
                if "error" in row:
                    print(f"  {w.label} {case['model']} {case['kind']} {case['max_len']}: {row['error']}",
                          file=sys.stderr)
    return rows


def summarise(rows: list) -> dict:
    """(tree, model, kind, max_len) -> median over rounds of the per-round medians."""
    groups = {}
    for row in rows:
        if "median_us" in row:
            groups.setdefault((row["tree"], row["model"], row["kind"], row["max_len"]), []).append(row["median_us"])
    return {k: statistics.median(v) for k, v in groups.items()}


def table(summary: dict, labels: list, models, max_lens) -> str:
    head, ref = labels[0], (labels[1] if len(labels) > 1 else None)
    cols = [f"decode@{L}" for L in max_lens] + ["16k/400", "forward", "step1"]
    if ref:
        cols += [f"fwd {head}/{ref}", f"step1 {head}/{ref}"] + [f"dec@{L} {head}/{ref}" for L in max_lens]
    lines = ["model         tree      " + "  ".join(f"{c:>14}" for c in cols)]
    for name in models:
        for label in labels:
            get = lambda kind, L=None, t=label: summary.get((t, name, kind, L))  # noqa: E731
            vals = [get("decode", L) for L in max_lens]
            lo, hi = get("decode", min(max_lens)), get("decode", max(max_lens))
            ratio = hi / lo if lo and hi else None
            cells = vals + [ratio, get("forward"), get("step1")]
            if ref and label == head:
                h = lambda kind, L=None: summary.get((head, name, kind, L))  # noqa: E731
                r = lambda kind, L=None: summary.get((ref, name, kind, L))  # noqa: E731
                div = lambda a, b: a / b if a and b else None  # noqa: E731
                cells += [div(h("forward"), r("forward")), div(h("step1"), r("step1"))]
                cells += [div(h("decode", L), r("decode", L)) for L in max_lens]
            elif ref:
                cells += [None] * (2 + len(max_lens))
            lines.append(f"{name:<13} {label:<9} " + "  ".join(_cell(c) for c in cells))
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return f"{'-':>14}"
    return f"{v:>14.3f}" if v < 20 else f"{v:>14.1f}"


def machine() -> dict:
    """This process's machine (it runs from the working tree, so the suite's machine facts are there)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from evals.machine import machine as suite_machine
    return dict(platform=platform.platform(), cpu_model=suite_machine()["cpu_model"], machine=platform.machine(),
                python=platform.python_version(), torch=torch.__version__, cpu_count=os.cpu_count(),
                node=platform.node(), threads=1)


def _rev(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def write(out: Path, rows: list, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["tree", "round", "model", "kind", "max_len", "tokens_cached", "max_len_used", "median_us",
              "iqr_us", "samples", "block", "min_time", "torch", "error"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", help="another git ref to time side by side (e.g. be14470)")
    p.add_argument("--out", default="results/decode_bench/decode", help="CSV/JSON path, without suffix")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--max-lens", default=",".join(map(str, MAX_LENS)))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=20, help="calls per timed block")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per case and round")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker()
        return 0
    models = [m for m in a.models.split(",") if m]
    bad = sorted(set(models) - set(MODELS))
    if bad:
        p.error(f"unknown model(s) {bad}; valid: {', '.join(MODELS)}")
    max_lens = [int(x) for x in a.max_lens.split(",") if x]
    if not max_lens or min(max_lens) <= CACHED:
        p.error(f"--max-lens must all exceed the {CACHED} cached tokens, got {a.max_lens!r}")
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as tmp:
        trees = [("HEAD", REPO)]
        if a.ref:
            ref_tree = Path(tmp) / "ref"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref_tree), a.ref],
                           check=True, capture_output=True)
            trees.append((a.ref, ref_tree))
        try:
            meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(),
                        trees={label: _rev(t) for label, t in trees}, config=CONFIG, prefill=PREFILL,
                        cached=CACHED, rounds=a.rounds, block=a.block, min_time=a.min_time,
                        loadavg_before=os.getloadavg())
            workers = [Worker(label, t) for label, t in trees]
            rows = run(workers, cases(models, max_lens, a.block, a.min_time), a.rounds)
            for w in workers:
                w.close()
        finally:
            if a.ref:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref_tree)],
                               capture_output=True)
    meta["loadavg_after"] = os.getloadavg()
    summary = summarise(rows)
    meta["summary"] = [dict(tree=k[0], model=k[1], kind=k[2], max_len=k[3], median_us=v) for k, v in summary.items()]
    write(Path(a.out), rows, meta)
    print(table(summary, [label for label, _ in trees], models, max_lens))
    print(f"\nwrote {Path(a.out).with_suffix('.csv')} and {Path(a.out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
