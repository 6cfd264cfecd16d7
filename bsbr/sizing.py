"""The one device-aware sizing policy that every op asks for its blocks and segments.

Two policies, chosen by the tensors' device unless forced:

* ``"cpu"``: cache-sized pieces. Each op keeps its own tuned budget (``SEGMENT_BYTES``,
  ``_BLOCK_STATE_BYTES``, ``QUERY_BLOCK`` in its module) and passes it here; the numbers that come
  back are exactly the ones the ops computed before this module existed, so CPU runs are unchanged.
  Why small pieces on a CPU: temporaries over glibc's mmap threshold are mapped fresh and
  page-faulted on every call, and a piece that stays in cache is reused while hot (the measurements
  are in each op's module).
* ``"cuda"``: whole sequences. A GPU is starved by many small kernels (one Python iteration per
  64-token chunk is ~3,800 launches at batch 8, 16k tokens), not by large temporaries, so every
  "pieces per block" answer is "all of them": Linear and GAU take every chunk in one batched pass
  (prefix sums by ``cumsum``), DeltaNet runs its UT transform for all chunks at once before the
  sequential chunk recurrence, and BSBR's and SlidingWindow's blocked attention is one
  ``scaled_dot_product_attention`` call over every block.

Both policies give the same numbers up to round-off, and the tests run both on the CPU by forcing:

    with sizing.use("cuda"):          # or BSBR_SIZING=cuda in the environment
        out = linear_attention(q, k, v, 64)

Precedence: ``use(...)`` (innermost wins), then ``BSBR_SIZING``, then the device type (anything that
is not ``cuda`` gets the CPU policy).
``BSBR_SIZING`` is read when this module is imported, when a model is built (``CausalLM.__init__``
calls :func:`refresh`) and when a policy is set with ``use``; an op call never reads the
environment (it did, on every call, with a ``torch.device`` built each time).
``torch.compile`` guards on ``use`` (a graph traced under one policy is retraced under the other)
but reads ``BSBR_SIZING`` once, when it traces: set the variable before the process starts.

The accumulation rule lives here too (:func:`acc_dtype`): states, normalisers and DeltaNet's UT
inverse are carried in fp32 whatever the input dtype, and outputs are cast back (as
flash-linear-attention's naive references do). For fp32 or fp64 inputs nothing is cast.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

POLICIES = ("cpu", "cuda")
ENV_VAR = "BSBR_SIZING"

_forced: list = []  # stack of policies forced by ``use``; the last one wins
_env: list = [None]  # the validated ``$BSBR_SIZING`` (None: unset), as of the last ``refresh``


def _check(name: str, source: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"{source}: unknown sizing policy {name!r}; valid: {', '.join(POLICIES)}")
    return name


def refresh() -> None:
    """Read ``$BSBR_SIZING`` again (a bad value raises here, naming the variable and the valid ones)."""
    env = os.environ.get(ENV_VAR)
    _env[0] = _check(env, f"${ENV_VAR}") if env else None


@contextmanager
def use(name: str) -> Iterator[None]:
    """Force every op called inside the block to size itself with policy ``name`` ("cpu" or "cuda")."""
    refresh()
    _forced.append(_check(name, "sizing.use"))
    try:
        yield
    finally:
        _forced.pop()


def policy(device: torch.device) -> str:
    """The policy for tensors on ``device``: forced by ``use``, else ``$BSBR_SIZING``, else by device type."""
    if _forced:
        return _forced[-1]
    if _env[0] is not None:
        return _env[0]
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return "cuda" if kind == "cuda" else "cpu"


def whole(device: torch.device) -> bool:
    """True when ops on ``device`` should take the whole sequence in one pass (the cuda policy)."""
    return policy(device) == "cuda"


def per_block(device: torch.device, total: int, item_bytes: int, cpu_budget: int) -> int:
    """How many items (chunks, query blocks, ...) one block or segment holds.

    total: items in the whole call; item_bytes: bytes one item adds to the block's largest
    temporary; cpu_budget: the op's byte budget under the cpu policy.
    cpu policy: ``max(1, cpu_budget // item_bytes)`` (may exceed ``total``; callers split by it).
    cuda policy: ``total``, i.e. one block.
    """
    if whole(device):
        return max(1, total)
    # two integer operations: cheaper than any lookup that would cache them (an lru_cache here
    # also made torch.compile warn); what was costly per call was the environment read above
    return max(1, cpu_budget // max(1, item_bytes))


_HALF = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and normalisers accumulate in: fp32 for half-precision inputs, else the input's."""
    return torch.float32 if dtype in _HALF else dtype


def upcast(*tensors: Optional[torch.Tensor]) -> tuple:
    """Each tensor in its accumulation dtype (fp32/fp64 tensors are returned as they are; None stays None).

    A dtype check rather than ``.to``: decode steps call this every token, so the fp32 path stays
    a few attribute reads.
    """
    for t in tensors:
        if t is not None and t.dtype in _HALF:
            return tuple(t.float() if t is not None and t.dtype in _HALF else t for t in tensors)
    return tensors  # full precision: no generator, no new tuple


try:  # a bad value at import must not make ``import bsbr`` fail: it raises at the next refresh
    refresh()
except ValueError:
    _env[0] = None
