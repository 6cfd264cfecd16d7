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
