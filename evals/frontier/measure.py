"""What every frontier measures, whatever run it reads: for each (model, configuration), the decode
time per token at batch 1 after a prefill of each length, through ``compare``'s harness
(``evals.compare.sweep.run_sweep``: one row per case, appended, locked, resumable), and the
decoding cache's bytes after that prefill.

Before anything is measured, every length is checked against this machine's memory
(``check_memory``): the cache's bytes and the prefill's peak are measured at two short lengths,
extrapolated (both grow at most linearly with the length for every model here), and a length
whose estimate exceeds the memory available is refused with the estimate, instead of running
for minutes before an out-of-memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

CSV_NAME = "frontier.csv"          # compare rows (the harness's own CSV, resumable)
TABLE_NAME = "frontier_table.csv"  # the joined table
STATE_NAME = "frontier_state.csv"  # measured cache bytes per configuration and length
DEFAULT_LENGTHS = (4096, 16384)
PROBE_LENGTHS = (256, 512)         # where the memory estimate is measured
HEADROOM = 0.8                     # refuse above this share of the memory available


@dataclass(frozen=True)
class Target:
    """One configuration to measure: a model and the exact configuration it was trained with."""

    model: str
    config: object  # evals.registry.ModelConfig


def decode_cases(targets: Sequence[Target], lengths: Sequence[int], device: str, decode_tokens: int) -> list:
    """compare's decode cases: batch 1, float32, model level, one per target and length."""
    from evals.grid import Case

    return [Case(t.model, device, "decode", "model", "float32", 1, int(n), t.config, decode_tokens=decode_tokens)
            for t in dict.fromkeys(targets) for n in lengths]


def state_bytes(t: Target, n: int, device: str = "cpu") -> tuple:
    """(bytes, status, error) of ``t``'s decoding cache after a prefill of ``n`` random tokens."""
    import torch

    from evals.errors import one_line
    from evals.recall.training import decoding_state_bytes
    from evals.registry import resolve_model

    try:
        torch.manual_seed(0)
        model = resolve_model(t.model).build(t.config).to(device)
        tokens = torch.randint(0, t.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        return decoding_state_bytes(model, tokens), "ok", ""
    except Exception as err:  # noqa: BLE001 - an unmeasurable configuration is a row with a status
        oom = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
        return float("nan"), "oom" if oom else "error", one_line(err, kind=True)


def states_table(targets: Sequence[Target], lengths: Sequence[int], device: str) -> pd.DataFrame:
    """Measured cache bytes, one row per target and length (with the target's config columns)."""
    return pd.DataFrame([dict(model=t.model, **_config_key(t.config), seq_len=int(n),
                              **dict(zip(("state_bytes", "status", "error"), state_bytes(t, int(n), device))))
                         for t in dict.fromkeys(targets) for n in lengths])


def _config_key(cfg) -> dict:
    return dict(hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers, ff_dim=cfg.ff_dim, chunk_size=cfg.chunk_size,
                window_size=cfg.window_size)


def lookup(frame: pd.DataFrame, t: Target, n: int) -> pd.DataFrame:
    """The rows of ``frame`` (timed rows or states) measured for ``t`` at length ``n``."""
    if not len(frame):
        return frame
    m = (frame["model"] == t.model) & (frame["seq_len"].astype(int) == int(n))
    for k, v in _config_key(t.config).items():
        if k in frame.columns:
            m &= pd.to_numeric(frame[k], errors="coerce") == v
    return frame[m]


def measured_at(timed: pd.DataFrame, states: pd.DataFrame, t: Target, n: int) -> tuple:
    """(decode ms/token, state bytes, failure) of ``t`` at ``n``; failure is (status, error) or None."""
    m, st = lookup(timed, t, n), lookup(states, t, n)
    ok = len(m) and m["status"].iloc[0] == "ok"
    ms = float(m["time_ms"].iloc[0]) if ok else float("nan")
    nbytes = float(st["state_bytes"].iloc[0]) if len(st) else float("nan")
    bad = (m["status"].iloc[0], m["error"].iloc[0]) if len(m) and not ok else \
        ("missing", "not measured") if not len(m) else None
    if bad is None and len(st) and st["status"].iloc[0] != "ok":
        bad = (st["status"].iloc[0], st["error"].iloc[0])
    return ms, nbytes, bad


# ----------------------------------------------------------------------------- memory


def memory_available() -> int:
    """Bytes this machine can still give (``MemAvailable``), or a large number where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def estimate_bytes(t: Target, n: int, device: str = "cpu") -> tuple[float, float]:
    """(prefill peak + cache, cache) bytes at length ``n``, extrapolated linearly from the two
    ``PROBE_LENGTHS`` (the cache grows at most linearly; the prefill's peak too, with SDPA's
    memory-efficient kernels and the linear models' chunked forms)."""
    import torch

    from evals.measure import cpu_alloc_peak
    from evals.registry import resolve_model

    cache, peak = [], []
    model = resolve_model(t.model).build(t.config).to(device).eval()
    for m in PROBE_LENGTHS:
        ids = torch.randint(0, t.config.vocab_size, (1, m), generator=torch.Generator().manual_seed(m)).to(device)
        holder = {}

        def prefill():
            holder["cache"] = model.init_cache(1)
            with torch.no_grad():
                model(ids, cache=holder["cache"])

        peak.append(cpu_alloc_peak(prefill))
        cache.append(holder["cache"].nbytes())
    a, b = PROBE_LENGTHS

    def line(v):
        slope = max((v[1] - v[0]) / (b - a), 0.0)
        return v[1] + slope * (n - b)
    return max(line(peak), line(cache)), line(cache)


def check_memory(targets: Sequence[Target], lengths: Sequence[int], device: str = "cpu") -> None:
    """Refuse (one ``ResultsError`` line, with the estimate) a length whose prefill and cache would
    not fit the memory this machine has available. On CUDA the device's own memory is the limit and
    an out-of-memory is a row, so only the CPU is checked."""
    from evals.errors import ResultsError

    if device != "cpu":
        return
    have = memory_available() * HEADROOM
    n = max(lengths)
    for t in dict.fromkeys(targets):
        need, cache = estimate_bytes(t, n, device)
        if need > have:
            raise ResultsError(f"--lengths {n:,}: {t.model}'s prefill and cache would take about {_gb(need)} (the "
                               f"cache alone {_gb(cache)}), more than the {_gb(have)} this machine can give "
                               f"({HEADROOM:.0%} of the memory available); give shorter --lengths")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:,.1f} MB"


# ----------------------------------------------------------------------------- the timed rows


@dataclass(frozen=True)
class Timing:
    """How the decode steps are timed (``compare``'s knobs) and where."""

    device: str = "cpu"
    decode_tokens: int = 16
    repeats: int = 10
    min_run_time: float = 0.2
    threads: int = 1


def measure(run_dir: Path, targets: Sequence[Target], lengths: Sequence[int], timing: Timing, *,
            settings: dict, resume: bool) -> tuple:
    """(timed rows, states) of every target at every length, the timed rows in ``frontier.csv``."""
    from evals.compare.sweep import Measurement, run_sweep

    check_claim(run_dir / CSV_NAME, settings, resume)
    cases = decode_cases(targets, lengths, timing.device, timing.decode_tokens)
    timed = run_sweep(cases, run_dir / CSV_NAME, resume=resume, settings=settings,
                      how=Measurement(repeats=timing.repeats, min_run_time=timing.min_run_time,
                                      threads=timing.threads, inject={}))
    return pd.DataFrame(list(timed)), states_table(targets, lengths, timing.device)


def check_claim(csv: Path, settings: dict, resume: bool) -> None:
    """Refuse to replace an earlier frontier run, and a --resume whose settings differ from it
    (its rows would be joined under the new settings' names). One line each, naming the way on."""
    from evals.errors import ResultsError
    from evals.output.files import read_sidecar

    if not csv.exists():
        return
    if not resume:
        raise ResultsError(f"RUN_DIR: {csv} already exists (an earlier frontier run); pass --resume to continue "
                           "it, or move it away to measure anew")
    old = (read_sidecar(csv) or {}).get("settings") or {}
    differ = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items()
              if k not in ("recall_run", "run") and old.get(k) != v]
    if differ:
        raise ResultsError(f"--resume: {csv} was measured with other settings ({'; '.join(differ)}); rerun with "
                           "those, or move the file away to measure anew")
