"""GPT-2 vs its BSBR conversions, side by side, on held-out text (``bsbr-eval convert --model-name``).

For each chunk size it reports, against the original on held-out text: logits agreement (max abs
diff over all logits, and over the first chunk alone, which must be ~0), the mean KL(GPT-2 || BSBR)
per token, top-1 agreement, and both perplexities; then forward time and peak memory against
length, measured by the harness (``evals.measure.time_fn`` / ``peak_memory``: warm-up, repeated
samples, pinned threads, allocator trace; no private timer here).

Text: ``pydoc_data.topics`` bytes when the model has no tokenizer (the experiment's byte-level
GPT-2); the model's own tokenizer when one loads with it (e.g. a hub GPT-2).
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from bsbr_extras.convert import convert_to_bsbr, load_gpt2
from evals.measure import peak_memory, time_fn  # the one module that reads a clock
from evals.results import sample_stats
from evals.machine import utc_now

log = logging.getLogger("bsbr.convert")

CORPUS = ("pydoc_data.topics: the Python Language Reference topics that ship with CPython "
          f"{sys.version_info.major}.{sys.version_info.minor} (all topics, sorted by name, joined by blank lines)")
HELDOUT_FRACTION = 0.1



# ----------------------------------------------------------------------------- data


def corpus_text() -> tuple[str, str]:
    """(train, held-out) text: the sorted pydoc topics; the last 10% of characters held out."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    return text[:cut], text[cut:]


def load_tokenizer(model_name: str, vocab_size: int):
    """The model's own tokenizer, or None for UTF-8 bytes (needs ``vocab_size >= 256``)."""
    tok = None
    local = Path(model_name)
    # A local directory without tokenizer files has no tokenizer (recent transformers would
    # otherwise hand back an empty GPT2Tokenizer built from the model config alone).
    if not local.is_dir() or any((local / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model_name)
        except Exception:  # no tokenizer to be had: fall back to bytes
            tok = None
    if tok is not None and len(tok) > 0:
        return tok
    if vocab_size < 256:
        raise ValueError(f"{model_name!r} has no tokenizer and vocab_size={vocab_size} < 256, "
                         "so the held-out text cannot be fed to it as bytes")
    return None


def encode(text: str, tokenizer=None) -> torch.Tensor:
    """Token ids (N,) int64: UTF-8 bytes without a tokenizer."""
    if tokenizer is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping evaluation windows (W, seq_len) from the start of ``tokens``."""
    w = tokens.numel() // seq_len
    if w == 0:
        raise ValueError(f"held-out text has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    w = min(w, max_windows) if max_windows else w
    return tokens[: w * seq_len].view(w, seq_len)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """(b, n, V) logits from a transformers GPT-2 (``.logits``) or a BSBRModel (a tensor)."""
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats): position t predicts token t+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# ----------------------------------------------------------------------------- agreement and perplexity


@torch.no_grad()
def compare_logits(reference, models: dict, data: torch.Tensor, *, batch_size: int = 4,
                   first_chunk: Optional[dict] = None) -> list[dict]:
    """Agreement of each model in ``models`` (label -> model) with ``reference`` on ``data`` (W, n).

    Per label: ``ppl`` (exp of the mean next-token NLL), ``max_abs_diff`` over all logits,
    ``first_chunk_max_abs_diff`` over positions ``< first_chunk[label]``, ``kl`` = mean over
    positions of KL(p_ref || p_model) in nats, ``top1_agreement`` = share of positions whose argmax
    agrees. The reference itself is reported with label ``"original"``.
    """
    first_chunk = first_chunk or {}
    acc = {k: dict(nll=0.0, kl=0.0, top1=0, mad=0.0, mad1=0.0) for k in ["original", *models]}
    count = pos = 0
    for i in range(0, data.shape[0], batch_size):
        ids = data[i:i + batch_size]
        ref = logits_of(reference, ids).float()  # (b, n, V)
        ref_lp = ref.log_softmax(-1)
        ref_top = ref.argmax(-1)
        count += ids[:, 1:].numel()
        pos += ids.numel()
        acc["original"]["nll"] += float(lm_loss(ref, ids)) * ids[:, 1:].numel()
        acc["original"]["top1"] += ids.numel()
        for label, model in models.items():
            out = logits_of(model, ids).float()
            lp = out.log_softmax(-1)
            a = acc[label]
            a["nll"] += float(lm_loss(out, ids)) * ids[:, 1:].numel()
            a["kl"] += float((ref_lp.exp() * (ref_lp - lp)).sum())
            a["top1"] += int((out.argmax(-1) == ref_top).sum())
            a["mad"] = max(a["mad"], float((out - ref).abs().max()))
            c = first_chunk.get(label, ids.shape[1])
            a["mad1"] = max(a["mad1"], float((out[:, :c] - ref[:, :c]).abs().max()))
    return [dict(variant=k, ppl=math.exp(a["nll"] / count), kl=a["kl"] / pos, top1_agreement=a["top1"] / pos,
                 max_abs_diff=a["mad"], first_chunk_max_abs_diff=a["mad1"], eval_tokens=count)
            for k, a in acc.items()]


# ----------------------------------------------------------------------------- time and memory


@dataclass(frozen=True)
class SpeedTiming:
    """How ``speed_rows`` times: batch, samples, seed, pinned threads, device and dtype."""

    batch_size: int = 1
    repeats: int = 5
    min_run_time: float = 0.2
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"


def speed_rows(models: dict, lengths: Sequence[int], vocab_size: int, timing: SpeedTiming = SpeedTiming()) -> list:
    """Forward (no grad) time and peak memory of each model at each length, through the harness.

    Threads are pinned (default 1, as ``bsbr-eval compare``) and recorded in each row. The models
    are timed as copies on ``device`` in ``dtype`` (the originals, which may be saved, stay as they are).
    """
    from evals.workload import DTYPES

    t = timing
    batch_size, repeats, min_run_time, seed, threads, device, dtype = (t.batch_size, t.repeats, t.min_run_time, t.seed,
                                                                       t.threads, t.device, t.dtype)
    placed = {label: copy.deepcopy(m).to(device=device, dtype=DTYPES[dtype]).eval() for label, m in models.items()}
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab_size, (batch_size, n), generator=torch.Generator().manual_seed(seed)).to(device)
        for label, model in placed.items():

            def fn(model=model):
                with torch.no_grad():
                    return logits_of(model, ids)

            mem, method = peak_memory(fn, device=device)
            stats = sample_stats(time_fn(fn, device=device, repeats=repeats, warmup=1, min_run_time=min_run_time,
                                         threads=threads))
            stats.pop("samples_ms")
            rows.append(dict(variant=label, seq_len=n, batch_size=batch_size, **stats,
                             timer="cuda_event" if device.startswith("cuda") else "cpu_wall", device=device,
                             dtype=dtype, peak_memory_mb=mem, memory_method=method, threads=threads))
            log.info("speed %s n=%d: %.1f ms, %.1f MB", label, n, rows[-1]["time_ms"], mem)
    return rows


# ----------------------------------------------------------------------------- the comparison


def check_comparison_args(chunk_sizes: Sequence[int], seq_len: Optional[int], compression_factor: Optional[int]) -> None:
    if not chunk_sizes:
        raise ValueError("chunk sizes must list at least one positive integer")
    for c in chunk_sizes:
        if not isinstance(c, int) or c <= 0:
            raise ValueError(f"chunk sizes must be positive integers, got {c!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if compression_factor is not None and (not isinstance(compression_factor, int) or compression_factor <= 0):
        raise ValueError(f"compression_factor must be a positive integer, got {compression_factor!r}")


def variant_label(chunk_size: int, compression_factor: Optional[int] = None, finetuned: bool = False) -> str:
    return f"bsbr-c{chunk_size}" + (f"-f{compression_factor}" if compression_factor else "") + ("-ft" if finetuned else "")


def run_comparison(model_name: str, chunk_sizes: Sequence[int] = (128,), *, compression_factor: Optional[int] = None,
                   seq_len: Optional[int] = None, max_windows: Optional[int] = 32, batch_size: int = 4,
                   speed: Optional[tuple] = None) -> dict:
    """Load a GPT-2, convert it at each chunk size, compare on the held-out text.

    ``seq_len`` (evaluation window) defaults to ``min(512, n_positions)``. ``speed``: (lengths,
    ``SpeedTiming``) of the forward-time rows; lengths None (the default) are powers of two up to
    ``seq_len``; timing defaults to the CPU in float32.

    Returns ``{"agreement": rows, "speed": rows, "info": {...}, "gpt2": model, "converted": {label: model}}``.
    """
    check_comparison_args(chunk_sizes, seq_len, compression_factor)
    started = utc_now()
    gpt2 = load_gpt2(model_name)
    n_pos = gpt2.config.n_positions
    seq_len = min(512, n_pos) if seq_len is None else seq_len
    if seq_len > n_pos:
        raise ValueError(f"seq_len={seq_len} is longer than the GPT-2's position table (n_positions={n_pos})")
    tokenizer = load_tokenizer(model_name, gpt2.config.vocab_size)
    data = windows(encode(corpus_text()[1], tokenizer), seq_len, max_windows)
    converted = {variant_label(c, compression_factor): convert_to_bsbr(gpt2, chunk_size=c,
                                                                        compression_factor=compression_factor)
                 for c in chunk_sizes}
    chunk_of = {variant_label(c, compression_factor): c for c in chunk_sizes}
    rows = compare_logits(gpt2, converted, data, batch_size=batch_size, first_chunk=chunk_of)
    for r in rows:
        r.update(chunk_size=chunk_of.get(r["variant"], ""), compression_factor=compression_factor or "",
                 seq_len=seq_len, finetuned=False)
    lengths, timing = speed if speed is not None else (None, SpeedTiming())
    lengths = _default_lengths(seq_len) if lengths is None else lengths
    speed = speed_rows({"original": gpt2, **converted}, lengths, gpt2.config.vocab_size, timing) if lengths else []
    for r in speed:
        r["chunk_size"] = chunk_of.get(r["variant"], "")
    info = dict(model=model_name, tokenizer="utf-8 bytes" if tokenizer is None else type(tokenizer).__name__,
                text=CORPUS + "; held-out part", eval_windows=int(data.shape[0]), seq_len=seq_len,
                chunk_sizes=list(chunk_sizes), compression_factor=compression_factor,
                gpt2_config=gpt2.config.to_diff_dict(), started_utc=started)
    return dict(agreement=rows, speed=speed, info=info, gpt2=gpt2, converted=converted)


def _default_lengths(seq_len: int) -> list[int]:
    """Powers of two from 64 up to seq_len (and seq_len itself)."""
    out, n = [], 64
    while n < seq_len:
        out.append(n)
        n *= 2
    return out + [seq_len]
