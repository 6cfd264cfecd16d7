"""The A/B runner of ``bsbr-eval guard --against REF``: materialise the accepted commit, start
one worker per side, and collect interleaved, paired samples.

Times do not transfer between machines, so the guard never compares a stored time: it measures
the accepted commit (side A) and the working tree (side B) on the same machine, in the same
minutes, with the same harness, as asv's ``continuous`` mode does.

- ``ref_worktree(ref)``: ``git worktree add --detach`` of REF into a temporary folder, removed
  afterwards whatever happens (an error, Ctrl-C, or SIGTERM, which ``timeout``, CI runners and
  schedulers send: it is turned into an exit that unwinds, exit code 143). An unknown ref is an
  ``ABError`` (exit 2).
- ``Worker``: one long-lived ``evals/guard/worker.py`` process per side, started from the working
  tree's file with ``PYTHONPATH`` = that side's tree (see that module for which code comes from
  where). The injected slowdown is sent to side B only; no worker reads
  ``$BSBR_EVAL_INJECT_SLOWDOWN`` itself.
- ``Session``: both workers with every configuration built; ``sample(side, i)`` is what
  ``evals.guard.sampling.interleave`` calls. The decision is ``evals.guard.findings.ab_check``.

Axis legend: ``s`` paired samples (rounds) of one configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from evals.guard.sampling import SIDES, interleave, order  # noqa: F401 (the runner's sampling order)

WORKER = Path(__file__).resolve().parent / "worker.py"
WORKING_TREE = Path(__file__).resolve().parents[2]  # the tree this harness runs from
TERMINATED = 128 + signal.SIGTERM  # the exit code after SIGTERM, as a shell reports it


class ABError(Exception):
    """Why the comparison cannot run, in one line (the CLI exits 2 with it)."""


# ----------------------------------------------------------------------------- git


def _git(root: Path, *args: str, check: bool = True) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        raise ABError(f"git {' '.join(args)} failed: {err}") from None
    if check and out.returncode != 0:
        msg = " ".join((out.stderr or out.stdout).split())
        raise ABError(f"git {' '.join(args)} failed: {msg}")
    return out.stdout.strip()


def repo_root(path: Path = WORKING_TREE) -> Path:
    """The top of the git checkout holding ``path``; an ABError if there is none."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise ABError(f"--against needs git: {err}") from None
    if out.returncode != 0:
        raise ABError(f"--against needs a git checkout, and {path} is not inside one")
    return Path(out.stdout.strip()).resolve()


def resolve_ref(ref: str, root: Path) -> str:
    """The full commit sha REF names in the repository at ``root``."""
    if not ref or ref.startswith("-"):
        raise ABError(f"--against: {ref!r} is not a git ref; give a commit, branch or tag (e.g. HEAD~1)")
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        raise ABError(f"--against: no commit named {ref!r} in {root}; give a commit, branch or tag "
                      "(e.g. $(cat results/baselines/ref))")
    return out.stdout.strip()


def tree_state(root: Path) -> dict:
    """The working tree's commit and whether tracked files differ from it (then B is that commit
    plus uncommitted changes, which is what is being checked)."""
    sha = _git(root, "rev-parse", "HEAD")
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    return dict(sha=sha, dirty=dirty)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside: SIGTERM raises ``SystemExit(143)``, so every ``finally`` on the way out runs
    (Python's default for SIGTERM ends the process on the spot, leaving the worktree behind, where
    Ctrl-C unwinds). A second SIGTERM during the clean-up is ignored. Outside the main thread,
    where no handler can be set, nothing changes."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        raise SystemExit(TERMINATED)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ref_worktree(ref: str, root: Optional[Path] = None) -> Iterator[tuple[Path, str]]:
    """``(path, sha)`` of REF checked out (detached) in a temporary git worktree.

    The worktree and its folder are removed on the way out, also after an exception, Ctrl-C or
    SIGTERM (``sigterm_unwinds``); ``git worktree prune`` then drops the record of it, so the
    repository is left as it was.
    """
    root = root or repo_root()
    sha = resolve_ref(ref, root)
    with sigterm_unwinds():
        tmp = Path(tempfile.mkdtemp(prefix="bsbr-regress-"))
        path = tmp / f"ref-{sha[:12]}"
        try:
            _git(root, "worktree", "add", "--detach", "--quiet", str(path), sha)
            yield path, sha
        finally:
            _git(root, "worktree", "remove", "--force", str(path), check=False)
            shutil.rmtree(tmp, ignore_errors=True)
            _git(root, "worktree", "prune", check=False)


# ----------------------------------------------------------------------------- workers


def _json_safe(rows) -> list:
    """DataFrame rows as plain JSON values (NaN -> None, numpy scalars -> Python)."""
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        return json.loads(rows.to_json(orient="records"))
    return json.loads(json.dumps(list(rows), default=float))


def _pin(pid: int) -> None:
    """Put a worker on the highest CPU this process may use, the same one for both sides: their
    samples alternate and never overlap, and one CPU for both removes any difference between
    cores (or a side's migrations between them) from the paired ratio. Where affinity cannot be
    set (not Linux), nothing is done."""
    try:
        os.sched_setaffinity(pid, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


class Worker:
    """One side's worker process; ``call(op=..., ...)`` sends a request and returns the reply.

    Starting returns at once (so both sides import torch at the same time); ``handshake`` waits
    for the worker's first reply and turns an import failure into an ABError naming the side.
    """

    def __init__(self, name: str, tree: Path, *, what: str):
        self.name, self.tree, self.what = name, Path(tree), what
        env = {k: v for k, v in os.environ.items() if k != "BSBR_EVAL_INJECT_SLOWDOWN"}
        env["PYTHONPATH"] = str(self.tree)  # the side's models first; nothing of the other side
        self._err = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(self.tree)], cwd=str(self.tree), env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1)
        _pin(self.proc.pid)
        self.info: dict = {}

    def handshake(self) -> dict:
        hello = self.recv()
        if "error" in hello:
            raise ABError(f"{self.what}: its code cannot be imported: {hello['error']}")
        self.info = hello
        return hello

    def _stderr_tail(self) -> str:
        self._err.seek(0)
        lines = [ln for ln in self._err.read().splitlines() if ln.strip() and not ln.startswith("USDT:")]
        return " ".join(lines[-1:])[:300]

    def _died(self) -> ABError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        return ABError(f"{self.what}: its worker stopped (exit {self.proc.returncode}): {self._stderr_tail()}")

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise self._died()
        return json.loads(line)

    def send(self, **msg) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died() from None

    def call(self, **msg) -> dict:
        self.send(**msg)
        return self.recv()

    def close(self, *, kill: bool = False) -> None:
        """Ask the worker to quit and wait for it; ``kill`` stops it at once (after an error, when
        it may still be importing and would not read the request for seconds)."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                f.close()
        self._err.close()


@contextlib.contextmanager
def workers(a_tree: Path, b_tree: Path, *, a_what: str, b_what: str = "the working tree") -> Iterator[dict]:
    """``{"A": Worker, "B": Worker}``, started together, both stopped on the way out."""
    started: dict = {}
    failed = True
    try:
        started["A"] = Worker("A", a_tree, what=a_what)
        started["B"] = Worker("B", b_tree, what=b_what)
        for w in started.values():
            w.handshake()
        yield started
        failed = False
    finally:
        for w in started.values():
            w.close(kill=failed)


# ----------------------------------------------------------------------------- sampling


@dataclass
class Session:
    """Two started workers with the guard's configurations built on both sides."""

    workers: dict
    rows: object                # the committed rows (DataFrame), in order
    built: dict                 # side -> [{status, error, params, flops, ...}] per row
    inject: dict = field(default_factory=dict)

    def sample(self, side: str, i: int) -> float:
        reply = self.workers[side].call(op="sample", i=i)
        if "error" in reply:
            raise ABError(f"{self.workers[side].what}: sampling configuration {i} failed: {reply['error']}")
        return float(reply["ms"])

    def set_inject(self, factors: dict) -> None:
        """Change side B's injected slowdown (side A never has one)."""
        self.workers["B"].call(op="inject", factors=dict(factors))
        self.inject = dict(factors)

    def testable(self) -> list:
        """Indices of configurations that both sides built."""
        return [i for i in range(len(self.rows))
                if self.built["A"][i]["status"] == "ok" and self.built["B"][i]["status"] == "ok"]


def open_session(ws: dict, rows, *, threads: int, inject: dict, exact: bool = True) -> Session:
    """Build every row on both sides at once (side B also computes the exact metrics when
    ``exact``); nothing is timed yet, so the two may share the CPUs."""
    payload = _json_safe(rows)
    for side in SIDES:
        ws[side].send(op="build", rows=payload, threads=threads, inject=inject if side == "B" else {},
                      exact=exact and side == "B")
    built = {}
    for side in SIDES:
        reply = ws[side].recv()
        if "error" in reply:
            raise ABError(f"{ws[side].what}: building the configurations failed: {reply['error']}")
        built[side] = reply["cases"]
    return Session(ws, rows, built, dict(inject))


# ----------------------------------------------------------------------------- one check


@dataclass
class Against:
    """What ``against`` ran and found."""

    result: object     # evals.guard.findings.ABResult, or what ``run`` returned
    ref: str           # the ref as given
    ref_sha: str
    tree: dict         # the working tree: {"sha", "dirty"}
    inject: dict       # side B's injected slowdown
    rounds: int
    threshold: float
    alpha: float
    phases: dict = field(default_factory=dict)  # wall seconds: start (worktree + workers), build, measure

    def sides(self) -> str:
        """Who was A and who was B, in one line (B says when it carries uncommitted changes)."""
        b = f"the working tree at {self.tree['sha'][:12]}" + (" + uncommitted changes (dirty)" if self.tree["dirty"]
                                                              else " (clean)")
        inj = (", injected into B: " + ",".join(f"{m}={f:g}" for m, f in self.inject.items())) if self.inject else ""
        took = ", ".join(f"{k} {v:.0f} s" for k, v in self.phases.items())
        return (f"A = {self.ref} ({self.ref_sha[:12]}), B = {b}; {self.rounds} interleaved pairs per "
                f"configuration, threshold 1+{self.threshold:g}, alpha {self.alpha:g}{inj}"
                + (f"; wall time: {took}" if took else ""))


def _fresh_sampler(stack: contextlib.ExitStack, session: Session, a_tree: Path, b_tree: Path, a_what: str,
                   threads: int) -> Callable[[list], Callable[[str, int], float]]:
    """For the second look: stop the first pair of workers' sampling, start a new pair, build only
    the configurations ``indices`` there (no exact metrics: those were checked), and sample them
    under their original indices."""

    def fresh(indices: list) -> Callable[[str, int], float]:
        ws = stack.enter_context(workers(a_tree, b_tree, a_what=a_what))
        sub = session.rows.iloc[list(indices)]
        again = open_session(ws, sub, threads=threads, inject=session.inject, exact=False)
        where = {i: k for k, i in enumerate(indices)}
        return lambda side, i: again.sample(side, where[i])
    return fresh


@dataclass(frozen=True)
class ABPlan:
    """How a check runs: pairs per configuration, the rule's threshold and alpha, side B's injected
    slowdown, threads, and whether side B's exact metrics are checked (the self-test skips them:
    the clean check has just done them)."""

    rounds: int
    threshold: float
    alpha: float
    inject: dict = field(default_factory=dict)
    threads: int = 1
    exact: bool = True


def against(ref: str, rows, plan: ABPlan, *, root: Optional[Path] = None, b_tree: Optional[Path] = None,
            progress: Optional[Callable[[int], None]] = None, run: Optional[Callable] = None) -> Against:
    """Materialise ``ref``, build ``rows`` on both sides, and run the check.

    ``run(session) -> result`` replaces the default check (``evals.guard.findings.ab_check``), e.g.
    with the power measurement. ``b_tree`` defaults to the working tree this harness runs from.
    """
    from evals.guard.findings import ab_check

    rounds, threshold, alpha, inject, threads, exact = (plan.rounds, plan.threshold, plan.alpha, plan.inject,
                                                         plan.threads, plan.exact)
    root = root or repo_root()
    b_tree = Path(b_tree or root)
    state = tree_state(b_tree)
    phases, t0 = {}, time.monotonic()  # wall time per phase, for the report (not a measurement)

    def lap(name):
        nonlocal t0
        phases[name], t0 = time.monotonic() - t0, time.monotonic()

    with ref_worktree(ref, root) as (path, sha), contextlib.ExitStack() as later:
        with workers(path, b_tree, a_what=f"ref {ref} ({sha[:12]})") as ws:
            lap("start")
            session = open_session(ws, rows, threads=threads, inject=inject, exact=exact)
            lap("build" + (" + exact metrics" if exact else ""))
            if run is not None:
                result = run(session)
            else:
                fresh = _fresh_sampler(later, session, path, b_tree, f"ref {ref} ({sha[:12]})", threads)
                result = ab_check(rows, session.built, session.sample, rounds=rounds, threshold=threshold,
                                  alpha=alpha, progress=progress, fresh=fresh)
            lap("measure")
    return Against(result, ref, sha, state, dict(inject), rounds, threshold, alpha, phases)
