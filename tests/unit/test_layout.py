"""The package's shape: no import cycles, and the shared library never imports the steps.

Walks every module's imports with ``ast`` (top-level and function-local alike, since a lazy import
is still a dependency), so it needs none of the heavy libraries the modules import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import airloop

PACKAGE = Path(airloop.__file__).parent
# The Airflow layer and the applications on top may import steps; nothing below them may.
ABOVE_STEPS = (
    "airloop.operators",
    "airloop.triggers",
    "airloop.loops",
    "airloop.embedded",
    "airloop.cli",
    "airloop.plugins",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _is_package_init(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycles() -> None:
    # A package's __init__ is imported before its submodules anyway: edges to one are not cycles of code.
    graph = {m: {t for t in edges if not _is_package_init(t)} for m, edges in _graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], f"import cycles: {cycles}"


def test_library_never_imports_steps() -> None:
    offenders = {
        module: sorted(t for t in edges if t.startswith("airloop.steps"))
        for module, edges in _graph().items()
        if not module.startswith(("airloop.steps", *ABOVE_STEPS))
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_steps_hold_only_entry_point_packages() -> None:
    """``steps/`` is grouped in loop order: only the stage packages, no loose modules."""
    steps = PACKAGE / "steps"
    loose = sorted(p.name for p in steps.glob("*.py") if p.name != "__init__.py")
    stages = sorted(p.name for p in steps.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert loose == []
    assert stages == ["conversion", "data", "drift", "rollout", "training"]
