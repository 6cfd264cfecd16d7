"""``bsbr-eval analyze``: its ``Options`` and ``main(options)``.

The output folder is written as one step (``evals.output.staged_folder``): the analysis goes into
a hidden folder beside it, which becomes the output folder only once every file is written. A run
stopped part-way (an error, Ctrl-C, SIGTERM) leaves the output folder as it was, so a rerun is
never refused because of it. The folder may be new, empty, or an earlier analysis (its
``report.md``), whose files of the same names are replaced; anything else is refused.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.options import option


@dataclass(frozen=True)
class Options:
    """Fit how time and memory grow with length, compare with Standard, write plots and a report.
    Rows that cannot be used (torn, not numeric, ok without a time) are left out and listed with why."""

    csvs: Optional[tuple] = option(None, "Result CSVs from `compare` (whole runs or --shard slices, read together). "
                                   "Default: the newest results CSV under results/.", argument=True, many=True,
                                   show_default=False)
    output_dir: Optional[Path] = option(None, "Where fits.csv, relative.csv, crossover.csv, the PNGs and report.md "
                                        "go: a new or empty folder, or one holding an earlier analysis. Default: "
                                        "<first CSV's stem>_analysis/ beside it.", show_default=False)


def inputs(o: Options) -> list:
    """The CSVs to read, each checked to be a readable regular file; the newest results CSV under
    results/ when none is given (and the user is told which)."""
    from evals.analyze.analysis import newest_results_csv
    from evals.console import err
    from evals.errors import ResultsError
    from evals.output.paths import check_source

    if o.csvs:
        return [check_source(p, "CSV", what="a results CSV written by bsbr-eval compare") for p in map(Path, o.csvs)]
    newest = newest_results_csv("results")
    if newest is None:
        raise ResultsError("no CSV given and no results CSV found under results/; pass CSV paths, e.g. "
                           "bsbr-eval analyze results/run.csv")
    err().print(f"analyzing {newest} (the newest results CSV under results/)", highlight=False)
    return [newest]


def main(o: Options) -> int:
    from evals import interrupts
    from evals.analyze.analysis import AnalysisInputError, analyze, default_output_dir, load
    from evals.analyze.report import is_earlier_analysis, sidecar_warnings, terminal_tables, write_analysis
    from evals.console import err, finish, plural, table
    from evals.errors import ResultsError
    from evals.output.claims import staged_folder

    csvs = inputs(o)
    out = Path(o.output_dir or default_output_dir(csvs[0]))
    command = shlex.join(["bsbr-eval", "analyze", *map(str, o.csvs or []),
                          *(["--output-dir", str(o.output_dir)] if o.output_dir else [])])
    with staged_folder(out, "--output-dir", replaceable=is_earlier_analysis, what="an earlier analysis") as stage:
        interrupts.hint(f"nothing was written: {out} is as it was (an analysis is written whole or not at all)")
        try:
            df, dropped, sidecars = load(csvs)
        except AnalysisInputError as e:
            raise ResultsError(str(e)) from None
        an = analyze(df, dropped, sidecars)
        written = write_analysis(an, stage, command=command)
    for t in terminal_tables(an):
        table(*t)
    for line in sidecar_warnings(an):
        err().print(line, style="yellow", highlight=False)
    return finish(0, f"wrote {plural(len(written), 'file')} to {out}/ (report: {out / 'report.md'}); used "
                     f"{plural(len(an.rows), 'row')}" + (f", left out {len(an.dropped)} (listed above)"
                                                           if len(an.dropped) else ""))
