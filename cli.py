"""``bsbr-eval``: the command-line suite. Thin Typer commands; the logic lives in ``evals``."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure, analyse and guard efficient long-sequence attention architectures.")

# ---- models command ----

# ---- compare command ----

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
            typer.echo("error: no CSV given and no results CSV found under results/; "
                       "pass CSV paths, e.g. bsbr-eval analyze results/run.csv", err=True)
            raise typer.Exit(2)
        csvs = [newest]
    try:
        df = analysis.load_results(csvs)
    except analysis.AnalysisInputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
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

    def usage(msg: str) -> None:
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)

    if not threshold > 0:
        usage(f"--threshold must be a positive fraction (0.25 = 25%), got {threshold}")
    if not 0 < alpha < 1:
        usage(f"--alpha must lie in (0, 1), got {alpha}")
    if current is not None and not current.is_file():
        usage(f"--current {current} does not exist; pass a results CSV")
    if not update and not baseline.is_file():
        usage(f"no baseline at {baseline}; create it with: bsbr-eval regress --baseline {baseline} --update")
    console = Console(stderr=False)
    start = results.utc_now()
    try:
        base = pd.read_csv(baseline, keep_default_na=True) if baseline.is_file() else None
        cur = pd.read_csv(current, keep_default_na=True) if current is not None else None
        for df, what in ((base, f"baseline {baseline}"), (cur, f"current run {current}")):
            if df is not None:
                rg.check_columns(df, what)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        usage(" ".join(str(e).split()))

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

    def fail(message: str) -> None:  # bad input: one line on stderr, exit 2, no traceback
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    sizes = []
    for v in [p.strip() for c in (chunk_sizes or ["128"]) for p in str(c).split(",") if p.strip()]:
        if not v.lstrip("+-").isdigit() or int(v) <= 0:
            fail(f"--chunk-sizes: {v!r} is not a positive integer; give sizes like 512,128,32")
        sizes.append(int(v))
    sizes = list(dict.fromkeys(sizes))
    try:
        from bsbr_extras import convert_example as ce

        ce.quiet_transformers()
        result = ce.run_cli(model_name=model_name, chunk_sizes=sizes, compression_factor=compression_factor,
                            seq_len=seq_len, output_dir=str(output_dir) if output_dir else None,
                            save_model=save_model, experiment=experiment)
    except ValueError as e:
        fail(" ".join(str(e).replace("--model_name", "--model-name").replace("--output_dir", "--output-dir")
                       .replace("--save_model", "--save-model").split()))
    except ImportError as e:
        extras = getattr(e, "name", None) in ("transformers", "safetensors")
        fail(f"{e}; install the converter's extras: pip install 'bsbr[convert]'" if extras else str(e))
    ce.print_summary(result)
    if output_dir is not None:
        typer.echo(f"wrote results to {output_dir}/")


# ---- recall command ----


def main() -> None:
    app()


if __name__ == "__main__":
    main()
