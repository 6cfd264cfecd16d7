"""The sweep behind ``bsbr-eval compare``: measure each case of a grid and append its row.

- A failing configuration is a row, never a crash: ``measure`` turns exceptions into ``error``
  rows and out-of-memory into ``oom``; after an ``oom`` at length ``n`` the longer lengths of the
  same model / device / mode (same level, dtype and config) are recorded as ``skipped``.
- CUDA cases on a machine without CUDA are ``skipped`` (the CLI refuses CUDA-only sweeps).
- The output is claimed through ``evals.results`` (validated, locked for the whole sweep, never
  replaced without ``resume``); rows are appended whole.
- ``resume=True`` keeps the rows already in the CSV and measures only the missing cases (an
  ``oom`` among the kept rows still skips the longer lengths after it).
- A rich progress bar shows the current configuration and the estimated time left; a rich table
  summarises the rows at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from evals.grid import DEVICES, DTYPES, SDPA_BACKENDS, Case, expand_grid, parse_shard, shard as take_shard
from evals.measure import calibrate, empty_row, measure, parse_inject
from evals.options import check_fraction, check_positive, choose, positive_ints
from evals.registry import LEVELS, MODES, REGISTRY, ModelConfig
from evals.results import (COLUMNS, KEY_COLUMNS, ResultsError, append_row, case_key, claim_output, completed_keys,
                           environment, new_run_id, outcome, read_sidecar, sidecar_path, utc_now, utc_stamp,
                           write_sidecar)

log = logging.getLogger(__name__)

_SEQ = KEY_COLUMNS.index("seq_len")


def _group(key: tuple) -> tuple:
    """A case identity without its length: an OOM skips the rest of its group."""
    return key[:_SEQ] + key[_SEQ + 1:]


class Rows(list):
    """The rows of the CSV after a sweep; ``kept`` of them (the first) were there before it."""

    kept: int = 0

    @property
    def new(self) -> list:
        return self[self.kept:]


def run_sweep(cases: Sequence[Case], output: Path | str, *, resume: bool = False, repeats: int = 10,
              warmup: int = 1, min_run_time: float = 0.2, threads: Optional[int] = None,
              inject: Optional[dict] = None, show_progress: bool = True, console: Optional[Console] = None,
              settings: Optional[dict] = None) -> Rows:
    """Measure ``cases`` in order, appending one row per case to ``output``; returns every row
    of the CSV (kept ones first when resuming). Writes the JSON sidecar next to the CSV.

    ``output`` is claimed for the whole sweep (``results.claim_output``): checked, locked, and
    refused with a ``ResultsError`` if it already holds rows and ``resume`` is False, or if it is
    not a results CSV. A failed write raises ``results.OutputError``; the rows before it stay.
    """
    output = Path(output)
    inject = parse_inject() if inject is None else inject
    threads = threads or torch.get_num_threads()
    with claim_output(output, resume=resume, columns=COLUMNS, exact=True) as kept:
        rows = _sweep(cases, output, kept, repeats=repeats, warmup=warmup, min_run_time=min_run_time,
                      threads=threads, inject=inject, show_progress=show_progress, console=console,
                      settings=settings)
    return rows


def _sweep(cases, output: Path, kept: list[dict], *, repeats, warmup, min_run_time, threads, inject,
           show_progress, console, settings) -> Rows:
    done = completed_keys(kept)
    oom_at = {}  # group -> first length that ran out of memory
    for r in kept:
        if r["status"] == "oom":
            g = _group(case_key(r))
            oom_at[g] = min(oom_at.get(g, int(r["seq_len"])), int(r["seq_len"]))

    env = environment()
    # what every measurement ran with (pinned), and what torch would have used unpinned
    env["torch_num_threads_default"], env["torch_num_threads"] = env["torch_num_threads"], threads
    info = dict((read_sidecar(output) if kept else None) or {}, **env)
    run_id = kept[0]["run_id"] if kept else new_run_id(env.get("git_sha") or "")
    session = {"command": env["command"], "git_sha": env["git_sha"], "git_dirty": env["git_dirty"],
               "started_utc": utc_now(), "ended_utc": None,
               "threads": threads, "inject_slowdown": inject,
               "warmup": warmup, "calibration_matmul_gflops": calibrate(cases, threads=threads)}
    info.update(run_id=run_id, settings=settings or {}, cases=len(cases), inject_slowdown=inject,
                calibration_matmul_gflops=session["calibration_matmul_gflops"], threads=threads)
    info.setdefault("started_utc", session["started_utc"])
    info["sessions"] = list(info.get("sessions", [])) + [session]
    write_sidecar(output, info)

    cuda_ok = torch.cuda.is_available()
    rows = Rows(kept)
    rows.kept = len(kept)
    todo = [c for c in cases if case_key(c.fields()) not in done]
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console or Console(stderr=True), disable=not show_progress)
    with progress:
        task = progress.add_task("starting", total=len(todo))
        for case in todo:
            progress.update(task, description=case.label())
            g = _group(case_key(case.fields()))
            common = dict(run_id=run_id, threads=threads, inject=float(inject.get(case.model, 1.0)))
            if case.device.startswith("cuda") and not cuda_ok:
                row = empty_row(case, "skipped", "CUDA is not available on this machine", **common)
            elif g in oom_at and case.seq_len > oom_at[g]:
                row = empty_row(case, "skipped", f"a shorter length (n={oom_at[g]}) of this model, device "
                                "and mode ran out of memory", **common)
            else:
                row = measure(case, repeats=repeats, warmup=warmup, min_run_time=min_run_time, threads=threads,
                              inject=inject, run_id=run_id)
                if row["status"] == "oom":
                    oom_at[g] = min(oom_at.get(g, case.seq_len), case.seq_len)
                if row["status"] in ("oom", "error"):
                    log.warning("%s: %s %s", case.label(), row["status"], row["error"])
            append_row(output, row)
            rows.append(row)
            progress.advance(task)

    # measured again at the end: a drift between the two says the machine's load changed mid-sweep
    session["calibration_matmul_gflops_end"] = calibrate(cases, threads=threads)
    info["calibration_matmul_gflops_end"] = session["calibration_matmul_gflops_end"]
    session["ended_utc"] = info["ended_utc"] = utc_now()
    write_sidecar(output, info)
    return rows


def run_compare(*, models=None, seq_lengths=None, devices=None, modes=None, level: str = "model",
                dtype: str = "float32", batch_size: int = 1, repeats: int = 10, min_run_time: float = 0.2,
                warmup: int = 1, compile: bool = False, sdpa_backend: str = "auto",
                decode_tokens: int = 16, output: Optional[Path] = None, resume: bool = False,
                shard: Optional[str] = None, threads: int = 1, seed: int = 0, console: Optional[Console] = None,
                **config) -> tuple[Rows, int, str]:
    """``bsbr-eval compare``: check the options (``ResultsError`` names the bad one), build the grid,
    sweep it into ``output``; returns the rows, the exit code and the closing line.

    ``config`` holds the ``ModelConfig`` overrides (``hidden_dim=...``; None means the default).
    """
    names = choose("--models", models, tuple(REGISTRY), default=tuple(REGISTRY))
    lengths = positive_ints("--seq-lengths", seq_lengths, default=(64, 128, 256, 512, 1024))
    devs = choose("--devices", devices, DEVICES, default=("cpu",))
    mode_list = choose("--modes", modes, MODES, default=("forward",))
    level, dtype = choose("--level", [level], LEVELS)[0], choose("--dtype", [dtype], DTYPES)[0]
    sdpa_backend = choose("--sdpa-backend", [sdpa_backend], SDPA_BACKENDS)[0]
    if "cuda" in devs and "cpu" not in devs and not torch.cuda.is_available():
        raise ResultsError("--devices: CUDA is not available on this machine; valid: cpu "
                           "(give 'cpu cuda' to record the cuda rows as skipped)")
    check_positive(batch_size=batch_size, repeats=repeats, decode_tokens=decode_tokens, threads=threads, **config)
    check_fraction("--min-run-time", min_run_time)
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ResultsError(f"--warmup must be a non-negative integer, got {warmup!r}")
    cfg = ModelConfig().with_(**{k: v for k, v in config.items() if v is not None})
    from bsbr.shell import check_heads

    try:
        check_heads(cfg.hidden_dim, cfg.num_heads)
        inject = parse_inject()
        slice_ = parse_shard(shard) if shard else None
    except ValueError as e:
        raise ResultsError(str(e)) from None
    if resume and output is None:
        raise ResultsError("--resume needs --output naming the CSV to continue")
    output = Path(output) if output else Path("results") / f"compare_{utc_stamp()}.csv"
    cases = expand_grid(names, lengths, devs, mode_list, level=level, config=cfg, batch_size=batch_size,
                        dtype=dtype, decode_tokens=decode_tokens, seed=seed, compile=compile,
                        sdpa_backend=sdpa_backend)
    if slice_:
        cases = take_shard(cases, *slice_)
    settings = dict(models=names, seq_lengths=lengths, devices=devs, modes=mode_list, level=level, dtype=dtype,
                    batch_size=batch_size, config=cfg.as_dict(), repeats=repeats, min_run_time=min_run_time,
                    decode_tokens=decode_tokens, threads=threads, seed=seed, shard=shard, warmup=warmup,
                    compile=compile, sdpa_backend=sdpa_backend)
    torch.manual_seed(seed)
    rows = run_sweep(cases, output, resume=resume, repeats=repeats, min_run_time=min_run_time, threads=threads,
                     warmup=warmup,
                     inject=inject, settings=settings, console=console)
    code, words = outcome(rows.new)
    summary = f"wrote {len(rows)} rows to {output} (+ {sidecar_path(output).name})"
    return rows, code, summary + (f"; {words}" if words else "")


def _num(v, fmt: str) -> str:
    if v in (None, ""):
        return ""
    v = float(v)
    return f"{v:.0f}" if fmt == ".3g" and v >= 1000 else format(v, fmt)  # 2330, not 2.33e+03


def summary_table(rows: Sequence[dict], title: str = "bsbr-eval compare") -> Table:
    """A rich table of the rows: median time, peak memory, GFLOPs and the error if any."""
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    table.add_column("device mode level", no_wrap=True)
    for col in ("n", "status", "ms", "MiB", "GFLOP"):
        table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    errors = any(r.get("error") for r in rows)
    if errors:
        table.add_column("error", overflow="fold", ratio=1)
    style = {"ok": "green", "oom": "yellow", "error": "red", "skipped": "dim"}
    for r in rows:
        flops = _num(float(r["flops"]) / 1e9, ".3g") if r.get("flops") not in (None, "") else ""
        table.add_row(str(r["model"]), f"{r['device']} {r['mode']} {r['level']}", str(r["seq_len"]),
                      f"[{style.get(r.get('status'), '')}]{r.get('status')}",
                      _num(r.get("time_ms"), ".3g") if r.get("status") == "ok" else "",
                      _num(r.get("peak_memory_mb"), ".1f"), flops, *([str(r.get("error") or "")] if errors else []))
    return table
