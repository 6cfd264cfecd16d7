"""Measure one case: time, peak memory, FLOPs and parameters. The one module that times a case
(the trainers time their own trainings; the guard's runqueue probe subtracts waits from these samples).

A case is measured in four passes over the same built workload, in this order:

1. **FLOPs**: one call under ``torch.utils.flop_counter.FlopCounterMode``. Torch registers no
   formula for the CPU SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
   backward), so it would count 0; we map them to torch's own SDPA formulas
   (``sdpa_flop_count`` / ``sdpa_backward_flop_count``). Convention, as torch uses for the CUDA
   kernels: the full ``n x n`` score matrix is counted even when ``is_causal=True`` (no causal
   halving), 2 FLOPs per multiply-add, matrix products only. Forward SDPA = ``4 b h n^2 d``;
   backward = ``10 b h n^2 d`` (the scores are recomputed). This call also warms up lazy init.
2. **Memory**, separate from timing:
   - CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
     before the call (``memory_method = cuda_max_allocated``);
   - CPU: the allocator's trace from ``torch.profiler`` (``profile_memory=True``): every
     allocation of the call and every free of a block allocated in the same trace, in order,
     summed; the peak of the running sum is the peak the call added on top of what was
     resident (``cpu_alloc_trace``; ``cpu_alloc_peak`` says why older blocks are left out).
   Parameters and inputs exist before the call, so they are not counted; it is never derived
   from the parameter count.
3. **Warm-up**: ``warmup`` untimed calls.
4. **Timing**: repeated samples; every sample is kept.
   - CPU (``timer = cpu_wall``): ``time.perf_counter`` around a block of ``number`` calls, with
     the thread count pinned. It is the loop of ``torch.utils.benchmark.Timer.blocked_autorange``
     (blocks long enough that the timer's overhead is negligible, samples until ``min_run_time``)
     written out so that it keeps *at least* ``repeats`` samples and can run an untimed
     ``setup`` (restoring a decode cache) before each sample, neither of which the Timer does.
   - CUDA (``timer = cuda_event``): CUDA events around the block after a synchronise, read after
     another synchronise.

What is timed, per level and mode, is built by ``evals.workload`` (its docstring says how); here
``time_ms`` is per call, and per token in decode mode (at op level a sample is one cached step).

Slowdown injection for the regression guard's self-test: ``BSBR_EVAL_INJECT_SLOWDOWN=
"MODEL=FACTOR[,MODEL=FACTOR]"`` makes each timed call of that model busy-wait for ``FACTOR - 1``
times its own measured duration, inside the timed region, so the model takes FACTOR times as long.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from evals.grid import Case
from evals.registry import resolve_model
from evals.errors import one_line
from evals.results import sample_stats
from evals.workload import DTYPES, _compiled, build_workload

aten = torch.ops.aten

INJECT_ENV = "BSBR_EVAL_INJECT_SLOWDOWN"
# The longest busy-wait one injected call may add (``_spin``).
MAX_SPIN_S = 10.0

# Aim for samples of at least this long so perf_counter and loop overhead stay < 0.1%.
_MIN_SAMPLE_S = 1e-3
# Never more samples than this per case (tiny calls with a per-sample cache restore).
_MAX_SAMPLES = 200


# ----------------------------------------------------------------------------- FLOPs


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Full n x n convention (no causal halving), matching torch's formula for the CUDA kernels.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def count_flops(fn: Callable[[], object], setup: Optional[Callable[[], None]] = None) -> int:
    """FLOPs of one call of ``fn`` by ``FlopCounterMode``, with the CPU SDPA formulas registered."""
    if setup is not None:
        setup()
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- clocks


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _injected(fn: Callable[[], object], device: str, factor: float) -> Callable[[], object]:
    """``fn`` made ``factor`` times slower: after each call, busy-wait (factor - 1) x its duration
    (on the CPU: the calling thread's CPU time of the call)."""
    if factor == 1.0:
        return fn

    cuda = device.startswith("cuda")

    def slowed():
        _sync(device)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        _sync(device)
        # The call's own work: on the CPU this thread's CPU time, so time it spent pre-empted is
        # not multiplied too; on CUDA the wall time, since the thread idles while the GPU works.
        took = time.perf_counter() - t0 if cuda else time.thread_time() - c0
        _spin((factor - 1.0) * took)
        return out

    return slowed


def _spin(seconds: float) -> None:
    """Burn ``seconds`` of this thread's CPU time, as slower code would. Not a sleep: a sleep
    yields the core (its caches go to whoever runs meanwhile) and wakes ~50-100 us late, so a
    1.1x injection into a 1 ms call read as 1.2x; and time pre-empted here does not count, so the
    regression guard, which removes pre-emption from its samples, sees exactly the injected work.

    Bounded: a non-finite or negative request is a ValueError, and no call burns more than
    ``MAX_SPIN_S`` (a factor large enough to reach it is no longer a realistic slowdown)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"an injected slowdown must burn a finite, non-negative time, got {seconds!r} s")
    end = time.thread_time() + min(seconds, MAX_SPIN_S)
    while time.thread_time() < end:
        pass


def time_fn(fn: Callable[[], object], *, device: str = "cpu", repeats: int = 10, warmup: int = 1,
            min_run_time: float = 0.2, setup: Optional[Callable[[], None]] = None, inject: float = 1.0,
            threads: Optional[int] = None) -> list[float]:
    """Per-call times in ms of ``fn``: ``warmup`` untimed calls, then at least ``repeats`` samples
    and at least ``min_run_time`` seconds of timed work (capped at 200 samples once ``repeats`` is met).

    A sample times a block of ``number`` calls, sized from the warm-up so a block lasts >= 1 ms
    (``number = 1`` when ``warmup = 0``, or when ``setup`` is given, since ``setup`` runs untimed
    before every sample), and records the mean per call. On CPU the thread
    count is pinned to ``threads`` (default: the current ``torch.get_num_threads()``).
    """
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not min_run_time >= 0:
        raise ValueError(f"min_run_time must be >= 0 seconds, got {min_run_time!r}")
    if not inject >= 1.0:
        raise ValueError(f"inject factor must be >= 1, got {inject!r}")
    cuda = device.startswith("cuda")
    call = _injected(fn, device, inject)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads or prev_threads)
    try:
        t_call = math.inf  # the fastest warm-up call sizes the blocks; without warm-up, 1 call a block
        for _ in range(warmup):
            t_call = min(t_call, one_call_ms(call, device, setup) / 1e3)
        number = 1
        if setup is None and warmup:
            number = max(1, min(10_000, math.ceil(_MIN_SAMPLE_S / max(t_call, 1e-9))))

        samples: list[float] = []
        timed = 0.0
        while len(samples) < repeats or (timed < min_run_time and len(samples) < _MAX_SAMPLES):
            if setup is not None:
                setup()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(number):
                    call()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                for _ in range(number):
                    call()
                ms = (time.perf_counter() - t0) * 1e3
            samples.append(ms / number)
            timed += ms / 1e3
        return samples
    finally:
        torch.set_num_threads(prev_threads)


# ----------------------------------------------------------------------------- memory


CPU_MEMORY_METHOD = "cpu_alloc_trace"
# The record_function name that marks the measured call inside a traced session.
_MEASURED = "bsbr_eval::measured_call"


def peak_memory(fn: Callable[[], object], *, device: str = "cpu",
                setup: Optional[Callable[[], None]] = None, prior: int = 0) -> tuple[float, str]:
    """Peak bytes one call of ``fn`` allocates on top of what is resident, in MiB, and the method.

    ``prior``: on the CPU, calls of ``fn`` (each after ``setup``) traced before the measured one,
    so that blocks the previous call left for this one to free are credited when it frees them
    (the steady state of a repeated call)."""
    if device.startswith("cuda"):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda_max_allocated"
    return cpu_alloc_peak(fn, setup=setup, prior=prior) / 2**20, CPU_MEMORY_METHOD


def cpu_alloc_peak(fn: Callable[[], object], *, setup: Optional[Callable[[], None]] = None,
                   prior: int = 0) -> int:
    """The high-water mark, in bytes, of CPU memory one call of ``fn`` adds, from the allocator's
    trace, counting only blocks whose allocation is in the same trace.

    One profiler session holds ``prior`` calls, then ``setup`` and the measured call. Every
    allocation in the session enters a table of live blocks (address -> size); a free counts only
    if its address is in that table, with the size the table holds. Over the measured call the
    running sum of those allocations and frees is taken, and its maximum is the peak.

    Why not sum the trace's own sizes: torch's CPU memory reporter remembers the size of a block
    only while a profiler is on, and forgets it only when the block is freed while one is on. A
    block allocated with the profiler off is freed without a size (dropped from the trace), and
    one at an address whose earlier block was freed with the profiler off is freed with that
    earlier block's size. Which of the two happens depends on where malloc put what, so the same
    call read 131,434 or 156,010 bytes at random (BSBR decode, n = 128). Blocks allocated inside
    the session are immune: their sizes are the trace's own, so the number is a function of the
    call's allocation sequence alone. Frees of blocks older than the session change nothing.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(prior):
            if setup is not None:
                setup()
            fn()
        if setup is not None:
            setup()
        with record_function(_MEASURED):
            fn()
    live: dict[int, int] = {}  # address -> size, of blocks allocated in this session
    running = peak = 0
    start, end = _measured_span(prof)
    for t, ptr, nbytes in _cpu_memory_events(prof):
        inside = start <= t <= end
        if nbytes > 0:
            live[ptr] = nbytes
        elif ptr in live:
            nbytes = -live.pop(ptr)
        else:
            continue  # a block older than the session: its size is not the trace's to know
        if inside:
            running += nbytes
            peak = max(peak, running)
    return peak


def _tree(prof):
    """Every event of a finished profile, depth-first in the profiler's own tree order."""
    stack = list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:
        e = stack.pop()
        yield e
        stack.extend(reversed(e.children))


def _measured_span(prof) -> tuple[int, int]:
    (mark,) = [e for e in _tree(prof) if e.name == _MEASURED]
    return mark.start_time_ns, mark.end_time_ns


def _cpu_memory_events(prof) -> list[tuple[int, int, int]]:
    """``(time ns, address, bytes)`` of every CPU allocation (bytes > 0) and free (< 0), in the
    order they happened: each thread's events in the tree's order; threads merged by time."""
    cpu = torch.device("cpu")
    out = [(e.start_time_ns, i, e.extra_fields.ptr, e.extra_fields.alloc_size) for i, e in enumerate(_tree(prof))
           if type(e.extra_fields).__name__ == "_ExtraFields_Allocation" and e.extra_fields.device == cpu]
    out.sort(key=lambda r: (r[0], r[1]))  # a stable merge: one thread's events keep their order
    return [(t, ptr, nbytes) for t, _, ptr, nbytes in out]


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 for a moment: kineto prints start/stop banners from C++ that no
    Python setting turns off. Python exceptions still propagate; nothing else is hidden."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------------------- calibration


# Matrix sizes that saturate each kind of device: 1024^2 keeps a 2-core CPU busy for ~10 ms;
# a GPU needs 8192^2 (1.1 TFLOP a product) to reach its tensor-core rate.
CALIBRATION_N = {"cpu": 1024, "cuda": 8192}


def calibrate_matmul(device: str = "cpu", n: Optional[int] = None, threads: Optional[int] = None,
                     dtype: str = "float32") -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype`` measured here and now: a same-process speed
    reference for the FLOP-rate fractions (a bf16 GPU run is compared with a bf16 product)."""
    n = n or CALIBRATION_N[device.split(":")[0]]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, generator=g).to(device=device, dtype=DTYPES[dtype])
    samples = time_fn(lambda: a @ b, device=device, repeats=10, warmup=2, min_run_time=0.1, threads=threads)
    return 2 * n**3 / (statistics.median(samples) * 1e-3) / 1e9


def calibrate(cases, threads: Optional[int] = None) -> dict:
    """``{"cpu": ..., "cuda/bfloat16": ...}``: one matmul rate per (device, dtype) the cases use
    (the CPU in fp32 always, as the key ``cpu``; other pairs as ``device/dtype``)."""
    pairs = {("cpu", "float32")} | {(c.device, c.dtype) for c in cases}
    out = {}
    for device, dtype in sorted(pairs):
        if device.startswith("cuda") and not torch.cuda.is_available():
            continue
        key = device if dtype == "float32" else f"{device}/{dtype}"
        out[key] = calibrate_matmul(device, threads=threads if device == "cpu" else None, dtype=dtype)
    return out


# ----------------------------------------------------------------------------- injection


def parse_inject(text: Optional[str] = None) -> dict[str, float]:
    """``"Standard=2,BSBR=1.5"`` -> ``{"Standard": 2.0, "BSBR": 1.5}`` (canonical model names).

    Reads ``$BSBR_EVAL_INJECT_SLOWDOWN`` when ``text`` is None; an empty value means no injection.
    """
    text = os.environ.get(INJECT_ENV, "") if text is None else text
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, factor = item.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not sep or not (math.isfinite(value) and value >= 1.0):  # inf would busy-wait forever
            raise ValueError(f"{INJECT_ENV} must look like MODEL=FACTOR[,MODEL=FACTOR] with FACTOR a finite "
                             f"number >= 1, got {item!r}")
        out[resolve_model(name).name] = value
    return out


# ----------------------------------------------------------------------------- one row


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def empty_row(case: Case, status: str, error: str = "", *, run_id: str = "", threads: Optional[int] = None,
              inject: float = 1.0) -> dict:
    """A row for a case that was not measured (``oom``, ``error`` or ``skipped``)."""
    row = dict(case.fields(), run_id=run_id, status=status, error=error,
               timer="cuda_event" if case.device.startswith("cuda") else "cpu_wall",
               threads=threads or torch.get_num_threads(), inject_factor=inject, host=platform.node())
    return row


def sdpa_backend(name: str):
    """A context that restricts torch's SDPA to one backend (``"auto"``: no restriction)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name])


def one_call_ms(fn: Callable[[], object], device: str, setup: Optional[Callable[[], None]] = None) -> float:
    """Wall time of one call (``setup`` first, untimed), synchronised: a warm-up call, or with
    ``--compile`` the call that compiles."""
    if setup is not None:
        setup()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


@dataclass(frozen=True)
class Measurement:
    """How every case of a sweep is measured (``evals.measure.measure``'s knobs); a resumed
    sweep must measure the same way."""

    repeats: int = 10
    warmup: int = 1
    min_run_time: float = 0.2
    threads: Optional[int] = None       # None: torch's current count
    inject: Optional[dict] = None       # model -> slowdown factor; None reads $BSBR_EVAL_INJECT_SLOWDOWN

    def resolved(self) -> "Measurement":
        return replace(self, threads=self.threads or torch.get_num_threads(),
                       inject=parse_inject() if self.inject is None else dict(self.inject))

    def recorded(self) -> dict:
        """As the sidecar records it (``measured_as``)."""
        return dict(repeats=self.repeats, warmup=self.warmup, min_run_time=self.min_run_time, threads=self.threads,
                    inject_slowdown=self.inject)


def measure(case: Case, how: Measurement = Measurement(), *, run_id: str = "", memory: bool = True,
            flops: bool = True) -> dict:
    """Measure ``case`` and return its row (see ``evals.results.COLUMNS``).

    Never raises for a failing model: an out-of-memory gives ``status = oom``, any other exception
    (an import that fails, a bad configuration, a crash) ``status = error`` with the message.
    ``inject`` maps model names to slowdown factors; None reads ``$BSBR_EVAL_INJECT_SLOWDOWN``.

    With ``case.compile`` the first call of the compiled workload (compilation included) is timed
    on its own (``compile_ms``) and is never a sample; ``warmup`` more untimed calls follow, and
    the FLOPs are counted on the eager workload.
    """
    repeats, warmup, min_run_time = how.repeats, how.warmup, how.min_run_time
    inject = parse_inject() if how.inject is None else how.inject
    factor = float(inject.get(case.model, 1.0))
    threads = how.threads or torch.get_num_threads()
    base = dict(run_id=run_id, threads=threads)
    host = platform.node()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with sdpa_backend(getattr(case, "sdpa_backend", "auto")):
            work = build_workload(case)
            k = work.tokens_per_call
            row = dict(case.fields(), **base, inject_factor=factor, params=work.params, error="", warmup=warmup,
                       host=host)
            row["flops"] = round(count_flops(work.counted, work.setup) / k) if flops else ""
            if _compiled(case):  # compilation (and autotuning) happen here, outside every figure
                row["compile_ms"] = one_call_ms(work.fn, case.device, work.setup)
            if memory:
                row["peak_memory_mb"], row["memory_method"] = peak_memory(work.fn, device=case.device,
                                                                          setup=work.setup)
            samples = time_fn(work.fn, device=case.device, repeats=repeats, warmup=warmup,
                              min_run_time=min_run_time, setup=work.setup, inject=factor, threads=threads)
    except Exception as err:  # a failing configuration is a row, never a crash of the sweep
        return empty_row(case, "oom" if _is_oom(err) else "error", one_line(err, kind=True), inject=factor, **base)
    finally:
        torch.set_num_threads(prev_threads)
        if case.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    row.update(sample_stats([s / k for s in samples]), status="ok",
               timer="cuda_event" if case.device.startswith("cuda") else "cpu_wall")
    return row
