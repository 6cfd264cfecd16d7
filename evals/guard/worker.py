"""One side of an A/B regression check: a long-lived process that checks the guard's
configurations once and then answers "one timed sample of configuration i" requests, holding one
built configuration at a time (``Side._workload`` says why).

``evals.guard.runner`` starts two of these, one per side, and runs this file *by path* from the working
tree for both: ``python <working tree>/evals/guard/worker.py TREE``. What comes from where:

- **the models** come from ``TREE`` (the accepted commit's temporary worktree for side A, the
  working tree for side B): ``bsbr``, ``bsbr_extras``, ``evals.registry`` and ``evals.grid``.
  The registry is how a tree builds its models, so it belongs to the code under test;
- **the harness** comes from the directory of this file, the working tree, on *both* sides:
  ``evals.results`` (sample statistics, case keys, the one-line error) with the modules it is
  made of (``errors``, ``locking``, ``machine``, ``resume``, the ``output`` package), ``evals.workload``
  (workload building), ``evals.measure`` (``time_fn``, FLOP counting, memory trace, injection)
  and the ``evals.guard`` package (``timing``: ``RunqueueWait``, ``steady_memory``,
  ``case_from_row``), installed in place of whatever the tree has under those names, so a ref
  from before the guard moved into its package (``evals/guard.py``, ``evals/regress.py``), or
  from before ``results.py`` was split, is checked the same way as a new one. The accepted commit
  may carry an older harness; timing both sides with the same one means a change to the harness
  cannot read as a change of the models. (The price: the working tree's harness has to be able
  to build the accepted commit's models; when it cannot, the check says so and exits 2.)

Protocol: one JSON object per line on stdin, one JSON reply per line on a private copy of
stdout (file descriptor 1 itself is pointed at stderr, so whatever a library prints cannot
corrupt the replies). The first reply, sent unasked, is ``{"ready": ...}`` or ``{"error": ...}``.

- ``{"op": "build", "rows": [...], "threads": T, "inject": {model: f}, "exact": bool}``:
  build every row's workload (``exact``: also count FLOPs, parameters and the steady-state
  memory trace) -> ``{"cases": [{"status", "error", "params", "flops", "peak_memory_mb",
  "memory_method"}, ...]}``. A configuration that fails to build is a case with status
  ``error``, never a crash of the worker.
- ``{"op": "inject", "factors": {model: f}}``: change the injected slowdown (power runs).
- ``{"op": "sample", "i": i}``: one sample of case ``i``, per call (per token in decode),
  runqueue wait removed -> ``{"ms": float}`` or ``{"error": str}``.
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

HARNESS = Path(__file__).resolve().parents[1]  # the working tree's evals/
# (name, is a package), in import order: what the results layer is made of first (an accepted
# commit may have none of them: it predates the output package, or results.py's split), then the
# results layer, which the workload builder and measure import (sample statistics, case keys);
# packages are installed whole (their submodules load from the working tree)
HARNESS_MODULES = (("errors", False), ("locking", False), ("machine", False), ("resume", False), ("output", True),
                   ("results", False), ("workload", False), ("measure", False), ("guard", True))


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]


def _install(evals, name: str, path: Path, package: bool) -> None:
    """Load ``evals.<name>`` from ``path`` (a module file, or a package folder) and put it in
    place of the tree's own, whatever the tree has under that name (a module, a package, none)."""
    init = path / "__init__.py" if package else path
    spec = importlib.util.spec_from_file_location(f"evals.{name}", init,
                                                  submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"evals.{name}"] = module
    setattr(evals, name, module)
    spec.loader.exec_module(module)  # its "from evals.registry import ..." gets the tree's


def load(tree: Path) -> dict:
    """Put ``tree`` first on the path, import its models, and install the working tree's
    harness modules in place of the tree's own. Returns facts for the ``ready`` reply."""
    # Running a file by path puts its folder on sys.path; no module of it may import bare.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (HARNESS, HARNESS / "guard")]
    sys.path.insert(0, str(tree))
    import evals  # the tree's package (its __init__ is empty)

    got = Path(evals.__file__).resolve().parent
    if got != tree / "evals":
        raise ImportError(f"evals resolved to {got}, not {tree / 'evals'}")
    for name, package in HARNESS_MODULES:
        _install(evals, name, HARNESS / (name if package else f"{name}.py"), package=package)
    import bsbr
    import torch

    import evals.registry

    where = Path(bsbr.__file__).resolve()
    if tree not in where.parents:
        raise ImportError(f"bsbr resolved to {where}, outside {tree}")
    return dict(ready=True, bsbr=str(where.parent), registry=str(Path(evals.registry.__file__).resolve()),
                torch=torch.__version__, pid=os.getpid())


def _first_call(work) -> None:
    """One untimed call of ``work`` (after its setup)."""
    if work.setup is not None:
        work.setup()
    work.fn()


class Side:
    """One side's configurations and how to take one sample of each."""

    def __init__(self):
        self.cases: list = []     # per case: the Case, or None when it failed to build
        self.inject: dict = {}
        self.threads = 1
        self.wait = None
        self.current: Optional[tuple] = None  # (i, Workload): the one configuration held now

    def build(self, rows: list, threads: int, inject: dict, exact: bool) -> list:
        import pandas as pd
        import torch

        from evals.guard.timing import RunqueueWait, case_from_row, exact_metrics
        from evals.workload import build_workload

        self.threads, self.inject = int(threads), dict(inject or {})
        torch.set_num_threads(self.threads)
        self.wait = self.wait or RunqueueWait()
        self.cases, self.current, out = [], None, []
        for row in rows:
            self.cases.append(None)
            info, work = dict(status="ok", error=""), None
            try:
                case = case_from_row(pd.Series(row))
                work = build_workload(case)
                if exact:
                    info.update(exact_metrics(work, case, self.threads))
                else:  # a configuration that cannot run is an error row now, not a failed sample later
                    _first_call(work)
                self.cases[-1] = case
            except Exception as err:  # a configuration that cannot be built is a row, not a crash
                info = dict(status="error", error=_one_line(err))
            del work
            out.append(info)
        gc.collect()
        return out

    def _workload(self, i: int):
        """Case ``i``'s workload, built when it is first sampled, the previous one dropped first.

        Why not keep all 63 built from the start: measured in one process, a workload's time drifts
        with what else the heap holds (SlidingWindow's layer train step went from 6.5 to 10 ms as
        eight copies of it were built and run), and the two sides' heaps drift apart, which read as
        a per-configuration bias of up to ±25% between A and B and let a 1.5x injection read +13%.
        Holding one workload at a time keeps both heaps small and alike; the re-check of a
        regression rebuilds it, so the re-check also sees a fresh allocation.
        """
        if self.current is None or self.current[0] != i:
            self.current = None
            gc.collect()
            from evals.workload import build_workload

            work = build_workload(self.cases[i])
            _first_call(work)  # it pays for lazy initialisation: keep it out of every sample
            self.current = (i, work)
        return self.current[1]

    def sample(self, i: int) -> float:
        from evals.guard.timing import timed_once

        case = self.cases[i]
        if case is None:
            raise ValueError(f"case {i} did not build")
        work = self._workload(i)
        ms = timed_once(work.fn, self.wait, device=case.device, threads=self.threads, setup=work.setup,
                         inject=float(self.inject.get(case.model, 1.0)))
        return ms / max(1, work.tokens_per_call)  # per token in decode mode, as the harness reports


def main(argv: list) -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    try:
        if len(argv) != 1:
            raise ValueError("usage: worker.py TREE")
        reply(load(Path(argv[0]).resolve()))
    except BaseException as err:  # the tree's code does not import: say why, then stop
        reply(dict(error=_one_line(err)))
        return 1
    side = Side()
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.get("op")
        try:
            if op == "quit":
                return 0
            if op == "build":
                reply(dict(cases=side.build(msg["rows"], msg.get("threads", 1), msg.get("inject"),
                                            bool(msg.get("exact")))))
            elif op == "inject":
                side.inject = dict(msg.get("factors") or {})
                reply(dict(ok=True))
            elif op == "sample":
                reply(dict(ms=side.sample(int(msg["i"]))))
            else:
                reply(dict(error=f"unknown op {op!r}"))
        except Exception as err:
            reply(dict(error=_one_line(err)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
