"""The evaluation suite behind ``bsbr-eval`` (``cli.py``): one package per command, over a shared
foundation of flat modules.

Commands, one package each (its ``__init__`` says what it owns; ``command.py`` holds the options
and ``main``): ``compare/``, ``forms/``, ``analyze/``, ``guard/`` (``bsbr-eval guard``),
``convert/``, ``recall/``, ``frontier/`` (recall and lm runs), ``lm/``, ``check/``; and
``models.py`` (``bsbr-eval models``).

Foundation (used by the commands, never using them):

- ``registry`` (built-ins, entry points and import paths), ``grid`` (configurations and shards),
  ``workload`` (building one configuration's call) and ``measure`` (timing, FLOPs, memory);
- ``output/`` (where a run may write, whole-file writes, claims: locks and resumes), ``results``
  (the CSV contract), ``errors``, ``locking``, ``machine``, ``resume``; ``options`` (declaring and
  checking options); ``console`` (what is printed, and how); ``interrupts`` (one way to stop);
- ``executors`` (local or Ray), ``train`` (the one trainer), ``figures`` (palette, markers, saving).

Nothing is imported here: the guard's worker imports this package first (the accepted commit's or
the working tree's) and then installs the working tree's harness modules into it.
"""
