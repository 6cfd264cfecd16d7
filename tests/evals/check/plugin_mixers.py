"""Mixers from outside the project, as a user would bring them (named by import path,
``tests.evals.check.plugin_mixers:Name``): one that follows the contract, and one broken in each way the
conformance check must catch. Tests import them only through the registry or the check."""

from __future__ import annotations

import torch

from bsbr_extras.linear import LinearAttention
from bsbr_extras.standard import StandardAttention


class MyStandard(StandardAttention):
    """A plain subclass of a built-in mixer: it follows the contract as its parent does."""


class PeeksAhead(StandardAttention):
    """Each output also sees the next position's input: not causal."""

    def forward(self, x, mask=None, cache=None):
        return super().forward(x, mask=mask, cache=cache) + 0.5 * torch.roll(x, -1, dims=1)


class IgnoresPadding(StandardAttention):
    """Scales its output by the length of the call, padding included: causal in the values, but a
    row's outputs change with how much padding the batch adds."""

    def forward(self, x, mask=None, cache=None):
        return super().forward(x, mask=mask, cache=cache) * (16.0 / x.shape[1])


class ForgetsItsCache(LinearAttention):
    """With a cache it starts from an empty state every call: streaming loses the past."""

    def forward(self, x, mask=None, cache=None):
        if cache is not None:
            cache = self.init_cache(x.shape[0], x.device, x.dtype)
        return super().forward(x, mask=mask, cache=cache)


class MisstatesItsState(LinearAttention):
    """Declares four bytes more state than its cache holds."""

    def state_bytes(self, n: int) -> int:
        return super().state_bytes(n) + 4


class ReadsTheHost(StandardAttention):
    """Reads a value on the host in its forward (a sync on a GPU; impossible on the meta device)."""

    def forward(self, x, mask=None, cache=None):
        if bool(torch.isnan(x).any()):
            raise ValueError("NaN input")
        return super().forward(x, mask=mask, cache=cache)
