"""The library never depends on the evaluation suite: importing every module of ``bsbr`` and
``bsbr_extras`` loads nothing from ``evals`` (nor the ``cli`` that imports it), and no import
statement in them names it. And the suite's layout holds: no module over 500 lines, no function
over 60 (a Typer command's body), no import cycle among the ``evals`` modules, the foundation
modules import no command, and every ``evals`` package's ``__init__`` says what it owns."""

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


def test_the_convert_example_command_is_served_by_whoever_registers_it(tmp_path):
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


# ----------------------------------------------------------------------------- the suite's layout
# evals/ is one package per command (guard/, analyze/, recall/, convert/; compare and forms are one
# module each) over flat foundation modules; every file short enough to hold in one's head.

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# No exceptions: issue 22 split gau_mixed_chunk and linear_attention, and _banded_blocked lost its
# per-segment attention to _blocks_attention.
LONG_FUNCTIONS_ALLOWED: set = set()
SIZED = ("bsbr", "bsbr_extras", "evals")
FOUNDATION = ("results", "registry", "grid", "executors", "options", "train", "measure", "workload", "figures",
              "errors", "output.paths", "output.files", "output.claims", "locking", "machine", "resume", "interrupts",
              "console")
COMMANDS = ("guard", "analyze", "recall", "convert", "compare", "forms", "lm", "frontier", "models", "check")


def _sized_files(root: Path = ROOT) -> list:
    return [root / "cli.py"] + sorted(p for pkg in SIZED for p in (root / pkg).rglob("*.py"))


def long_modules(root: Path = ROOT) -> list:
    """``path: lines`` for every module of the library, the suite and ``cli.py`` over the limit."""
    out = []
    for p in _sized_files(root):
        n = len(p.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{p.relative_to(root).as_posix()}: {n} lines")
    return out


def _typer_command(node) -> bool:
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
               for d in node.decorator_list)


def long_functions(root: Path = ROOT) -> list:
    """``path: name: lines`` for every function over the limit, from its ``def`` line to its last
    (decorators aside); a Typer command (``@app.command``) counts from its body, since its
    signature is its option table."""
    out = []
    for p in _sized_files(root):
        rel = p.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(p.read_text(), filename=rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.body[0].lineno if _typer_command(node) else node.lineno
                n = node.end_lineno - start + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    out.append(f"{rel}: {node.name}: {n} lines")
    return out


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def suite_import_graph(root: Path = ROOT) -> dict:
    """Module -> the ``evals`` modules it imports, at module level or inside a function, read from
    the source (nothing is imported). ``from evals.recall import report`` is an edge to the
    submodule ``evals.recall.report``; ``from evals.recall import run_recall`` one to the package
    ``evals.recall`` (its ``__init__``). A submodule's parent package is imported before it
    anyway, so that is not an edge."""
    return import_graph(root, ("evals",))


def import_graph(root: Path, packages: tuple) -> dict:
    """:func:`suite_import_graph` over the modules of ``packages``."""
    files = {_module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{base}.{a.name}" in files:
                        edges.add(f"{base}.{a.name}")
                    elif base in files:
                        edges.add(base)
        edges.discard(name)
        graph[name] = sorted(edges)
    return graph


def find_cycle(graph: dict) -> list:
    """One import cycle as ``[a, b, ..., a]``, or ``[]`` when there is none."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph.get(m, ()):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_module_is_over_the_line_limit():
    assert long_modules() == [], f"split these along a seam (at most {MAX_MODULE_LINES} lines)"


def test_no_function_is_over_the_line_limit():
    assert long_functions() == [], f"split these (at most {MAX_FUNCTION_LINES} lines; a Typer command's body)"


def test_the_suite_has_no_import_cycle():
    graph = suite_import_graph()
    assert {"evals.analyze.report", "evals.convert.command", "evals.guard.runner", "evals.figures"} <= set(graph)
    assert "evals.analyze.plots" in graph["evals.analyze.report"]  # a module-level edge is seen ...
    assert "evals.recall.plots" in graph["evals.recall.report"]    # ... and one inside a function
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_library_has_no_import_cycle():
    # a function-level import counts: a circle broken by a lazy import is still a circle
    graph = import_graph(ROOT, LIBRARY)
    assert {"bsbr.decode", "bsbr.ops"} <= set(graph["bsbr.attention"])
    assert "bsbr.mixer" in graph["bsbr_extras.linear"]
    assert "bsbr.attention" not in graph["bsbr.decode"]  # the layer hands itself to its decoding
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_foundation_imports_no_command():
    graph = suite_import_graph()
    for name in FOUNDATION:
        assert f"evals.{name}" in graph, f"evals/{name}.py is gone: update FOUNDATION"
        commands = [m for m in graph[f"evals.{name}"] if m.split(".")[1] in COMMANDS]
        assert commands == [], f"the foundation module evals.{name} imports the command(s) {commands}"


def test_every_suite_package_says_what_it_owns():
    folders = sorted({p.parent for p in (ROOT / "evals").rglob("*.py")})
    assert {f.relative_to(ROOT).as_posix() for f in folders} >= {"evals", "evals/guard", "evals/analyze",
                                                                   "evals/recall", "evals/convert"}
    for folder in folders:
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder.relative_to(ROOT)} has no __init__.py"
        assert (ast.get_docstring(ast.parse(init.read_text())) or "").strip(), \
            f"{init.relative_to(ROOT)} has no docstring saying what the package owns"


@pytest.mark.parametrize("files, cycle", [
    ({"a": "from evals import b\n", "b": "def f():\n    from evals.a import x\n"}, True),
    ({"a": "from evals import b\n", "b": "import evals.c\n", "c": "from evals.a import x\n"}, True),
    ({"a": "from evals import b\n", "b": "x = 1\n"}, False),
    ({"p/__init__.py": "from evals.p.q import y\n", "p/q": "from evals.p import r\n", "p/r": "x = 1\n"}, False),
    ({"p/__init__.py": "from .q import y\n", "p/q": "from . import r\n", "p/r": "from evals.p.q import y\n"}, True),
])
def test_the_cycle_check_sees_every_spelling(tmp_path, files, cycle):
    for name, code in files.items():
        path = tmp_path / "evals" / (name if name.endswith(".py") else f"{name}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    assert bool(find_cycle(suite_import_graph(tmp_path))) is cycle, suite_import_graph(tmp_path)


# ----------------------------------------------------------------------------- one shape, no facades

MAX_PARAMETERS = 8  # a function that needs more takes an options object (evals.*.command.Options)


def _parameters(node) -> int:
    a = node.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
    return n - bool(a.args and a.args[0].arg in ("self", "cls"))


def wide_functions(root: Path = ROOT) -> list:
    """``path: name: n`` for every function of ``evals`` and ``cli.py`` with more than
    ``MAX_PARAMETERS`` parameters (``self``/``cls`` aside; ``*args`` and ``**kw`` count one each)."""
    out = []
    for p in [root / "cli.py"] + sorted((root / "evals").rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(p.read_text(), filename=rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _parameters(node) > MAX_PARAMETERS:
                out.append(f"{rel}: {node.name}: {_parameters(node)}")
    return out


def test_no_function_of_the_suite_takes_more_than_eight_parameters():
    assert wide_functions() == [], f"hand an options object down instead (at most {MAX_PARAMETERS} parameters)"


def test_the_parameter_count_sees_every_kind(tmp_path):
    (tmp_path / "evals").mkdir()
    (tmp_path / "cli.py").write_text("def ok(a, b, *, c=1, **kw):\n    pass\n")
    (tmp_path / "evals" / "m.py").write_text("class C:\n    def f(self, a, b, c, d, e, f, g, *rest, h=1):\n"
                                            "        pass\n")
    assert wide_functions(tmp_path) == ["evals/m.py: f: 9"]


def package_inits_that_import(root: Path = ROOT) -> list:
    """Every ``evals`` package ``__init__`` that imports anything: a package of the suite says what
    it owns and imports nothing, so importing one of its modules never loads the others (a facade
    that re-exported its submodules made ``evals.recall.report`` load ``launch``, which loads
    ``report``: a circle through the package)."""
    out = []
    for init in sorted((root / "evals").rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        if imports:
            out.append(init.relative_to(root).as_posix())
    return out


def test_no_package_of_the_suite_is_a_facade():
    assert package_inits_that_import() == [], "import each name from the module that defines it"


def test_the_facade_check_sees_a_re_export(tmp_path):
    (tmp_path / "evals" / "recall").mkdir(parents=True)
    (tmp_path / "evals" / "__init__.py").write_text('"""x"""\n')
    (tmp_path / "evals" / "recall" / "__init__.py").write_text('"""x"""\nfrom evals.recall.launch import run\n')
    assert package_inits_that_import(tmp_path) == ["evals/recall/__init__.py"]


def library_self_imports(root: Path = ROOT) -> list:
    """Modules of ``bsbr`` / ``bsbr_extras`` that import their own package's namespace
    (``from bsbr import X`` inside ``bsbr``): the package ``__init__`` exposes the public API by
    importing its modules, so a module importing the package back would be a circle through it."""
    out = []
    for pkg in LIBRARY:
        for p in sorted((root / pkg).rglob("*.py")):
            if p.name == "__init__.py":
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Import) and any(a.name == pkg for a in node.names):
                    out.append(p.relative_to(root).as_posix())
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == pkg:
                    out.append(p.relative_to(root).as_posix())
                elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
                    # ``from . import x`` is fine for a submodule x; anything else comes from the package
                    if any(not ((p.parent / f"{a.name}.py").is_file() or (p.parent / a.name).is_dir())
                           for a in node.names):
                        out.append(p.relative_to(root).as_posix())
    return out


def test_no_library_module_imports_its_package_back():
    assert library_self_imports() == []
