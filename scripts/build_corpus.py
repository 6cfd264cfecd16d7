"""Rebuild the byte-level language-modelling corpus that ``bsbr-eval lm`` trains on.

The corpus is the reStructuredText source of the Python 3.11 documentation as Debian ships it
(package ``python3.11-doc``, version 3.11.2-6+deb12u8, the ``_sources/**/*.rst.txt`` files), every
document of at least 16 KiB (187 documents, 9,261,527 bytes), one JSON object a line
(``{"name": ..., "text": ...}``, names sorted), compressed with xz preset 9. Licence: the PSF
License Agreement (the documentation is dual licensed PSF / Zero-Clause BSD; the package's
copyright file, shipped beside the corpus as ``LICENSE``).

Nothing here runs at training time: the compressed file is committed and pinned by its sha256 in
``evals/lm/corpus.py``. This script documents how it was made and lets anyone check it:

    apt-get download python3.11-doc=3.11.2-6+deb12u8
    python scripts/build_corpus.py python3.11-doc_3.11.2-6+deb12u8_all.deb

writes ``evals/lm/corpus/pydoc311.jsonl.xz`` and ``LICENSE`` and prints the sha256.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MIN_BYTES = 16 * 1024
SOURCES = "usr/share/doc/python3.11/html/_sources"
COPYRIGHT = "usr/share/doc/python3.11-doc/copyright"
OUT = Path(__file__).resolve().parents[1] / "evals" / "lm" / "corpus"


def build(deb: Path, out: Path = OUT) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp) / SOURCES
        docs = []
        for path in sorted(root.rglob("*.rst.txt")):
            raw = path.read_bytes()
            if len(raw) >= MIN_BYTES:
                docs.append({"name": path.relative_to(root).as_posix()[:-len(".txt")], "text": raw.decode("utf-8")})
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
        out.mkdir(parents=True, exist_ok=True)
        (out / "pydoc311.jsonl.xz").write_bytes(lzma.compress(lines, preset=9))
        shutil.copyfile(Path(tmp) / COPYRIGHT, out / "LICENSE")
    digest = hashlib.sha256((out / "pydoc311.jsonl.xz").read_bytes()).hexdigest()
    print(f"{len(docs)} documents, {sum(len(d['text'].encode()) for d in docs):,} bytes; sha256 {digest}")
    return digest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/build_corpus.py python3.11-doc_3.11.2-6+deb12u8_all.deb")
    build(Path(sys.argv[1]))
