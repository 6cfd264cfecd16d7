"""The suite's two errors and their one-line text; the CLI maps them to exit codes."""

from __future__ import annotations


class ResultsError(ValueError):
    """Bad input about a results file or output path: one line, exit code 2."""


class OutputError(ResultsError):
    """Writing an output failed part-way (disk full, permission): one line, exit code 1."""


def one_line(err: BaseException | str, *, kind: bool = False, limit: int = 500) -> str:
    """The one-line text of an error, whitespace collapsed (``kind`` prefixes the type name)."""
    text = " ".join(str(err).split())
    if kind and isinstance(err, BaseException):
        text = f"{type(err).__name__}: {text}"
    return text[:limit]
