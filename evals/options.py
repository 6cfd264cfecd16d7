"""What a command's options are, and checking what a user typed.

Declaring: every command's ``Options`` is a frozen dataclass whose fields are declared with
``option(default, help, ...)``: the default and the help text live there and nowhere else, and
``cli.py`` turns the fields into flags (``--hidden-dim`` for ``hidden_dim``). Nothing here
imports torch, pandas or matplotlib, so building the command line (and ``--help``) stays fast.

Checking: list flags, choices and positive numbers, each failure one ``ResultsError`` line that
names the flag and what is valid (the CLI maps it to exit code 2). The commands call these, so
tests can call a command's ``main(Options(...))`` directly and get the same errors.
"""

from __future__ import annotations

import math
import re
from dataclasses import field
from typing import Iterable, Optional, Sequence

from evals.errors import ResultsError


def option(default, help: str, *, flags: Sequence[str] = (), choices: Sequence[str] = (), many: bool = False,
           argument: bool = False, show_default: bool = True):
    """A dataclass field that is also a command-line option.

    ``flags``: the spellings (default ``--field-name``); ``choices``: the valid values (shown in
    ``--help`` and checked by the parser); ``many``: a list flag that takes several values, space-
    or comma-separated (the field holds a tuple of strings, or None when not given);
    ``argument``: a positional argument instead of a flag.
    """
    return field(default=default, metadata=dict(help=help, flags=tuple(flags), choices=tuple(choices), many=many,
                                                 argument=argument, show_default=show_default))


def models_option(help: str = "Models (built-in names, case-insensitive, or plugins: an import path "
                  "pkg.mod:Class or an installed entry point), space- or comma-separated. Default: every "
                  "registered model."):
    """The ``--models`` option every command that picks models shares (``evals.registry.select``)."""
    return option(None, help, many=True, show_default=False)


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
        if not re.fullmatch(r"[+-]?\d+", v) or not 0 < int(v) <= INT_MAX:
            raise ResultsError(f"{flag}: {v!r} is not a positive integer (at most {INT_MAX}); give values like {example}")
        out.append(int(v))
    if not out:
        raise ResultsError(f"{flag} needs at least one value when given, like {example}")
    return list(dict.fromkeys(out))


def check_positive(**flags) -> None:
    """``check_positive(batch_size=1, ...)``: each given (not None) value must be a positive integer
    that fits a C int (``threads`` at most ``THREADS_MAX``)."""
    for name, value in flags.items():
        if value is not None:
            flag, high = f"--{name.replace('_', '-')}", THREADS_MAX if name == "threads" else INT_MAX
            try:
                check_finite(flag, value, low=1, high=high, integer=True)
            except ResultsError:
                raise ResultsError(f"{flag} must be a positive integer (at most {high}), got {value}") from None


def check_seed(value, flag: str = "--seed") -> int:
    """A seed torch, numpy and Python all take: an integer in [0, 2**63 - 1]."""
    return check_finite(flag, value, low=0, high=SEED_MAX, integer=True)


def check_fraction(flag: str, value: float, low: float = 0.0, high: Optional[float] = None) -> None:
    """A finite number in ``[low, high]`` (``high`` defaults to a day's seconds: every such
    option here is a duration or a fraction)."""
    check_finite(flag, value, low=low, high=SECONDS_MAX if high is None else high)


# Bounds that no sensible value reaches, so that a typo like ``--threads 99999999999`` is one line
# here rather than an overflow deep inside torch (``set_num_threads`` takes a C int, ``manual_seed``
# a 64-bit one).
INT_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1
THREADS_MAX = 4096
SECONDS_MAX = 24 * 3600.0


def _bound(low, high, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}" if isinstance(low, float) else
                     f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}" if isinstance(high, float) else
                     f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_finite(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False):
    """The one check of a number typed on the command line or read from the environment: it must be
    a finite number (an integer if ``integer``) within ``[low, high]`` (``low_open``/``high_open``:
    the bound itself excluded). Accepts numbers and their text; returns the value as an int (with
    ``integer``) or a float, else raises a one-line ``ResultsError`` naming ``name``, what is valid
    and what was given. ``inf``, ``nan``, ``1e309`` and ints too large for a float all fail here.
    """
    bound = _bound(low, high, low_open, high_open)
    kind = "an integer" if integer else "a finite number"
    want = f"{name} must be {kind}" + (f" {bound}" if bound else "")
    shown = repr(value) if isinstance(value, str) else str(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    if isinstance(value, bool):
        raise ResultsError(f"{want}, got {shown}")
    if integer:
        if isinstance(value, str):
            if not re.fullmatch(r"\s*[+-]?\d+\s*", value):
                raise ResultsError(f"{want}, got {shown}")
            value = int(value)
        elif isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise ResultsError(f"{want}, got {shown}")
            value = int(value)
        elif not isinstance(value, int):
            raise ResultsError(f"{want}, got {shown}")
        num = value
    else:
        try:
            num = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ResultsError(f"{want}, got {shown}") from None
        if not math.isfinite(num):
            raise ResultsError(f"{want}, got {shown}")
    if low is not None and (num < low or (low_open and num == low)):
        raise ResultsError(f"{want}, got {shown}")
    if high is not None and (num > high or (high_open and num == high)):
        raise ResultsError(f"{want}, got {shown}")
    return num


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's limit shows there too)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_jobs(jobs: Optional[int], threads: int, executor: str, *, default: int = 1) -> int:
    """How many jobs to run at once. The local executor runs ``jobs`` processes of ``threads``
    threads each on this machine: asking for more than its usable CPUs only makes every job slower
    (21 trainings on 2 cores finished none), so it is refused; a preset's ``default`` is capped to
    fit instead. Ray schedules by its own resources, so it may go wider."""
    cpus = usable_cpus()
    if jobs is None:
        return default if executor != "local" else max(1, min(default, cpus // max(threads, 1)))
    if executor == "local" and jobs * threads > cpus:
        raise ResultsError(f"--jobs {jobs} x --threads {threads} asks for {jobs * threads} CPUs, but this machine "
                           f"lets this process use {cpus}; give --jobs at most {max(1, cpus // threads)}, or "
                           f"--executor ray for a cluster")
    return jobs
