"""A deliberately broken retention layer, for the test that the conformance check catches it.

``LeakyRetention`` adds 1/100 of the NEXT position's input to each output: every output sees one
token of the future. Nothing else changes (``forward`` still equals ``output(op(...))``), so the
causality properties of ``bsbr-eval check`` are the ones that must fail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retnet.mixer import MultiScaleRetention


class LeakyRetention(MultiScaleRetention):
    """Multi-scale retention whose output at t also sees the input at t+1 (not causal; a test fixture)."""

    method = "Multi-scale retention that peeks one token ahead (a broken fixture, not a method)"
    departures = "deliberately not causal: output t adds 0.01 x input t+1"

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ahead = F.pad(x[:, 1:], (0, 0, 0, 1))                          # (b, n, D): x[t+1], zero at the end
        return super().output(o, x) + 0.01 * ahead
