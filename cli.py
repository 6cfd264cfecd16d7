"""``bsbr-eval``: the command-line suite. Thin Typer commands; the logic lives in ``evals``."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure, analyse and guard efficient long-sequence attention architectures.")

# ---- models command ----

# ---- compare command ----

# ---- analyze command ----

# ---- regress command ----

# ---- convert command ----

# ---- recall command ----


def main() -> None:
    app()


if __name__ == "__main__":
    main()
