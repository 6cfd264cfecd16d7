"""``bsbr-eval recall``: its ``Options`` and ``main(options)``.

The options are checked and turned into a preset before anything is written
(``evals.recall.launch.configure``); the run folder is an ``evals.output.RunFolder`` (new or
empty, or ``--resume`` of a recall run with the same recorded settings); the sweep runs on the
chosen executor with a progress bar over the trainings still to run; the summary, figures and
sidecar are written at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evals.options import models_option, option


@dataclass(frozen=True)
class Options:
    """Multi-query associative recall (MQAR; Arora et al., 2023): train each model from scratch over a
    learning-rate sweep and several seeds, report held-out accuracy at the best rate against length,
    pairs and decoding-state size. See docs/recall.md."""

    quick: bool = option(False, "The smoke preset (same as --preset quick).", flags=("--quick",))
    preset: Optional[str] = option(None, "quick (smoke run, minutes), cpu (the protocol on 2 cores), cpu-v1024 "
                                   "(vocabulary 1024, opt-in) or zoology (zoology's grid; use with --device cuda). "
                                   "Default: quick.", show_default=False)
    models: Optional[tuple] = models_option()
    seq_lengths: Optional[tuple] = option(None, "Sequence lengths; with --num-pairs they replace the preset's "
                                          "(length, pairs) points. Default: the preset's.", many=True,
                                          show_default=False)
    num_pairs: Optional[tuple] = option(None, "Key-value pairs per sequence. Default: the preset's.", many=True,
                                        show_default=False)
    hidden_dims: Optional[tuple] = option(None, "Model widths d. Default: the preset's.", many=True,
                                          show_default=False)
    sizes: Optional[tuple] = option(None, "Chunk size (BSBR, Linear, DeltaNet, GAU) and window (SlidingWindow). "
                                    "Default: the preset's.", many=True, show_default=False)
    vocab_size: Optional[int] = option(None, "Vocabulary: keys and values take disjoint halves of it. Default: the "
                                       "preset's.", show_default=False)
    compression_factor: Optional[int] = option(None, "BSBR's chunk states (d_head/f) x d_head; f divides d_head. "
                                               "Default: none.", show_default=False)
    max_steps: Optional[int] = option(None, "Training steps at most per run. Default: the preset's.",
                                      show_default=False)
    batch_size: Optional[int] = option(None, "Sequences per step. Default: the preset's.", show_default=False)
    lrs: Optional[tuple] = option(None, "Learning rates of the sweep; each configuration is reported at the one "
                                  "with the best validation accuracy. Default: the preset's.", many=True,
                                  show_default=False)
    seeds: Optional[int] = option(None, "Seeds (0..N-1): the rates are tuned on seed 0, then every other seed runs "
                                  "at the best rate. Default: the preset's.", show_default=False)
    target_acc: Optional[float] = option(None, "Stop training once validation accuracy reaches this. Default: the "
                                         "preset's.", show_default=False)
    device: str = option("cpu", "cpu or cuda.", choices=("cpu", "cuda"))
    threads: int = option(1, "CPU threads per training (pinned and recorded; 1 is fastest for these small "
                          "models).")
    jobs: Optional[int] = option(None, "Trainings at once: local worker processes (at most the usable CPUs / "
                                 "--threads), or the CPUs of the local Ray cluster. Default: the preset's, capped "
                                 "to the usable CPUs.", show_default=False)
    executor: str = option("local", "local (this machine's processes) or ray (one Ray task per training).",
                           choices=("local", "ray"))
    address: Optional[str] = option(None, "With --executor ray: join this cluster (auto or host:port) instead of "
                                    "starting a local one.", show_default=False)
    shard: Optional[str] = option(None, "Run only slice i of N (e.g. 2/4) of the configurations (each with all its "
                                  "rates and seeds), for job arrays.", show_default=False)
    seed: int = option(0, "Seed of the data sets (recorded).")
    output_dir: Optional[Path] = option(None, "A new or empty folder for recall.csv, its recall.json sidecar, "
                                        "summary.md and the figures. Default: results/recall_<UTC time>/.",
                                        show_default=False)
    resume: bool = option(False, "Continue the recall run in --output-dir: keep its rows and train only the "
                          "missing runs (refused if its settings differ).", flags=("--resume",))


def main(o: Options) -> int:
    from evals.console import finish, out, plural, table
    from evals.recall.launch import recall_command
    from evals.results import outcome

    res, p = recall_command(o)
    table(f"MQAR held-out accuracy (%) at the best rate, vocab {p.vocab_size}: mean ± std (min) over seeds @rate",
          *res["summary_rows"])
    code, words = outcome(res["rows"])
    if res["broken"]:  # the sanity anchor failed: the run's numbers cannot be trusted, so it fails
        out().print(f"BROKEN RUN: Standard failed to learn at {', '.join(res['broken'])}; the other models' "
                    f"numbers there mean nothing", style="bold red", highlight=False)
        code, words = 1, f"BROKEN RUN: Standard, the sanity anchor, failed at {', '.join(res['broken'])}"
    return finish(code, f"wrote {plural(len(res['rows']), 'row')} to {res['csv']} (+ recall.json, summary.md, "
                        f"{plural(len(res['figures']), 'figure')})" + (f"; {words}" if words else ""))
