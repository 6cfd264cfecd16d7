"""The sweep behind ``bsbr-eval compare``: measure each case of a grid and append its row.

- A failing configuration is a row, never a crash: ``measure`` turns exceptions into ``error``
  rows and out-of-memory into ``oom``; after an ``oom`` at length ``n`` the longer lengths of the
  same model / device / mode (same level, dtype and config) are recorded as ``skipped``.
- CUDA cases on a machine without CUDA are ``skipped`` (the CLI refuses CUDA-only sweeps).
- The output is claimed through ``evals.results`` (validated, locked for the whole sweep, never
  replaced without ``resume``); rows are appended whole.
- ``resume=True`` keeps the rows already in the CSV and measures only the missing cases (an
  ``oom`` among the kept rows still skips the longer lengths after it).
- A rich progress bar shows the current configuration and the estimated time left; a rich table
  summarises the rows at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from evals.executors import RayExecutor
from evals.grid import Case
from evals.measure import Measurement, calibrate, empty_row, measure
from evals import interrupts
from evals.errors import ResultsError
from evals.output.files import read_sidecar, write_sidecar
from evals.interrupts import sigterm_as_interrupt
from evals.machine import environment, new_run_id, utc_now
from evals.results import COLUMNS, KEY_COLUMNS, append_row, case_key, completed_keys
from evals.output.claims import claim_file
from evals.resume import check_same_settings

log = logging.getLogger(__name__)

_SEQ = KEY_COLUMNS.index("seq_len")


def _series(key: tuple) -> tuple:
    """A case identity without its length: an OOM skips the rest of its series."""
    return key[:_SEQ] + key[_SEQ + 1:]


class Rows(list):
    """The rows of the CSV after a sweep; ``kept`` of them (the first) were there before it."""

    kept: int = 0

    @property
    def new(self) -> list:
        return self[self.kept:]


def run_sweep(cases: Sequence[Case], output: Path | str, *, resume: bool = False, how: Measurement = Measurement(),
              settings: Optional[dict] = None, executor=None, console: Optional[Console] = None,
              show_progress: bool = True) -> Rows:
    """Measure ``cases`` in order, appending one row per case to ``output``; returns every row
    of the CSV (kept ones first when resuming). Writes the JSON sidecar next to the CSV.

    ``output`` is claimed for the whole sweep (``claims.claim_file``): checked, locked, and
    refused with a ``ResultsError`` if it already holds rows and ``resume`` is False, if it is
    not a results CSV, or if it was measured with other settings (``how``, and ``settings``'
    level, model configuration, batch, dtype, decode steps, seed, compilation and SDPA backend:
    a resumed CSV never mixes two configurations). A failed write raises ``OutputError``; the
    rows before it stay.

    ``executor``: None measures in this process, one case after another. A
    ``evals.executors.RayExecutor`` measures each case as a Ray task (see :func:`_ray_rows`).
    """
    output = Path(output)
    how = how.resolved()
    with sigterm_as_interrupt(), claim_file(output, resume=resume, columns=COLUMNS, exact=True) as kept, \
            _started(executor):
        interrupts.hint(f"every finished row is in {output}; --resume continues it")
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=console or Console(stderr=True), disable=not show_progress)
        rows = _sweep(cases, output, kept, how, settings=settings, executor=executor, progress=progress)
    return rows


@contextlib.contextmanager
def _started(executor):
    """Start ``executor`` (after the output is claimed: a refused output starts no cluster) and
    stop it at the end, also on Ctrl-C; a cluster that cannot start is one line, exit 2."""
    if executor is None:
        yield
        return
    try:
        executor.__enter__()
    except ValueError as e:
        raise ResultsError(str(e)) from None
    try:
        yield
    finally:
        executor.close()


# what a resumed sweep must share with the rows it keeps, beyond how it measures: the grid's common
# settings (adding models, lengths, devices or modes to a sweep is a resume; changing these is not)
RESUME_SETTINGS = ("level", "config", "batch_size", "dtype", "decode_tokens", "seed", "compile", "sdpa_backend")


def _sweep(cases, output: Path, kept: list[dict], how: Measurement, *, settings, executor, progress) -> Rows:
    done = completed_keys(kept)
    oom_at = _first_oom(kept)
    measured_as = dict(how.recorded(), **{k: (settings or {}).get(k) for k in RESUME_SETTINGS if settings})
    info, session = _start_session(output, cases, kept, measured_as, settings=settings, how=how)
    run_id = info["run_id"]

    cuda_ok = torch.cuda.is_available()
    rows = Rows(kept)
    rows.kept = len(kept)
    todo = [c for c in cases if case_key(c.fields()) not in done]
    with progress:
        task = progress.add_task("starting", total=len(todo))
        if executor is not None:
            machines = info.setdefault("machines", {})
            for row, mach in _ray_rows(executor, todo, oom_at, dict(how=how, run_id=run_id)):
                if mach:
                    machines[mach["hostname"]] = mach
                append_row(output, row)
                rows.append(row)
                progress.update(task, description=f"{row['model']} {row['device']} {row['mode']} "
                                f"n={row['seq_len']}: {row['status']}")
                progress.advance(task)
            todo = []
        for case in todo:
            progress.update(task, description=case.label())
            row = _local_row(case, oom_at, cuda_ok, how, run_id)
            append_row(output, row)
            rows.append(row)
            progress.advance(task)

    # measured again at the end: a drift between the two says the machine's load changed mid-sweep
    session["calibration_matmul_gflops_end"] = calibrate(cases, threads=how.threads)
    info["calibration_matmul_gflops_end"] = session["calibration_matmul_gflops_end"]
    session["ended_utc"] = info["ended_utc"] = utc_now()
    write_sidecar(output, info)
    return rows


def _first_oom(kept: list[dict]) -> dict:
    """Group -> the first length that ran out of memory, among the rows kept from an earlier run."""
    oom_at = {}
    for r in kept:
        if r["status"] == "oom":
            g = _series(case_key(r))
            oom_at[g] = min(oom_at.get(g, int(r["seq_len"])), int(r["seq_len"]))
    return oom_at


def _start_session(output: Path, cases, kept: list[dict], measured_as: dict, *, settings,
                   how: Measurement) -> tuple[dict, dict]:
    """Refuse to resume under other measurement settings, then write the sidecar with this session
    added (its start, the machine, the matmul calibration). Returns ``(info, session)``: the
    sidecar's contents and this session's entry in it, both completed at the end of the sweep."""
    before = read_sidecar(output) if kept else None
    if kept:
        check_same_settings(_measured_as(before), measured_as, output)
    threads, inject, warmup = how.threads, how.inject, how.warmup
    env = environment()
    # what every measurement ran with (pinned), and what torch would have used unpinned
    env["torch_num_threads_default"], env["torch_num_threads"] = env["torch_num_threads"], threads
    info = dict(before or {}, **env, measured_as=measured_as)
    run_id = kept[0]["run_id"] if kept else new_run_id(env.get("git_sha") or "")
    session = {"command": env["command"], "git_sha": env["git_sha"], "git_dirty": env["git_dirty"],
               "started_utc": utc_now(), "ended_utc": None,
               "threads": threads, "inject_slowdown": inject,
               "warmup": warmup, "calibration_matmul_gflops": calibrate(cases, threads=threads)}
    info.update(run_id=run_id, settings=settings or {}, cases=len(cases), inject_slowdown=inject,
                calibration_matmul_gflops=session["calibration_matmul_gflops"], threads=threads)
    info.setdefault("started_utc", session["started_utc"])
    info["sessions"] = list(info.get("sessions", [])) + [session]
    write_sidecar(output, info)
    return info, session


def unsupported(case: Case) -> str:
    """Why ``case`` asks for a mode or level its mixer does not provide ("" when it does): decode
    needs ``init_cache``, the op level ``op_inputs`` and ``op`` (the contract, ``bsbr.mixer``)."""
    from evals.registry import resolve_model

    try:
        spec = resolve_model(case.model)
        modes, cls = spec.modes, spec.mixer_class() if case.level == "op" else None
    except ValueError:
        return ""  # a mixer that cannot be loaded: measuring it makes the error row that says why
    if case.mode not in modes:
        return f"{case.model} has no {case.mode} mode: its mixer defines no init_cache"
    if cls is not None and not (callable(getattr(cls, "op", None)) and callable(getattr(cls, "op_inputs", None))):
        return f"{case.model} has no op level: its mixer defines no op / op_inputs"
    return ""


def _local_row(case, oom_at: dict, cuda_ok: bool, how: Measurement, run_id: str) -> dict:
    """One case measured in this process, or skipped: CUDA missing, or a shorter length of its
    series already ran out of memory (``oom_at``, updated when this one does)."""
    g = _series(case_key(case.fields()))
    common = dict(run_id=run_id, threads=how.threads, inject=float(how.inject.get(case.model, 1.0)))
    if case.device.startswith("cuda") and not cuda_ok:
        return empty_row(case, "skipped", "CUDA is not available on this machine", **common)
    why = unsupported(case)
    if why:
        return empty_row(case, "unsupported", why, **common)
    if g in oom_at and case.seq_len > oom_at[g]:
        return empty_row(case, "skipped", f"a shorter length (n={oom_at[g]}) of this model, device "
                         "and mode ran out of memory", **common)
    row = measure(case, how, run_id=run_id)
    if row["status"] == "oom":
        oom_at[g] = min(oom_at.get(g, case.seq_len), case.seq_len)
    if row["status"] in ("oom", "error"):
        log.warning("%s: %s %s", case.label(), row["status"], row["error"])
    return row


def _measured_as(meta: Optional[dict]) -> Optional[dict]:
    """How a recorded run measured (what a resumed run must repeat): from its sidecar's
    ``measured_as``, or, in a sidecar written before that existed, from its settings; the grid's
    common settings (``RESUME_SETTINGS``) from ``settings`` where ``measured_as`` predates them."""
    if not meta:
        return None
    old = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    if isinstance(meta.get("measured_as"), dict):
        got = dict(meta["measured_as"])
    elif "repeats" in old:
        got = {k: old.get(k) for k in ("repeats", "warmup", "min_run_time", "threads")} | {
            "inject_slowdown": meta.get("inject_slowdown")}
    else:
        return None
    return got | {k: old[k] for k in RESUME_SETTINGS if k in old and k not in got}


# Ray: the custom resource that admits one timed CPU case per node at a time. A cluster started by
# ``--executor ray`` declares it; each node of a cluster joined with ``--address`` must declare it
# itself (``ray start ... --resources='{"bsbr_cpu_timer": 1}'``). A GPU is one ``num_gpus`` unit.
CPU_TIMER = "bsbr_cpu_timer"


def _measure_task(job: tuple) -> tuple:
    """One case measured in a Ray task: its row and the facts of the machine that measured it."""
    from evals.machine import machine

    case, kw = job
    return measure(case, kw["how"], run_id=kw["run_id"]), machine()


def ray_options(case: Case, threads: int) -> dict:
    """The Ray resources of one timed case: its threads, and the whole timing slot of its device
    (the node's CPU timer, or one GPU), so that no two timed cases ever share a device."""
    if case.device.startswith("cuda"):
        return {"num_cpus": threads, "num_gpus": 1}
    return {"num_cpus": threads, "resources": {CPU_TIMER: 1}}


def check_ray_cluster(executor, cases: Sequence[Case]) -> None:
    """Refuse, in one line, a joined cluster that cannot run the CPU cases in isolation."""
    have = executor.cluster_resources()
    if any(not c.device.startswith("cuda") for c in cases) and have.get(CPU_TIMER, 0) < 1:
        raise ResultsError(f"--executor ray: the Ray cluster at {executor.address} declares no {CPU_TIMER!r} "
                           f"resource, which admits one timed CPU case per node; start each node with "
                           f"ray start ... --resources='{{\"{CPU_TIMER}\": 1}}'")


def _ray_rows(executor, todo: Sequence[Case], oom_at: dict, kw: dict):
    """``(row, machine)`` for every case of ``todo`` as Ray finishes them.

    Each case is one Ray task holding its device's timing slot (:func:`ray_options`): on a node,
    at most one CPU case and one case per GPU are timed at any moment. The lengths of one
    (model, device, mode, ...) series run in ascending order, one at a time, so that an
    out-of-memory skips the longer ones exactly as a local sweep does; series run side by side.
    CUDA cases need a GPU somewhere in the cluster, else they are ``skipped`` rows.
    """
    how = kw["how"]
    common = lambda c: dict(run_id=kw["run_id"], threads=how.threads,  # noqa: E731
                            inject=float(how.inject.get(c.model, 1.0)))
    if executor.address is not None:
        check_ray_cluster(executor, todo)
    gpus = executor.cluster_resources().get("GPU", 0)
    chains: dict = {}
    for case in todo:
        g = _series(case_key(case.fields()))
        if case.device.startswith("cuda") and gpus < 1:
            yield empty_row(case, "skipped", "the Ray cluster has no GPU", **common(case)), None
        elif unsupported(case):
            yield empty_row(case, "unsupported", unsupported(case), **common(case)), None
        elif g in oom_at and case.seq_len > oom_at[g]:
            yield empty_row(case, "skipped", f"a shorter length (n={oom_at[g]}) of this model, device and mode "
                            "ran out of memory", **common(case)), None
        else:
            chains.setdefault(g, []).append((case, kw))
    for (case, _), result in executor.map_chains(
            _measure_task, [sorted(ch, key=lambda j: j[0].seq_len) for ch in chains.values()],
            options=lambda job: ray_options(job[0], how.threads),
            stop=lambda job, res: res[0]["status"] == "oom"):
        if result is None:
            yield empty_row(case, "skipped", "a shorter length of this model, device and mode ran out of memory",
                            **common(case)), None
        else:
            row, mach = result
            if row["status"] in ("oom", "error"):
                log.warning("%s: %s %s", case.label(), row["status"], row["error"])
            yield row, mach


def ray_executor(address: Optional[str], threads: int) -> RayExecutor:
    """A cluster started here gets every CPU and one timing slot for the CPU (GPUs count themselves)."""
    try:
        return RayExecutor(address, threads=threads, num_cpus=os.cpu_count(), resources={CPU_TIMER: 1})
    except ValueError as e:
        raise ResultsError(str(e)) from None


def _num(v, fmt: str) -> str:
    if v in (None, ""):
        return ""
    v = float(v)
    return f"{v:.0f}" if fmt == ".3g" and v >= 1000 else format(v, fmt)  # 2330, not 2.33e+03


def summary_rows(rows: Sequence[dict]) -> tuple[tuple, list]:
    """(columns, rows) of the closing table: median time, peak memory, GFLOPs and the error if any."""
    errors = any(r.get("error") for r in rows)
    columns = ("model", "device mode level", "n", "status", "ms", "MiB", "GFLOP") + (("error",) if errors else ())
    out = []
    for r in rows:
        flops = _num(float(r["flops"]) / 1e9, ".3g") if r.get("flops") not in (None, "") else ""
        out.append((str(r["model"]), f"{r['device']} {r['mode']} {r['level']}", str(r["seq_len"]), str(r.get("status")),
                    _num(r.get("time_ms"), ".3g") if r.get("status") == "ok" else "",
                    _num(r.get("peak_memory_mb"), ".1f"), flops, *([str(r.get("error") or "")] if errors else [])))
    return columns, out
