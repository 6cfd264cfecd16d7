"""``bsbr-eval convert``: GPT-2 -> BSBR, the evaluation side of the converter (``bsbr_extras.convert``
is the weight map only). Run by ``bsbr-eval convert`` and by the earlier package's ``python -m
bsbr_extras.convert_example``, which hands its command line to the same command (one set of
options, one error style). docs/convert.md has the method and the results.

Comparison (any GPT-2 that ``transformers`` can load, by hub name or local path)::

    bsbr-eval convert --model-name PATH_OR_NAME --chunk-sizes 512,128,32 \\
        --seq-len 512 --output-dir out/ [--compression-factor 2] [--save-model]

Experiment (a small byte-level GPT-2 trained first, then converted and fine-tuned)::

    bsbr-eval convert --experiment --output-dir results/convert

Owns, one job per module:

- ``comparison``: the held-out text and its windows, logits agreement and perplexity
  (``compare_logits``), forward time and memory through the harness (``speed_rows``), and one
  comparison of a loaded GPT-2 at several chunk sizes (``run_comparison``);
- ``experiment``: the train -> convert -> fine-tune experiment (``ExperimentConfig``, ``train_lm``
  on ``evals.train.fit``, ``run_experiment``);
- ``command``: the command's logic (option and folder checks, the lock, writing the results,
  ``replot``, the terminal summary); ``cli.py`` only parses;
- ``plots``: the figure (``plot_conversion``).

Nothing is imported here, so ``import evals.convert.plots`` does not load torch or transformers.
"""
