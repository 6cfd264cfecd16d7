"""``python -m bsbr_extras.convert_example``: the seed's command line for the GPT-2 -> BSBR
comparison and the train -> convert -> fine-tune experiment.

The experiment is evaluation code and lives in the suite (``evals/convert_experiment.py``);
the library never depends on the suite, so this module imports nothing from it. Running it hands
the command line to ``bsbr-eval convert``, the same command with the same options (the seed's
spellings ``--model_name``, ``--chunk_size 512 128 32``, ``--seq_len``, ``--output_dir``,
``--compression_factor``, ``--save_model`` are accepted there too) and the same one-line errors.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

PROG = "python -m bsbr_extras.convert_example"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``bsbr-eval convert`` with ``argv`` (default: this process's arguments); its exit code."""
    try:  # at call time, by name: importing bsbr_extras never loads the suite
        cli = importlib.import_module("cli")
    except ImportError as e:
        print(f"error: {PROG} runs the evaluation suite's convert command, which is not installed "
              f"here ({e}); install the bsbr project (pip install -e .)", file=sys.stderr)
        return 2
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.app(["convert", *args], prog_name=PROG)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
