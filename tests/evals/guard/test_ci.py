"""The guard's ready workflow (.github/workflows/guard.yml), as far as this machine allows: it
parses, runs on pull requests, and each command it runs works here (the guard on findings we set)."""

from evals.output import claims
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[3]
WORKFLOW = ROOT / ".github" / "workflows" / "guard.yml"


@pytest.fixture(scope="module")
def flow():
    return yaml.safe_load(WORKFLOW.read_text())


def steps(flow) -> dict:
    (job,) = flow["jobs"].values()
    return {s.get("name", s.get("uses")): s for s in job["steps"]}


def test_the_workflow_parses_and_runs_on_pull_requests(flow):
    assert "pull_request" in flow[True]  # YAML 1.1 reads the key "on" as True
    s = steps(flow)
    checkout = next(v for k, v in s.items() if k.startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # the merge base must be in the clone
    assert "pip install -q -e ." in s["install"]["run"]
    assert s["keep the verdicts"]["if"] == "always()"


def git(root, *args):
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_the_merge_base_step_names_the_fork_point(flow, tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for msg in ("one", "two"):
        git(repo, "commit", "-q", "--allow-empty", "-m", msg)
    fork = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "feature")
    git(repo, "commit", "-q", "--allow-empty", "-m", "pr")
    git(repo, "checkout", "-q", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main moves on")
    git(repo, "update-ref", "refs/remotes/origin/main", "main")
    git(repo, "checkout", "-q", "feature")
    out = tmp_path / "github_output"
    run = steps(flow)["merge base"]["run"]
    subprocess.run(["bash", "-c", run], cwd=repo, check=True, timeout=60,
                   env=dict(os.environ, GITHUB_BASE_REF="main", GITHUB_OUTPUT=str(out)))
    assert out.read_text().strip() == f"sha={fork}"


def test_the_guard_step_writes_its_verdicts(flow, tmp_path, monkeypatch):
    from cli import app
    from evals.guard import baseline as bl
    from evals.guard import runner
    from tests.evals.guard.test_command import fake_against, tiny_rows

    monkeypatch.chdir(tmp_path)
    Path("results/baselines").mkdir(parents=True)  # a write never creates its folder (evals.claims.locked)
    bl.write_baseline(Path("results/baselines/cpu.csv"), tiny_rows().assign(status="ok", flops=1, params=1),
                      start="t", source="test")
    monkeypatch.setattr(runner, "against", fake_against())
    run = steps(flow)["guard"]["run"].replace("${{ steps.base.outputs.sha }}", "good")
    argv = shlex.split(run)
    assert argv[:2] == ["bsbr-eval", "guard"]
    summary = tmp_path / "step_summary.md"
    r = CliRunner().invoke(app, argv[1:], env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert r.exit_code == 0, r.output
    upload = steps(flow)["keep the verdicts"]["with"]["path"].split()
    assert all((tmp_path / p).is_file() for p in upload) and "PASS" in summary.read_text()
