"""The decoding-state bytes that recall and frontier report follow each model's formula.

``decoding_state_bytes`` measures the real cache (every tensor's storage, after one prefill call of
``n`` tokens at batch 1, float32). The formulas below are written from each architecture's math,
not from the code, and are the ones docs/recall.md ("What each model's state holds") gives:
L layers, h heads, dh = D / h, c the chunk, w the window, s GAU's qk size, e = 2D its expansion.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from evals.frontier.recall import target
from evals.recall.training import decoding_state_bytes
from evals.registry import MODEL_NAMES, resolve_model

F32, BOOL, LONG = 4, 1, 8
SIDE = {"settings": dict(vocab_size=64, num_layers=2, num_heads=2, ff_mult=2, qk_dim=32)}


def expected_bytes(model: str, D: int, size: int, n: int, L: int = 2, h: int = 2, s: int = 32, f: int = 1) -> int:
    dh = D // h
    dk = dh // f                                        # BSBR's compressed key side (compression_factor f)
    if model in ("Standard", "Hopfield"):
        cap = max(n + n // 4, 16)                      # K and V of every token, +25% headroom
        per = F32 * 2 * h * cap * dh
    elif model == "BSBR":
        P, r = divmod(n, size)                          # completed chunks, tokens of the open one
        per = F32 * (h * P * dk * dh + h * P * dh + D) + BOOL * P  # chunk states, meta keys, summary
        if r:                                           # the open chunk's K, V, x and its state S
            per += F32 * (2 * h * r * dh + r * D + h * dk * dh) + BOOL * r
    elif model == "Linear":
        per = F32 * h * (dh * dh + dh)                  # S = sum phi(k) v^T and z = sum phi(k)
    elif model == "DeltaNet":
        per = F32 * h * dh * dh                         # the delta-rule memory
    elif model == "SlidingWindow":
        per = F32 * 2 * h * size * dh + BOOL * size + LONG  # a ring of w keys/values, its mask, position
    elif model == "GAU":
        e = 2 * D                                       # global linear state + pending, the open chunk
        per = F32 * (2 * s * e + size * s + size * e) + LONG
    else:
        raise AssertionError(f"no formula for {model}")
    return L * per


def measured_bytes(model: str, D: int, size: int, n: int, f=None) -> int:
    torch.manual_seed(0)
    side = {"settings": dict(SIDE["settings"], compression_factor=f)}
    m = resolve_model(model).build(target(side, model, D, size).config)
    return decoding_state_bytes(m, torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n)))


def test_every_registered_model_has_a_formula():
    for name in MODEL_NAMES:
        expected_bytes(name, 32, 8, 64)


@pytest.mark.parametrize("model", MODEL_NAMES)
@settings(max_examples=5, deadline=None)
@given(D=st.sampled_from([32, 64]), size=st.sampled_from([4, 8, 16]), n=st.integers(1, 80))
def test_measured_state_bytes_follow_the_formula(model, D, size, n):
    assert measured_bytes(model, D, size, n) == expected_bytes(model, D, size, n)


@settings(max_examples=10, deadline=None)
@given(D=st.sampled_from([32, 64]), f=st.sampled_from([1, 2, 4, 8]), size=st.sampled_from([4, 8]), n=st.integers(1, 40))
def test_bsbr_compression_shrinks_its_chunk_states_by_f(D, f, size, n):
    # recall --compression-factor F reaches the model the frontier rebuilds: (dh/f) x dh chunk states
    assert measured_bytes("BSBR", D, size, n, f) == expected_bytes("BSBR", D, size, n, f=f)


def test_the_recall_points_state_ordering():
    """At the cpu preset's (64 tokens, width 32, size 8): the fixed-state models hold ~10x less than
    the caches that grow with n; BSBR's chunk states (h dh^2 per chunk) outweigh Standard's K/V
    once dh > 2c, which is why its bytes pass Standard's at width 64."""
    b = {m: measured_bytes(m, 32, 8, 64) for m in MODEL_NAMES}
    assert max(b["Linear"], b["DeltaNet"], b["SlidingWindow"]) * 8 < min(b["Standard"], b["BSBR"], b["GAU"])
    assert measured_bytes("BSBR", 64, 8, 64) > measured_bytes("Standard", 64, 8, 64)
