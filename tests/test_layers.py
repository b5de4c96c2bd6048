"""The floor plan holds: imports point down the layers (docs/architecture.md), no module imports
itself back through others, and modules stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "worker"
SHARED = {"errors", "model", "jobparts", "logs", "redact", "budget", "__init__", "__main__"}
# Each layer and the layers it may import (besides the shared ground and itself).
MAY_IMPORT = {
    "jobs": set(),
    "enos": set(),
    "store": set(),
    "sim": {"enos"},
    "core": {"jobs", "enos"},
    "report": {"core", "jobs", "enos", "store"},
    "app": {"report", "core", "jobs", "enos", "store"},
    "cli": {"app", "report", "core", "sim", "jobs", "enos", "store"},
}
STATE_MACHINES = {"core/decide.py", "core/batching.py"}
MAX_LINES = 450


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The worker modules a file imports at run time (not under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("worker"):
            base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("worker"))
    return found


MODULES = {_module(path): path for path in sorted(ROOT.rglob("*.py"))}
GRAPH = {
    name: {other for other in _imports(path) if other in MODULES and other != name}
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    """A module imports the shared ground, its own layer, and the layers below it only."""
    layer = _layer(module)
    if layer in SHARED:
        allowed = SHARED if module != "worker.__main__" else SHARED | {"cli"}
    else:
        allowed = SHARED | MAY_IMPORT[layer] | {layer}
    wrong = sorted(other for other in GRAPH[module] if _layer(other) not in allowed)
    assert not wrong, f"{module} ({layer}) imports {wrong}"


def test_no_import_cycles() -> None:
    """No module reaches itself through the modules it imports (packages excepted: a package's
    __init__ only documents it)."""
    edges = {m: {o for o in deps if MODULES[o].name != "__init__.py"} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(edges[module]):
            if state.get(other) == 1:
                cycle = [*path[path.index(other) :], other] if other in path else [module, other]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path: Path) -> None:
    """No module over MAX_LINES lines but the two state machines (one rule set each)."""
    relative = str(path.relative_to(ROOT))
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert relative in STATE_MACHINES or lines <= MAX_LINES, f"{relative}: {lines} lines"
