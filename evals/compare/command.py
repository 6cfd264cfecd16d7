"""``bsbr-eval compare``: its ``Options`` and ``main(options)``.

``plan`` checks every option before anything is written (one ``ResultsError`` line naming the
flag and what is valid) and turns them into the grid of cases, how each is measured, and the
settings a resumed run must share; ``main`` runs the sweep (``evals.compare.sweep``) and prints
the table and the closing line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.options import models_option, option

DEFAULT_LENGTHS = (64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Options:
    """Sweep models x lengths x devices x modes; write one tidy CSV row per configuration and a
    JSON sidecar. Failures become rows (status oom / error / skipped), never a crash; a sweep in
    which none succeeded exits 1. BSBR_EVAL_INJECT_SLOWDOWN="MODEL=FACTOR" slows a model down on
    purpose (the guard's self-test)."""

    models: Optional[tuple] = models_option()
    seq_lengths: Optional[tuple] = option(None, "Sequence lengths, space- or comma-separated. Default: 64 128 256 "
                                          "512 1024.", many=True, show_default=False)
    devices: Optional[tuple] = option(None, "cpu and/or cuda. cuda without a GPU is an error, unless cpu is also "
                                      "given: then its rows are 'skipped'. Default: cpu.", many=True,
                                      show_default=False)
    modes: Optional[tuple] = option(None, "forward, train and/or decode. Default: forward.", many=True,
                                    show_default=False)
    level: str = option("model", "model (whole model), layer (one mixer with projections) or op (the "
                        "token-mixing op on per-head inputs).", choices=("model", "layer", "op"))
    hidden_dim: Optional[int] = option(None, "Hidden size D. Default: 256.", show_default=False)
    num_layers: Optional[int] = option(None, "Layers (model level). Default: 2.", show_default=False)
    num_heads: Optional[int] = option(None, "Heads H (D must divide by H). Default: 4.", show_default=False)
    ff_dim: Optional[int] = option(None, "Feed-forward width. Default: 512.", show_default=False)
    vocab_size: Optional[int] = option(None, "Vocabulary size (model level). Default: 1000.", show_default=False)
    chunk_size: Optional[int] = option(None, "Chunk size c of BSBR, Linear, DeltaNet, GAU. Default: 64.",
                                       show_default=False)
    window_size: Optional[int] = option(None, "Window w of SlidingWindow. Default: 64.", show_default=False)
    compression_factor: Optional[int] = option(None, "BSBR state compression f (divides the head size D/H). "
                                               "Default: none.", show_default=False)
    batch_size: int = option(1, "Batch size.")
    dtype: str = option("float32", "Floating-point type.", choices=("float32", "float64", "float16", "bfloat16"))
    repeats: int = option(10, "Minimum timed samples per configuration (time_ms is their median).")
    min_run_time: float = option(0.2, "Minimum seconds of timed work per configuration (more samples, up to 200, "
                                 "if --repeats finish sooner).")
    warmup: int = option(1, "Untimed calls before the timed samples (after the compiling call with --compile).")
    compile: bool = option(False, "Time torch.compile(...) of each model, layer or op: the first call "
                           "(compilation) is timed on its own (compile_ms) and --warmup calls follow before any "
                           "sample. FLOPs are counted eagerly.", flags=("--compile",))
    sdpa_backend: str = option("auto", "Restrict torch's scaled dot-product attention to one backend in every "
                               "model; auto lets torch choose.", choices=("auto", "flash", "efficient", "cudnn",
                                                                           "math"))
    decode_tokens: int = option(16, "Decode mode: one-token steps timed per sample (time_ms is per token); at op "
                                "level a sample is 1 cached step.")
    output: Optional[Path] = option(None, "CSV to write (ends in .csv; its .json sidecar goes beside it; locked "
                                    "while the run writes it). Default: results/compare_<UTC time>.csv.",
                                    show_default=False)
    resume: bool = option(False, "Continue --output: keep its rows, measure only the missing configurations "
                          "(refused for a file that is not a results CSV, or one measured with other settings).",
                          flags=("--resume",))
    shard: Optional[str] = option(None, "Run only slice i of N (e.g. 2/4) of the grid; the N slices cover it "
                                  "exactly once.", show_default=False)
    threads: int = option(1, "CPU threads, pinned for every measurement and recorded.")
    seed: int = option(0, "Seed for weights and inputs (recorded).")
    executor: str = option("local", "local: measure in this process, one case at a time. ray: one Ray task per "
                           "case, each holding its device's timing slot (one timed CPU case per node, one case "
                           "per GPU), rows streamed into --output as they finish.", choices=("local", "ray"))
    address: Optional[str] = option(None, "With --executor ray: join this cluster (auto or host:port); each node "
                                    "must declare the resource bsbr_cpu_timer=1. Default: start a local Ray.",
                                    show_default=False)


CONFIG_FLAGS = ("hidden_dim", "num_layers", "num_heads", "ff_dim", "vocab_size", "chunk_size", "window_size",
                "compression_factor")


@dataclass(frozen=True)
class Plan:
    """What ``main`` runs: the cases, where they go, how each is measured, and the settings."""

    cases: list
    output: Path
    how: object          # evals.compare.sweep.Measurement
    settings: dict
    executor: object     # None (this process) or a RayExecutor


def plan(o: Options) -> Plan:
    """Every option checked and turned into a ``Plan``; one ``ResultsError`` line if one is bad."""
    import torch

    from bsbr import sizing
    from bsbr.checks import check_heads
    from evals.compare.sweep import Measurement, ray_executor
    from evals.errors import ResultsError
    from evals.grid import DEVICES, GridSpec, expand_grid, parse_shard, shard as take_shard
    from evals.machine import utc_stamp
    from evals.measure import parse_inject
    from evals.options import check_fraction, check_positive, check_seed, choose, positive_ints
    from evals.output.paths import check_target
    from evals.registry import MODES, ModelConfig, select

    names = select("--models", o.models)
    lengths = positive_ints("--seq-lengths", o.seq_lengths, default=DEFAULT_LENGTHS)
    devs = choose("--devices", o.devices, DEVICES, default=("cpu",))
    modes = choose("--modes", o.modes, MODES, default=("forward",))
    if "cuda" in devs and "cpu" not in devs and not torch.cuda.is_available():
        raise ResultsError("--devices: CUDA is not available on this machine; valid: cpu "
                           "(give 'cpu cuda' to record the cuda rows as skipped)")
    config = {k: getattr(o, k) for k in CONFIG_FLAGS}
    check_positive(batch_size=o.batch_size, repeats=o.repeats, decode_tokens=o.decode_tokens, threads=o.threads,
                   **config)
    check_fraction("--min-run-time", o.min_run_time)
    check_seed(o.seed)
    if not (isinstance(o.warmup, int) and 0 <= o.warmup <= 10**6):
        raise ResultsError(f"--warmup must be an integer from 0 to 1000000, got {o.warmup!r}")
    cfg = ModelConfig().with_(**{k: v for k, v in config.items() if v is not None})
    try:
        dh = check_heads(cfg.hidden_dim, cfg.num_heads)
        if cfg.compression_factor is not None and dh % cfg.compression_factor:
            raise ValueError(f"--compression-factor {cfg.compression_factor} must divide the head size "
                             f"(--hidden-dim {cfg.hidden_dim} / --num-heads {cfg.num_heads} = {dh})")
        sizing.refresh()  # a bad $BSBR_SIZING is one line now, not an error in every row
        inject = parse_inject()
        slice_ = parse_shard(o.shard) if o.shard else None
    except ValueError as e:
        raise ResultsError(str(e)) from None
    if o.address is not None and o.executor != "ray":
        raise ResultsError("--address only applies to --executor ray")
    if o.resume and o.output is None:
        raise ResultsError("--resume needs --output naming the CSV to continue")
    output = check_target(o.output or Path("results") / f"compare_{utc_stamp()}.csv", "--output", folder=False,
                          suffix=".csv")
    spec = GridSpec(level=o.level, config=cfg, batch_size=o.batch_size, dtype=o.dtype,
                    decode_tokens=o.decode_tokens, seed=o.seed, compile=o.compile, sdpa_backend=o.sdpa_backend)
    cases = expand_grid(names, lengths, devs, modes, spec)
    if slice_:
        cases = take_shard(cases, *slice_)
    settings = dict(models=names, seq_lengths=lengths, devices=devs, modes=modes, shard=o.shard,
                    executor=o.executor, address=o.address, **spec.settings())
    how = Measurement(repeats=o.repeats, warmup=o.warmup, min_run_time=o.min_run_time, threads=o.threads,
                      inject=inject)
    torch.manual_seed(o.seed)
    return Plan(cases, output, how, settings, ray_executor(o.address, o.threads) if o.executor == "ray" else None)


def main(o: Options) -> int:
    from evals.compare.sweep import run_sweep, summary_rows
    from evals.console import finish, plural, table
    from evals.output.files import sidecar_path
    from evals.results import outcome

    p = plan(o)
    rows = run_sweep(p.cases, p.output, resume=o.resume, how=p.how, settings=p.settings, executor=p.executor)
    table("bsbr-eval compare", *summary_rows(rows))
    code, words = outcome(rows.new)
    return finish(code, f"wrote {plural(len(rows), 'row')} to {p.output} (+ {sidecar_path(p.output).name})"
                        + (f"; {words}" if words else ""))
