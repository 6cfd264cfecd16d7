"""Launching a recall sweep: the preset the options make, the run folder, the two phases of the
protocol on an executor, and rows streamed to ``recall.csv`` as each run finishes.

The folder is an ``evals.output.RunFolder`` of kind ``recall``: a new run needs a new or empty
folder; ``--resume`` needs a folder whose ``recall.csv`` has exactly this module's header and
whose recorded settings equal this run's (each that differs is named). A folder in use by
another run is refused at once, naming its lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

from evals.output import files
from evals import machine
from evals.recall.sweep import COLUMNS, RecallCase, RecallPreset, recall_grid, row_key, run_case, seed_cases, shard_configs

KIND = "recall"
CSV_NAME, LOCK_NAME, SIDECAR_NAME = "recall.csv", "recall.lock", "recall.json"


@dataclass(frozen=True)
class RecallRun:
    """What every training of one run shares besides the preset: the data seed, where it trains,
    the run id, and the shard of the configurations it takes."""

    data_seed: int = 0
    device: str = "cpu"
    threads: int = 1
    run_id: str = ""
    shard: Optional[tuple] = None


# ----------------------------------------------------------------------------- the sweep


def _task(case: RecallCase, *, preset: RecallPreset, run: RecallRun) -> dict:
    return diverged_as_error(run_case(case, preset, data_seed=run.data_seed, device=run.device, threads=run.threads))


def diverged_as_error(row: dict) -> dict:
    """A training whose loss is not a finite number learned nothing that its accuracy can report
    (a rate too high for the model, say): its row becomes an ``error`` saying so, never ``ok``."""
    loss = row.get("final_loss")
    try:
        finite = loss is None or loss == "" or math.isfinite(float(loss))
    except (TypeError, ValueError):
        finite = False
    if row.get("status") == "ok" and not finite:
        row.update(status="error", error=f"training diverged: the final loss is {loss} (lr {row.get('lr')}); "
                                         "its accuracy means nothing")
    return row


def resume_settings(preset: RecallPreset, run: RecallRun) -> dict:
    """What a resumed run must share with the rows it keeps: the whole protocol (everything but how
    many trainings run at once), the data seed, the device and the threads."""
    from evals.recall.sweep import settings

    return {k: v for k, v in settings(preset).items() if k != "jobs"} | dict(
        data_seed=run.data_seed, device=run.device, threads=run.threads)


def recorded_settings(meta) -> Optional[dict]:
    """``resume_settings`` as a recall.json recorded them (rebuilt for a sidecar that predates the key)."""
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("resume_settings"), dict):
        return meta["resume_settings"]
    if not isinstance(meta.get("settings"), dict):
        return None
    return {k: v for k, v in meta["settings"].items() if k != "jobs"} | {
        k: meta.get(k) for k in ("data_seed", "device", "threads")}


def open_folder(out_dir, preset: RecallPreset, run: RecallRun, *, resume: bool = False):
    """The run's ``RunFolder`` (enter it to claim the folder)."""
    from evals.output.claims import RunFolder

    return RunFolder(Path(out_dir), KIND, COLUMNS, resume=resume, settings=resume_settings(preset, run),
                     header=dict(run_id=run.run_id, task="mqar"), recorded=recorded_settings)


def run_recall(models: Sequence[str], preset: RecallPreset, out_dir, *, executor, resume: bool = False,
               run: RecallRun = RecallRun(), on_start: Optional[Callable[[int], None]] = None,
               on_row: Optional[Callable[[dict], None]] = None) -> list:
    """Run the protocol for ``models`` on ``executor`` into ``out_dir/recall.csv``; every row of
    the (possibly resumed) run, the old ones first. ``on_start(kept)`` once the folder is claimed
    (``kept``: this run's trainings already there), ``on_row(row)`` after each append."""
    from evals import interrupts
    from evals.interrupts import sigterm_as_interrupt

    with sigterm_as_interrupt(), open_folder(out_dir, preset, run, resume=resume) as folder:
        interrupts.hint(f"every finished run is in {folder.csv}; rerun with --resume to continue it")
        return run_phases(models, preset, folder, executor=executor, run=run, on_start=on_start, on_row=on_row)


def run_phases(models, preset: RecallPreset, folder, *, executor, run: RecallRun, on_start=None, on_row=None) -> list:
    """Phase 1 (tune) then phase 2 (seeds), appending each row to the claimed ``folder``."""
    rows = {row_key(r): r for r in folder.rows}
    tune = recall_grid(models, preset)
    if run.shard is not None:
        tune = shard_configs(tune, *run.shard)
    if on_start is not None:
        wanted = {c.key() for c in tune} | {c.key() for c in seed_cases(tune, rows, preset)}
        on_start(len(wanted & set(rows)))
    fn = partial(_task, preset=preset, run=run)
    with executor:
        for phase in ("tune", "seed"):
            todo = tune if phase == "tune" else seed_cases(tune, rows, preset)
            todo = [c for c in todo if c.key() not in rows]
            for case, row in executor.map_unordered(fn, todo):
                row["run_id"] = run.run_id
                folder.append(row)
                rows[case.key()] = row
                if on_row is not None:
                    on_row(row)
    return list(rows.values())


def expected_runs(models: Sequence[str], preset: RecallPreset, shard: Optional[tuple]) -> int:
    tune = recall_grid(models, preset)
    n_tune = len(shard_configs(tune, *shard) if shard else tune)
    return n_tune + n_tune // len(preset.lrs) * (len(preset.seeds) - 1)


# ----------------------------------------------------------------------------- from the options


def configure(o) -> RecallPreset:
    """The preset ``o`` names (``evals.recall.command.Options``) with its overrides, checked; a
    one-line ValueError otherwise.

    Giving ``seq_lengths`` or ``num_pairs`` replaces a preset's explicit (length, pairs) points by
    lengths x pairs (all the points that fit for ``cross`` presets, one factor at a time otherwise).
    """
    from evals.options import check_finite, check_jobs, check_positive, positive_ints, split_list
    from evals.recall.sweep import PRESETS

    name = o.preset or "quick"
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown value {name!r}; valid: {', '.join(PRESETS)}")
    if o.quick and name != "quick":
        raise ValueError(f"--quick conflicts with --preset {name}; give one of them")
    base = PRESETS[name]
    check_positive(vocab_size=o.vocab_size, max_steps=o.max_steps, batch_size=o.batch_size, seeds=o.seeds,
                   jobs=o.jobs, compression_factor=o.compression_factor)
    lrs = [check_finite("--lrs", v, low=0, low_open=True) for v in split_list(o.lrs)]
    if o.target_acc is not None:
        check_finite("--target-acc", o.target_acc, low=0, low_open=True, high=1)
    ints = {f: positive_ints(f"--{f.replace('_', '-')}", getattr(o, f)) or None
            for f in ("seq_lengths", "num_pairs", "hidden_dims", "sizes")}

    def pick(given, values, base_value):
        vals = tuple(given) if given else values
        return vals, (base_value if base_value in vals else vals[0])

    lens, base_len = pick(ints["seq_lengths"], base.seq_lens, base.base_seq_len)
    pairs, base_pairs = pick(ints["num_pairs"], base.num_pairs, base.base_num_pairs)
    dims, base_dim = pick(ints["hidden_dims"], base.hidden_dims, base.base_hidden_dim)
    sz, base_sz = pick(ints["sizes"], base.sizes, base.base_size)
    train = base.train.with_(**{k: v for k, v in dict(max_steps=o.max_steps, batch_size=o.batch_size,
                                                      target_acc=o.target_acc).items() if v is not None})
    replaced = bool(ints["seq_lengths"] or ints["num_pairs"])
    p = base.with_(seq_lens=lens, num_pairs=pairs, base_seq_len=base_len, base_num_pairs=base_pairs,
                   hidden_dims=dims, sizes=sz, base_hidden_dim=base_dim, base_size=base_sz,
                   vocab_size=o.vocab_size or base.vocab_size, train=train,
                   task_pairs=None if replaced else base.task_pairs,
                   batch_by_len=None if o.batch_size else base.batch_by_len,
                   lrs=tuple(float(v) for v in lrs) if lrs else base.lrs,
                   seeds=tuple(range(o.seeds)) if o.seeds else base.seeds,
                   jobs=check_jobs(o.jobs, o.threads, o.executor, default=base.jobs),
                   compression_factor=o.compression_factor or base.compression_factor)
    return p.check()


def recall_command(o) -> tuple[dict, RecallPreset]:
    """Everything ``bsbr-eval recall`` does after parsing: check (one ``ResultsError`` line, exit 2),
    run, summary, figures, sidecar. KeyboardInterrupt passes through with every finished row kept."""
    import torch

    from evals.errors import ResultsError
    from evals.executors import make_executor
    from evals.grid import parse_shard
    from evals.options import check_positive, check_seed
    from evals.registry import select

    try:
        names = select("--models", o.models)
        if o.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device: CUDA is not available on this machine; valid: cpu")
        check_positive(threads=o.threads)
        check_seed(o.seed)
        preset = configure(o)
        run = RecallRun(data_seed=o.seed, device=o.device, threads=o.threads,
                        run_id=f"recall-{machine.utc_now()}", shard=parse_shard(o.shard) if o.shard else None)
        ex = make_executor(o.executor, jobs=1 if o.device == "cuda" and o.executor == "local" else preset.jobs,
                           address=o.address, threads=o.threads, gpu=o.device == "cuda")
    except ResultsError:
        raise
    except ValueError as e:
        raise ResultsError(str(e)) from None
    out = Path(o.output_dir) if o.output_dir else Path("results") / f"recall_{machine.utc_stamp()}"
    return _run(names, preset, run, out, ex, o), preset


def _run(names, preset: RecallPreset, run: RecallRun, out: Path, ex, o) -> dict:
    from evals.console import err, progress_bar
    from evals.recall import report
    from evals.recall.sweep import settings

    start = machine.utc_now()
    bar, on_start, on_row = progress_bar(err(), expected_runs(names, preset, run.shard), "recall sweep", _describe)
    try:
        rows = run_recall(names, preset, out, executor=ex, resume=o.resume, run=run, on_start=on_start, on_row=on_row)
    finally:
        bar.stop()
    csv_path = out / CSV_NAME
    summary = report.summarize(rows)
    broken = report.broken_configs(summary)
    files.write_sidecar(csv_path, dict(machine.environment(), run_id=run.run_id, utc_start=start,
                                         utc_end=machine.utc_now(), task="mqar", preset=o.preset or "quick",
                                         settings=settings(preset), models=names, device=run.device,
                                         threads=run.threads, executor=o.executor, address=o.address,
                                         jobs=preset.jobs, data_seed=run.data_seed, shard=o.shard, broken=broken,
                                         resume_settings=resume_settings(preset, run)))
    files.write_text(out / "summary.md", report.markdown_table(summary))
    figures = report.plot_run(summary, preset, out)
    return dict(rows=rows, summary=summary, summary_rows=report.summary_rows(summary), figures=figures,
                broken=broken, csv=csv_path)


def _describe(row) -> str:
    acc = f"{float(row['test_acc']):.3f}" if row["status"] == "ok" else row["status"]
    return (f"recall: {row['model']} n={row['seq_len']} P={row['num_pairs']} d={row['hidden_dim']} "
            f"lr={float(row['lr']):g} seed={row['seed']} -> {acc}")
