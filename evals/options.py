"""Checking what a user typed: list flags, choices and positive numbers, each failure one
``ResultsError`` line that names the flag and what is valid (the CLI maps it to exit code 2).

The commands' functions call these, so tests can call the functions directly and get the same
errors as the command line.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from evals.results import ResultsError


def split_list(values: Optional[Iterable]) -> list[str]:
    """Flatten repeated and comma-separated values, dropping blanks and duplicates (order kept)."""
    out = []
    for v in values or []:
        out.extend(p.strip() for p in str(v).split(",") if p.strip())
    return list(dict.fromkeys(out))


def choose(flag: str, values: Optional[Iterable], valid: Sequence[str], default: Sequence[str] = ()) -> list[str]:
    """Canonical spellings of ``values`` among ``valid`` (case-insensitive); ``default`` if none given."""
    if values is None or values == []:
        return list(default)
    picked = []
    for v in split_list(values):
        match = [c for c in valid if c.lower() == v.lower()]
        if not match:
            raise ResultsError(f"{flag}: unknown value {v!r}; valid: {', '.join(valid)}")
        picked.append(match[0])
    if not picked:
        raise ResultsError(f"{flag} needs at least one value when given; valid: {', '.join(valid)}")
    return list(dict.fromkeys(picked))


def positive_ints(flag: str, values: Optional[Iterable], default: Sequence[int] = (),
                  example: str = "64 128 256 or 64,128,256") -> list[int]:
    if values is None or values == []:
        return list(default)
    out = []
    for v in split_list(values):
        if not re.fullmatch(r"[+-]?\d+", v) or int(v) <= 0:
            raise ResultsError(f"{flag}: {v!r} is not a positive integer; give values like {example}")
        out.append(int(v))
    if not out:
        raise ResultsError(f"{flag} needs at least one value when given, like {example}")
    return list(dict.fromkeys(out))


def check_positive(**flags) -> None:
    """``check_positive(batch_size=1, ...)``: each given (not None) value must be a positive integer."""
    for name, value in flags.items():
        if value is not None and not (isinstance(value, int) and value > 0):
            raise ResultsError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_fraction(flag: str, value: float, low: float = 0.0, high: Optional[float] = None) -> None:
    if not value >= low or (high is not None and not value <= high):
        bound = f">= {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ResultsError(f"{flag} must be {bound}, got {value}")
