"""``bsbr-eval recall`` (docs/recall.md): multi-query associative recall
(MQAR; Arora et al., 2023): can each architecture retrieve what it saw? Split along zoology's
lines, one job per module:

- ``data``: the seeded MQAR generator and its train/validation/test splits;
- ``training``: the shared initialisation recipe, the loss and accuracy, one model trained
  (through ``evals.train.fit``), and the measured decoding-state size;
- ``sweep``: cases, presets (``quick``, ``cpu``, ``zoology``), the learning-rate protocol, one run;
- ``command``: the options and ``main``;
- ``launch``: the preset the options make, the run folder, the phases on an executor;
- ``report``: best rate per configuration, mean/std/min over seeds, the Standard check, figures;
- ``plots``: the figures (accuracy vs task, accuracy vs state size; the markers the frontier shares);

Its cost x accuracy frontier is ``evals.frontier``. Nothing is imported here: import each module
from where it is defined.
"""
