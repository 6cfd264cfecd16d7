"""``bsbr-eval``: flags in, ``Options`` out, ``main(options)`` run. Nothing else lives here.

Every command is a module with a frozen ``Options`` dataclass, whose fields (declared with
``evals.options.option``) hold each flag's default and help, and a ``main(options) -> exit code``.
``command`` turns the fields into Typer parameters, so a default is written once, in the options.

How every command ends (``main`` below, one path for all):
- bad input (``ResultsError``: a flag, a path, a file): ``error: <one line>`` on stderr, exit 2;
  an unknown command or option, or a value that is not a number, the same;
- a write that failed part-way (``OutputError``): one line, exit 1 (rows already written kept);
- SIGINT or SIGTERM, from start-up on (``evals.interrupts``): ``interrupted: <what was kept>``,
  exit 130 or 143;
- standard output that cannot be written (``> /dev/full``): one line on stderr, exit 2; a reader
  that closes the pipe early (``| head``) ends it quietly, exit 0.
Nothing heavy is imported until a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

from evals import interrupts

interrupts.install()  # first: from here on Ctrl-C and SIGTERM end in one line, while Python loads the rest too
try:
    import dataclasses
    import enum
    import importlib
    import inspect
    import re
    import sys
    import typing
    from typing import Annotated, Optional

    import typer
    import typer.core
except KeyboardInterrupt as _stop:
    interrupts.exit_now(_stop)

# command name -> the module holding its Options and main (registry order is --help's order)
COMMANDS = {
    "models": "evals.models",
    "compare": "evals.compare.command",
    "forms": "evals.forms.command",
    "analyze": "evals.analyze.command",
    "guard": "evals.guard.command",
    "convert": "evals.convert.command",
    "recall": "evals.recall.command",
    "frontier": "evals.frontier.command",
    "lm": "evals.lm.command",
    "check": "evals.check.command",
}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Measure, analyse and guard efficient long-sequence attention architectures.")


def join_list_flags(args: list[str], flags: set) -> list[str]:
    """Rewrite ``--seq-lengths 64 128 256`` as ``--seq-lengths 64,128,256`` before click parses.

    Click options take one value each; this lets list flags take several space-separated values
    too (up to the next option). Negative numbers count as values so that ``--seq-lengths 64 -8``
    reaches the length check instead of "no such option".
    """
    out, i = [], 0
    while i < len(args):
        flag, eq, first = args[i].partition("=")
        if args[i] == "--":
            out.extend(args[i:])
            break
        if flag in flags:
            values = [first] if eq else []
            i += 1
            while i < len(args) and (not args[i].startswith("-") or re.fullmatch(r"-\d+(\.\d*)?(e-?\d+)?", args[i])):
                values.append(args[i])
                i += 1
            out.extend([flag, ",".join(values)] if values else [flag])
            continue
        out.append(args[i])
        i += 1
    return out


class Command(typer.core.TyperCommand):
    """List flags joined before parsing; a usage error is one line on stderr and exit 2."""

    list_flags: set = set()
    choices: dict = {}  # parameter name -> its valid values

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, join_list_flags(list(args), self.list_flags))
        except typer.TyperException as e:  # click's usage errors (typer ships its own click)
            if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
                raise
            typer.echo(f"error: {_usage_line(e, self.choices)}", err=True)
            raise typer.Exit(2) from None

    def collect_usage_pieces(self, ctx):
        """``RUN_DIR``, as Unix usage lines spell a required argument (typer writes ``{RUN_DIR}``,
        which reads like a template left unfilled)."""
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


def _usage_line(e, choices: Optional[dict] = None) -> str:
    """A usage error as one line; a value outside a flag's choices (``choices``: parameter name ->
    valid values) in the words every other bad value gets (``evals.options.choose``):
    ``--executor: unknown value 'slurm'; valid: local, ray``."""
    param, text = getattr(e, "param", None), " ".join(e.format_message().split())
    valid = (choices or {}).get(getattr(param, "name", None))
    given = re.search(r"'([^']*)' is not one of", text)
    if valid and given:
        flag = max((o for o in param.opts if o.startswith("--")), key=len, default=param.opts[0])
        return f"{flag}: unknown value {given.group(1)!r}; valid: {', '.join(valid)}"
    return text


def _flags(f: dataclasses.Field) -> list[str]:
    return list(f.metadata.get("flags") or ()) or [f"--{f.name.replace('_', '-')}"]


def _parameter(f: dataclasses.Field, hint) -> inspect.Parameter:
    """One Typer parameter from one ``option`` field."""
    md = f.metadata
    default = f.default
    annotation = hint
    if md.get("choices"):
        choice = enum.Enum(f.name, {c: c for c in md["choices"]}, type=str)
        annotation = Optional[choice] if default is None else choice
        default = None if default is None else choice(default)
    elif md.get("many"):
        annotation = Optional[list[str]]
    info = (typer.Argument(help=md["help"], show_default=md.get("show_default", True), metavar=f.name.upper())
            if md.get("argument") else
            typer.Option(*_flags(f), help=md["help"], show_default=md.get("show_default", True),
                         case_sensitive=False) if md.get("choices") else
            typer.Option(*_flags(f), help=md["help"], show_default=md.get("show_default", True)))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])


def _value(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, list):
        return tuple(v)
    return v


# older names that still work, hidden from --help
ALIASES = {"regress": "guard"}


def command(name: str, module: str, hidden: bool = False) -> None:
    """Register ``name``: its parameters from ``module.Options``, its body ``module.main``."""
    mod = importlib.import_module(module)
    options = mod.Options
    hints = typing.get_type_hints(options)
    fields = dataclasses.fields(options)

    def run(**given):
        raise typer.Exit(ended(mod.main, options(**{k: _value(v) for k, v in given.items()})))

    run.__signature__ = inspect.Signature([_parameter(f, hints[f.name]) for f in fields])
    run.__doc__ = inspect.getdoc(options)
    run.__name__ = name
    cls = type(f"{name.title()}Command", (Command,),
               {"list_flags": {fl for f in fields if f.metadata.get("many") for fl in _flags(f)},
                "choices": {f.name: f.metadata["choices"] for f in fields if f.metadata.get("choices")}})
    app.command(name, cls=cls, hidden=hidden)(run)


try:
    for _name, _module in COMMANDS.items():
        command(_name, _module)
    for _alias, _name in ALIASES.items():
        command(_alias, COMMANDS[_name], hidden=True)
except KeyboardInterrupt as _stop:
    interrupts.exit_now(_stop)


def ended(main_fn, options) -> int:
    """Run a command's ``main``; map how it ended to a line and an exit code (module docstring)."""
    from evals import interrupts
    from evals.errors import OutputError, ResultsError, one_line

    try:
        if getattr(sys.modules.get(main_fn.__module__), "USES_TORCH", True) and "torch" not in sys.modules:
            with interrupts.deferred():  # a signal mid-import would abort inside torch's C++
                import torch  # noqa: F401
        return main_fn(options)
    except KeyboardInterrupt as e:
        typer.echo(f"interrupted: {interrupts.current_hint()}", err=True)
        return interrupts.exit_code(e)
    except OutputError as e:
        typer.echo(f"error: {one_line(e)}", err=True)
        return 1
    except ResultsError as e:
        typer.echo(f"error: {one_line(e)}", err=True)
        return 2


def convert_example(argv: list) -> int:
    """``python -m bsbr_extras.convert_example ARGS``: ``bsbr-eval convert ARGS`` (registered for the
    library in pyproject.toml's ``bsbr_extras.commands`` entry points); its exit code."""
    return main(["convert", *argv], prog_name="python -m bsbr_extras.convert_example", exit=False)


class StdoutUnwritable(OSError):
    """Standard output refused a write (``> /dev/full``, a closed pipe)."""


class _Stdout:
    """Standard output, with a failed write or flush raised as ``StdoutUnwritable`` so it can be
    told from any other ``OSError`` (a results file has its own one-line errors)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            raise StdoutUnwritable(e.errno, e.strerror) from None

    def flush(self):
        try:
            return self._stream.flush()
        except OSError as e:
            raise StdoutUnwritable(e.errno, e.strerror) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: Optional[list] = None, *, prog_name: str = "bsbr-eval", exit: bool = True) -> int:
    """Run the command line; every way it can end is here (see the module docstring)."""
    interrupts.install()
    real = sys.stdout
    sys.stdout = _Stdout(real)
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv), prog_name)
        try:
            sys.stdout.flush()
        except StdoutUnwritable as e:
            code = _unwritable(e)
    finally:
        sys.stdout = real
    if exit:
        sys.exit(code)
    return code


def _run(argv: list, prog_name: str) -> int:
    from evals import interrupts

    group = typer.main.get_command(app)
    try:  # click's own main would turn Ctrl-C into a blank line and "Aborted!": invoke it directly
        with group.make_context(prog_name, argv) as ctx:
            rv = group.invoke(ctx)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # an unknown command or option, a missing argument
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `bsbr-eval`: the help, not an error
            typer.echo(e.ctx.get_help())
            return 0
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        return 2
    except typer.Abort:
        typer.echo(f"interrupted: {interrupts.current_hint()}", err=True)
        return 130
    except KeyboardInterrupt as e:  # before a command began (parsing), or while --help printed
        typer.echo(f"interrupted: {interrupts.current_hint()}", err=True)
        return interrupts.exit_code(e)
    except StdoutUnwritable as e:
        return _unwritable(e)


def _unwritable(e: OSError) -> int:
    """Standard output refused a write: say so once on stderr (a reader that closed the pipe, as
    ``| head`` does, is no error: nothing is said and the exit code is 0); stop Python from trying
    to write again at exit."""
    import errno
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    if e.errno == errno.EPIPE:
        return 0
    print(f"error: cannot write to standard output ({e.strerror or e}); give a writable destination", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
