"""The guard's harness: its grid, one timed sample, the steady memory trace and the exact metrics.

Loaded from the working tree on *both* sides of an A/B check (``evals.guard.worker``), so a
change to the harness cannot read as a change of the models.

- ``guard_cases``: the guard's grid, every model at three lengths in prefill and training,
  decoding (64 cached steps after a prefill), and the token-mixing layer alone (where a mixer
  regression is not diluted by the embedding, feed-forward and head around it);
- ``timed_once``: one sample from ``evals.measure.time_fn``, less the time the thread waited for
  a CPU another process held (``RunqueueWait``), which on a shared 2-core box is most of the noise;
- ``exact_metrics``: FLOPs, parameters and the steady-state traced memory, the numbers the
  baseline holds to the unit.
"""

from __future__ import annotations

import math
import os
from typing import Callable

# Small enough that an A/B check takes a few minutes on two shared cores. Changing it means
# rewriting the baseline: delete it, then --update.
GUARD_CONFIG = dict(vocab_size=256, hidden_dim=64, num_layers=2, num_heads=4, ff_dim=128,
                    chunk_size=32, window_size=32, qk_dim=32)
GUARD_LENGTHS = (128, 256, 512)
GUARD_MODES = ("forward", "train")
# Decode at two lengths, so that the self-test's decode group does not stand on one configuration
# (the measurements that chose this grid: docs/guard.md, "The grid").
GUARD_DECODE_LENGTHS = (128, 256)      # model level, decode mode
GUARD_LAYER_LENGTHS = (512,)           # layer level, forward and train
# One thread: on a shared 2-core box a second thread turns every barrier into a wait on whoever
# else holds the other core. Memory (per-thread buffers) depends on it, so it is pinned.
GUARD_THREADS = 1
STEADY_METHOD = "cpu_alloc_trace_steady"


def guard_cases(models=None) -> list:
    """The cases of a fresh baseline (``--update`` with no baseline file yet), model by model: the
    built-ins, or ``models`` (names or import paths, a plugin's too)."""
    from evals.grid import GridSpec, expand_grid
    from evals.registry import MODEL_NAMES, ModelConfig

    cfg = ModelConfig(**GUARD_CONFIG)
    out = []
    for m in models or MODEL_NAMES:
        out += expand_grid([m], GUARD_LENGTHS, modes=GUARD_MODES, spec=GridSpec(config=cfg))
        out += expand_grid([m], GUARD_DECODE_LENGTHS, modes=["decode"], spec=GridSpec(config=cfg))
        out += expand_grid([m], GUARD_LAYER_LENGTHS, modes=GUARD_MODES, spec=GridSpec(level="layer", config=cfg))
    return out


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""


def case_from_row(row) -> "Case":
    """Rebuild the ``Case`` that produced a CSV row (every ModelConfig field is a column)."""
    import typing
    from dataclasses import fields

    from evals.grid import Case
    from evals.registry import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    kw = {}
    for f in fields(ModelConfig):
        if f.name not in row.index:
            continue  # an older CSV: that field keeps its default
        v = row[f.name]
        if _blank(v):
            kw[f.name] = None
            continue
        kind = typing.get_args(hints[f.name]) or (hints[f.name],)
        kw[f.name] = float(v) if float in kind else int(float(v))
    num = lambda c, d: int(float(row[c])) if c in row.index and not _blank(row[c]) else d  # noqa: E731
    return Case(str(row["model"]), str(row["device"]), str(row["mode"]), str(row["level"]), str(row["dtype"]),
                num("batch_size", 1), num("seq_len", 1), ModelConfig(**kw),
                decode_tokens=num("decode_tokens", 16) or 16, seed=num("seed", 0))


def steady_memory(work, device: str, threads: int) -> tuple[float, str]:
    """Peak MiB one call of a built workload adds in the steady state of repeated calls, from the
    CPU allocator's trace (``evals.measure.cpu_alloc_peak``).

    Two untraced warm-up calls pay for lazy initialisation; then one traced session holds a prior
    call and the measured one, so blocks the prior call left behind (last step's gradients, the
    previous cache copy) are credited when the measured call frees them. The number depends only
    on the call's own allocation sequence, so it is the same in every process and under any load
    (``tests/evals/guard/test_exact_memory.py`` holds every guard configuration to that).
    """
    import torch

    from evals.measure import peak_memory

    if not device.startswith("cpu"):
        return peak_memory(work.fn, device=device, setup=work.setup)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(2):
            if work.setup is not None:
                work.setup()
            work.fn()
        mb, _ = peak_memory(work.fn, device=device, setup=work.setup, prior=1)
        return mb, STEADY_METHOD
    finally:
        torch.set_num_threads(prev)


def exact_metrics(work, case, threads: int) -> dict:
    """``{params, flops, peak_memory_mb, memory_method}`` of a built workload: what the baseline
    holds to the unit (FLOPs per token in decode mode, as the harness reports)."""
    from evals.measure import count_flops

    k = work.tokens_per_call
    out = dict(params=work.params, flops=round(count_flops(work.fn, work.setup) / k))
    out["peak_memory_mb"], out["memory_method"] = steady_memory(work, case.device, threads)
    return out


class RunqueueWait:
    """Nanoseconds this thread has spent runnable but not running (waiting for a CPU), from
    Linux's ``/proc/thread-self/schedstat`` (second field; ``Documentation/scheduler/sched-stats``).

    Subtracting it leaves the time the code ran plus any time it chose to sleep (the harness's
    injected slowdown burns CPU, so it is measured whole). It counts the calling thread only,
    which is why the guard pins torch to one thread. ``available`` is False where the file does
    not exist (not Linux); then nothing is subtracted.
    """

    PATH = "/proc/thread-self/schedstat"

    def __init__(self):
        try:
            self.fd = os.open(self.PATH, os.O_RDONLY)
        except OSError:
            self.fd = None

    @property
    def available(self) -> bool:
        return self.fd is not None

    def __call__(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) if self.fd is not None else 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def timed_once(fn: Callable, wait: RunqueueWait, *, device: str, threads: int, setup=None,
               inject: float = 1.0) -> float:
    """One sample of ``fn`` from the harness's ``time_fn`` (per call, ms), less the runqueue wait
    from the start of its first timed call to its return (what ``time_fn`` timed, give or take a
    few microseconds), so a wait during the injected busy-wait is removed too."""
    from evals.measure import time_fn

    starts: list = []  # runqueue wait (ns) at the start of each call: the block-sizing call first

    def probed():
        starts.append(wait())
        return fn()

    # One untimed warm-up call (it also sizes the block), then one timed block of calls.
    (ms,) = time_fn(probed, device=device, threads=threads, setup=setup, inject=inject, repeats=1, warmup=1,
                    min_run_time=0.0)
    if device.startswith("cuda"):
        # CUDA events time the GPU, which runs on while this thread waits for a core: the host's
        # run-queue wait is not in the figure, so nothing is subtracted
        return ms
    waited = wait() - starts[1]
    return ms - (waited / 1e6) / (len(starts) - 1)
