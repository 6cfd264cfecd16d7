"""Bring your own architecture: a mixer named by import path or declared as an installed
package's entry point goes through every command, gets the conformance check, and bad input
naming it is one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from evals.registry import MODEL_NAMES, REGISTRY, resolve_model, select

ROOT = Path(__file__).resolve().parents[2]
MINE = "tests.evals.check.plugin_mixers:MyStandard"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line(res) -> str:
    text = res.output.strip()
    assert res.exit_code == 2 and len(text.splitlines()) == 1 and text.startswith("error:"), res.output
    assert "Traceback" not in text
    return text


# ----------------------------------------------------------------------------- the registry


def test_an_import_path_registers_under_itself_and_builds_in_the_shell():
    from tests.conftest import TINY

    spec = resolve_model(MINE)
    assert spec.name == MINE and spec.source == "import path" and REGISTRY[MINE] is spec
    model = spec.build(TINY)
    assert type(model.layers[0].mixer).__name__ == "MyStandard"
    assert spec.modes == ("forward", "train", "decode") and spec.forms == ("parallel",)


def test_a_path_to_a_built_ins_own_class_is_that_built_in():
    assert resolve_model("bsbr_extras.standard:StandardAttention").name == "Standard"


@pytest.mark.parametrize("path, says", [
    ("nowhere.at_all:Mixer", "cannot import nowhere.at_all"),
    ("tests.evals.check.plugin_mixers:Absent", "tests.evals.check.plugin_mixers has no Absent"),
    ("evals.registry:ModelConfig", "is not a token mixer"),
    ("tests.evals.check.plugin_mixers:", "is not an import path"),
    (":Mixer", "is not an import path"),
    ("NotAModel", "unknown model 'NotAModel'; valid: BSBR, Standard"),
])
def test_every_bad_model_name_is_one_line_on_every_command_that_takes_models(path, says, tmp_path):
    with pytest.raises(ValueError, match=says):
        select("--models", [path])
    for args in (["compare", "--output", tmp_path / "c.csv"], ["forms", "--output", tmp_path / "f.csv"],
                 ["recall", "--output-dir", tmp_path / "r"], ["lm", "--output-dir", tmp_path / "l"]):
        line = _one_line(_cli(*args, "--models", path))
        assert line.startswith("error: --models:") and says in line, line
    assert _one_line(_cli("check", path)).startswith("error: ARCH:")
    assert list(tmp_path.iterdir()) == [], "a refused command writes nothing"


# ----------------------------------------------------------------------------- through the commands


def test_compare_then_analyze_take_a_plugin_beside_a_built_in(tmp_path):
    out = tmp_path / "run.csv"
    res = _cli("compare", "--models", MINE, "Standard", "--seq-lengths", "16", "32", "--hidden-dim", "32",
               "--num-heads", "2", "--num-layers", "1", "--ff-dim", "32", "--vocab-size", "64", "--repeats", "1",
               "--min-run-time", "0", "--output", out)
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(out)
    assert sorted(rows["model"].unique()) == sorted([MINE, "Standard"]) and (rows["status"] == "ok").all()
    # the same weights from the same seed: the plugin (a plain subclass) costs what its parent costs
    a, b = (rows[rows.model == m].sort_values("seq_len") for m in (MINE, "Standard"))
    assert list(a["flops"]) == list(b["flops"]) and list(a["params"]) == list(b["params"])
    import json

    assert MINE in json.loads(out.with_suffix(".json").read_text())["plugins"]
    res = _cli("analyze", out, "--output-dir", tmp_path / "an")
    assert res.exit_code == 0, res.output
    report = (tmp_path / "an" / "report.md").read_text()
    assert MINE in report and "Standard" in report
    assert (tmp_path / "an" / "time_ms_model.png").stat().st_size > 0


def test_a_mode_a_mixer_lacks_is_an_unsupported_row(tmp_path, monkeypatch):
    from bsbr_extras.standard import StandardAttention

    class NoCache(StandardAttention):
        init_cache = None  # no decoding: the contract's decode mode is absent

    monkeypatch.setattr(sys.modules["tests.evals.check.plugin_mixers"], "NoCache", NoCache, raising=False)
    out = tmp_path / "nc.csv"
    res = _cli("compare", "--models", "tests.evals.check.plugin_mixers:NoCache", "--modes", "forward", "decode",
               "--seq-lengths", "16", "--hidden-dim", "32", "--num-heads", "2", "--num-layers", "1", "--ff-dim", "32",
               "--vocab-size", "64", "--repeats", "1", "--min-run-time", "0", "--output", out)
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(out).set_index("mode")
    assert rows.loc["forward", "status"] == "ok" and rows.loc["decode", "status"] == "unsupported"
    assert "no init_cache" in rows.loc["decode", "error"]


# ----------------------------------------------------------------------------- the check command


def test_check_passes_a_conforming_plugin_and_fails_a_leaky_one_naming_causality():
    ok = _cli("check", MINE)
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("PASS") == 11 and "conforms" in ok.output
    leaky = _cli("check", "tests.evals.check.plugin_mixers:PeeksAhead")
    assert leaky.exit_code == 1
    fails = [line for line in leaky.output.splitlines() if line.startswith("FAIL")]
    assert any("causality" in line for line in fails), leaky.output


# ----------------------------------------------------------------------------- entry points


def _installed(tmp_path: Path, entries: dict) -> dict:
    """An environment in which a package declares ``entries`` in bsbr.architectures."""
    dist = tmp_path / "site" / "mixers_demo-1.2.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mixers-demo\nVersion: 1.2\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (dist / "entry_points.txt").write_text(f"[bsbr.architectures]\n{lines}")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]))


def _run(env, *args):
    return subprocess.run([sys.executable, "-c", "from cli import main; main()", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_an_entry_point_plugin_is_listed_with_where_it_came_from_and_runs_by_name(tmp_path):
    env = _installed(tmp_path, {"Mine": MINE})
    listed = _run(env, "models")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("| Mine |"))
    assert "entry point of mixers-demo 1.2" in row and MINE in row
    assert [line.split("|")[1].strip() for line in listed.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:8] == list(MODEL_NAMES), "built-ins first"
    checked = _run(env, "check", "mine")  # names are case-insensitive
    assert checked.returncode == 0 and "conforms" in checked.stdout, checked.stdout + checked.stderr


def test_an_entry_point_that_clashes_with_a_built_in_is_one_line(tmp_path):
    env = _installed(tmp_path, {"standard": MINE})
    res = _run(env, "compare", "--models", "Standard", "--output", tmp_path / "x.csv")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "clashes with the built-in Standard" in lines[0], res.stderr
