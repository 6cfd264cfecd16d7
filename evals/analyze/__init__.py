"""``bsbr-eval analyze``: how time and memory grow with length, against Standard, from the CSVs
``bsbr-eval compare`` writes (docs/evaluation.md, "bsbr-eval analyze"). Owns:

- ``analysis``: the pure functions on DataFrames (loading and checking the CSVs, log-log slopes,
  the best complexity class by AICc, ratios and crossovers against Standard, FLOP rates);
- ``plots``: its figures (scaling, speedup and memory ratio, parameter count);
- ``report``: what the command hands back (CSV tables, the figures, ``report.md``, the terminal
  tables) and ``run_analyze``, the command's logic; ``cli.py`` only parses.

Nothing is imported here.
"""
