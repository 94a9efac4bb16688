"""The package's shape, checked from its source: imports flow one way (no cycle, function-level imports
included), nothing but `__main__` imports the CLI, recipes are leaves that only the registry imports, and
every recipe's run() is a short main over the shared parts."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The tunelab modules that module `name` imports anywhere in its file (a `from package import x`
    counts as importing the submodule x when there is one), with the packages above each (but those
    above `name` itself, which Python has imported first)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}  # already imported before `name`
    out = set()
    for target in found:
        while target and target.startswith("tunelab"):
            if target in MODULES and target != name and target not in ancestors:
                out.add(target)
            target = target.rpartition(".")[0]
    return out


GRAPH = {name: imports(name) for name in MODULES}


def test_no_import_cycle_among_the_modules():
    """A depth-first search for a back edge; the cycle, if any, is named in the failure."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(GRAPH):
        if start not in state:
            cycle = visit(start)
            assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: a two-module cycle is found and reported."""
    assert "tunelab.errors" in GRAPH["tunelab.config"]
    GRAPH["tunelab.errors"].add("tunelab.config")  # config imports errors; now errors would import config
    try:
        with pytest.raises(AssertionError, match=r"tunelab.config -> .*tunelab.errors -> tunelab.config"):
            test_no_import_cycle_among_the_modules()
    finally:
        GRAPH["tunelab.errors"].discard("tunelab.config")


def test_only_main_imports_the_cli():
    assert sorted(name for name, targets in GRAPH.items() if "tunelab.cli" in targets) == ["tunelab.__main__"]


def test_recipes_are_leaves_that_only_the_registry_names():
    recipes = {name for name in MODULES if name.startswith("tunelab.recipes.")}
    assert recipes == {f"tunelab.recipes.{m}" for m in importlib.import_module("tunelab.recipes").METHODS}
    importers = {name: targets & recipes for name, targets in GRAPH.items() if targets & recipes}
    assert importers == {}


def test_evaluation_and_generation_live_in_their_packages():
    assert not (PACKAGE / "evaluate.py").exists() and not (PACKAGE / "metrics.py").exists()
    assert not (PACKAGE / "inference.py").exists()
    assert {"metrics", "files", "heldout", "classifier"} <= {p.stem for p in (PACKAGE / "eval").glob("*.py")}
    assert (PACKAGE / "experiments" / "compare.py").exists()  # an application over eval, not part of it


@pytest.mark.parametrize("method", ["sft", "classify", "task", "reward", "dpo", "rlhf", "grpo"])
def test_every_recipe_run_is_at_most_25_statements(method):
    """A short main over the shared parts; counted in statements, since the formatter lays one call's
    arguments out over as many lines as it likes."""
    tree = ast.parse(MODULES[f"tunelab.recipes.{method}"].read_text(encoding="utf-8"))
    [run] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    statements = {n.lineno for n in ast.walk(run) if isinstance(n, ast.stmt)}
    assert len(statements) <= 25
    module = importlib.import_module(f"tunelab.recipes.{method}")
    assert callable(module.run)


# The packages from the top down, as docs/architecture.md draws them: a module imports only from its own
# package or from a layer below its own (packages on one layer do not import each other).
LAYERS = (
    ("__main__",),
    ("cli",),
    ("serve",),
    ("jobs", "dashboard"),
    ("experiments", "export"),
    ("recipes",),
    ("train",),
    ("eval",),
    ("infer",),
    ("losses",),
    ("config",),
    ("data",),
    ("models",),
    ("methods", "precision"),
    ("rundir", "ids"),
    ("fs", "errors", "progress", "launch", "allocator"),
)
LAYER = {package: depth for depth, packages in enumerate(LAYERS) for package in packages}


def package_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "tunelab"


def upward_imports() -> list[str]:
    found = []
    for name, targets in GRAPH.items():
        for target in targets:
            here, there = package_of(name), package_of(target)
            if "tunelab" in (here, there) or here == there:
                continue
            if LAYER[there] <= LAYER[here]:
                found.append(f"{name} -> {target} ({here} is not above {there})")
    return sorted(found)


def test_every_package_has_its_layer():
    assert {package_of(name) for name in MODULES} - {"tunelab"} == set(LAYER)


def test_imports_only_go_down_the_layers():
    assert upward_imports() == []


def test_the_layer_check_finds_an_upward_import():
    """The check above can fail: a model loader importing the training loop is named."""
    GRAPH["tunelab.models.load"].add("tunelab.train.loop")
    try:
        assert upward_imports() == ["tunelab.models.load -> tunelab.train.loop (models is not above train)"]
    finally:
        GRAPH["tunelab.models.load"].discard("tunelab.train.loop")
