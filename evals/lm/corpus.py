"""The shipped corpus: the reStructuredText source of the Python 3.11 documentation, pinned.

``corpus/pydoc311.jsonl.xz`` holds every document of at least 16 KiB of Debian's
``python3.11-doc`` 3.11.2-6+deb12u8 (``_sources/**/*.rst.txt``): 187 documents, 9,261,527 bytes of
UTF-8, one ``{"name", "text"}`` object a line, names sorted. It is read only after its sha256
matches ``SHA256``, so every machine trains on the same bytes; ``scripts/build_corpus.py`` says
how it was made. Licence: PSF License Agreement (``corpus/LICENSE``).

The split is by document, never inside one: a document's name, hashed, decides whether it is
test (10%), validation (10%) or training text (the rest), so no document is on two sides and the
split does not depend on the order documents are listed in.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_FILE = CORPUS_DIR / "pydoc311.jsonl.xz"
SHA256 = "f063bfb19a3a609b2150d095900f06b87ee20b243f490abc8481137241a82b7e"
NAME = "pydoc311"
SPLITS = ("train", "val", "test")
# the share of documents in validation and in test; the rest is training text
HELD_OUT = {"test": 0.10, "val": 0.10}


class CorpusError(ValueError):
    """The corpus file cannot be used (missing, or not the pinned bytes): one line, exit 2."""


@dataclass(frozen=True)
class Document:
    name: str
    data: bytes  # UTF-8 bytes: the model's tokens are these bytes (vocabulary 256)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_corpus(path: Path = CORPUS_FILE, expected: Optional[str] = None) -> Path:
    """``path`` if it holds the pinned bytes (``SHA256`` unless ``expected``); else a one-line
    ``CorpusError`` saying what is wrong."""
    expected = expected or SHA256
    if not path.is_file():
        raise CorpusError(f"corpus {path} is missing; it ships with the repository (git checkout -- {path.name})")
    got = sha256_of(path)
    if got != expected:
        raise CorpusError(f"corpus {path} fails its checksum (sha256 {got[:16]}..., expected {expected[:16]}...); "
                          f"restore the committed file (git checkout -- {path})")
    return path


@lru_cache(maxsize=2)
def load_documents(path: Path = CORPUS_FILE, expected: Optional[str] = None) -> tuple:
    """Every document of the checked corpus, in the file's (sorted) order."""
    check_corpus(path, expected)
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return tuple(Document(d["name"], d["text"].encode("utf-8")) for d in map(json.loads, f))


def split_of(name: str) -> str:
    """A document's split, from its name alone: a fixed fraction of the sha256 range each."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < HELD_OUT["test"]:
        return "test"
    if u < HELD_OUT["test"] + HELD_OUT["val"]:
        return "val"
    return "train"


def split_documents(docs) -> dict:
    """``{"train": [...], "val": [...], "test": [...]}`` by ``split_of``."""
    out = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d.name)].append(d)
    return out


def unigram_entropy(docs) -> float:
    """Bits per byte of the byte distribution of ``docs``: what a model that knows only how often
    each byte occurs, and nothing of context, would score on this text."""
    counts = [0] * 256
    for d in docs:
        for b, c in enumerate(_byte_counts(d.data)):
            counts[b] += c
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def _byte_counts(data: bytes) -> list:
    import numpy as np

    return np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).tolist()


def describe(docs) -> dict:
    """What a sidecar records of the corpus: its name, checksum, sizes per split, entropy."""
    parts = split_documents(docs)
    return dict(name=NAME, file=CORPUS_FILE.name, sha256=SHA256, documents=len(docs),
                bytes=sum(len(d.data) for d in docs),
                splits={s: dict(documents=len(v), bytes=sum(len(d.data) for d in v)) for s, v in parts.items()},
                shortest_document=min(len(d.data) for d in docs),
                unigram_bits_per_byte=round(unigram_entropy(docs), 4))
