"""Argument checks shared by every model: each raises one ValueError naming the argument, what it
got and what is valid. They run at the public edge (constructors, ``CausalLM.forward``, the public
ops), never below it (see docs/decoding.md, "Checks")."""

from __future__ import annotations

import math
from typing import Optional

import torch


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> None:
    """Raise a one-line ValueError naming ``name`` unless ``value`` is a positive int."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        want = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_heads(hidden_dim: int, num_heads: int) -> int:
    """Validate the head split and return the head size."""
    check_positive_int("hidden_dim", hidden_dim)
    check_positive_int("num_heads", num_heads)
    if hidden_dim % num_heads:
        raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
    return hidden_dim // num_heads


def check_float(name: str, value, lo: float = 0.0, hi: float = math.inf, *, lo_open: bool = True,
                hi_open: bool = True, allow_none: bool = False, note: str = "") -> None:
    """The one check for every float hyperparameter: a real number (not a bool), finite, in the
    interval from ``lo`` to ``hi`` (open or closed at each end); one ValueError naming it otherwise."""
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        if hi == math.inf:
            want = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            want = f"a float in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be {want}{' (or None' + note + ')' if allow_none else note}, got {value!r}")


def check_dropout(dropout, name: str = "dropout") -> None:
    check_float(name, dropout, 0.0, 1.0, lo_open=False)


def check_positive_float(name: str, value) -> None:
    """Raise a one-line ValueError naming ``name`` unless ``value`` is a finite number > 0."""
    check_float(name, value)


def normalize_mask(attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Turn a user attention_mask (b, n) of 0/1 (any dtype) into bool, True = real token.

    Returns None when there is no mask or every position is real, so mixers can take their
    mask-free fast path.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor of shape {tuple(input_ids.shape)}, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must match input_ids shape {tuple(input_ids.shape)}"
        )
    mask = mask_as_bool(attention_mask.to(device=input_ids.device), "attention_mask")
    return None if known_all_true(mask) else mask


def mask_as_bool(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A padding mask as bool (True = real token): a bool tensor as it is, a numeric one only if it
    holds 0s and 1s (2, 0.5, -1 or NaN are not a mask and would silently count as real tokens).
    The one check of mask values, for the models' ``attention_mask`` and the ops' ``mask``.

    On the CPU outside ``torch.compile`` a bad value is a ValueError naming ``name``; elsewhere
    reading the values would synchronise with the device (or break the graph), so the check is
    asynchronous and a bad mask fails the next synchronising call."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name} must be bool or hold only 0/1 numbers, got a complex tensor")
    ok = ((mask == 0) | (mask == 1)).all()
    if mask.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(ok, f"{name} must be bool or hold only 0/1 numbers")
    elif not bool(ok):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{name} must be bool or hold only 0/1 numbers (1 = real token, 0 = padding), got {bad}")
    return mask != 0


def check_qkv_aligned(q, k, v, mask: Optional[torch.Tensor] = None) -> None:
    """Per-head inputs of an op whose queries and keys are the same tokens (the recurrent and
    chunked ops): q, k (b, h, n, d), v (b, h, n, d_v), mask None or (b, n)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k must be (b, h, n, d) and v (b, h, n, d_v) with matching b, h, n; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask is not None and mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"mask must be (batch, n) = {(q.shape[0], q.shape[2])}, got {tuple(mask.shape)}")


def known_all_true(mask: torch.Tensor) -> bool:
    """True when ``mask`` is all True and that can be read for free: on a CPU tensor outside
    ``torch.compile``. Elsewhere reading it would synchronise with the device or break the graph, so
    the answer is False and callers keep the (equivalent) masked path."""
    if mask.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(mask.all())


def check_input_ids(input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"input_ids must have an integer dtype (e.g. torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have rank 2 (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids must hold at least one sequence (batch >= 1), got batch 0")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per sequence (seq_len >= 1)")
    if input_ids.device.type != "cpu" or torch.compiler.is_compiling():
        # reading the range would synchronise with the device (or break a compiled graph): check it
        # asynchronously instead; a bad id then fails the next synchronising call
        torch._assert_async(((input_ids >= 0) & (input_ids < vocab_size)).all(),
                            f"input_ids must lie in [0, vocab_size={vocab_size})")
        return
    ext = torch.aminmax(input_ids)  # one pass over the ids (min() and max() made two)
    lo, hi = int(ext.min), int(ext.max)
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got range [{lo}, {hi}]")
