"""``bsbr-eval lm``: ``run(options)`` does everything after the flags are parsed.

It checks every option before any work (``launch.configure``), claims the output folder
(``evals.output.RunFolder``), trains on the chosen executor with a progress bar, then writes the
tables, the figures and the sidecar, and returns what the CLI prints.

Files in the output folder: ``lm.csv`` (one row per training, appended as each finishes),
``lm.json`` (its sidecar: machine, corpus, settings, command), ``summary.md``, ``summary.csv``,
``loss_by_position.csv`` (one row per model, context and position bucket), and the figures.
"""

from __future__ import annotations

from pathlib import Path

from evals.lm.launch import KIND, Options, configure, expected_runs, resume_settings, run_lm


def run(o: Options, console=None) -> dict:
    """Train and report; ``{"rows", "summary", "csv", "files"}``. ``ResultsError`` (one line, exit 2)
    for bad input before any work; KeyboardInterrupt passes through with every finished row kept."""
    import torch
    from rich.console import Console

    from evals import results
    from evals.errors import ResultsError
    from evals.executors import make_executor
    from evals.lm.corpus import CorpusError, describe, load_documents
    from evals.options import choose
    from evals.output import RunFolder
    from evals.registry import resolve_model, REGISTRY

    try:
        names = [resolve_model(m).name for m in choose("--models", o.models, tuple(REGISTRY), default=tuple(REGISTRY))]
        if o.device not in ("cpu", "cuda"):
            raise ValueError(f"--device: unknown value {o.device!r}; valid: cpu, cuda")
        if o.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device: CUDA is not available on this machine; valid: cpu")
        preset = configure(o)
        corpus = describe(load_documents())
        ex = make_executor(o.executor, jobs=1 if o.device == "cuda" and o.executor == "local" else preset.jobs,
                           address=o.address, threads=o.threads, gpu=o.device == "cuda")
    except (ValueError, CorpusError) as e:
        raise ResultsError(str(e)) from None
    out = Path(o.output_dir) if o.output_dir else Path("results") / f"lm_{results.utc_stamp()}"
    console = console or Console(stderr=True)
    start = results.utc_now()
    settings = resume_settings(preset, device=o.device, threads=o.threads)
    header = dict(run_id=f"lm-{start}", task="lm", preset=o.preset, corpus=corpus)
    bar, on_start, on_row = _progress_bar(console, expected_runs(names, preset))
    with RunFolder(out, KIND, _columns(), resume=o.resume, settings=settings, header=header) as folder:
        try:
            rows = run_lm(names, preset, folder, executor=ex, device=o.device, threads=o.threads,
                          run_id=header["run_id"], on_start=on_start, on_row=on_row)
        finally:
            bar.stop()
        files = _report(folder, rows, preset, corpus)
        results.write_sidecar(folder.csv, dict(results.environment(), **header, utc_start=start,
                                               utc_end=results.utc_now(), models=names, settings=settings,
                                               executor=o.executor, address=o.address, jobs=preset.jobs,
                                               resume_settings=settings))
    return dict(rows=rows, summary=files.pop("summary"), csv=folder.csv, files=files["written"])


def _columns():
    from evals.lm.sweep import COLUMNS

    return COLUMNS


def _report(folder, rows, preset, corpus) -> dict:
    """summary.csv / summary.md / loss_by_position.csv and the figures, each written whole."""
    from evals import results
    from evals.lm import plots, report

    summary = report.summarize(rows)
    table = report.positions_table(rows)
    written = [results.write_frame(folder.path / "summary.csv", summary),
               results.write_text(folder.path / "summary.md", report.markdown(summary, corpus)),
               results.write_frame(folder.path / "loss_by_position.csv", table)]
    written += plots.plot_bpb_vs_context(summary, folder.path)
    written += plots.plot_loss_by_position(table, folder.path, window=preset.window_size, chunk=preset.chunk_size)
    return dict(summary=summary, written=written)


def _progress_bar(console, expected: int):
    """A progress bar with an estimate of the time left, over the trainings still to run (a
    resumed run counts only what is missing); it starts once the folder is claimed."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task("lm", total=expected)

    def on_start(kept: int):
        bar.update(task, total=max(expected - kept, 0))
        bar.start()

    def on_row(row):
        got = f"{float(row['test_bpb']):.3f} bpb" if row["status"] == "ok" else row["status"]
        bar.update(task, advance=1, description=f"lm: {row['model']} context={row['context']} lr={float(row['lr']):g} "
                                                f"seed={row['seed']} -> {got}")
    return bar, on_start, on_row
