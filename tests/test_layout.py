"""The package's shape: no import cycle between its modules (imports inside functions included), and reading a
run or analysing it imports no torch."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import attentropy
from synthetic import write_synthetic_run

PACKAGE = Path(attentropy.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (module level or inside functions), except under
    `if TYPE_CHECKING:` (annotations only, never run)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import stats`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    assert graph["attentropy.instrument"] and graph["attentropy.cli"]  # the walk sees imports at all
    state: dict[str, str] = {}

    def cycle_from(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = cycle_from(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = cycle_from(start, [start])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walk_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle test can fail: two modules importing each other inside functions are found."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                                  "def g():\n    from . import a\n")
    (package / "c.py").write_text("from . import b\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    assert imports_of(package / "a.py", modules) == {"pkg.b"}
    assert imports_of(package / "b.py", modules) == {"pkg", "pkg.a"}  # not c: annotations only
    assert imports_of(package / "c.py", modules) == {"pkg", "pkg.b"}


def test_reading_and_analysing_a_run_imports_no_torch(tmp_path):
    run = write_synthetic_run(tmp_path / "run", benchmark="facts", n_questions=12)
    code = ("import sys, attentropy\n"
            f"run = attentropy.load_run({str(run)!r})\n"
            "assert len(run.samples) == 12 and run.attn('entropy').shape[0] == len(run.tokens)\n"
            "from attentropy import stats, report, instrument, evaluation\n"
            f"from attentropy.answers import load_answers\nload_answers([{str(run)!r}])\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not loaded, loaded[:5]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_readme_layout_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    on_disk = {p.name for p in PACKAGE.rglob("*.py")} - {"__init__.py"}
    named = set(re.findall(r"`([a-z0-9_]+\.py)`", layout)) - {"__init__.py"}
    assert on_disk - named == set(), "modules missing from the README's layout"
    assert named - on_disk == set(), "the README's layout names modules that do not exist"


def test_every_module_opens_with_a_docstring_and_stays_small():
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert ast.get_docstring(ast.parse(source)), f"{path.name} has no opening docstring naming its noun"
        assert source.count("\n") <= 600, f"{path.name} has {source.count(chr(10))} lines"


def test_every_name_imported_from_the_package_exists():
    """Imports inside functions run only when the function does: a name that moved must not be left behind in one."""
    import importlib

    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = importlib.import_module(".".join(base + ([node.module] if node.module else [])))
                for alias in node.names:
                    if not hasattr(target, alias.name):
                        try:
                            importlib.import_module(f"{target.__name__}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.name}: {target.__name__}.{alias.name}")
    assert not missing, missing


def test_the_distribution_holds_every_package():
    """A plain `pip install .` (not editable) installs the packages pyproject.toml names: every folder of the
    package (attentropy.detectors too) must be among them."""
    import tomllib

    from setuptools import find_packages

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    listed = (set(config) if isinstance(config, list)
              else set(find_packages(str(PACKAGE.parent), include=config["find"]["include"])))
    assert listed == {module_name(path) for path in PACKAGE.rglob("__init__.py")}
