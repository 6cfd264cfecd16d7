"""Launching a recall sweep: the output folder (lock, resume, never replacing a run), the two
phases of the protocol on an executor, and rows streamed to ``recall.csv`` as each run finishes.

Folder rules (issue 12):
- without ``resume`` the folder must not exist or be empty: an earlier run is never replaced;
- the folder is locked (``recall.lock``, ``evals.locking``) for the whole run: a second run
  into it exits with a message naming the lock, before it reads or writes anything;
- ``resume`` continues only a folder whose ``recall.csv`` has exactly this module's header;
  anything else is refused and left byte-identical.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

from evals import results
from evals.interrupts import sigterm_as_interrupt
from evals.locking import LockHeld, acquire, release
from evals.recall.sweep import (COLUMNS, RecallCase, RecallPreset, recall_grid, row_key, run_case, seed_cases,
                                shard_groups)

CSV_NAME, LOCK_NAME, SIDECAR_NAME = "recall.csv", "recall.lock", "recall.json"


OutputError = results.ResultsError  # the output folder cannot be used as asked (one line: what, and what to do)


# ----------------------------------------------------------------------------- the output folder


@contextmanager
def locked_output(out_dir, *, resume: bool):
    """Hold ``out_dir``'s lock for the block; yields the rows already there (``resume``) or []."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output-dir {out} is a file; give a folder (new, or a recall run with --resume)")
    lock_path, csv_path = out / LOCK_NAME, out / CSV_NAME
    # read-only checks first, so that a folder we refuse never gets even a lock file
    if not resume and out.is_dir() and not lock_path.exists() and _holds_something(out):
        raise OutputError(f"--output-dir {out} already exists and is not empty; pass --resume to continue a "
                          f"recall run there, or choose a new folder")
    if resume:
        if not csv_path.is_file():
            raise OutputError(f"--resume: {out} holds no {CSV_NAME}; it is not a recall run (left untouched)")
        check_header(csv_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--output-dir {out}: cannot create it ({e.strerror or e}); choose a writable folder") from None
    try:
        fd = acquire(lock_path)
    except LockHeld:
        raise OutputError(f"--output-dir {out} is in use: another recall run holds {lock_path}; "
                          f"wait for it or choose another folder") from None
    except OSError as e:
        raise OutputError(f"--output-dir {out}: cannot lock {lock_path} ({e.strerror or e})") from None
    try:
        yield from_locked(out, csv_path, resume=resume)
    finally:
        release(lock_path, fd)  # the lock file goes with the lock


def from_locked(out: Path, csv_path: Path, *, resume: bool):
    """The rows a locked folder already holds ([] for a new run), after checking it again."""
    if not resume:
        if _holds_something(out):  # the folder was filled between the check above and the lock
            raise OutputError(f"--output-dir {out} already exists and is not empty; pass --resume to continue")
        return []
    if not csv_path.is_file():
        raise OutputError(f"--resume: {out} holds no {CSV_NAME}; it is not a recall run (left untouched)")
    return read_rows(csv_path)


def _holds_something(out: Path) -> bool:
    """Whether ``out`` holds anything but its lock and the row-less sidecar of a run killed before
    its first row (ours, replaceable: it describes no result)."""
    others = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if [p.name for p in others] == [SIDECAR_NAME]:
        try:
            return not results._ours(results.read_sidecar(out / CSV_NAME))
        except results.ResultsError:
            return True
    return bool(others)


def check_header(path) -> None:
    """ResultsError (file untouched) unless ``path``'s first line is exactly this module's header."""
    results.check_header(Path(path), COLUMNS, exact=True)


def read_rows(path) -> list:
    """The rows of a recall CSV; refused (file untouched) unless the header is exactly ours. A torn
    last line (a crash mid-write) is cut back, so the next append starts on a fresh line."""
    check_header(path)
    results.repair(path)
    return results.read_rows(path, COLUMNS)


def append_row(path, row: dict) -> None:
    """Append one whole row through the results layer (header first on a new file)."""
    results.append_row(path, row, COLUMNS)


# ----------------------------------------------------------------------------- the sweep


def _task(case: RecallCase, *, preset: RecallPreset, data_seed: int, device: str, threads: int) -> dict:
    return diverged_as_error(run_case(case, preset, data_seed=data_seed, device=device, threads=threads))


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


def resume_settings(preset: RecallPreset, *, data_seed: int, device: str, threads: int) -> dict:
    """What a resumed run must share with the rows it keeps: the whole protocol (everything but how
    many trainings run at once), the data seed, the device and the threads."""
    from evals.recall.sweep import settings

    return {k: v for k, v in settings(preset).items() if k != "jobs"} | dict(data_seed=data_seed, device=device,
                                                                               threads=threads)


def _recorded_settings(meta) -> Optional[dict]:
    """``resume_settings`` as a recall.json recorded them (rebuilt for a sidecar that predates the key)."""
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("resume_settings"), dict):
        return meta["resume_settings"]
    if not isinstance(meta.get("settings"), dict):
        return None
    return {k: v for k, v in meta["settings"].items() if k != "jobs"} | {
        k: meta.get(k) for k in ("data_seed", "device", "threads")}


def run_recall(models: Sequence[str], preset: RecallPreset, out_dir, *, executor, data_seed: int = 0,
               device: str = "cpu", threads: int = 1, run_id: str = "", resume: bool = False,
               shard: Optional[tuple] = None, on_row: Optional[Callable[[dict], None]] = None) -> list:
    """Run the protocol for ``models`` on ``executor`` into ``out_dir/recall.csv``; return every row
    of the (possibly resumed) run, the old ones first.

    Phase 1 trains every tune case not already in the CSV; phase 2 the seed runs at each group's
    best rate (chosen from all its tune rows, old and new). Each row is appended as its run
    finishes, whatever the executor; ``on_row(row)`` is called after each append (progress), and
    ``on_row(None)`` once the folder is locked and the work begins.
    """
    with sigterm_as_interrupt(), locked_output(out_dir, resume=resume) as old_rows:
        csv_path = Path(out_dir) / CSV_NAME
        expected = resume_settings(preset, data_seed=data_seed, device=device, threads=threads)
        if resume:
            results.check_same_settings(_recorded_settings(results.read_sidecar(csv_path)), expected, out_dir)
        else:  # recorded now, so that a run killed before its end can still be resumed
            results.write_sidecar(csv_path, dict(results.environment(), run_id=run_id, task="mqar",
                                                 resume_settings=expected))
        if on_row is not None:
            on_row(None)
        try:
            return _run_phases(models, preset, csv_path, old_rows, executor=executor, data_seed=data_seed,
                               device=device, threads=threads, run_id=run_id, shard=shard, on_row=on_row)
        except BaseException:
            if not resume and not csv_path.exists():  # stopped before its first row: leave the folder empty
                results.sidecar_path(csv_path).unlink(missing_ok=True)
            raise


def _run_phases(models, preset, csv_path: Path, old_rows, *, executor, data_seed, device, threads, run_id, shard,
                on_row) -> list:
    """Phase 1 (tune) then phase 2 (seeds) of ``run_recall``, appending each row as it comes."""
    rows = {row_key(r): r for r in old_rows}
    tune = recall_grid(models, preset)
    if shard is not None:
        tune = shard_groups(tune, *shard)
    fn = partial(_task, preset=preset, data_seed=data_seed, device=device, threads=threads)
    with executor:
        for phase in ("tune", "seed"):
            todo = tune if phase == "tune" else seed_cases(tune, rows, preset)
            todo = [c for c in todo if c.key() not in rows]
            for case, row in executor.map_unordered(fn, todo):
                row["run_id"] = run_id
                append_row(csv_path, row)
                rows[case.key()] = row
                if on_row is not None:
                    on_row(row)
    return list(rows.values())


# ----------------------------------------------------------------------------- from the command line


def configure(preset: str = "quick", *, seq_lens=None, num_pairs=None, hidden_dims=None, sizes=None,
              vocab_size=None, max_steps=None, batch_size=None, lrs=None, seeds=None, target_acc=None,
              jobs=None, compression_factor=None) -> RecallPreset:
    """The named preset with the given overrides applied, checked; a one-line ValueError otherwise.

    Giving ``seq_lens`` or ``num_pairs`` replaces a preset's explicit (length, pairs) points by
    lengths x pairs (all the points that fit for ``cross`` presets, one factor at a time otherwise).
    """
    from evals.options import check_finite, check_positive
    from evals.recall.sweep import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown value {preset!r}; valid: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    check_positive(vocab_size=vocab_size, max_steps=max_steps, batch_size=batch_size, seeds=seeds, jobs=jobs,
                   compression_factor=compression_factor)
    if lrs is not None and not lrs:
        raise ValueError("--lrs must be finite numbers > 0, got nothing")
    for v in lrs or ():
        check_finite("--lrs", v, low=0, low_open=True)
    if target_acc is not None:
        check_finite("--target-acc", target_acc, low=0, low_open=True, high=1)

    def pick(given, values, base_value):
        vals = tuple(given) if given else values
        return vals, (base_value if base_value in vals else vals[0])

    lens, base_len = pick(seq_lens, base.seq_lens, base.base_seq_len)
    pairs, base_pairs = pick(num_pairs, base.num_pairs, base.base_num_pairs)
    dims, base_dim = pick(hidden_dims, base.hidden_dims, base.base_hidden_dim)
    sz, base_sz = pick(sizes, base.sizes, base.base_size)
    train = base.train.with_(**{k: v for k, v in dict(max_steps=max_steps, batch_size=batch_size,
                                                      target_acc=target_acc).items() if v is not None})
    p = base.with_(seq_lens=lens, num_pairs=pairs, base_seq_len=base_len, base_num_pairs=base_pairs,
                   hidden_dims=dims, sizes=sz, base_hidden_dim=base_dim, base_size=base_sz,
                   vocab_size=vocab_size or base.vocab_size, train=train,
                   task_pairs=None if (seq_lens or num_pairs) else base.task_pairs,
                   batch_by_len=None if batch_size else base.batch_by_len,
                   lrs=tuple(float(v) for v in lrs) if lrs else base.lrs,
                   seeds=tuple(range(seeds)) if seeds else base.seeds, jobs=jobs or base.jobs,
                   compression_factor=compression_factor or base.compression_factor)
    return p.check()


def run_command(preset_name: str, preset: RecallPreset, models: Sequence[str], out_dir, *, executor: str = "local",
                address: Optional[str] = None, device: str = "cpu", threads: int = 1, data_seed: int = 0,
                resume: bool = False, shard: Optional[str] = None, console=None) -> dict:
    """Everything ``bsbr-eval recall`` does after parsing: run, sidecar, table, figures.

    Returns ``{"rows", "summary", "figures", "broken", "csv"}``. ValueError (incl. OutputError) for
    bad input before any work; KeyboardInterrupt passes through after the rows are written.
    """
    import torch
    from rich.console import Console

    from evals import results
    from evals.executors import make_executor
    from evals.grid import parse_shard
    from evals.recall import report
    from evals.recall.sweep import settings
    from evals.registry import resolve_model
    from evals.options import check_positive, check_seed

    names = [resolve_model(m).name for m in models]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: unknown value {device!r}; valid: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: CUDA is not available on this machine; valid: cpu")
    check_positive(threads=threads)
    check_seed(data_seed)
    slice_ = parse_shard(shard) if shard else None
    ex = make_executor(executor, jobs=1 if device == "cuda" and executor == "local" else preset.jobs,
                       address=address, threads=threads, gpu=device == "cuda")
    out = Path(out_dir)
    console = console or Console(stderr=True)
    start = results.utc_now()
    n_tune = len(shard_groups(recall_grid(names, preset), *slice_) if slice_ else recall_grid(names, preset))
    expected = n_tune + n_tune // len(preset.lrs) * (len(preset.seeds) - 1)
    bar, on_row = _progress_bar(console, expected)
    try:
        rows = run_recall(names, preset, out, executor=ex, data_seed=data_seed, device=device, threads=threads,
                          run_id=f"recall-{start}", resume=resume, shard=slice_, on_row=on_row)
    finally:
        bar.stop()
    csv_path = out / CSV_NAME
    summary = report.summarize(rows)
    broken = report.broken_configs(summary)
    results.write_sidecar(csv_path, dict(results.environment(), utc_start=start, utc_end=results.utc_now(),
                                         task="mqar", preset=preset_name, settings=settings(preset), models=names,
                                         device=device, threads=threads, executor=executor, address=address,
                                         jobs=preset.jobs, data_seed=data_seed, shard=shard, broken=broken,
                                         resume_settings=resume_settings(preset, data_seed=data_seed, device=device,
                                                                         threads=threads)))
    results.write_text(out / "summary.md", report.markdown_table(summary))
    figures = report.plot_run(summary, preset, out)
    return dict(rows=rows, summary=summary, figures=figures, broken=broken, csv=csv_path)


def _progress_bar(console, expected: int):
    """A progress bar over ``expected`` runs and the ``on_row`` that advances it (``run_recall``
    calls it with None at the start). The bar starts once the folder is locked, so that a refused
    folder prints one line only."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False)
    task = bar.add_task("recall sweep", total=expected)

    def on_row(row):
        if row is None:  # the start
            bar.start()
            return
        acc = f"{float(row['test_acc']):.3f}" if row["status"] == "ok" else row["status"]
        bar.update(task, advance=1, description=f"recall: {row['model']} n={row['seq_len']} P={row['num_pairs']} "
                                                f"d={row['hidden_dim']} lr={float(row['lr']):g} "
                                                f"seed={row['seed']} -> {acc}")
    return bar, on_row


def recall_command(*, quick: bool = False, preset: Optional[str] = None, models=None, seq_lengths=None,
                   num_pairs=None, hidden_dims=None, sizes=None, vocab_size=None, max_steps=None, batch_size=None,
                   lrs=None, seeds=None, target_acc=None, device: str = "cpu", threads: int = 1, jobs=None,
                   executor: str = "local", address: Optional[str] = None, shard: Optional[str] = None,
                   seed: int = 0, output_dir=None, resume: bool = False,
                   compression_factor=None) -> tuple[dict, RecallPreset]:
    """``bsbr-eval recall`` after parsing: check the options (``ResultsError``, one line, exit 2),
    then ``run_command``. KeyboardInterrupt passes through with every finished row written."""
    from evals.options import choose, positive_ints, split_list
    from evals.recall.sweep import PRESETS
    from evals.registry import REGISTRY

    name = choose("--preset", [preset or "quick"], tuple(PRESETS))[0]
    if quick and name != "quick":
        raise results.ResultsError(f"--quick conflicts with --preset {name}; give one of them")
    names = choose("--models", models, tuple(REGISTRY), default=tuple(REGISTRY))
    executor = choose("--executor", [executor], ("local", "ray"))[0]
    rates = []
    for v in split_list(lrs):
        try:
            rates.append(float(v))
        except ValueError:
            raise results.ResultsError(f"--lrs: {v!r} is not a number; give rates like 1e-3 3e-3 1e-2") from None
    ints = {flag: (positive_ints(flag, given) if given else None) for flag, given in
            (("--seq-lengths", seq_lengths), ("--num-pairs", num_pairs), ("--hidden-dims", hidden_dims),
             ("--sizes", sizes))}
    out = Path(output_dir) if output_dir else Path("results") / f"recall_{results.utc_stamp()}"
    try:
        p = configure(name, seq_lens=ints["--seq-lengths"], num_pairs=ints["--num-pairs"],
                      hidden_dims=ints["--hidden-dims"], sizes=ints["--sizes"], vocab_size=vocab_size,
                      max_steps=max_steps, batch_size=batch_size, lrs=rates or None, seeds=seeds,
                      target_acc=target_acc, jobs=jobs, compression_factor=compression_factor)
        res = run_command(name, p, names, out, executor=executor, address=address, device=device,
                          threads=threads, data_seed=seed, resume=resume, shard=shard)
    except results.ResultsError:
        raise
    except ValueError as e:
        raise results.ResultsError(str(e)) from None
    return res, p
