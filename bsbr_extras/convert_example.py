"""``python -m bsbr_extras.convert_example``: the earlier package's command line for the GPT-2 -> BSBR
comparison and the train -> convert -> fine-tune experiment.

The experiment is evaluation code and does not live in the library; the library depends on
nothing outside it, not even by name. Whatever package provides this command registers it
under the entry-point group ``bsbr_extras.commands`` with the name ``convert_example``: a
function ``main(argv) -> exit code``. This module looks the command up there and runs it; the
project's own ``pyproject.toml`` registers its convert command (same options, the earlier package's
spellings included), so an installed project serves it.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import Optional, Sequence

PROG = "python -m bsbr_extras.convert_example"
GROUP, NAME = "bsbr_extras.commands", "convert_example"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the registered command with ``argv`` (default: this process's arguments); its exit code."""
    found = list(entry_points(group=GROUP, name=NAME))
    if not found:
        print(f"error: {PROG}: no package registers the {NAME!r} command (entry-point group {GROUP!r}); "
              "install the bsbr project with its evaluation suite (pip install -e .)", file=sys.stderr)
        return 2
    args = list(sys.argv[1:] if argv is None else argv)
    return int(found[0].load()(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
