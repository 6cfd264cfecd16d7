"""The library never depends on the evaluation suite: importing every module of ``bsbr`` and
``bsbr_extras`` loads nothing from ``evals`` (nor the ``cli`` that imports it), and no import
statement in them names it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("bsbr", "bsbr_extras")


def _suite(name: str) -> bool:
    return name == "cli" or name == "evals" or name.startswith("evals.")


def test_importing_every_library_module_loads_no_suite_module():
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"for pkg in {LIBRARY!r}:\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert "bsbr_extras.convert_example" in loaded and "bsbr_extras.convert" in loaded
    assert [m for m in loaded if _suite(m)] == []


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for pkg in LIBRARY
                                        for p in (ROOT / pkg).rglob("*.py")))
def test_no_import_statement_in_the_library_names_the_suite(path):
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    names = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0]
    assert [n for n in names if _suite(n)] == [], f"{path} imports the evaluation suite"


def _docstrings(tree) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def suite_references(source: str) -> list:
    """Every name, attribute, import or string in ``source`` (docstrings, which are prose, aside)
    that names the suite: ``cli`` or ``evals`` as a word. A string counts: importing by name at call
    time (``importlib.import_module("cli")``) is a dependency too."""
    import re

    tree = ast.parse(source)
    prose = _docstrings(tree)
    word = re.compile(r"\b(cli|evals)\b")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, ast.alias):
            text = node.name
        elif isinstance(node, ast.ImportFrom):
            text = node.module or ""
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            text = node.value
        else:
            continue
        if word.search(text):
            found.append(text)
    return found


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for pkg in LIBRARY
                                        for p in (ROOT / pkg).rglob("*.py")))
def test_no_module_of_the_library_references_the_suite_even_by_name(path):
    assert suite_references((ROOT / path).read_text()) == [], f"{path} references the suite"


@pytest.mark.parametrize("source", [
    "import importlib\nm = importlib.import_module('cli')\n",
    "def f():\n    import evals.results\n",
    "x = __import__('evals')\n",
    "from cli import app\n",
])
def test_the_reference_check_sees_every_spelling(source):
    assert suite_references(source)


def test_the_seed_command_is_served_by_whoever_registers_it(tmp_path):
    # A stand-in for the installed project's metadata: the entry point pyproject.toml declares.
    import re

    spec = re.search(r'\[project\.entry-points\."bsbr_extras\.commands"\]\s*\n\s*convert_example\s*=\s*"([^"]+)"',
                     (ROOT / "pyproject.toml").read_text())
    assert spec, "pyproject.toml must register convert_example for the library"
    dist = tmp_path / "bsbr_suite_stub-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bsbr-suite-stub\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[bsbr_extras.commands]\nconvert_example = {spec.group(1)}\n")
    run = lambda path: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "bsbr_extras.convert_example", "--model_name", str(tmp_path / "missing"),
         "--chunk_size", "8"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path), capture_output=True,
        text=True, timeout=300)
    out = run(os.pathsep.join([str(tmp_path), str(ROOT)]))
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    # a missing local path is one line naming it (bsbr_extras.convert), through the same command
    assert out.returncode == 2 and len(lines) == 1 and "no such folder, and not a hub name" in lines[0], out.stderr
