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

# ---- recall command ----


def main() -> None:
    app()


if __name__ == "__main__":
    main()
