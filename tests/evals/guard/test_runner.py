"""The A/B runner's handling of git and of its workers, on a throwaway repository.

The repository holds a copy of this tree's code in four commits: ``good``, ``broken`` (``bsbr``
raises on import), ``old-harness`` (models fine, its ``evals/measure.py`` raises on import: the
workers must time it with the working tree's harness, never its own), then ``fixed`` at HEAD. Side A is materialised from it;
side B is the throwaway checkout itself, so nothing here touches the project's own repository.
"""

import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from evals.guard import runner as ab
from evals.guard.findings import AB_TIME_METRIC, failures
from evals.guard.rule import CHANGED, REGRESSION

TREE = Path(__file__).resolve().parents[3]
# the old layout's flat modules, and the modules it did not have yet (results.py's parts, figures)
OLD_ONLY = ("guard", "regress", "ab", "ab_worker", "regress_power", "analysis", "plots", "report",
            "convert_experiment")
NEW_ONLY = ("errors", "locking", "machine", "resume", "figures")
NEW_PACKAGES = ("output",)  # the output layer, a package since results.py's files.py moved into it


def git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for pkg in ("bsbr", "bsbr_extras", "evals"):
        shutil.copytree(TREE / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "good")
    git(root, "tag", "good")

    def tag_failing_import(module: Path, why: str, tag: str) -> None:
        """Commit ``module`` raising ImportError(why) as ``tag``, then restore it in the tree."""
        text = module.read_text()
        module.write_text(f'raise ImportError("{why}")\n' + text)
        git(root, "commit", "-qam", tag)
        git(root, "tag", tag)
        module.write_text(text)

    tag_failing_import(root / "bsbr" / "__init__.py", "broken on purpose", "broken")
    tag_failing_import(root / "evals" / "measure.py", "an older harness", "old-harness")
    # a ref from before the guard moved into evals/guard/, before results.py was split and before
    # the commands moved into packages: flat modules under the old names, which must never be
    # imported (the workers install the working tree's harness instead), and none of the new ones
    for folder in ("guard", "analyze", "convert"):
        shutil.rmtree(root / "evals" / folder)
    for name in OLD_ONLY:
        (root / "evals" / f"{name}.py").write_text(f'raise ImportError("the old {name}.py was imported")\n')
    for name in NEW_ONLY:
        (root / "evals" / f"{name}.py").unlink()
    for name in NEW_PACKAGES:
        shutil.rmtree(root / "evals" / name)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "old layout")
    git(root, "tag", "old-layout")
    git(root, "rm", "-q", *(f"evals/{n}.py" for n in OLD_ONLY))
    for folder in ("guard", "analyze", "convert"):
        shutil.copytree(TREE / "evals" / folder, root / "evals" / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in NEW_ONLY:
        shutil.copy(TREE / "evals" / f"{name}.py", root / "evals" / f"{name}.py")
    for name in NEW_PACKAGES:
        shutil.copytree(TREE / "evals" / name, root / "evals" / name, ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "fixed")
    return root


def worktrees(root) -> int:
    return git(root, "worktree", "list", "--porcelain").count("worktree ")


@pytest.fixture(scope="module")
def rows():
    """Three tiny committed configurations with their exact metrics, counted by the harness."""
    from evals.grid import GridSpec, expand_grid
    from evals.measure import count_flops
    from evals.workload import build_workload
    from evals.registry import ModelConfig
    from evals.guard.timing import steady_memory

    cfg = ModelConfig(vocab_size=64, hidden_dim=32, num_layers=1, num_heads=2, ff_dim=64, chunk_size=16)
    cases = expand_grid(["BSBR"], [64], modes=["forward", "decode"], spec=GridSpec(config=cfg))
    cases += expand_grid(["Standard"], [64], modes=["forward"], spec=GridSpec(config=cfg))
    out = []
    for c in cases:
        w = build_workload(c)
        mb, method = steady_memory(w, "cpu", 1)
        out.append(dict(c.fields(), threads=1, status="ok", params=w.params, peak_memory_mb=mb, memory_method=method,
                        flops=round(count_flops(w.fn, w.setup) / w.tokens_per_call)))
    return pd.DataFrame(out)


def test_an_unknown_ref_is_one_clear_error_and_leaves_nothing(repo):
    with pytest.raises(ab.ABError, match="no commit named 'nope'"):
        with ab.ref_worktree("nope", repo):
            pass
    with pytest.raises(ab.ABError, match="not a git ref"):
        ab.resolve_ref("--help", repo)
    assert worktrees(repo) == 1


def test_not_a_checkout_is_one_clear_error(tmp_path):
    with pytest.raises(ab.ABError, match="needs a git checkout"):
        ab.repo_root(tmp_path)


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_the_ref_worktree_is_removed_whatever_happens(repo, stop):
    with pytest.raises(stop):
        with ab.ref_worktree("good", repo) as (path, sha):
            assert sha == git(repo, "rev-parse", "good")
            assert (path / "bsbr" / "__init__.py").read_text() == (repo / "bsbr" / "__init__.py").read_text()
            assert worktrees(repo) == 2
            raise stop()
    assert not path.exists() and not path.parent.exists()
    assert worktrees(repo) == 1


def test_a_ref_whose_code_cannot_import_names_the_ref(repo):
    with ab.ref_worktree("broken", repo) as (path, sha):
        with pytest.raises(ab.ABError) as err:
            with ab.workers(path, repo, a_what=f"ref broken ({sha[:12]})"):
                pass
    msg = str(err.value)
    assert msg.startswith(f"ref broken ({sha[:12]}): its code cannot be imported")
    assert "broken on purpose" in msg and "\n" not in msg
    assert worktrees(repo) == 1


def test_dirty_tree_own_harness_and_injection_on_side_b_only(repo, rows, monkeypatch):
    # The variable is set in the parent: workers must not read it (side A would be slowed too).
    monkeypatch.setenv("BSBR_EVAL_INJECT_SLOWDOWN", "BSBR=3")
    assert ab.tree_state(repo)["dirty"] is False
    readme = repo / "bsbr" / "__init__.py"
    text = readme.read_text()
    readme.write_text(text + "\n# an uncommitted change\n")
    try:
        state = ab.tree_state(repo)
        assert state["dirty"] is True and state["sha"] == git(repo, "rev-parse", "HEAD")
        done = ab.against("old-harness", rows, ab.ABPlan(rounds=8, threshold=0.2, alpha=0.01, inject={"Standard": 3.0}),
                          root=repo, b_tree=repo)
    finally:
        readme.write_text(text)
    assert "+ uncommitted changes (dirty)" in done.sides() and "injected into B: Standard=3" in done.sides()
    f = done.result.findings
    assert not (f["verdict"] == CHANGED).any(), f[f.verdict == CHANGED]  # exact metrics reproduce
    t = f[f.metric == AB_TIME_METRIC].set_index("config")
    assert t.loc["Standard forward n=64", "verdict"] == REGRESSION and t.loc["Standard forward n=64", "change"] > 1
    assert set(failures(f)["model"]) == {"Standard"}  # BSBR: not injected on either side
    assert worktrees(repo) == 1


def test_cli_self_test_exit_code_and_report(tmp_path, rows, monkeypatch):
    # The CLI's part of --self-test, on findings we set: every model caught -> 0; one group
    # missed -> 1, naming it. (The measuring itself is tested above on the throwaway repo.)
    from typer.testing import CliRunner

    from cli import app
    from evals.guard.findings import ABResult, ab_findings

    base = tmp_path / "base.csv"
    rows.to_csv(base, index=False)  # a baseline: configurations and exact metrics, nothing timed
    seen = {}

    def fake_against(ref, rows, plan, *, findings_verdict, **rest):
        kw = dict(rounds=plan.rounds, threshold=plan.threshold, alpha=plan.alpha, inject=plan.inject)
        seen.update(kw, ref=ref, exact=plan.exact)
        built = {s: [dict(status="ok", error="") for _ in range(len(rows))] for s in "AB"}
        prs = {i: ([1.0] * 8, [2.0 if findings_verdict(i) else 1.0] * 8) for i in range(len(rows))}
        f = ab_findings(rows, built, prs, threshold=kw["threshold"], alpha=kw["alpha"])
        return ab.Against(ABResult(f, prs, []), ref, "f" * 40, dict(sha="e" * 40, dirty=True), kw["inject"],
                          kw["rounds"], kw["threshold"], kw["alpha"])

    for slow, code, word in ((lambda i: True, 0, "SELF-TEST PASS"),
                             (lambda i: i != 1, 1, "missed: BSBR model decode")):
        monkeypatch.setattr(ab, "against", lambda ref, rows, plan, slow=slow, **kw: fake_against(
            ref, rows, plan, findings_verdict=slow, **kw))
        r = CliRunner().invoke(app, ["regress", "--baseline", str(base), "--against", "good", "--self-test", "1.5",
                                     "--rounds", "8"])
        assert r.exit_code == code, r.output
        assert word in r.output and "uncommitted changes (dirty)" in r.output
    assert seen["inject"] == {m: 1.5 for m in dict.fromkeys(rows["model"])}  # every model of the baseline
    assert seen["exact"] is False and seen["rounds"] == 8


def test_a_ref_from_before_the_guard_package_builds_with_the_working_trees_guard(repo, rows):
    # old-layout has evals/guard.py, evals/regress.py, ... that raise on import; the A side must load
    # its models from that tree and the guard (case_from_row, exact metrics) from the working tree.
    with ab.ref_worktree("old-layout", repo) as (path, sha):
        assert (path / "evals" / "guard.py").is_file() and not (path / "evals" / "guard").exists()
        assert not (path / "evals" / "errors.py").exists() and (path / "evals" / "analysis.py").is_file()
        with ab.workers(path, repo, a_what="ref old-layout") as ws:
            session = ab.open_session(ws, rows, threads=1, inject={}, exact=False)
            assert [c["status"] for c in session.built["A"]] == ["ok"] * len(rows), session.built["A"]
            assert session.testable() == list(range(len(rows)))
            assert ws["A"].info["registry"].startswith(str(path))
    assert worktrees(repo) == 1


SIGTERM_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from evals.guard import runner
with runner.ref_worktree("good", Path(sys.argv[1])) as (path, sha):
    print(path, flush=True)
    time.sleep(60)
"""


def test_sigterm_during_a_check_removes_the_worktree_as_ctrl_c_does(repo):
    # what timeout(1), CI runners and schedulers send: the worktree must go, and its record too
    import signal
    import sys

    child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(repo), str(TREE)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        path = Path(child.stdout.readline().strip())
        assert path.is_dir() and worktrees(repo) == 2
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
    assert not path.exists() and not path.parent.exists()
    assert worktrees(repo) == 1


def test_sigterm_handler_is_restored_after_the_worktree_is_gone(repo):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with ab.ref_worktree("good", repo):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
