"""The sweep grid: one frozen ``Case`` per configuration to measure, in a deterministic order.

The grid is the cross product ``models x devices x modes x seq_lengths`` for one level, one
dtype, one batch size and one ``ModelConfig``. Its order is fixed by the order the caller
gives (the CLI passes the registry's order), with lengths ascending inside each
(model, device, mode) series so that an out-of-memory at length ``n`` can skip the longer
lengths after it.

``--shard i/N`` keeps every N-th case starting at the i-th (round robin), so the N slices are
disjoint, cover the grid exactly once, and each gets a similar mix of short and long cases.
Slices from many machines are concatenated afterwards; nothing in a slice depends on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable, Optional, Sequence

from evals.registry import LEVELS, MODES, ModelConfig

DEVICES = ("cpu", "cuda")
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")  # what a dtype flag may say (workload.DTYPES maps them)
# torch.nn.attention.SDPBackend members a sweep can restrict SDPA to ("auto": no restriction).
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")

# ModelConfig fields that go into the CSV as their own columns (after the required ones).
# hidden_dim, num_layers, num_heads and chunk_size are required columns already.
CONFIG_COLUMNS = tuple(f.name for f in fields(ModelConfig))


@dataclass(frozen=True)
class Case:
    """One configuration to measure: everything that decides what is built and timed."""

    model: str                  # a registry name, canonical spelling
    device: str                 # "cpu" or "cuda"
    mode: str                   # "forward", "train" or "decode"
    level: str                  # "model", "layer" or "op"
    dtype: str                  # "float32", ...
    batch_size: int
    seq_len: int
    config: ModelConfig
    decode_tokens: int = 16     # k one-token steps timed per sample in decode mode
    seed: int = 0
    compile: bool = False       # time torch.compile(...) of the workload (compilation kept out of the figures)
    sdpa_backend: str = "auto"  # restrict torch's SDPA to one backend (``SDPA_BACKENDS``); auto: torch picks

    @property
    def series(self) -> tuple:
        """Cases in one series share everything but the length: an OOM skips the rest of a series."""
        return (self.model, self.device, self.mode, self.level, self.dtype, self.batch_size,
                self.config, self.decode_tokens, self.seed, self.compile, self.sdpa_backend)

    def fields(self) -> dict:
        """The identifying columns of this case's row (required columns and config extras)."""
        c = self.config
        row = dict(model=self.model, device=self.device, mode=self.mode, level=self.level, dtype=self.dtype,
                   batch_size=self.batch_size, seq_len=self.seq_len, hidden_dim=c.hidden_dim,
                   num_layers=c.num_layers, num_heads=c.num_heads, chunk_size=c.chunk_size)
        row.update({k: getattr(c, k) for k in CONFIG_COLUMNS if k not in row})
        row.update(decode_tokens=self.effective_decode_tokens, seed=self.seed, compile=self.compile,
                   sdpa_backend=self.sdpa_backend)
        return row

    @property
    def effective_decode_tokens(self) -> int:
        """Tokens per timed sample in decode mode; at op level a sample is one cached step."""
        if self.mode != "decode":
            return 0
        return 1 if self.level == "op" else self.decode_tokens

    def label(self) -> str:
        extra = (" compiled" if self.compile else "") + (f" sdpa={self.sdpa_backend}" if self.sdpa_backend != "auto" else "")
        return f"{self.model} {self.device} {self.mode} {self.level} n={self.seq_len}{extra}"


# Columns that identify a case in a CSV row (``evals.results.case_key`` compares rows on them).
KEY_COLUMNS = tuple(Case("x", "cpu", "forward", "model", "float32", 1, 1, ModelConfig()).fields())


@dataclass(frozen=True)
class GridSpec:
    """What every case of one sweep shares: the level, the model configuration, the batch, the
    dtype, the decode steps, the seed, compilation and the SDPA backend."""

    level: str = "model"
    config: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 1
    dtype: str = "float32"
    decode_tokens: int = 16
    seed: int = 0
    compile: bool = False
    sdpa_backend: str = "auto"

    def settings(self) -> dict:
        """As a sidecar records it (the configuration as a plain dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["config"] = self.config.as_dict()
        return out


def expand_grid(models: Sequence[str], seq_lengths: Iterable[int], devices: Sequence[str] = ("cpu",),
                modes: Sequence[str] = ("forward",), spec: Optional[GridSpec] = None) -> list[Case]:
    """Every case of the sweep, model-major, lengths ascending inside each (model, device, mode).

    Raises ValueError naming the valid choices for an unknown device, mode, level or dtype, or a
    non-positive length. Model names must already be canonical (see ``registry.resolve_model``).
    """
    s = spec or GridSpec()
    level, config, batch_size, dtype, decode_tokens = s.level, s.config, s.batch_size, s.dtype, s.decode_tokens
    seed, compile, sdpa_backend = s.seed, s.compile, s.sdpa_backend
    lengths = sorted(set(int(n) for n in seq_lengths))
    if not lengths:
        raise ValueError("seq_lengths must name at least one length")
    if lengths[0] <= 0:
        raise ValueError(f"sequence lengths must be positive integers, got {lengths[0]}")
    for name, values, valid in (("device", devices, DEVICES), ("mode", modes, MODES),
                                ("level", [level], LEVELS), ("dtype", [dtype], DTYPE_NAMES),
                                ("sdpa_backend", [sdpa_backend], SDPA_BACKENDS)):
        for v in values:
            if v not in valid:
                raise ValueError(f"unknown {name} {v!r}; valid: {', '.join(valid)}")
    for name, v in (("batch_size", batch_size), ("decode_tokens", decode_tokens)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return [Case(m, dev, mode, level, dtype, batch_size, n, config, decode_tokens, seed, bool(compile), sdpa_backend)
            for m in dict.fromkeys(models) for dev in dict.fromkeys(devices) for mode in dict.fromkeys(modes)
            for n in lengths]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``1 <= i <= N``; a ValueError says what a shard looks like."""
    parts = str(text).strip().split("/")
    try:
        i, n = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shard must look like i/N with integers 1 <= i <= N (e.g. 2/4), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"shard must look like i/N with integers 1 <= i <= N (e.g. 2/4), got {text!r}")
    return i, n


def shard(cases: Sequence[Case], i: int, n: int) -> list[Case]:
    """The i-th of N disjoint round-robin slices (1-based); their union is ``cases``, in order."""
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"shard index must satisfy 1 <= i <= N, got {i}/{n}")
    return list(cases[i - 1::n])
