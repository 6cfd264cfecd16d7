"""``bsbr-eval``: the command-line suite. Each command parses its options, calls one function in
``evals`` and maps its errors to exit codes: a ``ResultsError`` (bad input: a flag, a path, a
file) is one line and exit 2; an ``OutputError`` (a write failed part-way) is one line and exit 1;
a run in which nothing succeeded exits 1 with its first error. The checks live in the functions
called, so tests can call them directly."""

from __future__ import annotations

import enum
import re
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from evals import compare as sweep
from evals import forms as fm
from evals import results
from evals.analyze import report
from evals.convert import command as conv
from evals.guard import command as guard
from evals.grid import DTYPES, SDPA_BACKENDS
from evals.options import positive_ints
from evals.registry import LEVELS, REGISTRY
from evals.results import OutputError, ResultsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure, analyse and guard efficient long-sequence attention architectures.")

# ----------------------------------------------------------------------------- choices and parsing

Level = enum.Enum("Level", {v: v for v in LEVELS}, type=str)
Dtype = enum.Enum("Dtype", {v: v for v in DTYPES}, type=str)
Device = enum.Enum("Device", {v: v for v in ("cpu", "cuda")}, type=str)
SdpaBackend = enum.Enum("SdpaBackend", {v: v for v in SDPA_BACKENDS}, type=str)

# Flags that take several values, space- or comma-separated (``--seq-lengths 64 128`` or ``64,128``).
LIST_FLAGS = ("--models", "--seq-lengths", "--lengths", "--contexts", "--devices", "--modes", "--num-pairs", "--hidden-dims", "--sizes", "--lrs",
              "--chunk-sizes", "--chunk_size")


def join_list_flags(args: list[str]) -> list[str]:
    """Rewrite ``--seq-lengths 64 128 256`` as ``--seq-lengths 64,128,256`` before click parses.

    Click options take one value each; this lets the list flags take several space-separated
    values too (up to the next option). Negative numbers count as values so that
    ``--seq-lengths 64 -8`` reaches the length check instead of "no such option".
    """
    out, i = [], 0
    while i < len(args):
        flag, eq, first = args[i].partition("=")
        if args[i] == "--":
            out.extend(args[i:])
            break
        if flag in LIST_FLAGS:
            values = [first] if eq else []
            i += 1
            while i < len(args) and (not args[i].startswith("-") or re.fullmatch(r"-\d+", args[i])):
                values.append(args[i])
                i += 1
            out.extend([flag, ",".join(values)] if values else [flag])
            continue
        out.append(args[i])
        i += 1
    return out


class Command(typer.core.TyperCommand):
    """List flags joined before parsing; a usage error (an unknown option, a value that is not one
    of an enum's choices, not a number) is one line on stderr and exit 2, like every bad input."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, join_list_flags(list(args)))
        except typer.TyperException as e:  # click's usage errors (typer ships its own click)
            if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
                raise
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            raise typer.Exit(2) from None


@contextmanager
def exit_codes():
    """Map the suite's errors to one line on stderr and an exit code (see the module docstring)."""
    try:
        yield
    except OutputError as e:
        typer.echo(f"error: {results.one_line(e)}", err=True)
        raise typer.Exit(1) from None
    except ResultsError as e:
        typer.echo(f"error: {results.one_line(e)}", err=True)
        raise typer.Exit(2) from None


@contextmanager
def interrupted(hint: str):
    """Ctrl-C (or SIGTERM, which the long commands turn into it) ends in one line saying what was
    kept, and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {hint}", err=True)
        raise typer.Exit(130) from None


def finish(code: int, summary: str) -> None:
    """The closing line; exit 1 (first error on stderr) when nothing succeeded."""
    if code:
        typer.echo(f"error: {summary}", err=True)
        raise typer.Exit(code)
    Console().print(summary)


# ----------------------------------------------------------------------------- shared options

def _list(flag: str, help: str):
    return Annotated[Optional[list[str]], typer.Option(flag, help=help, show_default=False)]


def _int(help: str):
    return Annotated[Optional[int], typer.Option(help=help, show_default=False)]


ModelsOpt = _list("--models", "Models, space- or comma-separated (case-insensitive). Default: all seven.")
ThreadsOpt = Annotated[int, typer.Option(help="CPU threads, pinned for every measurement and recorded.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for weights and inputs (recorded).")]
BatchOpt = Annotated[int, typer.Option(help="Batch size.")]
MinRunTimeOpt = Annotated[float, typer.Option(help="Minimum seconds of timed work per configuration (more "
                                                   "samples, up to 200, if --repeats finish sooner).")]
WarmupOpt = Annotated[int, typer.Option(help="Untimed calls before the timed samples (after the compiling "
                                             "call with --compile).")]
OutputCsvOpt = Annotated[Optional[Path], typer.Option(
    help="CSV to write (must end in .csv; its .json sidecar goes beside it; locked while the run "
         "writes it). Default: results/<command>_<UTC time>.csv.", show_default=False)]
OutputDirOpt = Annotated[Optional[Path], typer.Option("--output-dir", help="Folder to write into.",
                                                      show_default=False)]


# ----------------------------------------------------------------------------- commands

@app.command(cls=Command)
def models() -> None:
    """List the registry: name, the published method it follows, complexity, modes, op forms, decoding state, departures."""
    table = Table(title="bsbr-eval models (names are case-insensitive)")
    for col in ("name", "method", "complexity (per head)", "modes", "op forms", "decoding cache holds",
                "departures from the method"):
        table.add_column(col, overflow="fold")
    for spec in REGISTRY.values():
        table.add_row(spec.name, spec.method, spec.complexity, " ".join(spec.modes), " ".join(spec.forms), spec.state,
                      spec.departures)
    Console().print(table)


@app.command(cls=Command)
def compare(
    models: ModelsOpt = None,
    seq_lengths: _list("--seq-lengths", "Sequence lengths, space- or comma-separated. "
                       "Default: 64 128 256 512 1024.") = None,
    devices: _list("--devices", "cpu and/or cuda. cuda without a GPU is an error, unless cpu is also "
                   "given: then its rows are 'skipped'. Default: cpu.") = None,
    modes: _list("--modes", "forward, train and/or decode. Default: forward.") = None,
    level: Annotated[Level, typer.Option(case_sensitive=False, help="model (whole model), layer (one mixer "
                     "with projections) or op (the token-mixing op on per-head inputs).")] = Level.model,
    hidden_dim: _int("Hidden size D. Default: ModelConfig's (256).") = None,
    num_layers: _int("Layers (model level). Default: 2.") = None,
    num_heads: _int("Heads H (D must divide by H). Default: 4.") = None,
    ff_dim: _int("Feed-forward width. Default: 512.") = None,
    vocab_size: _int("Vocabulary size (model level: embedding and LM head). Default: 1000.") = None,
    chunk_size: _int("Chunk size c of BSBR, Linear, DeltaNet, GAU. Default: 64.") = None,
    window_size: _int("Window w of SlidingWindow. Default: 64.") = None,
    compression_factor: _int("BSBR state compression f. Default: none.") = None,
    batch_size: BatchOpt = 1,
    dtype: Annotated[Dtype, typer.Option(case_sensitive=False, help="Floating-point type.")] = Dtype.float32,
    repeats: Annotated[int, typer.Option(help="Minimum timed samples per configuration (time_ms is "
                                              "their median).")] = 10,
    min_run_time: MinRunTimeOpt = 0.2,
    warmup: WarmupOpt = 1,
    compile: Annotated[bool, typer.Option("--compile", help="Time torch.compile(...) of each model, layer or "
                       "op: the first call (compilation) is timed on its own (compile_ms) and --warmup "
                       "calls follow before any sample. FLOPs are counted eagerly.")] = False,
    sdpa_backend: Annotated[SdpaBackend, typer.Option(case_sensitive=False, help="Restrict torch's scaled "
                            "dot-product attention to one backend (flash, efficient, cudnn, math) in every "
                            "model; auto lets torch choose.")] = SdpaBackend.auto,
    decode_tokens: Annotated[int, typer.Option(help="Decode mode: one-token steps timed per sample "
                             "(time_ms is per token); at op level a sample is 1 cached step.")] = 16,
    output: OutputCsvOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue --output: keep its rows, measure only the "
                      "missing configurations (refused for a file that is not a results CSV).")] = False,
    shard: Annotated[Optional[str], typer.Option(help="Run only slice i of N (e.g. 2/4) of the grid; the N "
                     "slices cover it exactly once.", show_default=False)] = None,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    executor: Annotated[str, typer.Option(help="local: measure in this process, one case at a time. ray: "
                        "one Ray task per case, each holding its device's timing slot (one timed CPU case "
                        "per node, one case per GPU), rows streamed into --output as they finish.")] = "local",
    address: Annotated[Optional[str], typer.Option(help="With --executor ray: join this cluster (auto or "
                       "host:port); each node must declare the resource bsbr_cpu_timer=1. Default: start a "
                       "local Ray.", show_default=False)] = None,
) -> None:
    """Sweep models x lengths x devices x modes; write one tidy CSV row per configuration + a JSON sidecar.

    Failures become rows (status oom / error / skipped), never a crash; a sweep in which none
    succeeded exits 1. Set BSBR_EVAL_INJECT_SLOWDOWN="MODEL=FACTOR" to slow a model down on
    purpose (regression self-test).
    """
    with exit_codes(), interrupted(f"every finished row is in {output}; --resume continues it" if output else
                                   "every finished row is in the output CSV named above; --resume continues it"):
        rows, code, summary = sweep.run_compare(
            models=models, seq_lengths=seq_lengths, devices=devices, modes=modes, level=level.value,
            dtype=dtype.value, batch_size=batch_size, repeats=repeats, min_run_time=min_run_time,
            warmup=warmup, compile=compile, sdpa_backend=sdpa_backend.value,
            decode_tokens=decode_tokens, output=output, resume=resume, shard=shard, threads=threads, seed=seed,
            executor=executor, address=address, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ff_dim=ff_dim,
            vocab_size=vocab_size, chunk_size=chunk_size, window_size=window_size,
            compression_factor=compression_factor)
    Console().print(sweep.summary_table(rows))
    finish(code, summary)


@app.command(cls=Command)
def forms(
    models: _list("--models", "Models with a recurrent op form (case-insensitive). Default: all of them "
                  "(see `bsbr-eval models`).") = None,
    seq_lengths: _list("--seq-lengths", "Sequence lengths, space- or comma-separated. Default: 1024 4096.") = None,
    modes: _list("--modes", "forward and/or train (forward + backward). Default: train.") = None,
    hidden_dim: Annotated[int, typer.Option(help="Hidden size D.")] = 512,
    num_heads: Annotated[int, typer.Option(help="Heads H (D must divide by H).")] = 8,
    chunk_size: Annotated[int, typer.Option(help="Chunk size of the parallel form.")] = 64,
    batch_size: BatchOpt = 1,
    repeats: Annotated[int, typer.Option(help="Timed samples per configuration (time_ms is their median).")] = 3,
    min_run_time: MinRunTimeOpt = 0.0,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    device: Annotated[Device, typer.Option(case_sensitive=False, help="Where to run the ops.")] = Device.cpu,
    dtype: Annotated[Dtype, typer.Option(case_sensitive=False, help="Floating-point type.")] = Dtype.float32,
    output: OutputCsvOpt = None,
) -> None:
    """Time an op's chunkwise-parallel form against its token-by-token recurrence (op level).

    Both forms compute the same outputs (the tests pin it); the table shows how much faster the
    parallel form is. The recurrence is slow by nature: keep lengths modest.
    """
    console = Console()
    with exit_codes(), interrupted("the rows finished so far are in the output CSV; forms cannot resume, "
                                   "so rerun it with a new --output"):
        rows, _, code, summary = fm.run_forms(
            models=models, seq_lengths=seq_lengths, modes=modes, hidden_dim=hidden_dim, num_heads=num_heads,
            chunk_size=chunk_size, batch_size=batch_size, repeats=repeats, min_run_time=min_run_time,
            threads=threads, seed=seed, output=output, device=device.value, dtype=dtype.value,
            progress=lambda m, mode, n, form: console.print(f"[dim]{m} {mode} n={n} {form}[/dim]"))
    console.print(fm.speedup_table(rows))
    for r in rows:
        if r["status"] != "ok":
            console.print(f"[red]{r['model']} {r['mode']} n={r['seq_len']} {r['form']}: {r['error']}[/red]")
    finish(code, summary)


@app.command(cls=Command)
def analyze(
    csvs: Annotated[Optional[list[Path]], typer.Argument(
        help="Result CSVs from `compare` (whole runs or --shard slices, read together). "
             "Default: the newest results CSV under results/.", show_default=False)] = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", help="Where fits.csv, relative.csv, crossover.csv, the PNGs and report.md go: a new "
                             "or empty folder, or one holding an earlier analysis. "
                             "Default: <first CSV's stem>_analysis/ beside it.", show_default=False)] = None,
) -> None:
    """Fit how time and memory grow with length, compare with Standard, write plots and a report.

    Rows that cannot be used (torn, not numeric, ok without a time) are left out and listed with why.
    """
    out_arg = ["--output-dir", str(output_dir)] if output_dir else []
    with exit_codes():
        an, out, written = report.run_analyze(
            csvs, output_dir, command=shlex.join(["bsbr-eval", "analyze", *map(str, csvs or []), *out_arg]))
    report.print_run(Console(), an, out, written)


@app.command(cls=Command)
def regress(
    baseline: Annotated[Path, typer.Option(
        help="The committed baseline CSV (its JSON sidecar sits beside it): the guard's configurations and "
             "their exact metrics (FLOPs, parameters, traced memory).")] = Path("results/baselines/cpu.csv"),
    against: Annotated[Optional[str], typer.Option(
        "--against", help="A git ref (e.g. $(cat results/baselines/ref), or a pull request's merge base): "
                          "measure it and the working tree side by side now, interleaved, and compare their "
                          "times pair by pair.", show_default=False)] = None,
    update: Annotated[bool, typer.Option(
        "--update", help="Rewrite the baseline's exact metrics, measured now, and exit 0 (only a file whose "
                         "sidecar says it is a baseline is replaced). With no baseline file yet, measures the "
                         "guard's default grid.")] = False,
    threshold: Annotated[Optional[float], typer.Option(
        help="Smallest slowdown that can count as a regression (0.2 = 20%). Default: the one chosen from "
             "results/regress_power/ (0.2 until it exists).", show_default=False)] = None,
    alpha: Annotated[float, typer.Option(
        help="Significance level of the one-sided Wilcoxon signed-rank test on the paired log ratios.")] = 0.01,
    rounds: Annotated[Optional[int], typer.Option(
        help="With --against: interleaved A/B pairs per configuration. Default: chosen from "
             "results/regress_power/ (16 until it exists).", show_default=False)] = None,
    self_test: Annotated[Optional[float], typer.Option(
        "--self-test", help="With --against: make every model FACTOR times slower on the working-tree side; "
                            "exit 0 only if every model is caught in every level and mode of the grid.",
        show_default=False)] = None,
    power: Annotated[Optional[Path], typer.Option(
        "--power", help="With --against: measure the guard's power curve (detection of 1.1x-1.5x injected, "
                        "false alarms on clean runs) and write it to this folder.", show_default=False)] = None,
    power_runs: Annotated[int, typer.Option(help="With --power: runs per injected factor, and clean runs.")] = 10,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="With --against: write the verdicts as JSON (per configuration: ratio B/A, its 95% "
                       "interval, p, verdict, machine; and the exit code).", show_default=False)] = None,
    summary_path: Annotated[Optional[Path], typer.Option(
        "--summary", help="With --against: write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY "
                          "when that is set).", show_default=False)] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Show every check, not only what moved.")] = False,
) -> None:
    """Guard performance: exit 0 pass, 1 regression, 2 the check could not run, 143 SIGTERM.

    With --against REF (what CI runs): the accepted commit and the working tree are timed side by
    side, interleaved; a configuration whose paired ratio exceeds 1 + --threshold is measured again,
    and regresses if the fresh pairs exceed it too with Wilcoxon p < --alpha. FLOPs, parameters and
    the traced memory must match --baseline exactly. No stored time is ever compared. A baseline with a torn row, missing columns or a
    non-numeric value is refused (exit 2), never passed.
    """
    console = Console(width=None if sys.stdout.isatty() else 120)  # CI logs: one line per table row
    opts = guard.Options(baseline=baseline, against=against, update=update, threshold=threshold, alpha=alpha,
                         rounds=rounds, self_test=self_test, power=power, power_runs=power_runs, show_all=show_all,
                         json_path=json_path, summary_path=summary_path)
    with exit_codes():
        code = guard.run_regress(console, opts)
    raise typer.Exit(code)


@app.command(cls=Command)
def convert(
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", "--model_name", help="Hub name or local save_pretrained directory of a GPT-2 "
        "(loaded by transformers).", show_default=False)] = None,
    chunk_sizes: Annotated[Optional[list[str]], typer.Option(
        "--chunk-sizes", "--chunk_size", help="BSBR chunk sizes to compare, space- or comma-separated "
        "(e.g. 512,128,32). Default: 128.", show_default=False)] = None,
    compression_factor: Annotated[Optional[int], typer.Option(
        "--compression-factor", "--compression_factor", help="BSBR state compression f (must divide the head "
        "size). Default: none.", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", "--seq_len", help="Evaluation window length (at most the GPT-2's n_positions). "
        "Default: min(512, n_positions).", show_default=False)] = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", "--output_dir", help="Write convert.csv, convert_speed.csv, the convert.json sidecar "
        "and the figure here (a folder without a convert.csv).", show_default=False)] = None,
    save_model: Annotated[bool, typer.Option(
        "--save-model", "--save_model", help="Also save each converted model (config.json + model.safetensors) "
        "under --output-dir.")] = False,
    experiment: Annotated[bool, typer.Option(
        "--experiment", help="Train a small byte-level GPT-2 on pydoc_data.topics (~10 CPU minutes), "
                             "then convert, compare and fine-tune; ignores --chunk-sizes and --seq-len.")] = False,
    device: Annotated[Device, typer.Option(case_sensitive=False, help="Where the forward-time rows are "
                      "measured (the comparison itself runs on the CPU).")] = Device.cpu,
    dtype: Annotated[Dtype, typer.Option(case_sensitive=False, help="Floating-point type of the "
                     "forward-time rows.")] = Dtype.float32,
) -> None:
    """GPT-2 -> BSBR: convert at several chunk sizes and compare with the original on held-out text.

    Reports logits agreement (max |diff|, KL, top-1), perplexity, and forward time and memory
    against length (measured by the harness). See docs/convert.md. The seed's
    `python -m bsbr_extras.convert_example` runs this command (its underscore spellings work here).
    """
    conv.quiet_transformers()
    with exit_codes(), interrupted("convert writes its results only once it finishes, so nothing was written; "
                                   "run it again"):
        sizes = positive_ints("--chunk-sizes", chunk_sizes, default=(128,), example="512,128,32")
        result = conv.run_convert(model_name=model_name, chunk_sizes=sizes, compression_factor=compression_factor,
                                  seq_len=seq_len, output_dir=output_dir, save_model=save_model,
                                  experiment=experiment, device=device.value, dtype=dtype.value)
    conv.print_summary(result)
    if output_dir is not None:
        typer.echo(f"wrote results to {output_dir}/")


@app.command(cls=Command)
def recall(
    quick: Annotated[bool, typer.Option("--quick", help="The smoke preset (same as --preset quick).")] = False,
    preset: Annotated[Optional[str], typer.Option(help="quick (smoke run, minutes), cpu (the protocol on 2 cores) "
                      "or zoology (zoology's grid; use with --device cuda). Default: quick.",
                      show_default=False)] = None,
    models: ModelsOpt = None,
    seq_lengths: _list("--seq-lengths", "Sequence lengths; with --num-pairs they replace the preset's "
                       "(length, pairs) points. Default: the preset's.") = None,
    num_pairs: _list("--num-pairs", "Key-value pairs per sequence. Default: the preset's.") = None,
    hidden_dims: _list("--hidden-dims", "Model widths d. Default: the preset's.") = None,
    sizes: _list("--sizes", "Chunk size (BSBR, Linear, DeltaNet, GAU) and window (SlidingWindow). "
                 "Default: the preset's.") = None,
    vocab_size: _int("Vocabulary: keys and values take disjoint halves of it. Default: the preset's.") = None,
    compression_factor: _int("BSBR's chunk states (d_head/f) x d_head; f divides d_head. Default: none.") = None,
    max_steps: _int("Training steps at most per run. Default: the preset's.") = None,
    batch_size: _int("Sequences per step. Default: the preset's.") = None,
    lrs: _list("--lrs", "Learning rates of the sweep; each configuration is reported at the one with the best "
               "validation accuracy. Default: the preset's.") = None,
    seeds: _int("Seeds (0..N-1): the rates are tuned on seed 0, then every other seed runs at the best rate. "
                "Default: the preset's.") = None,
    target_acc: Annotated[Optional[float], typer.Option(help="Stop training once validation accuracy reaches "
                          "this. Default: the preset's.", show_default=False)] = None,
    device: Annotated[Device, typer.Option(case_sensitive=False, help="cpu or cuda.")] = Device.cpu,
    threads: Annotated[int, typer.Option(help="CPU threads per training (pinned and recorded; 1 is fastest for "
                       "these small models).")] = 1,
    jobs: _int("Trainings at once: local worker processes, or the CPUs of the local Ray cluster (x --threads). "
               "Default: the preset's.") = None,
    executor: Annotated[str, typer.Option(help="local (this machine's processes) or ray (one Ray task per "
                        "training).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="With --executor ray: join this cluster (auto or "
                       "host:port) instead of starting a local one.", show_default=False)] = None,
    shard: Annotated[Optional[str], typer.Option(help="Run only slice i of N (e.g. 2/4) of the configurations "
                     "(each with all its rates and seeds), for job arrays.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data sets (recorded).")] = 0,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="A new or empty folder for "
                          "recall.csv, its recall.json sidecar, summary.md and the figures. Default: "
                          "results/recall_<UTC time>/.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the recall run in --output-dir: keep its "
                      "rows and train only the missing runs.")] = False,
) -> None:
    """Multi-query associative recall (MQAR; Arora et al., 2023): train each model from scratch over a
    learning-rate sweep and several seeds, report held-out accuracy at the best rate vs length, pairs and
    decoding-state size. See docs/recall.md."""
    from evals.recall import launch, report as recall_report

    console = Console()
    with interrupted("every finished run is in the output folder's recall.csv; --resume continues it"):
        with exit_codes():
            res, p = launch.recall_command(
                quick=quick, preset=preset, models=models, seq_lengths=seq_lengths, num_pairs=num_pairs,
                hidden_dims=hidden_dims, sizes=sizes, vocab_size=vocab_size, max_steps=max_steps,
                batch_size=batch_size, lrs=lrs, seeds=seeds, target_acc=target_acc, device=device.value,
                threads=threads, jobs=jobs, executor=executor, address=address, shard=shard, seed=seed,
                output_dir=output_dir, resume=resume, compression_factor=compression_factor)
    console.print(recall_report.summary_table(res["summary"], f"MQAR held-out accuracy (%) at the best rate, "
                                              f"vocab {p.vocab_size}: mean ± std (min) over seeds @rate"))
    code, words = results.outcome(res["rows"])
    if res["broken"]:  # the sanity anchor failed: the run's numbers cannot be trusted, so it fails
        console.print(f"[bold red]BROKEN RUN[/]: Standard failed to learn at {', '.join(res['broken'])}; "
                      f"the other models' numbers there mean nothing")
        code, words = 1, f"BROKEN RUN: Standard, the sanity anchor, failed at {', '.join(res['broken'])}"
    finish(code, f"wrote {len(res['rows'])} rows to {res['csv']} (+ recall.json, summary.md, "
                 f"{len(res['figures'])} figures)" + (f"; {words}" if words else ""))


@app.command(cls=Command)
def frontier(
    run_dir: Annotated[Path, typer.Argument(help="A finished recall run's folder (recall.csv + recall.json).",
                                            show_default=False)],
    lengths: _list("--lengths", "Prefill lengths before the timed decode steps. Default: 4096 16384.") = None,
    device: Annotated[Device, typer.Option(case_sensitive=False, help="cpu or cuda.")] = Device.cpu,
    decode_tokens: Annotated[int, typer.Option(help="One-token steps timed per sample.")] = 16,
    repeats: Annotated[int, typer.Option(help="Timed samples per configuration (at least).")] = 10,
    min_run_time: MinRunTimeOpt = 0.2,
    threads: ThreadsOpt = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue RUN_DIR/frontier.csv: keep its rows and "
                      "measure only the missing cases.")] = False,
) -> None:
    """The cost x recall frontier: decode ms/token (batch 1, after each prefill length) and decoding-state
    bytes of every configuration a recall run trained, measured through compare's harness, joined with
    its accuracy. Writes frontier.csv (the timed rows), frontier_table.csv, frontier.md and frontier.png
    into RUN_DIR. See docs/recall.md."""
    from evals.recall import frontier as fr

    with exit_codes():
        res = fr.frontier_command(run_dir, lengths=lengths, device=device.value, decode_tokens=decode_tokens,
                                  repeats=repeats, min_run_time=min_run_time, threads=threads, resume=resume)
    t = res["table"]
    bad = t[t["status"] != "ok"]
    finish(0, f"wrote {len(t)} configurations to {res['csv']} (+ frontier.md, {len(res['figures'])} figure(s))"
              + (f"; {len(bad)} with a status other than ok" if len(bad) else ""))


@app.command(cls=Command)
def lm(
    preset: Annotated[str, typer.Option(help="quick (a smoke run, seconds), cpu (the committed run: 2 contexts, "
                      "3 rates, 2 seeds on a 2-core CPU, hours) or gpu (longer contexts and budget, for a GPU).")]
    = "quick",
    models: ModelsOpt = None,
    contexts: _list("--contexts", "Context lengths in bytes (each shorter than the corpus's shortest document). "
                    "Default: the preset's.") = None,
    lrs: _list("--lrs", "Learning rates tried on the first seed; each (model, context) is reported at the one "
               "with the best validation bits per byte. Default: the preset's.") = None,
    seeds: _int("Seeds (0..N-1): rates tuned on seed 0, the other seeds run at the best rate. "
                "Default: the preset's.") = None,
    max_steps: _int("Optimiser steps per training (every model sees the same bytes). Default: the preset's.") = None,
    device: Annotated[Device, typer.Option(case_sensitive=False, help="cpu or cuda.")] = Device.cpu,
    threads: Annotated[int, typer.Option(help="CPU threads per training (pinned and recorded).")] = 1,
    jobs: _int("Trainings at once: local worker processes, or the CPUs of the local Ray cluster (x --threads). "
               "Default: the preset's.") = None,
    executor: Annotated[str, typer.Option(help="local (this machine's processes) or ray (one Ray task per "
                        "training).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="With --executor ray: join this cluster (auto or "
                       "host:port) instead of starting a local one.", show_default=False)] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="A new or empty folder for lm.csv, "
                          "its lm.json sidecar, the summary, the loss-by-position table and the figures. "
                          "Default: results/lm_<UTC time>/.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the lm run in --output-dir: keep its rows "
                      "and train only the missing runs (refused if its settings differ).")] = False,
) -> None:
    """Byte-level language modelling on the shipped corpus (the Python 3.11 documentation's
    reStructuredText source, pinned by sha256): every model matched on parameters and on bytes
    seen; test bits per byte and the loss by position. See docs/lm.md."""
    from evals.lm import command as lm_command
    from evals.lm.launch import Options
    from evals.options import split_list

    opts = Options(preset=preset, models=tuple(split_list(models)) or None,
                   contexts=tuple(positive_ints("--contexts", contexts)) or None,
                   lrs=_floats("--lrs", lrs), seeds=seeds, max_steps=max_steps, device=device.value, threads=threads,
                   jobs=jobs, executor=executor, address=address, output_dir=output_dir, resume=resume)
    with interrupted("every finished training is in the output folder's lm.csv; --resume continues it"):
        with exit_codes():
            res = lm_command.run(opts)
    from evals.lm.report import markdown

    Console().print(markdown(res["summary"], results.read_sidecar(res["csv"])["corpus"]))
    code, words = results.outcome(res["rows"])
    finish(code, f"wrote {len(res['rows'])} rows to {res['csv']} (+ lm.json, summary, loss_by_position.csv, "
                 f"{len(res['files']) - 3} figure(s))" + (f"; {words}" if words else ""))


def _floats(flag: str, values) -> Optional[tuple]:
    from evals.options import split_list

    out = []
    for v in split_list(values):
        try:
            out.append(float(v))
        except ValueError:
            raise typer.BadParameter(f"{v!r} is not a number") from None
    return tuple(out) or None


def convert_example(argv: list) -> int:
    """``python -m bsbr_extras.convert_example ARGS``: ``bsbr-eval convert ARGS`` (registered for the
    library in pyproject.toml's ``bsbr_extras.commands`` entry points); its exit code."""
    try:
        app(["convert", *argv], prog_name="python -m bsbr_extras.convert_example")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main() -> None:
    app()


if __name__ == "__main__":
    main()
