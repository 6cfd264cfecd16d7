"""``bsbr-eval models``: the registry as a table (name, the published method each follows, its
cost, the modes it runs, what its decoding cache holds, and every way it departs from the
method). Read from the registry's own descriptions, so listing loads no model code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """List the registry: name, the published method it follows, complexity, modes, decoding
    state, departures from the method. Names are case-insensitive everywhere."""


def main(o: Options) -> int:
    from evals.console import table
    from evals.registry import REGISTRY

    rows = [(s.name, s.method, s.complexity, " ".join(s.modes), s.state, s.departures) for s in REGISTRY.values()]
    table("bsbr-eval models (names are case-insensitive)",
          ("name", "method", "complexity (per head)", "modes", "decoding cache holds", "departures from the method"),
          rows)
    return 0
