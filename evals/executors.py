"""Where a job runs: in this process, in local worker processes, or as Ray tasks.

An executor maps a picklable top-level function over items and yields ``(item, result)`` as each
finishes (in completion order; the caller writes each result as it arrives). Two guarantees, both
tested in tests/evals/test_executors.py:

- *Nothing outlives the command.* Local workers ask the kernel to SIGKILL them when their parent
  dies (``prctl(PR_SET_PDEATHSIG)``). A Ray cluster that ``ray.init()`` starts here is mostly
  fate-shared with the driver already, but not all of it: measured with ray 2.60 after a SIGKILL
  of the driver, gcs_server, raylet and the task workers die while ``ray::DashboardAgent`` and
  ``ray::RuntimeEnvAgent`` live on, reparented to init (still running 38 s later in one trial and
  over a minute in another). So the Ray executor starts a small reaper
  process first; it snapshots the driver's process tree every half second and, once the driver is
  gone, SIGKILLs every process of the last snapshot (checking each one's start time, so a reused
  pid is never hit). A cluster joined with ``address`` is not ours: Ray itself cancels a dead
  driver's tasks there.
- *Interruptions stop cleanly.* ``close()`` (also on KeyboardInterrupt) cancels what has not
  finished and stops the workers; results already yielded are the caller's to keep.

Axis of resources: a local worker or a Ray task gets ``threads`` CPU threads (pinned inside the
job by ``evals.train.deterministic``); on a GPU each Ray task declares ``num_gpus=1``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable, Iterator, Optional

EXECUTORS = ("local", "ray")
_PR_SET_PDEATHSIG = 1
CONNECT_TIMEOUT_S = 5.0   # the TCP probe of a cluster's address
RAY_REQUEST_TIMEOUT_S = "20"  # Ray's own GCS request timeout when joining (its default is 60 s)


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit now if it already has.

    Why the second check: the parent may die between fork and prctl, and then no signal comes.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the watchdog below still covers it
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


# ----------------------------------------------------------------------------- process trees (/proc)


def _stat(pid: int) -> Optional[tuple]:
    """(ppid, start_time) of a live ``pid`` from /proc; None if it is gone or a zombie (dead, only
    waiting to be reaped)."""
    try:
        text = open(f"/proc/{pid}/stat", "rb").read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()   # after "pid (comm) ": state ppid ... starttime
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def alive(pid: int, start_time: int) -> bool:
    """Whether the process that had ``start_time`` still runs as ``pid`` (not a reused pid)."""
    st = _stat(pid)
    return st is not None and st[1] == start_time


def descendants(root: int) -> dict:
    """{pid: start_time} of every process below ``root`` (not ``root`` itself)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents[int(name)] = st
    out, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for pid, (ppid, start) in parents.items():
            if ppid == p and pid not in out:
                out[pid] = start
                frontier.append(pid)
    return out


def _reap(driver: int, period: float = 0.5) -> None:
    """The reaper's loop: remember ``driver``'s tree; when the driver is gone, SIGKILL that tree."""
    me = os.getpid()
    tree: dict = {}
    while _stat(driver) is not None and os.getppid() == driver:
        tree = {p: s for p, s in descendants(driver).items() if p != me} or tree
        time.sleep(period)
    for pid, start in tree.items():
        if alive(pid, start):  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# ----------------------------------------------------------------------------- executors


class LocalExecutor:
    """``jobs == 1``: run in this process, one item at a time. ``jobs > 1``: that many spawned
    worker processes (spawn, not fork: a forked child would inherit the parent's OpenMP state),
    each of which dies with this process."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
        self.jobs = jobs
        self._pool = None

    def __enter__(self) -> "LocalExecutor":
        if self.jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"),
                                             initializer=die_with_parent, initargs=(os.getpid(),))
        return self

    def map_unordered(self, fn: Callable, items: Iterable) -> Iterator[tuple]:
        items = list(items)
        if self._pool is None:
            for item in items:
                yield item, fn(item)
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        running = {self._pool.submit(fn, item): item for item in items}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                yield running.pop(fut), fut.result()

    def close(self) -> None:
        if self._pool is not None:
            procs = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:  # a running training is not interruptible otherwise
                p.kill()
            for p in procs:
                p.join(5)
            self._pool = None

    def __exit__(self, *exc) -> None:
        self.close()


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``ray://host:port``, ``[v6]:port``) -> (host, port); ValueError, one line,
    naming the valid forms otherwise."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address: {address!r} is not host:port (a port from 1 to 65535) or auto")
    return host, int(port)


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Prove that a cluster's head answers before Ray is asked to join it, within ``timeout``
    seconds; returns the ``host:port`` probed. Ray itself, given an address where nothing listens,
    retries and warns for minutes; a closed port is refused here at once, a host that does not
    answer after ``timeout``. ``auto`` is the address of the cluster ``ray start`` last recorded on
    this machine (none: refused). ValueError, one line, when the address is unusable."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except Exception as e:  # noqa: BLE001 - Ray's own lookup; any failure means no cluster
            raise ValueError(f"--address auto: no running Ray cluster found ({' '.join(str(e).split())[:120]}); "
                             f"start one with ray start --head, or give host:port") from None
        if not found:
            raise ValueError("--address auto: no running Ray cluster found on this machine; start one with "
                             "ray start --head, or give host:port")
        address = found
    import socket

    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise ValueError(f"--address {address}: no answer within {timeout:g} s; is the Ray head running "
                         f"there and reachable?") from None
    except OSError as e:
        raise ValueError(f"--address {address}: cannot connect ({e.strerror or e}); is the Ray head running "
                         f"there (ray start --head --port {port})?") from None
    return f"{host}:{port}"


class RayExecutor:
    """Each item is one Ray task with declared resources: ``num_cpus=threads``, plus ``num_gpus=1``
    on a GPU. Without ``address`` ``ray.init`` starts a local cluster of ``num_cpus`` CPUs (default:
    all) and a reaper that takes it down if this process is killed; with ``address`` it joins
    that cluster (``"auto"``, or ``host:port`` of its head)."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, *, threads: int = 1, gpu: bool = False,
                 num_cpus: Optional[int] = None, resources: Optional[dict] = None):
        if address is not None:
            # bound Ray's own waits too (read when ray is first imported), unless the user set them
            os.environ.setdefault("RAY_gcs_server_request_timeout_seconds", RAY_REQUEST_TIMEOUT_S)
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError('--executor ray needs Ray: pip install -e ".[ray]"') from None
        if address is not None:
            probe_address(address)  # before anything starts: an unreachable cluster is one line, at once
        self.address, self.threads, self.gpu, self.num_cpus = address, threads, gpu, num_cpus
        self.resources = resources  # custom resources of a cluster started here (none when joining)
        self._reaper = None
        self._pending: list = []

    def __enter__(self) -> "RayExecutor":
        import ray

        if self.address is None:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # evals/'s parent
            self._reaper = subprocess.Popen(
                [sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); "
                 f"from evals.executors import _reap; _reap({os.getpid()})"],
                stdin=subprocess.DEVNULL, start_new_session=True)  # a Ctrl-C to the terminal spares it
        try:
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                     resources=None if self.address else self.resources,
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except Exception as e:
            self.close()
            raise ValueError(f"--executor ray: could not {'join ' + self.address if self.address else 'start a local Ray'}: "
                             f"{' '.join(str(e).split())[:200]}") from None
        return self

    def map_unordered(self, fn: Callable, items: Iterable) -> Iterator[tuple]:
        import ray

        task = ray.remote(_call).options(num_cpus=self.threads, num_gpus=1 if self.gpu else 0, max_retries=0)
        fn_ref = ray.put(fn)
        refs = {task.remote(fn_ref, item): item for item in items}
        self._pending = list(refs)
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                item = refs.pop(ref)
                self._pending = list(refs)
                yield item, ray.get(ref)

    def map_chains(self, fn: Callable, chains: Iterable[Iterable], *, options: Callable[[object], dict],
                   stop: Callable[[object, object], bool]) -> Iterator[tuple]:
        """Run each chain's items in order, one at a time, the chains side by side; yield
        ``(item, result)`` as each finishes. ``options(item)`` gives the item's Ray task options (its
        resources); once ``stop(item, result)`` is true the chain's later items are not run and are
        yielded as ``(item, None)``.

        Why chains: ``compare`` runs a (model, device, mode) group's lengths in ascending order so
        that an out-of-memory at one length skips the longer ones, as a local sweep does.
        """
        import ray

        task = ray.remote(_call)
        fn_ref = ray.put(fn)
        queues = [list(c) for c in chains]
        refs: dict = {}

        def submit(i: int) -> None:
            item = queues[i].pop(0)
            refs[task.options(max_retries=0, **options(item)).remote(fn_ref, item)] = (i, item)
            self._pending = list(refs)

        for i, q in enumerate(queues):
            if q:
                submit(i)
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                i, item = refs.pop(ref)
                self._pending = list(refs)
                result = ray.get(ref)
                yield item, result
                if queues[i] and stop(item, result):
                    rest, queues[i] = queues[i], []
                    for later in rest:
                        yield later, None
                elif queues[i]:
                    submit(i)

    def cluster_resources(self) -> dict:
        import ray

        return dict(ray.cluster_resources())

    def close(self) -> None:
        try:
            import ray

            for ref in self._pending:
                ray.cancel(ref, force=True)
            self._pending = []
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self._reaper is not None:
                self._reaper.kill()
                self._reaper.wait()
                self._reaper = None

    def __exit__(self, *exc) -> None:
        self.close()


def _call(fn: Callable, item):
    return fn(item)


def make_executor(name: str, *, jobs: int = 1, address: Optional[str] = None, threads: int = 1,
                  gpu: bool = False):
    """``local`` (``jobs`` processes) or ``ray`` (``jobs`` CPUs for a cluster it starts)."""
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if address is not None and name != "ray":
        raise ValueError("--address only applies to --executor ray")
    if name == "local":
        return LocalExecutor(jobs)
    return RayExecutor(address, threads=threads, gpu=gpu, num_cpus=jobs * threads)
