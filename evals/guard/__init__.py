"""The performance-regression guard, ``bsbr-eval guard`` (docs/guard.md).

Owns one timing method, the paired A/B rule against the accepted commit, and the exact metrics:

- ``rule``: the decision (``paired_verdict``) and the verdict names; the power curve uses it too;
- ``sampling``: the interleaved order of A and B samples;
- ``findings``: every check of a run (exact metrics, time), the re-measurement, the self-test;
- ``runner``: the accepted commit's temporary git worktree and one worker process per side;
- ``worker``: one side's process (run by path; it loads the models from its side's tree and this
  package, ``evals.results`` with its modules, ``evals.workload`` and ``evals.measure`` from the
  working tree);
- ``timing``: the guard's grid, one timed sample, the exact metrics (the harness both sides share);
- ``baseline``: the committed configurations and their exact metrics, and ``--update``;
- ``report``: the terminal tables, ``--json``, ``--summary`` and ``$GITHUB_STEP_SUMMARY``;
- ``power`` and ``figure``: the power curve (``--power``) and its figure;
- ``command``: the command's logic; ``cli.py`` only parses.

Nothing is imported here: the worker installs this package into a process whose ``evals`` is
another tree's, so importing it must not pull in anything.
"""
