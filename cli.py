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
        help="The committed baseline CSV (its JSON sidecar sits beside it): the guard's configurations and "
             "their exact metrics.")] = _Path("results/baselines/cpu.csv"),
    against: _Annotated[_Optional[str], typer.Option(
        "--against", help="A git ref (e.g. $(cat results/baselines/ref)): measure it and the working tree "
                          "side by side now, interleaved, and compare their times pair by pair.",
        show_default=False)] = None,
    current: _Annotated[_Optional[_Path], typer.Option(
        help="Compare this stored run (same machine only) instead of re-measuring the baseline's "
             "configurations now.", show_default=False)] = None,
    update: _Annotated[bool, typer.Option(
        "--update", help="Rewrite the baseline with this run (re-measured now, or --current) and exit 0. "
                         "With no baseline file yet, measures the guard's default grid.")] = False,
    threshold: _Annotated[_Optional[float], typer.Option(
        help="Smallest slowdown that can count as a regression (0.2 = 20%). Default: with --against, the "
             "one chosen from results/regress_power/ (0.2 until it exists); else 0.25.",
        show_default=False)] = None,
    alpha: _Annotated[float, typer.Option(
        help="Significance level of the one-sided test on the raw samples (Wilcoxon signed-rank on the "
             "paired log ratios with --against, Mann-Whitney otherwise).")] = 0.01,
    rounds: _Annotated[_Optional[int], typer.Option(
        help="With --against: interleaved A/B pairs per configuration. Default: chosen from "
             "results/regress_power/ (16 until it exists).", show_default=False)] = None,
    self_test: _Annotated[_Optional[float], typer.Option(
        "--self-test", help="With --against: make every model FACTOR times slower on the working-tree side; "
                            "exit 0 only if every model is caught in every level and mode of the grid.",
        show_default=False)] = None,
    power: _Annotated[_Optional[_Path], typer.Option(
        "--power", help="With --against: measure the guard's power curve (detection of 1.1x-1.5x injected, "
                        "false alarms on clean runs) and write it to this folder.", show_default=False)] = None,
    power_runs: _Annotated[int, typer.Option(
        help="With --power: runs per injected factor, and clean runs.")] = 10,
    allow_other_machine: _Annotated[bool, typer.Option(
        "--allow-other-machine", help="Compare stored times although the runs' machine fingerprints "
                                      "(CPU model, core count, torch build) differ.")] = False,
    show_all: _Annotated[bool, typer.Option("--all", help="Show every check, not only what moved.")] = False,
) -> None:
    """Guard performance: exit 0 pass, 1 regression, 2 usage error.

    With --against REF (what CI runs): the accepted commit and the working tree are timed side by
    side, interleaved; a configuration regresses if the paired ratio exceeds 1 + --threshold with
    Wilcoxon p < --alpha, twice. FLOPs, parameters and the traced memory must match --baseline
    exactly. Without it: a stored run (--current) or a re-measurement now is compared with the
    stored baseline, from the same machine only.
    """
    import os
    import sys

    import pandas as pd
    from rich.console import Console
    from rich.progress import Progress

    from evals import regress as rg
    from evals import results

    if threshold is not None and not threshold > 0:
        _fail(f"--threshold must be a positive fraction (0.25 = 25%), got {threshold}")
    if not 0 < alpha < 1:
        _fail(f"--alpha must lie in (0, 1), got {alpha}")
    if rounds is not None and rounds < 1:
        _fail(f"--rounds must be a positive integer, got {rounds}")
    if against is None:
        for flag, given in (("--rounds", rounds is not None), ("--self-test", self_test is not None),
                            ("--power", power is not None)):
            if given:
                _fail(f"{flag} only applies with --against REF")
    elif current is not None or update:
        _fail("--against measures both sides now; it cannot be combined with --current or --update")
    if self_test is not None and not self_test > 1:
        _fail(f"--self-test must be a slowdown factor above 1 (e.g. 1.5), got {self_test}")
    if power is not None and self_test is not None:
        _fail("--power injects its own factors; it cannot be combined with --self-test")
    if power_runs < 2:
        _fail(f"--power-runs must be at least 2 (a re-measurement pairs two runs), got {power_runs}")
    if current is not None and not current.is_file():
        _fail(f"--current {current} does not exist; pass a results CSV")
    if not update and not baseline.is_file():
        _fail(f"no baseline at {baseline}; create it with: bsbr-eval regress --baseline {baseline} --update")
    if power is not None and power.exists() and not power.is_dir():
        _fail(f"--power {power} is a file; give a folder")
    if power is not None and (power / "power.csv").exists():
        _fail(f"--power {power} already holds a power curve (power.csv); remove it or give another folder")

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

    if against is not None:
        _regress_against(console, base, baseline, against, threshold=threshold, alpha=alpha, rounds=rounds,
                         self_test=self_test, power=power, power_runs=power_runs, show_all=show_all)
    if not update and not allow_other_machine:  # stored times compare on one machine only
        other = (results.read_sidecar(current) if current is not None
                 else results.environment())
        why = rg.machine_mismatch(results.read_sidecar(baseline), other, what_a=f"baseline {baseline}",
                                  what_b=f"--current {current}" if current is not None else "this machine")
        if why:
            _fail(f"{why}; times do not transfer between machines: use --against REF, "
                  "or --allow-other-machine to compare anyway")
    threshold = 0.25 if threshold is None else threshold

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


def _regress_against(console, base, baseline, ref, *, threshold, alpha, rounds, self_test, power, power_runs,
                     show_all) -> None:
    """``regress --against REF``: the A/B check, its self-test, or the power measurement. Exits."""
    from rich.progress import Progress

    from evals import ab
    from evals import regress as rg
    from evals.measure import parse_inject
    from evals.registry import MODEL_NAMES

    settings = rg.ab_settings()
    threshold = settings["threshold"] if threshold is None else threshold
    rounds = settings["rounds"] if rounds is None else rounds
    try:
        inject = parse_inject()  # side B only: the workers never read the variable themselves
    except ValueError as e:
        _fail(str(e))
    if self_test is not None:
        inject = {m: float(self_test) for m in MODEL_NAMES}
    todo = int((base["status"] == "ok").sum())
    run = None
    if power is not None:
        from evals import regress_power

        def run(session):
            return regress_power.measure_power(session, runs=power_runs, rounds=rounds, progress=lambda *_: None)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"A/B against {ref}", total=todo if power is None else None)
            done = ab.against(ref, base, rounds=rounds, threshold=threshold, alpha=alpha, inject=inject,
                              exact=self_test is None and power is None,
                              progress=lambda i: bar.update(task, advance=1), run=run)
    except ab.ABError as e:
        _fail(str(e))
    console.print(done.sides())
    if power is not None:
        from evals import regress_power

        written = regress_power.write_power(power, done.result, alpha=alpha, ref=ref, ref_sha=done.ref_sha,
                                            tree=done.tree, baseline=str(baseline))
        console.print(f"wrote {', '.join(str(p) for p in written)}")
        raise typer.Exit(0)
    findings = done.result.findings
    console.print(rg.render(findings, show_all=show_all, title=f"bsbr-eval regress --against {ref}",
                            columns=("A (ms)", "B (ms)")))
    summary = rg.ab_summary(findings, ref=f"{ref} ({done.ref_sha[:12]})", baseline=str(baseline))
    if self_test is None:
        console.print(summary)
        raise typer.Exit(1 if not rg.failures(findings).empty else 0)
    st = rg.self_test(findings, base, inject)
    console.print(rg.render_self_test(st))
    other = rg.failures(findings)
    other = other[other["metric"] != rg.AB_TIME_METRIC]
    passed = bool(st["ok"].all()) and other.empty
    missed = [f"{r.model} {r.group}" for r in st.itertuples() if not r.ok]
    console.print(f"SELF-TEST {'PASS' if passed else 'FAIL'}: {self_test:g}x injected into every model, "
                  + ("caught in every model, level and mode" if not missed else f"missed: {', '.join(missed)}")
                  + ("" if other.empty else f"; other failures: {summary}"))
    raise typer.Exit(0 if passed else 1)


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
_LIST_FLAGS = _LIST_FLAGS + ("--num-pairs", "--hidden-dims", "--sizes")



@app.command(cls=_ListFlagsCommand)
def recall(
    quick: _Annotated[bool, typer.Option("--quick", help="The CPU preset (same as --preset quick): all "
                      "seven models in under 15 minutes on 2 cores.")] = False,
    preset: _Annotated[_Optional[str], typer.Option(help="quick (CPU, small) or full (GPU scale; use with "
                       "--device cuda). Default: quick.", show_default=False)] = None,
    models: _ModelsOpt = None,
    seq_lengths: _Annotated[_ListOpt, typer.Option("--seq-lengths", help="Sequence lengths of the "
                            "length x pairs sweep. Default: the preset's.", show_default=False)] = None,
    num_pairs: _Annotated[_ListOpt, typer.Option("--num-pairs", help="Key-value pairs per sequence of the "
                          "length x pairs sweep. Default: the preset's.", show_default=False)] = None,
    hidden_dims: _Annotated[_ListOpt, typer.Option("--hidden-dims", help="Model widths d of the state-size "
                            "sweep. Default: the preset's.", show_default=False)] = None,
    sizes: _Annotated[_ListOpt, typer.Option("--sizes", help="Chunk size (BSBR, Linear, DeltaNet, GAU) and "
                      "window (SlidingWindow) of the state-size sweep. Default: the preset's.",
                      show_default=False)] = None,
    vocab_size: _Annotated[_Optional[int], typer.Option(help="Vocabulary: keys and values take disjoint "
                           "halves of it. Default: the preset's.", show_default=False)] = None,
    max_steps: _Annotated[_Optional[int], typer.Option(help="Training steps at most per model. "
                          "Default: the preset's.", show_default=False)] = None,
    batch_size: _Annotated[_Optional[int], typer.Option(help="Sequences per step. Default: the preset's.",
                           show_default=False)] = None,
    lr: _Annotated[_Optional[float], typer.Option(help="Peak AdamW learning rate. Default: the preset's.",
                   show_default=False)] = None,
    target_acc: _Annotated[_Optional[float], typer.Option(help="Stop training once validation accuracy "
                           "reaches this. Default: the preset's (quick 0.995, full 0.99).",
                           show_default=False)] = None,
    device: _Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: _Annotated[int, typer.Option(help="CPU threads per training process (pinned and recorded; 1 is "
                        "fastest for these small models).")] = 1,
    jobs: _Annotated[_Optional[int], typer.Option(help="Cases trained at once in worker processes (CPU "
                     "only). Default: the preset's (quick: 2, full: 1).", show_default=False)] = None,
    seed: _Annotated[int, typer.Option(help="Seed of the data and the initial weights (recorded).")] = 0,
    output_dir: _Annotated[_Optional[_Path], typer.Option("--output-dir", help="Where recall.csv, its "
                           "recall.json sidecar and the two figures go. Default: results/recall_<UTC time>/.",
                           show_default=False)] = None,
    resume: _Annotated[bool, typer.Option("--resume", help="Keep the rows already in --output-dir's "
                       "recall.csv and train only the missing configurations.")] = False,
) -> None:
    """Multi-query associative recall (MQAR; Arora et al., 2023): train each model from scratch, report
    held-out accuracy vs length, pairs and decoding-state size. See docs/recall.md."""
    import time as _time

    import torch
    from rich.console import Console

    from evals import recall as rc
    from evals import results
    from evals.registry import REGISTRY

    if quick and preset not in (None, "quick"):
        _fail(f"--quick conflicts with --preset {preset}; give one of them")
    name = _choose("--preset", [preset or "quick"], tuple(rc.PRESETS))[0]
    base = rc.PRESETS[name]
    names = _choose("--models", models, tuple(REGISTRY)) if models else list(REGISTRY)
    device = _choose("--device", [device], ("cpu", "cuda"))[0]
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device: CUDA is not available on this machine; valid: cpu")
    for flag, value in (("--vocab-size", vocab_size), ("--max-steps", max_steps), ("--batch-size", batch_size),
                        ("--threads", threads), ("--jobs", jobs)):
        if value is not None and value <= 0:
            _fail(f"{flag} must be a positive integer, got {value}")
    if lr is not None and not lr > 0:
        _fail(f"--lr must be > 0, got {lr}")
    if target_acc is not None and not 0 < target_acc <= 1:
        _fail(f"--target-acc must lie in (0, 1], got {target_acc}")

    def pick(flag, given, values, base_value):
        vals = tuple(_positive_ints(flag, given)) if given else values
        if not vals:
            _fail(f"{flag} needs at least one value when given")
        return vals, (base_value if base_value in vals else vals[0])

    lens, base_len = pick("--seq-lengths", seq_lengths, base.seq_lens, base.base_seq_len)
    pairs, base_pairs = pick("--num-pairs", num_pairs, base.num_pairs, base.base_num_pairs)
    dims, base_dim = pick("--hidden-dims", hidden_dims, base.hidden_dims, base.base_hidden_dim)
    sz, base_sz = pick("--sizes", sizes, base.sizes, base.base_size)
    train = base.train.with_(**{k: v for k, v in dict(max_steps=max_steps, batch_size=batch_size, lr=lr,
                                                      target_acc=target_acc).items() if v is not None})
    p = base.with_(seq_lens=lens, num_pairs=pairs, base_seq_len=base_len, base_num_pairs=base_pairs,
                   hidden_dims=dims, sizes=sz, base_hidden_dim=base_dim, base_size=base_sz,
                   vocab_size=vocab_size or base.vocab_size, train=train)
    try:
        p.check()
        torch.set_num_threads(threads)
    except ValueError as e:
        _fail(str(e))

    out = output_dir or _Path("results") / f"recall_{_time.strftime('%Y%m%dT%H%M%SZ', _time.gmtime())}"
    csv_path = out / "recall.csv"
    if resume and not csv_path.is_file():
        _fail(f"--resume: no {csv_path} to continue; drop --resume or point --output-dir at a previous run")
    cases = rc.recall_grid(names, p)
    console = Console(stderr=True)
    start = results.utc_now()
    try:
        rows = rc.run_recall(cases, p, csv_path, seed=seed, device=device, run_id=f"recall-{start}",
                             resume=resume, jobs=jobs or p.jobs, console=console)
    except ValueError as e:
        _fail(str(e))
    results.write_sidecar(csv_path, dict(results.environment(), utc_start=start, utc_end=results.utc_now(),
                                         task="mqar", preset=name, settings=rc.settings(p), models=names,
                                         device=device, threads=threads, jobs=jobs or p.jobs, seed=seed))
    figures = rc.plot_run(rows, p, out)
    Console().print(rc.summary_table(rows, p))
    bad = sum(r["status"] != "ok" for r in rows)
    Console().print(f"wrote {len(rows)} rows to {csv_path} (+ recall.json, {len(figures)} figures)"
                    + (f"; {bad} failed (see the error column)" if bad else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
