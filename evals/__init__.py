"""The evaluation suite behind ``bsbr-eval`` (``cli.py``): one package per command, over a shared
foundation of flat modules.

Commands (each package's ``__init__`` says what it owns):

- ``guard/``: ``bsbr-eval regress``, the performance-regression guard;
- ``analyze/``: ``bsbr-eval analyze``, fits and figures from ``compare``'s CSVs;
- ``recall/``: ``bsbr-eval recall`` and ``frontier``, multi-query associative recall;
- ``convert/``: ``bsbr-eval convert``, GPT-2 -> BSBR;
- ``compare`` and ``forms``: ``bsbr-eval compare`` (the sweep) and ``forms``, one module each.

Foundation (used by the commands, never using them):

- ``registry`` (the models), ``grid`` (configurations and shards), ``workload`` (building one
  configuration's call) and ``measure`` (timing, FLOPs, memory; the one module that reads a clock);
- ``results`` (the CSV contract and its writes) with ``errors``, ``files``, ``locking``,
  ``machine`` and ``resume``; ``options`` (option checks); ``interrupts`` (SIGTERM as Ctrl-C);
- ``executors`` (local or Ray), ``train`` (the one trainer), ``figures`` (palette, markers, saving).

Nothing is imported here: the guard's worker imports this package first (the accepted commit's or
the working tree's) and then installs the working tree's harness modules into it.
"""
