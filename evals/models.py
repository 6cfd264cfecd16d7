"""``bsbr-eval models``: the registry as a table: each architecture's name, where it comes from
(built in, or which installed package's entry point), the published method it follows, its
cost, the modes and op forms it runs, what its decoding cache holds, and every way it departs
from the method.

Listing imports no model code (so no torch): the built-ins' descriptions live in the registry,
and a plugin is listed by its entry point; ``bsbr-eval check NAME`` imports it and says the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

USES_TORCH = False  # cli.ended imports torch before every other command (where a signal must wait)


@dataclass(frozen=True)
class Options:
    """List the registry: built-in architectures and installed plugins, where each comes from, the
    published method it follows, complexity, modes, op forms, decoding state and departures. Names
    are case-insensitive; a mixer class may also be named by import path (package.module:Class)."""


def main(o: Options) -> int:
    from evals.console import table
    from evals.registry import REGISTRY, registered

    rows = []
    for s in (REGISTRY[name] for name in registered()):
        known = s.declared_modes is not None
        rows.append((s.name, s.source if s.source == "built-in" else f"{s.source}: {s.target}", s.method, s.complexity,
                     " ".join(s.declared_modes) if known else "", " ".join(s.declared_forms or ()), s.state,
                     s.departures))
    table("bsbr-eval models (names are case-insensitive)",
          ("name", "from", "method", "complexity (per head)", "modes", "op forms", "decoding cache holds",
           "departures from the method"), rows)
    return 0
