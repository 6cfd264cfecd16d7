"""``bsbr-eval recall`` and ``bsbr-eval frontier`` (docs/recall.md): multi-query associative recall
(MQAR; Arora et al., 2023): can each architecture retrieve what it saw? Split along zoology's
lines, one job per module:

- ``data``: the seeded MQAR generator and its train/validation/test splits;
- ``training``: the shared initialisation recipe, the loss and accuracy, one model trained
  (through ``evals.train.fit``), and the measured decoding-state size;
- ``sweep``: cases, presets (``quick``, ``cpu``, ``zoology``), the learning-rate protocol, one run;
- ``launch``: the output folder (lock, resume), the phases on an executor (``evals.executors``);
- ``report``: best rate per configuration, mean/std/min over seeds, the Standard check, figures;
- ``plots``: the figures (accuracy vs task, accuracy vs state size; the markers the frontier shares);
- ``frontier``: ``bsbr-eval frontier``, decode cost and state bytes of every trained configuration,
  measured through compare's harness and joined to its accuracy.
"""

from evals.recall.data import FILLER, IGNORE, MQARConfig, Splits, make_mqar, query_accuracy
from evals.recall.launch import OutputError, run_recall
from evals.recall.sweep import (COLUMNS, PRESETS, RecallCase, RecallPreset, best_lr, recall_grid, run_case,
                                seed_cases)
from evals.recall.training import decoding_state_bytes, reinit_for_recall, train_and_evaluate
from evals.train import TrainConfig, warmup_cosine

__all__ = ["FILLER", "IGNORE", "MQARConfig", "Splits", "make_mqar", "query_accuracy", "OutputError", "run_recall",
           "COLUMNS", "PRESETS", "RecallCase", "RecallPreset", "best_lr", "recall_grid", "run_case", "seed_cases",
           "decoding_state_bytes", "reinit_for_recall", "train_and_evaluate", "TrainConfig", "warmup_cosine"]
