"""``bsbr-eval lm``'s sweep: the preset its options make, the two phases of the protocol on an
executor, and rows streamed to ``lm.csv`` as each training finishes.

The folder is a ``evals.output.RunFolder``: new or empty without ``--resume``; with it, a folder
holding an ``lm.csv`` whose recorded settings (preset, contexts, corpus checksum, device, threads)
equal this run's. Models are not a setting: a resumed run may add models (a plugin, say), whose
rows join the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

from evals.lm.sweep import LMCase, LMPreset, lm_grid, row_key, run_case, seed_cases

KIND = "lm"


def configure(o) -> LMPreset:
    """The named preset with the options' overrides, checked (one-line ValueError otherwise); the
    contexts are checked against the corpus (a context must fit its shortest document)."""
    from evals.lm.corpus import load_documents
    from evals.lm.data import check_context
    from evals.lm.sweep import PRESETS
    from evals.options import check_finite, check_jobs, check_positive, positive_ints, split_list

    if o.preset not in PRESETS:
        raise ValueError(f"--preset: unknown value {o.preset!r}; valid: {', '.join(PRESETS)}")
    base = PRESETS[o.preset]
    check_positive(seeds=o.seeds, max_steps=o.max_steps, jobs=o.jobs, threads=o.threads)
    lrs = [check_finite("--lrs", v, low=0, low_open=True) for v in split_list(o.lrs)]
    contexts = positive_ints("--contexts", o.contexts)
    jobs = check_jobs(o.jobs, o.threads, o.executor, default=base.jobs)
    p = base.with_(contexts=tuple(contexts) if contexts else base.contexts,
                   lrs=tuple(lrs) if lrs else base.lrs,
                   seeds=tuple(range(o.seeds)) if o.seeds else base.seeds, jobs=jobs,
                   train=base.train.with_(max_steps=o.max_steps) if o.max_steps else base.train)
    p.check()
    docs = load_documents()
    for c in p.contexts:
        check_context(c, docs)
    return p


def resume_settings(preset: LMPreset, *, device: str, threads: int) -> dict:
    """What a resumed run must share with the rows it keeps: the whole preset but how many
    trainings run at once, the corpus, the device and the threads."""
    from evals.lm.corpus import SHA256
    from evals.lm.sweep import settings

    return {k: v for k, v in settings(preset).items() if k != "jobs"} | dict(corpus_sha256=SHA256, device=device,
                                                                               threads=threads)


def _task(case: LMCase, *, preset: LMPreset, device: str, threads: int) -> dict:
    return run_case(case, preset, device=device, threads=threads)


@dataclass(frozen=True)
class LMRun:
    """What every training of one run shares besides the preset: where it trains and its run id."""

    device: str = "cpu"
    threads: int = 1
    run_id: str = ""


def run_lm(models: Sequence[str], preset: LMPreset, folder, *, executor, run: LMRun = LMRun(),
           on_start: Optional[Callable[[int], None]] = None, on_row: Optional[Callable[[dict], None]] = None) -> list:
    """Phase 1 (every rate at the first seed), then phase 2 (every further seed at each configuration's
    best rate), appending each row to ``folder`` as it arrives; every row of the run, old first.
    ``on_start(kept)`` is called once the folder is claimed, with how many of this run's trainings
    it already holds; ``on_row(row)`` after each append."""
    rows = {row_key(r): r for r in folder.rows}
    tune = lm_grid(models, preset)
    fn = partial(_task, preset=preset, device=run.device, threads=run.threads)
    if on_start is not None:
        wanted = {c.key() for c in tune} | {c.key() for c in seed_cases(tune, rows, preset)}
        on_start(len(wanted & set(rows)))
    with executor:
        for phase in ("tune", "seed"):
            todo = tune if phase == "tune" else seed_cases(tune, rows, preset)
            todo = [c for c in todo if c.key() not in rows]
            for case, row in executor.map_unordered(fn, todo):
                row["run_id"] = run.run_id
                folder.append(row)
                rows[case.key()] = row
                if on_row is not None:
                    on_row(row)
    return list(rows.values())


def expected_runs(models: Sequence[str], preset: LMPreset) -> int:
    n_tune = len(lm_grid(models, preset))
    return n_tune + n_tune // len(preset.lrs) * (len(preset.seeds) - 1)
