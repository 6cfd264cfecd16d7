"""What the commands print, and how, in one place.

- ``out()`` / ``err()``: rich consoles on standard output and standard error. Piped (not a
  terminal), they do not wrap at 80 columns: a table or a line is written at its full width, so a
  pipe or a log file gets whole rows.
- ``table(title, columns, rows)``: a rich table on a terminal; piped, the same data as a Markdown
  table (one line per row, nothing cut), which other tools can read.
- ``finish(code, summary)``: the closing line (on stdout when the run succeeded, as
  ``error: ...`` on stderr when it did not) and the exit code.
- ``plural(n, word)``: ``1 row``, ``2 rows``.
"""

from __future__ import annotations

import sys
from typing import Sequence

WIDE = 10_000  # columns a console may use when its output is not a terminal


def _console(stderr: bool):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, width=None if tty else WIDE, soft_wrap=not tty)


def out():
    return _console(False)


def err():
    return _console(True)


def plural(n: int, word: str, many: str = "") -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """``columns`` and ``rows`` as a Markdown table; a ``|`` inside a cell is escaped."""
    def cell(v) -> str:
        return " ".join(str("" if v is None else v).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence], *, stderr: bool = False) -> None:
    """Print a table: rich on a terminal, Markdown when piped."""
    stream = sys.stderr if stderr else sys.stdout
    if not stream.isatty():
        print(f"{title}\n\n{markdown_table(columns, rows)}\n", file=stream)
        return
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(str(c), overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    _console(stderr).print(t)


def finish(code: int, summary: str) -> int:
    """The closing line, and the exit code (1 when nothing succeeded: the line goes to stderr)."""
    if code:
        print(f"error: {summary}", file=sys.stderr)
    else:
        out().print(summary, highlight=False)
    return code


def progress_bar(console, expected: int, what: str, describe):
    """A progress bar over ``expected`` jobs with the time elapsed and an estimate of the time left,
    and its two callbacks: ``on_start(kept)`` once the output is claimed (a resumed run counts
    only the jobs still to run; a refused output never shows a bar), ``on_row(row)`` after each
    job (``describe(row)`` is the bar's text)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task(what, total=expected)

    def on_start(kept: int):
        bar.update(task, total=max(expected - kept, 0))
        bar.start()

    def on_row(row):
        bar.update(task, advance=1, description=describe(row))
    return bar, on_start, on_row
