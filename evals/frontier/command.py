"""``bsbr-eval frontier``: its ``Options`` and ``main(options)``.

RUN_DIR is a finished ``recall`` run (``recall.csv`` + ``recall.json``) or ``lm`` run (``lm.csv`` +
``lm.json``); the sidecar's ``task`` says which, and ``evals.frontier.recall`` / ``evals.frontier.lm``
join the measurements to that run's quality. The run's own lock is held throughout, so no run of
that command writes rows while they are read and joined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.options import models_option, option

KINDS = {"mqar": ("recall", "evals.frontier.recall"), "lm": ("lm", "evals.frontier.lm")}


@dataclass(frozen=True)
class Options:
    """The cost x quality frontier: decode ms/token (batch 1, after each prefill length) and
    decoding-state bytes of every configuration a recall or lm run trained, measured through
    compare's harness, joined with its accuracy (recall) or bits per byte (lm). Writes
    frontier.csv (the timed rows), frontier_table.csv, frontier.md and a figure into RUN_DIR.
    See docs/recall.md and docs/lm.md."""

    run_dir: Path = option(..., "A finished recall or lm run's folder.", argument=True, show_default=False)
    models: Optional[tuple] = models_option("Only these of the run's models (names or import paths). Default: "
                                            "every model the run trained.")
    lengths: Optional[tuple] = option(None, "Prefill lengths before the timed decode steps (refused when this "
                                      "machine's memory cannot hold the prefill and cache). Default: 4096 16384.",
                                      many=True, show_default=False)
    device: str = option("cpu", "cpu or cuda.", choices=("cpu", "cuda"))
    decode_tokens: int = option(16, "One-token steps timed per sample.")
    repeats: int = option(10, "Timed samples per configuration (at least).")
    min_run_time: float = option(0.2, "Minimum seconds of timed work per configuration.")
    threads: int = option(1, "CPU threads, pinned for every measurement and recorded.")
    resume: bool = option(False, "Continue RUN_DIR/frontier.csv: keep its rows and measure only the missing cases.",
                          flags=("--resume",))


def read_run(run_dir: Path) -> tuple:
    """(kind module name, csv name, rows, sidecar) of the finished run in ``run_dir``; one
    ``ResultsError`` line naming what is wrong (not a folder, no finished run, a torn CSV)."""
    import csv as csvlib

    from evals.errors import ResultsError
    from evals.output.files import read_sidecar
    from evals.output.paths import check_source

    run_dir = check_source(run_dir, "RUN_DIR", folder=True, what="a recall or lm run's output folder")
    for task, (kind, module) in KINDS.items():
        path = run_dir / f"{kind}.csv"
        side = read_sidecar(path) if path.is_file() else None
        if side is None or side.get("task") != task or "resume_settings" not in side and "settings" not in side:
            continue
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csvlib.DictReader(f))
        except (OSError, UnicodeDecodeError, csvlib.Error) as e:
            raise ResultsError(f"RUN_DIR: {path} cannot be read ({e}); restore it, or finish the run with --resume")
        whole = [r for r in rows if None not in r and None not in r.values() and r.get("status")]
        if len(whole) != len(rows):
            raise ResultsError(f"RUN_DIR: {path} has {len(rows) - len(whole)} torn row(s); finish or repair the run "
                               f"with `bsbr-eval {kind} --resume` first")
        if not rows:
            raise ResultsError(f"RUN_DIR: {path} has no rows; finish the {kind} run first (--resume)")
        return kind, module, rows, side
    raise ResultsError(f"RUN_DIR: {run_dir} holds no finished recall or lm run (recall.csv with recall.json, or "
                       f"lm.csv with lm.json, as those commands write them)")


def main(o: Options) -> int:
    import importlib

    import torch

    from evals import interrupts
    from evals.console import finish, plural
    from evals.errors import ResultsError
    from evals.frontier.measure import DEFAULT_LENGTHS, Timing, check_memory, measure
    from evals.locking import LockHeld, holding
    from evals.options import check_fraction, check_positive, positive_ints
    from evals.registry import select

    lengths = tuple(positive_ints("--lengths", o.lengths, default=DEFAULT_LENGTHS))
    check_positive(decode_tokens=o.decode_tokens, repeats=o.repeats, threads=o.threads)
    check_fraction("--min-run-time", o.min_run_time)
    if o.device == "cuda" and not torch.cuda.is_available():
        raise ResultsError("--device: CUDA is not available on this machine; valid: cpu")
    kind, module, _, _ = read_run(o.run_dir)
    run_dir, lock = Path(o.run_dir), Path(o.run_dir) / f"{kind}.lock"
    try:
        with holding(lock):
            _, module, rows, side = read_run(run_dir)  # again, under the lock
            k = importlib.import_module(module)
            if o.models:
                keep = set(select("--models", o.models))
                rows = [r for r in rows if r["model"] in keep]
                if not rows:
                    raise ResultsError(f"--models: the run trained none of {', '.join(sorted(keep))}")
            targets = k.summary_targets(rows, side)
            check_memory(targets, lengths, o.device)
            interrupts.hint(f"every finished measurement is in {run_dir / 'frontier.csv'}; rerun with --resume "
                            f"to continue")
            settings = dict(command="frontier", run=str(run_dir), lengths=list(lengths),
                            decode_tokens=o.decode_tokens, device=o.device)
            if o.models:
                settings["models"] = sorted({r["model"] for r in rows})
            timing = Timing(o.device, o.decode_tokens, o.repeats, o.min_run_time, o.threads)
            timed, states = measure(run_dir, targets, lengths, timing, settings=settings, resume=o.resume)
            res = k.report(run_dir, rows, side, timed, states, lengths, o.device)
    except LockHeld:
        raise ResultsError(f"RUN_DIR: a {kind} run is still writing {run_dir} (it holds {lock}); measure its "
                           "frontier once it has finished") from None
    t = res["table"]
    bad = t[t["status"] != "ok"]
    return finish(0, f"wrote {plural(len(t), 'configuration')} to {res['csv']} (+ frontier.md, "
                     f"{plural(len(res['figures']), 'figure')})" + (f"; {len(bad)} with a status other than ok"
                                                                   if len(bad) else ""))
