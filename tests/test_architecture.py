"""The import graph of `beit`: no cycles, counting module-level and function-local imports alike (a function-local
import hides a cycle from Python's import machinery, not from the design). The layer contract itself is
import-linter's (pyproject.toml, `[tool.importlinter]`; `make test` runs `lint-imports`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "beit"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a package is its __init__.py)."""
    mods = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imported_modules(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The modules of `mods` that `name` imports anywhere in its file (module level, functions, classes)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in mods and t != name)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    mods = module_files(package)
    return {name: imported_modules(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_beit_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and graph["beit.train.loop"], "the graph reader found no modules or no imports"
    assert cycles(graph) == [], "import cycles among beit modules (move code to the layer it belongs to)"


@pytest.mark.parametrize("lazy", [False, True])
def test_the_cycle_check_sees_module_level_and_function_local_imports(tmp_path, lazy):
    """A two-module cycle closed by a function-local relative import, and a three-module one closed at module
    level through `from pkg import sub`, are both found; the same package without the closing import has none."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    closing = "def g():\n    from .a import h\n" if lazy else "from pkg import c\n"
    (pkg / "b.py").write_text("import os\n" + closing)
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "c.py").write_text("from pkg.sub import x\nfrom . import a\n")
    want = [["pkg.a", "pkg.b"]] if lazy else [["pkg.a", "pkg.b", "pkg.c"]]
    assert cycles(import_graph(pkg)) == want
    (pkg / "b.py").write_text("import os\n")
    assert cycles(import_graph(pkg)) == []


# ------------------------------------------------------------------------------------- function-local imports
# Only the CLI (beit/cli/, so that `beit --help` loads no torch) and the package root's lazy `create_model`,
# `create_tokenizer` and `load` may import `beit` modules inside functions; everywhere else an import sits at
# the top of its module, where the layers contract and a reader see it.
LAZY_IMPORTS_BY_DESIGN = ("beit/cli/", "beit/__init__.py")


def function_local_beit_imports(path: Path) -> list[str]:
    """`line: module` of every `beit` import inside a function of `path` (absolute or relative)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for imp in ast.walk(node):
            if isinstance(imp, ast.Import):
                names = [a.name for a in imp.names if a.name == "beit" or a.name.startswith("beit.")]
            elif isinstance(imp, ast.ImportFrom):
                module = imp.module or ""
                names = [module] if imp.level or module == "beit" or module.startswith("beit.") else []
            else:
                continue
            found += [f"{imp.lineno}: {'.' * getattr(imp, 'level', 0)}{n}" for n in names]
    return sorted(set(found))


def test_function_local_beit_imports_only_in_the_cli_and_the_package_root():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(LAZY_IMPORTS_BY_DESIGN):
            continue
        if lines := function_local_beit_imports(path):
            found[rel] = lines
    assert found == {}, f"hoist these imports to the top of their module (function-local ones hide the layers): {found}"


def test_the_local_import_check_sees_absolute_relative_and_nested_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import beit.config\nimport os\n\ndef f():\n    import json\n    from beit.hub import load\n\n"
                    "class C:\n    def g(self):\n        def h():\n            from . import x\n            import beit\n")
    assert function_local_beit_imports(path) == ["11: .", "12: beit", "6: beit.hub"]


# ----------------------------------------------------------------------------------------------- the task registry
def test_every_task_names_functions_that_exist_at_or_below_its_layer():
    """beit.tasks names its functions as strings (so `beit --help` imports none of them): each must resolve, and
    to a module the registry's layer may import (not the CLI or the experiment drivers above it)."""
    from beit.tasks import CHECKPOINT_CONFIG, LOOP, TASKS, resolve

    for spec in TASKS.values():  # a training command is a builder (+ report) for the one loop, or names its runner
        assert (spec.run is None) == (spec.build is not None), spec.name
    refs = [CHECKPOINT_CONFIG, LOOP] + [ref for spec in TASKS.values() for ref in (spec.run, spec.build, spec.report) if ref]
    for ref in refs:
        assert callable(resolve(ref)), ref
        assert not ref.startswith(("beit.cli", "beit.experiments")), f"{ref}: above beit.tasks in the layers"
    assert {"pretrain", "finetune", "linprobe", "knn", "segment", "tokenizer", "eval", "predict"} <= set(TASKS)


def test_the_cli_builds_its_task_commands_from_the_registry():
    import argparse

    from beit.cli import build_parser
    from beit.tasks import TASKS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for spec in TASKS.values():
        parser = sub.choices[spec.words[0]]
        if len(spec.words) > 1:
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[spec.words[1]]
        dests = {a.dest for a in parser._actions}
        assert {"config", "overrides", *spec.options} <= dests, (spec.name, dests)


# ----------------------------------------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 60  # a function longer than a screen is several steps that want names of their own


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' for every function or method (nested ones too) over `limit` lines, counting
    from its `def` (decorators aside) to its last line."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append((str(path.relative_to(package.parent)), node.lineno, f"{node.name} ({n} lines)"))
    return [f"{path}:{line} {what}" for path, line, what in sorted(found)]


def test_no_function_in_beit_is_longer_than_60_lines():
    assert long_functions(PACKAGE) == []


def test_the_length_check_counts_methods_and_nested_functions(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    lines = lambda n, indent: "".join(f"{indent}x{i} = {i}\n" for i in range(n))  # noqa: E731
    (pkg / "m.py").write_text("class C:\n    def method(self):\n" + lines(60, " " * 8)       # 61 lines: too long
                              + "def outer():\n    def inner():\n" + lines(59, " " * 8)     # 60 and 61 lines
                              + "    return inner\n" + "def fits():\n" + lines(59, " " * 4))  # 60 lines: fine
    assert long_functions(pkg) == ["pkg/m.py:2 method (61 lines)", "pkg/m.py:63 outer (62 lines)"]


def unresolved_beit_imports(path: Path) -> list[str]:
    """`from beit.x import y` anywhere in `path` (scripts import inside functions) whose `y` is not in `beit.x`."""
    import importlib.util

    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "beit":
            module = importlib.import_module(node.module)
            submodules = hasattr(module, "__path__")  # a package: `from pkg import sub` names a submodule
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                        and not (submodules and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    return missing


def test_every_beit_name_the_scripts_import_exists():
    """Scripts are not imported by any test: a name moved out of a module would break them silently."""
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert scripts
    assert {p.name: m for p in scripts if (m := unresolved_beit_imports(p))} == {}


def test_the_script_import_check_sees_a_moved_name(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def f():\n    from beit.train.evaluate import run_eval, run_over\n")
    assert unresolved_beit_imports(script) == ["beit.train.evaluate.run_eval"]
