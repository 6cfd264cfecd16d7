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
