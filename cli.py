"""``bsbr-eval``: the command-line suite. Thin Typer commands; the logic lives in ``evals``."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure, analyse and guard efficient long-sequence attention architectures.")

# ---- models command ----
import re as _re  # noqa: E402
from pathlib import Path as _Path  # noqa: E402
from typing import Annotated as _Annotated, Optional as _Optional  # noqa: E402

import typer.core as _typer_core  # noqa: E402


def _fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def models() -> None:
    """List the registry: name, the published method it follows, complexity, modes, op forms, decoding state."""
    from rich.console import Console
    from rich.table import Table

    from evals.registry import REGISTRY

    table = Table(title="bsbr-eval models (names are case-insensitive)")
    for col in ("name", "method", "complexity (per head)", "modes", "op forms", "decoding cache holds"):
        table.add_column(col, overflow="fold")
    for spec in REGISTRY.values():
        table.add_row(spec.name, spec.method, spec.complexity, " ".join(spec.modes), " ".join(spec.forms), spec.state)
    Console().print(table)


# ---- compare command ----
_LIST_FLAGS = ("--models", "--seq-lengths", "--devices", "--modes")


def _join_list_flags(args: list[str]) -> list[str]:
    """Rewrite ``--seq-lengths 64 128 256`` as ``--seq-lengths 64,128,256`` before click parses.

    Click options take one value each; this lets the four list flags take several
    space-separated values too (up to the next option). Negative numbers count as values so
    that ``--seq-lengths 64 -8`` reaches the length check instead of "no such option".
    """
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        flag, eq, first = arg.partition("=")
        if arg == "--":
            out.extend(args[i:])
            break
        if flag in _LIST_FLAGS:
            values = [first] if eq else []
            i += 1
            while i < len(args) and (not args[i].startswith("-") or _re.fullmatch(r"-\d+", args[i])):
                values.append(args[i])
                i += 1
            out.extend([flag, ",".join(values)] if values else [flag])
            continue
        out.append(arg)
        i += 1
    return out


class _ListFlagsCommand(_typer_core.TyperCommand):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _join_list_flags(list(args)))


def _split(values) -> list[str]:
    """Flatten repeated and comma-separated values, dropping blanks and duplicates (order kept)."""
    out = []
    for v in values or []:
        out.extend(p.strip() for p in str(v).split(",") if p.strip())
    return list(dict.fromkeys(out))


def _choose(flag: str, values, valid) -> list[str]:
    picked = []
    for v in _split(values):
        match = [c for c in valid if c.lower() == v.lower()]
        if not match:
            _fail(f"{flag}: unknown value {v!r}; valid: {', '.join(valid)}")
        picked.append(match[0])
    return list(dict.fromkeys(picked))


def _positive_ints(flag: str, values, example: str = "4 8 16 or 4,8,16") -> list[int]:
    out = []
    for v in _split(values):
        if not _re.fullmatch(r"[+-]?\d+", v) or int(v) <= 0:
            _fail(f"{flag}: {v!r} is not a positive integer; give values like {example}")
        out.append(int(v))
    return out


def _lengths(values) -> list[int]:
    return _positive_ints("--seq-lengths", values, "64 128 256 or 64,128,256")


_ListOpt = _Optional[list[str]]
_ModelsOpt = _Annotated[_ListOpt, typer.Option("--models", help="Models, space- or comma-separated "
                                               "(case-insensitive). Default: all seven.", show_default=False)]


@app.command(cls=_ListFlagsCommand)
def compare(
    models: _ModelsOpt = None,
    seq_lengths: _Annotated[_ListOpt, typer.Option("--seq-lengths", help="Sequence lengths, space- or "
                            "comma-separated. Default: 64 128 256 512 1024.", show_default=False)] = None,
    devices: _Annotated[_ListOpt, typer.Option("--devices", help="cpu and/or cuda. cuda without a GPU is an "
                        "error, unless cpu is also given: then its rows are 'skipped'. Default: cpu.",
                        show_default=False)] = None,
    modes: _Annotated[_ListOpt, typer.Option("--modes", help="forward, train and/or decode. Default: forward.",
                      show_default=False)] = None,
    level: _Annotated[str, typer.Option(help="model (whole model), layer (one mixer with projections) "
                      "or op (the token-mixing op on per-head inputs).")] = "model",
    hidden_dim: _Annotated[_Optional[int], typer.Option(help="Hidden size D. Default: ModelConfig's (256).",
                           show_default=False)] = None,
    num_layers: _Annotated[_Optional[int], typer.Option(help="Layers (model level). Default: 2.",
                           show_default=False)] = None,
    num_heads: _Annotated[_Optional[int], typer.Option(help="Heads H (D must divide by H). Default: 4.",
                          show_default=False)] = None,
    ff_dim: _Annotated[_Optional[int], typer.Option(help="Feed-forward width. Default: 512.",
                       show_default=False)] = None,
    vocab_size: _Annotated[_Optional[int], typer.Option(help="Vocabulary size (model level: embedding and "
                           "LM head). Default: 1000.", show_default=False)] = None,
    chunk_size: _Annotated[_Optional[int], typer.Option(help="Chunk size c of BSBR, Linear, DeltaNet, GAU. "
                           "Default: 64.", show_default=False)] = None,
    window_size: _Annotated[_Optional[int], typer.Option(help="Window w of SlidingWindow. Default: 64.",
                            show_default=False)] = None,
    compression_factor: _Annotated[_Optional[int], typer.Option(help="BSBR state compression f. "
                                   "Default: none.", show_default=False)] = None,
    batch_size: _Annotated[int, typer.Option(help="Batch size.")] = 1,
    dtype: _Annotated[str, typer.Option(help="float32, float64, float16 or bfloat16.")] = "float32",
    repeats: _Annotated[int, typer.Option(help="Minimum timed samples per configuration (time_ms is "
                        "their median).")] = 10,
    min_run_time: _Annotated[float, typer.Option(help="Minimum seconds of timed work per configuration "
                             "(more samples, up to 200, if repeats finish sooner).")] = 0.2,
    decode_tokens: _Annotated[int, typer.Option(help="Decode mode: one-token steps timed per sample "
                              "(time_ms is per token); at op level a sample is 1 cached step.")] = 16,
    output: _Annotated[_Optional[_Path], typer.Option(help="CSV to write (a .json sidecar goes beside it). "
                       "Default: results/compare_<UTC time>.csv.", show_default=False)] = None,
    resume: _Annotated[bool, typer.Option("--resume", help="Continue --output: keep its rows, measure "
                       "only the missing configurations.")] = False,
    shard: _Annotated[_Optional[str], typer.Option(help="Run only slice i of N (e.g. 2/4) of the grid; "
                      "the N slices cover it exactly once.", show_default=False)] = None,
    threads: _Annotated[int, typer.Option(help="CPU threads, pinned for every measurement and recorded.")] = 1,
    seed: _Annotated[int, typer.Option(help="Seed for weights and inputs (recorded).")] = 0,
) -> None:
    """Sweep models x lengths x devices x modes; write one tidy CSV row per configuration + a JSON sidecar.

    Failures become rows (status oom / error / skipped), never a crash. Set
    BSBR_EVAL_INJECT_SLOWDOWN="MODEL=FACTOR" to slow a model down on purpose (regression self-test).
    """
    import time as _time

    import torch
    from rich.console import Console

    from evals import compare as sweep
    from evals.grid import DEVICES, DTYPES, expand_grid, parse_shard, shard as take_shard
    from evals.measure import parse_inject
    from evals.registry import LEVELS, MODES, REGISTRY, ModelConfig
    from bsbr.shell import check_heads

    names = _choose("--models", models, tuple(REGISTRY)) if models else list(REGISTRY)
    lengths = _lengths(seq_lengths) if seq_lengths else [64, 128, 256, 512, 1024]
    devs = _choose("--devices", devices, DEVICES) if devices else ["cpu"]
    mode_list = _choose("--modes", modes, MODES) if modes else ["forward"]
    level = _choose("--level", [level], LEVELS)[0]
    dtype = _choose("--dtype", [dtype], DTYPES)[0]
    if not names or not lengths or not devs or not mode_list:
        _fail("--models, --seq-lengths, --devices and --modes need at least one value when given")
    if "cuda" in devs and "cpu" not in devs and not torch.cuda.is_available():
        _fail("--devices: CUDA is not available on this machine; valid: cpu "
              "(give 'cpu cuda' to record the cuda rows as skipped)")
    for flag, value in (("--batch-size", batch_size), ("--repeats", repeats), ("--decode-tokens", decode_tokens),
                        ("--threads", threads), ("--hidden-dim", hidden_dim), ("--num-layers", num_layers),
                        ("--num-heads", num_heads), ("--ff-dim", ff_dim), ("--vocab-size", vocab_size),
                        ("--chunk-size", chunk_size),
                        ("--window-size", window_size), ("--compression-factor", compression_factor)):
        if value is not None and value <= 0:
            _fail(f"{flag} must be a positive integer, got {value}")
    if not min_run_time >= 0:
        _fail(f"--min-run-time must be >= 0 seconds, got {min_run_time}")
    given = dict(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ff_dim=ff_dim,
                 vocab_size=vocab_size, chunk_size=chunk_size, window_size=window_size, compression_factor=compression_factor)
    config = ModelConfig().with_(**{k: v for k, v in given.items() if v is not None})
    try:
        check_heads(config.hidden_dim, config.num_heads)
        inject = parse_inject()
        slice_ = parse_shard(shard) if shard else None
    except ValueError as e:
        _fail(str(e))
    if resume and output is None:
        _fail("--resume needs --output naming the CSV to continue")
    output = output or _Path("results") / f"compare_{_time.strftime('%Y%m%dT%H%M%SZ', _time.gmtime())}.csv"

    cases = expand_grid(names, lengths, devs, mode_list, level=level, config=config, batch_size=batch_size,
                        dtype=dtype, decode_tokens=decode_tokens, seed=seed)
    if slice_:
        cases = take_shard(cases, *slice_)
    settings = dict(models=names, seq_lengths=lengths, devices=devs, modes=mode_list, level=level, dtype=dtype,
                    batch_size=batch_size, config=config.as_dict(), repeats=repeats, min_run_time=min_run_time,
                    decode_tokens=decode_tokens, threads=threads, seed=seed, shard=shard)
    torch.manual_seed(seed)
    try:
        rows = sweep.run_sweep(cases, output, resume=resume, repeats=repeats, min_run_time=min_run_time,
                               threads=threads, inject=inject, settings=settings)
    except ValueError as e:
        _fail(str(e))
    console = Console()
    console.print(sweep.summary_table(rows))
    bad = sum(r["status"] in ("oom", "error") for r in rows)
    console.print(f"wrote {len(rows)} rows to {output} (+ {output.with_suffix('.json').name})"
                  + (f"; {bad} failed (see the error column)" if bad else ""))


# ---- forms command ----
@app.command(cls=_ListFlagsCommand)
def forms(
    models: _Annotated[_ListOpt, typer.Option("--models", help="Models with a recurrent op form "
                       "(case-insensitive). Default: all of them (see `bsbr-eval models`).",
                       show_default=False)] = None,
    seq_lengths: _Annotated[_ListOpt, typer.Option("--seq-lengths", help="Sequence lengths, space- or "
                            "comma-separated. Default: 1024 4096.", show_default=False)] = None,
    modes: _Annotated[_ListOpt, typer.Option("--modes", help="forward and/or train (forward + backward). "
                      "Default: train.", show_default=False)] = None,
    hidden_dim: _Annotated[int, typer.Option(help="Hidden size D.")] = 512,
    num_heads: _Annotated[int, typer.Option(help="Heads H (D must divide by H).")] = 8,
    chunk_size: _Annotated[int, typer.Option(help="Chunk size of the parallel form.")] = 64,
    batch_size: _Annotated[int, typer.Option(help="Batch size.")] = 1,
    repeats: _Annotated[int, typer.Option(help="Timed samples per configuration (time_ms is their median).")] = 3,
    min_run_time: _Annotated[float, typer.Option(help="Minimum seconds of timed work per configuration.")] = 0.0,
    threads: _Annotated[int, typer.Option(help="CPU threads, pinned for every measurement and recorded.")] = 1,
    seed: _Annotated[int, typer.Option(help="Seed for weights and inputs (recorded).")] = 0,
    output: _Annotated[_Optional[_Path], typer.Option(help="CSV to write (a .json sidecar goes beside it). "
                       "Default: results/forms_<UTC time>.csv.", show_default=False)] = None,
) -> None:
    """Time an op's chunkwise-parallel form against its token-by-token recurrence (op level, CPU).

    Both forms compute the same outputs (the tests pin it); the table shows how much faster the
    parallel form is. The recurrence is slow by nature: keep lengths modest.
    """
    import time as _time

    from rich.console import Console
    from rich.table import Table

    from evals import forms as fm
    from evals.compare import new_run_id
    from evals.registry import ModelConfig
    from evals.results import _git
    from bsbr.shell import check_heads

    valid = fm.models_with_recurrence()
    names = _choose("--models", models, valid) if models else list(valid)
    lengths = _lengths(seq_lengths) if seq_lengths else [1024, 4096]
    mode_list = _choose("--modes", modes, fm.FORM_MODES) if modes else ["train"]
    if not names or not lengths or not mode_list:
        _fail("--models, --seq-lengths and --modes need at least one value when given")
    for flag, value in (("--hidden-dim", hidden_dim), ("--num-heads", num_heads), ("--chunk-size", chunk_size),
                        ("--batch-size", batch_size), ("--repeats", repeats), ("--threads", threads)):
        if value <= 0:
            _fail(f"{flag} must be a positive integer, got {value}")
    if not min_run_time >= 0:
        _fail(f"--min-run-time must be >= 0 seconds, got {min_run_time}")
    try:
        check_heads(hidden_dim, num_heads)
    except ValueError as e:
        _fail(str(e))
    output = output or _Path("results") / f"forms_{_time.strftime('%Y%m%dT%H%M%SZ', _time.gmtime())}.csv"
    if output.exists() and output.stat().st_size > 0:
        _fail(f"--output: {output} already exists; choose another file")
    config = ModelConfig(hidden_dim=hidden_dim, num_heads=num_heads, chunk_size=chunk_size, num_layers=1)
    settings = dict(models=names, seq_lengths=lengths, modes=mode_list, config=config.as_dict(),
                    batch_size=batch_size, repeats=repeats, min_run_time=min_run_time, threads=threads, seed=seed)
    console = Console()
    rows = fm.run(names, lengths, mode_list, output, config=config, batch_size=batch_size, threads=threads,
                  repeats=repeats, min_run_time=min_run_time, seed=seed, run_id=new_run_id(_git("rev-parse", "HEAD")),
                  settings=settings,
                  progress=lambda m, mode, n, form: console.print(f"[dim]{m} {mode} n={n} {form}[/dim]"))
    table = Table(title="bsbr-eval forms: parallel vs recurrent (op level)")
    for col in ("model", "mode", "n", "parallel ms", "recurrent ms", "parallel is"):
        table.add_column(col, justify="right" if col not in ("model", "mode") else "left")
    for s in fm.speedups(rows):
        table.add_row(s["model"], s["mode"], str(s["seq_len"]), f"{s['parallel_ms']:.3g}",
                      f"{s['recurrent_ms']:.4g}", f"{s['speedup']:.1f}x faster")
    console.print(table)
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        console.print(f"[red]{r['model']} {r['mode']} n={r['seq_len']} {r['form']}: {r['error']}[/red]")
    console.print(f"wrote {len(rows)} rows to {output} (+ {output.with_suffix('.json').name})")


# ---- analyze command ----
from pathlib import Path as _Path  # noqa: E402
from typing import Annotated as _Annotated, Optional as _Optional  # noqa: E402


@app.command()
def analyze(
    csvs: _Annotated[_Optional[list[_Path]], typer.Argument(
        help="Result CSVs from `compare` (whole runs or --shard slices, read together). "
             "Default: the newest results CSV under results/.", show_default=False)] = None,
    output_dir: _Annotated[_Optional[_Path], typer.Option(
        "--output-dir", help="Where fits.csv, relative.csv, crossover.csv, the PNGs and report.md go. "
                             "Default: <first CSV's stem>_analysis/ beside it.", show_default=False)] = None,
) -> None:
    """Fit how time and memory grow with length, compare with Standard, write plots and a report."""
    import shlex

    from rich.console import Console

    from evals import analysis, report

    if not csvs:
        newest = analysis.newest_results_csv("results")
        if newest is None:
            _fail("no CSV given and no results CSV found under results/; "
                  "pass CSV paths, e.g. bsbr-eval analyze results/run.csv")
        csvs = [newest]
    try:
        df = analysis.load_results(csvs)
    except analysis.AnalysisInputError as e:
        _fail(str(e))
    out = output_dir or analysis.default_output_dir(csvs[0])
    an = analysis.analyze(df)
    command = shlex.join(["bsbr-eval", "analyze", *map(str, csvs), "--output-dir", str(out)])
    written = report.write_analysis(an, out, command=command)
    console = Console()
    for table in report.terminal_tables(an):
        console.print(table)
    console.print(f"wrote {len(written)} files to {out}/ (report: {written['report']})")


# ---- regress command ----


@app.command()
def regress(
    baseline: _Annotated[_Path, typer.Option(
        help="The committed baseline CSV (its JSON sidecar sits beside it).")] = _Path("results/baselines/cpu.csv"),
    current: _Annotated[_Optional[_Path], typer.Option(
        help="Compare this stored run instead of re-measuring the baseline's configurations now.",
        show_default=False)] = None,
    update: _Annotated[bool, typer.Option(
        "--update", help="Rewrite the baseline with this run (re-measured now, or --current) and exit 0. "
                         "With no baseline file yet, measures the guard's default grid.")] = False,
    threshold: _Annotated[float, typer.Option(
        help="Smallest growth of time/reference that can count as a regression (0.25 = 25%).")] = 0.25,
    alpha: _Annotated[float, typer.Option(
        help="Significance level of the one-sided Mann-Whitney test on the raw samples.")] = 0.01,
    show_all: _Annotated[bool, typer.Option("--all", help="Show every check, not only what moved.")] = False,
) -> None:
    """Compare a run with a committed baseline: exit 0 pass, 1 regression, 2 usage error.

    FLOPs, parameters and the traced memory must match exactly; time (as a ratio to a reference
    timed next to it) fails only if it grew by more than --threshold with Mann-Whitney p < --alpha,
    and, when re-measured now, again on a second measurement.
    """
    import os

    import pandas as pd
    from rich.console import Console
    from rich.progress import Progress

    from evals import regress as rg
    from evals import results

    if not threshold > 0:
        _fail(f"--threshold must be a positive fraction (0.25 = 25%), got {threshold}")
    if not 0 < alpha < 1:
        _fail(f"--alpha must lie in (0, 1), got {alpha}")
    if current is not None and not current.is_file():
        _fail(f"--current {current} does not exist; pass a results CSV")
    if not update and not baseline.is_file():
        _fail(f"no baseline at {baseline}; create it with: bsbr-eval regress --baseline {baseline} --update")
    import sys

    console = Console(width=None if sys.stdout.isatty() else 120)  # CI logs: one line per table row
    start = results.utc_now()
    try:
        base = pd.read_csv(baseline, keep_default_na=True) if baseline.is_file() else None
        cur = pd.read_csv(current, keep_default_na=True) if current is not None else None
        for df, what in ((base, f"baseline {baseline}"), (cur, f"current run {current}")):
            if df is not None:
                rg.check_columns(df, what)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        _fail(" ".join(str(e).split()))

    run_id = f"regress-{start}"
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("measuring", total=None)

        def progress(label: str) -> None:
            bar.update(task, description=f"measuring {label}", advance=1)

        if update:
            if cur is None:  # re-measure the baseline's configurations (or the default grid)
                rows = base if base is not None else pd.DataFrame(
                    [dict(c.fields(), threads=rg.GUARD_THREADS) for c in rg.guard_cases()])
                bar.update(task, total=len(rows))
                new = rg.measure_all(rows, run_id=run_id, progress=progress)
            else:
                new = cur
            findings = None
            if base is not None:
                findings = rg.compare_runs(base, new, threshold=threshold, alpha=alpha)
        elif cur is not None:
            findings = rg.compare_runs(base, cur, threshold=threshold, alpha=alpha)
        else:
            bar.update(task, total=int((base["status"] == "ok").sum()))
            live = rg.live_check(base, threshold=threshold, alpha=alpha, run_id=run_id, progress=progress)
            findings = live.findings

    if findings is not None:
        console.print(rg.render(findings, show_all=show_all))
    if update:
        broken = new[new["status"] != "ok"]
        if len(broken):  # a baseline row that is not ok would switch the guard off for it
            for _, r in broken.iterrows():
                console.print(f"{rg.config_label(r)}: {r['status']} {r.get('error', '')}")
            console.print(f"FAIL: not writing {baseline}: {len(broken)} configuration(s) did not measure ok")
            raise typer.Exit(1)
        tmp = baseline.with_name(baseline.name + ".tmp")
        baseline.parent.mkdir(parents=True, exist_ok=True)
        rg.run_frame(new).to_csv(tmp, index=False)
        os.replace(tmp, baseline)
        results.write_sidecar(baseline, dict(results.environment(), utc_start=start, utc_end=results.utc_now(),
                                             source=str(current) if current else "measured now",
                                             guard=rg.guard_settings()))
        console.print(f"wrote baseline {baseline} ({len(new)} rows) and {results.sidecar_path(baseline)}")
        raise typer.Exit(0)
    console.print(rg.summary(findings))
    raise typer.Exit(1 if not rg.failures(findings).empty else 0)


# ---- convert command ----


@app.command()
def convert(
    model_name: _Annotated[_Optional[str], typer.Option(
        "--model-name", help="Hub name or local save_pretrained directory of a GPT-2 (loaded by transformers).",
        show_default=False)] = None,
    chunk_sizes: _Annotated[_Optional[list[str]], typer.Option(
        "--chunk-sizes", help="BSBR chunk sizes to compare, comma-separated or repeated (e.g. 512,128,32). "
                              "Default: 128.", show_default=False)] = None,
    compression_factor: _Annotated[_Optional[int], typer.Option(
        help="BSBR state compression f (must divide the head size). Default: none.", show_default=False)] = None,
    seq_len: _Annotated[_Optional[int], typer.Option(help="Evaluation window length (at most the GPT-2's "
                        "n_positions). Default: min(512, n_positions).", show_default=False)] = None,
    output_dir: _Annotated[_Optional[_Path], typer.Option(
        "--output-dir", help="Write convert.csv, convert_speed.csv, the convert.json sidecar and the figure here.",
        show_default=False)] = None,
    save_model: _Annotated[bool, typer.Option(
        "--save-model", help="Also save each converted model (config.json + model.safetensors) under --output-dir.")] = False,
    experiment: _Annotated[bool, typer.Option(
        "--experiment", help="Train a small byte-level GPT-2 on pydoc_data.topics (~10 CPU minutes), "
                             "then convert, compare and fine-tune; ignores --chunk-sizes and --seq-len.")] = False,
) -> None:
    """GPT-2 -> BSBR: convert at several chunk sizes and compare with the original on held-out text.

    Reports logits agreement (max |diff|, KL, top-1), perplexity, and forward time and memory
    against length (measured by the harness). See docs/convert.md.
    """
    import logging

    from rich.logging import RichHandler


    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    sizes = []
    for v in [p.strip() for c in (chunk_sizes or ["128"]) for p in str(c).split(",") if p.strip()]:
        if not v.lstrip("+-").isdigit() or int(v) <= 0:
            _fail(f"--chunk-sizes: {v!r} is not a positive integer; give sizes like 512,128,32")
        sizes.append(int(v))
    sizes = list(dict.fromkeys(sizes))
    try:
        from bsbr_extras import convert_example as ce

        ce.quiet_transformers()
        result = ce.run_cli(model_name=model_name, chunk_sizes=sizes, compression_factor=compression_factor,
                            seq_len=seq_len, output_dir=str(output_dir) if output_dir else None,
                            save_model=save_model, experiment=experiment)
    except ValueError as e:
        _fail(" ".join(str(e).replace("--model_name", "--model-name").replace("--output_dir", "--output-dir")
                       .replace("--save_model", "--save-model").split()))
    except ImportError as e:
        extras = getattr(e, "name", None) in ("transformers", "safetensors")
        _fail(f"{e}; install the converter's extras: pip install 'bsbr[convert]'" if extras else str(e))
    ce.print_summary(result)
    if output_dir is not None:
        typer.echo(f"wrote results to {output_dir}/")


# ---- recall command ----
# recall's own list flags take space- or comma-separated values too (compare's joiner reads this tuple)
_LIST_FLAGS = _LIST_FLAGS + ("--num-pairs", "--hidden-dims", "--sizes", "--lrs")


@app.command(cls=_ListFlagsCommand)
def recall(
    quick: _Annotated[bool, typer.Option("--quick", help="The smoke preset (same as --preset quick).")] = False,
    preset: _Annotated[_Optional[str], typer.Option(help="quick (smoke run, minutes), cpu (the protocol on 2 "
                       "cores, ~90 min) or zoology (zoology's grid; use with --device cuda). Default: quick.",
                       show_default=False)] = None,
    models: _ModelsOpt = None,
    seq_lengths: _Annotated[_ListOpt, typer.Option("--seq-lengths", help="Sequence lengths; with --num-pairs "
                            "they replace the preset's (length, pairs) points. Default: the preset's.",
                            show_default=False)] = None,
    num_pairs: _Annotated[_ListOpt, typer.Option("--num-pairs", help="Key-value pairs per sequence. "
                          "Default: the preset's.", show_default=False)] = None,
    hidden_dims: _Annotated[_ListOpt, typer.Option("--hidden-dims", help="Model widths d. Default: the "
                            "preset's.", show_default=False)] = None,
    sizes: _Annotated[_ListOpt, typer.Option("--sizes", help="Chunk size (BSBR, Linear, DeltaNet, GAU) and "
                      "window (SlidingWindow). Default: the preset's.", show_default=False)] = None,
    vocab_size: _Annotated[_Optional[int], typer.Option(help="Vocabulary: keys and values take disjoint "
                           "halves of it. Default: the preset's.", show_default=False)] = None,
    max_steps: _Annotated[_Optional[int], typer.Option(help="Training steps at most per run. "
                          "Default: the preset's.", show_default=False)] = None,
    batch_size: _Annotated[_Optional[int], typer.Option(help="Sequences per step. Default: the preset's.",
                           show_default=False)] = None,
    lrs: _Annotated[_ListOpt, typer.Option("--lrs", help="Learning rates of the sweep; each configuration "
                    "is reported at the one with the best validation accuracy. Default: the preset's.",
                    show_default=False)] = None,
    seeds: _Annotated[_Optional[int], typer.Option(help="Seeds (0..N-1): the rates are tuned on seed 0, then "
                      "every other seed runs at the best rate. Default: the preset's.", show_default=False)] = None,
    target_acc: _Annotated[_Optional[float], typer.Option(help="Stop training once validation accuracy "
                           "reaches this. Default: the preset's.", show_default=False)] = None,
    device: _Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: _Annotated[int, typer.Option(help="CPU threads per training (pinned and recorded; 1 is "
                        "fastest for these small models).")] = 1,
    jobs: _Annotated[_Optional[int], typer.Option(help="Trainings at once: local worker processes, or the "
                     "CPUs of the local Ray cluster (x --threads). Default: the preset's.",
                     show_default=False)] = None,
    executor: _Annotated[str, typer.Option(help="local (this machine's processes) or ray (one Ray task "
                         "per training).")] = "local",
    address: _Annotated[_Optional[str], typer.Option(help="With --executor ray: join this cluster (auto or "
                        "host:port) instead of starting a local one.", show_default=False)] = None,
    shard: _Annotated[_Optional[str], typer.Option(help="Run only slice i of N (e.g. 2/4) of the "
                      "configurations (each with all its rates and seeds), for job arrays.",
                      show_default=False)] = None,
    seed: _Annotated[int, typer.Option(help="Seed of the data sets (recorded).")] = 0,
    output_dir: _Annotated[_Optional[_Path], typer.Option("--output-dir", help="A new or empty folder for "
                           "recall.csv, its recall.json sidecar, summary.md and the figures. Default: "
                           "results/recall_<UTC time>/.", show_default=False)] = None,
    resume: _Annotated[bool, typer.Option("--resume", help="Continue the recall run in --output-dir: keep its "
                       "rows and train only the missing runs.")] = False,
) -> None:
    """Multi-query associative recall (MQAR; Arora et al., 2023): train each model from scratch over a
    learning-rate sweep and several seeds, report held-out accuracy at the best rate vs length, pairs and
    decoding-state size. See docs/recall.md."""
    import time as _time

    from rich.console import Console

    from evals.recall import launch, report
    from evals.registry import REGISTRY

    if quick and preset not in (None, "quick"):
        _fail(f"--quick conflicts with --preset {preset}; give one of them")
    name = _choose("--preset", [preset or "quick"], ("quick", "cpu", "zoology"))[0]
    names = _choose("--models", models, tuple(REGISTRY)) if models else list(REGISTRY)
    executor = _choose("--executor", [executor], ("local", "ray"))[0]
    rates = []
    for v in _split(lrs):
        try:
            rates.append(float(v))
        except ValueError:
            _fail(f"--lrs: {v!r} is not a number; give rates like 1e-3 3e-3 1e-2")
    try:
        p = launch.configure(
            name, seq_lens=_positive_ints("--seq-lengths", seq_lengths) if seq_lengths else None,
            num_pairs=_positive_ints("--num-pairs", num_pairs) if num_pairs else None,
            hidden_dims=_positive_ints("--hidden-dims", hidden_dims) if hidden_dims else None,
            sizes=_positive_ints("--sizes", sizes) if sizes else None, vocab_size=vocab_size, max_steps=max_steps,
            batch_size=batch_size, lrs=rates or None, seeds=seeds, target_acc=target_acc, jobs=jobs)
        out = output_dir or _Path("results") / f"recall_{_time.strftime('%Y%m%dT%H%M%SZ', _time.gmtime())}"
        res = launch.run_command(name, p, names, out, executor=executor, address=address, device=device,
                                 threads=threads, data_seed=seed, resume=resume, shard=shard)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: every finished run is in {out / launch.CSV_NAME}; --resume continues it", err=True)
        raise typer.Exit(130)
    except ValueError as e:
        _fail(str(e))
    Console().print(report.summary_table(res["summary"], f"MQAR held-out accuracy (%) at the best rate, vocab "
                                         f"{p.vocab_size}: mean ± std (min) over seeds @rate"))
    bad = sum(r["status"] != "ok" for r in res["rows"])
    Console().print(f"wrote {len(res['rows'])} rows to {res['csv']} (+ recall.json, summary.md, "
                    f"{len(res['figures'])} figures)" + (f"; {bad} failed (see the error column)" if bad else ""))
    if res["broken"]:
        Console().print(f"[bold red]BROKEN RUN[/]: Standard failed to learn at {', '.join(res['broken'])}; "
                        f"the other models' numbers there mean nothing")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
