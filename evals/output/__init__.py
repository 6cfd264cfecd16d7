"""The output layer every writing command goes through (docs/evaluation.md, "Writing results
safely"):

- ``paths``: where a command may write and what it may read, checked before any work;
- ``files``: whole files written atomically with the umask's mode, and the JSON sidecars;
- ``claims``: an output claimed for one run (locked, resumed only with equal settings, left as it
  was when the run is refused or stopped before its first row).

Rows are appended whole by ``evals.results.append_row`` (the CSV contract lives there).
Nothing is imported here.
"""
