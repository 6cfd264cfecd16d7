"""Invariants every registered architecture must satisfy: the conformance check
(``evals.check.conformance``, what ``bsbr-eval check`` runs on any mixer) run on the seven
built-ins, property by property. One definition: a property tightened there is tightened here.

Run in float64 so "unchanged" can be asserted to round-off; the fp32 oracle comparisons live
in each architecture's own test module. Every built-in takes part in every property (none is
``n/a``): each keeps a cache, has an op form and declares its state formula.
"""

import pytest

from evals.check.conformance import PROPERTIES, Subject
from evals.registry import MODEL_NAMES


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_built_in_conforms(name, prop):
    result = PROPERTIES[prop](Subject.of(name))
    assert result.status == "pass", result.line()


@pytest.mark.parametrize("target, prop", [
    ("tests.evals.check.plugin_mixers:PeeksAhead", "causal_perturbation"),
    ("tests.evals.check.plugin_mixers:PeeksAhead", "causal_jacobian"),
    ("tests.evals.check.plugin_mixers:IgnoresPadding", "padding"),
    ("tests.evals.check.plugin_mixers:ForgetsItsCache", "streaming"),
    ("tests.evals.check.plugin_mixers:ForgetsItsCache", "decode_step"),
    ("tests.evals.check.plugin_mixers:MisstatesItsState", "state_formula"),
    ("tests.evals.check.plugin_mixers:ReadsTheHost", "device_clean"),
], ids=lambda v: v.split(":")[-1])
def test_a_property_fails_on_a_mixer_broken_its_way(target, prop):
    """A check that cannot fail proves nothing: each property fails on a mixer broken in its way
    (tests/evals/check/plugin_mixers.py), and the same mixer's other contract still holds where it should."""
    result = PROPERTIES[prop](Subject.of(target))
    assert result.status == "fail", result.line()
