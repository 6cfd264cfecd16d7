"""``bsbr-eval frontier``: the cost of each trained configuration beside its quality.

- ``command``: the options, reading the run (recall or lm), ``main``;
- ``measure``: decode time and state bytes through compare's harness, and the memory check;
- ``recall`` and ``lm``: each run kind's table, Markdown and figure.
"""
