"""``bsbr-eval lm``: its ``Options`` and ``main(options)``, everything after the flags are parsed.

It checks every option before any work (``launch.configure``), claims the output folder
(``evals.output.RunFolder``), trains on the chosen executor with a progress bar, then writes the
tables, the figures and the sidecar, and returns what the CLI prints.

Files in the output folder: ``lm.csv`` (one row per training, appended as each finishes),
``lm.json`` (its sidecar: machine, corpus, settings, command), ``summary.md``, ``summary.csv``,
``loss_by_position.csv`` (one row per model, context and position bucket), and the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.output import files
from evals import machine
from evals.options import models_option, option

KIND = "lm"


@dataclass(frozen=True)
class Options:
    """Byte-level language modelling on the shipped corpus (the Python 3.11 documentation's
    reStructuredText source, pinned by sha256): every model matched on parameters and on bytes
    seen; test bits per byte and the loss by position. See docs/lm.md."""

    preset: str = option("quick", "quick (a smoke run, seconds), cpu (the committed run: contexts 512 and 2048, "
                         "3 rates, 2 seeds; hours on 2 cores) or gpu (contexts to 16k, 25x the bytes).")
    models: Optional[tuple] = models_option()
    contexts: Optional[tuple] = option(None, "Context lengths in bytes (each shorter than the corpus's shortest "
                                       "document). Default: the preset's.", many=True, show_default=False)
    lrs: Optional[tuple] = option(None, "Learning rates tried on the first seed; each (model, context) is "
                                  "reported at the one with the best validation bits per byte. Default: the "
                                  "preset's.", many=True, show_default=False)
    seeds: Optional[int] = option(None, "Seeds (0..N-1): rates tuned on seed 0, the other seeds at the best rate. "
                                  "Default: the preset's.", show_default=False)
    max_steps: Optional[int] = option(None, "Optimiser steps per training (every model sees the same bytes). "
                                      "Default: the preset's.", show_default=False)
    device: str = option("cpu", "Where to train.", choices=("cpu", "cuda"))
    threads: int = option(1, "CPU threads per training (pinned and recorded).")
    jobs: Optional[int] = option(None, "Trainings at once: local worker processes (at most the usable CPUs / "
                                 "--threads), or the CPUs of a local Ray cluster. Default: the preset's.",
                                 show_default=False)
    executor: str = option("local", "local (this machine's processes) or ray (one Ray task per training).",
                           choices=("local", "ray"))
    address: Optional[str] = option(None, "With --executor ray: join this cluster (auto or host:port) instead of "
                                    "starting a local one.", show_default=False)
    output_dir: Optional[Path] = option(None, "A new or empty folder for lm.csv, its lm.json sidecar, the summary, "
                                        "the loss-by-position table and the figures. Default: "
                                        "results/lm_<UTC time>/.", show_default=False)
    resume: bool = option(False, "Continue the lm run in --output-dir: keep its rows and train only the missing "
                          "runs (refused if its settings differ).")


def main(o: Options) -> int:
    """The command: train, report, print the summary; the exit code."""
    from evals import interrupts, results
    from evals.console import finish, out, plural
    from evals.lm.report import markdown

    res = run(o)
    out().print(markdown(res["summary"], files.read_sidecar(res["csv"])["corpus"]), highlight=False)
    code, words = results.outcome(res["rows"])
    interrupts.hint(f"every training is in {res['csv']}")
    return finish(code, f"wrote {plural(len(res['rows']), 'row')} to {res['csv']} (+ lm.json, summary, loss_by_position.csv, "
                        f"{plural(len(res['files']) - 3, 'figure')})" + (f"; {words}" if words else ""))


def run(o: Options, console=None) -> dict:
    """Train and report; ``{"rows", "summary", "csv", "files"}``. ``ResultsError`` (one line, exit 2)
    for bad input before any work; KeyboardInterrupt passes through with every finished row kept."""
    import torch

    from evals import interrupts
    from evals.console import err, progress_bar
    from evals.errors import ResultsError
    from evals.executors import make_executor
    from evals.lm.corpus import CorpusError, describe, load_documents
    from evals.lm.launch import LMRun, configure, expected_runs, resume_settings, run_lm
    from evals.output.claims import RunFolder
    from evals.registry import select

    try:
        names = select("--models", o.models)
        if o.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device: CUDA is not available on this machine; valid: cpu")
        preset = configure(o)
        corpus = describe(load_documents())
        ex = make_executor(o.executor, jobs=1 if o.device == "cuda" and o.executor == "local" else preset.jobs,
                           address=o.address, threads=o.threads, gpu=o.device == "cuda")
    except (ValueError, CorpusError) as e:
        raise ResultsError(str(e)) from None
    out = Path(o.output_dir) if o.output_dir else Path("results") / f"lm_{machine.utc_stamp()}"
    console = console or err()
    start = machine.utc_now()
    settings = resume_settings(preset, device=o.device, threads=o.threads)
    header = dict(run_id=f"lm-{start}", task="lm", preset=o.preset, corpus=corpus)
    bar, on_start, on_row = progress_bar(console, expected_runs(names, preset), "lm", _describe)
    with RunFolder(out, KIND, _columns(), resume=o.resume, settings=settings, header=header) as folder:
        interrupts.hint(f"every finished training is in {folder.csv}; rerun with --resume to continue")
        try:
            rows = run_lm(names, preset, folder, executor=ex, run=LMRun(o.device, o.threads, header["run_id"]),
                          on_start=on_start, on_row=on_row)
        finally:
            bar.stop()
        made = _report(folder, rows, preset, corpus)
        files.write_sidecar(folder.csv, dict(machine.environment(), **header, utc_start=start,
                                               utc_end=machine.utc_now(), models=names, settings=settings,
                                               executor=o.executor, address=o.address, jobs=preset.jobs,
                                               resume_settings=settings))
    return dict(rows=rows, summary=made["summary"], csv=folder.csv, files=made["written"])


def _columns():
    from evals.lm.sweep import COLUMNS

    return COLUMNS


def _report(folder, rows, preset, corpus) -> dict:
    """summary.csv / summary.md / loss_by_position.csv and the figures, each written whole."""
    from evals.lm import plots, report

    summary = report.summarize(rows)
    table = report.positions_table(rows)
    written = [files.write_frame(folder.path / "summary.csv", summary),
               files.write_text(folder.path / "summary.md", report.markdown(summary, corpus)),
               files.write_frame(folder.path / "loss_by_position.csv", table)]
    written += plots.plot_bpb_vs_context(summary, folder.path)
    written += plots.plot_loss_by_position(table, folder.path, window=preset.window_size, chunk=preset.chunk_size)
    return dict(summary=summary, written=written)


def _describe(row) -> str:
    got = f"{float(row['test_bpb']):.3f} bpb" if row["status"] == "ok" else row["status"]
    return f"lm: {row['model']} context={row['context']} lr={float(row['lr']):g} seed={row['seed']} -> {got}"
