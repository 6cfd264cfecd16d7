"""``bsbr-eval lm`` (docs/lm.md): byte-level language modelling on a corpus that ships with the
repository, pinned by sha256. One job per module:

- ``corpus``: the pinned corpus, its split by document, its unigram entropy;
- ``data``: training batches and evaluation windows of bytes, and the position buckets;
- ``training``: the loss, bits per byte with padding left out, the loss by position, one run;
- ``sweep``: cases, presets (``quick``, ``cpu``, ``gpu``), matched models, the rate protocol;
- ``launch``: the command's options, the phases on an executor, rows into the run folder;
- ``command``: ``run(options)``, everything after the flags are parsed;
- ``report`` and ``plots``: the summary, the loss-by-position table and the figures.
"""
