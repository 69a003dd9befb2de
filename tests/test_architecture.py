"""The package's shape: subpackages in one declared order, imports pointing one way, no cycles.

Reads every module's imports with ``ast`` (nothing is imported), so a wrong arrow fails here before
it shows up as a circular import at run time. The declared order, lowest first, is the data flow:
data in -> content embeddings -> the model -> its evaluation -> its training -> serving ->
monitoring -> orchestration -> operations -> the CLI on top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "learn_tasks"

# The bottom: imported by all, importing nothing above the core (state builds on config, storage, postgres).
CORE = ("paths", "config", "schema", "storage", "processes", "postgres", "state", "artifacts", "artifact_log")
LAYERS = ("data", "ceg", "pch", "evaluation", "training", "online", "monitoring", "orchestration", "ops", "cli")
MAX_LINES = 600
# Imports of our own modules belong at module top, with two exceptions made for start-up cost: cli.py
# imports its stages inside the command functions, so `learn --help` and shell completion do not load
# torch, Feast and Airflow; dag_tasks is imported by the DAG files while the scheduler parses them, so
# the stages it calls load inside the running task.
LAZY_ALLOWED = {"learn_tasks.cli", "learn_tasks.orchestration.dag_tasks"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """0 for core modules and the package itself, 1.. in LAYERS order."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in CORE:
        return 0
    return 1 + LAYERS.index(parts[1])


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[str, int, bool]]:
    """(imported learn_tasks module, line, at module top) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = root.name
    top: set[int] = set()

    def module_level(nodes: list[ast.stmt]) -> None:
        # A module-level `if TYPE_CHECKING:` or `try:` block still counts as module top; a function or
        # class defined inside one does not.
        for node in nodes:
            top.add(id(node))
            if isinstance(node, ast.If):
                module_level(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                module_level(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])

    module_level(tree.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            # `from learn_tasks.ceg import store` imports the module learn_tasks.ceg.store
            names = [f"{base}.{a.name}" if (root.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                     or (root.parent / f"{base}.{a.name}".replace(".", "/")).is_dir() else base for a in node.names]
        else:
            continue
        for name in names:
            if name == pkg or name.startswith(pkg + "."):
                found.append((name, node.lineno, id(node) in top))
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, _, _ in imports_of(path, root):
            if target != mod and target in modules:
                edges[mod].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layering_violations(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        for target, line, at_top in imports_of(path, root):
            if target.split(".")[1:2] and target.split(".")[1] not in CORE + LAYERS:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {target} is in no declared layer")
                continue
            if layer_of(target) > layer_of(mod):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {mod} (layer {layer_of(mod)}) imports "
                           f"{target} (layer {layer_of(target)}), which sits above it")
            if not at_top and mod not in LAZY_ALLOWED:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {mod} imports {target} inside a function; "
                           "import our own modules at module top")
    return bad


# ------------------------------------------------------------------------------------------------
def test_every_subpackage_is_in_a_declared_layer() -> None:
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert found <= set(CORE) | set(LAYERS), f"not in CORE or LAYERS: {sorted(found - set(CORE) - set(LAYERS))}"


def test_imports_point_down_the_layers() -> None:
    bad = layering_violations()
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_is_over_the_size_limit() -> None:
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_entry_point_is_called_run() -> None:
    """Stage entry points are named for what they do (encode_catalogue, train_model, ...), not `run`."""
    bad = [f"{p.relative_to(PACKAGE.parent)}:{node.lineno}" for p in PACKAGE.rglob("*.py")
           for node in ast.parse(p.read_text(encoding="utf-8")).body
           if isinstance(node, ast.FunctionDef) and node.name == "run"]
    assert not bad, f"public functions named run: {bad}"


# --- the checks themselves catch what they claim to catch -----------------------------------------
def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture()
def fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "learn_tasks"
    _write(root, "__init__.py", "")
    _write(root, "config.py", "X = 1\n")
    _write(root, "data/__init__.py", "")
    _write(root, "data/readers.py", "from learn_tasks.config import X\n")
    _write(root, "ceg/__init__.py", "")
    _write(root, "ceg/store.py", "from learn_tasks.data import readers\n")
    return root


def test_a_cycle_is_found(fake_package: Path) -> None:
    assert find_cycle(graph(fake_package)) is None
    _write(fake_package, "ceg/text.py", "from learn_tasks.ceg import store\n")
    _write(fake_package, "ceg/store.py", "from learn_tasks.ceg import text\n")
    cycle = find_cycle(graph(fake_package))
    assert cycle is not None and set(cycle) == {"learn_tasks.ceg.store", "learn_tasks.ceg.text"}


def test_an_upward_import_is_found(fake_package: Path) -> None:
    assert layering_violations(fake_package) == []
    _write(fake_package, "data/readers.py", "from learn_tasks.ceg import store\n")
    bad = layering_violations(fake_package)
    assert len(bad) == 1 and "learn_tasks.ceg.store" in bad[0] and "above it" in bad[0]


def test_a_lazy_import_of_our_own_module_is_found(fake_package: Path) -> None:
    _write(fake_package, "ceg/store.py", "def f():\n    from learn_tasks.data import readers\n")
    bad = layering_violations(fake_package)
    assert len(bad) == 1 and "inside a function" in bad[0]
    # also when the function sits in a module-level `if` or `try` block
    _write(fake_package, "ceg/store.py", "try:\n    def f():\n        from learn_tasks.data import readers\n"
                                         "except ImportError:\n    pass\n")
    bad = layering_violations(fake_package)
    assert len(bad) == 1 and "inside a function" in bad[0]
    _write(fake_package, "ceg/store.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                         "    from learn_tasks.data import readers\n")
    assert layering_violations(fake_package) == []
