"""The order of the guard's samples: A and B back to back, alternating who goes first.

For each configuration, ``rounds`` pairs, A and B taken back to back, alternating which goes
first (ABBAAB...), so a drift of the machine within a configuration hits both sides alike.
Pure: ``sample(side, i) -> ms`` is given (the workers' in a real run, a synthetic one in tests).

Axis legend: ``s`` paired samples (rounds) of one configuration.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

SIDES = ("A", "B")


def order(i: int, r: int) -> tuple[str, str]:
    """Who goes first in round ``r`` of configuration ``i``: alternate, and start configurations
    alternately too, so neither side is systematically first (first-after-a-switch is the cold one)."""
    return SIDES if (i + r) % 2 == 0 else SIDES[::-1]


def interleave(configs: list, rounds: int, sample: Callable[[str, int], float],
               progress: Optional[Callable[[int], None]] = None) -> dict:
    """``{i: (a, b)}``: for each configuration index ``i``, (s,) samples of each side, pair ``k``
    taken back to back in round ``k``. ``sample(side, i) -> ms``."""
    out = {}
    for i in configs:
        a, b = [], []
        for r in range(rounds):
            for side in order(i, r):
                (a if side == "A" else b).append(sample(side, i))
        out[i] = (np.asarray(a), np.asarray(b))
        if progress:
            progress(i)
    return out
