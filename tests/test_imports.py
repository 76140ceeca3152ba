"""The modules of src/petbreeds import each other without a cycle.

A cycle between two modules makes one of them half-initialised while the other runs, and it usually means two
jobs are tangled in one module. Imports inside functions count too: a lazy import only hides a cycle until the
function runs.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "petbreeds"
MODULES = {p.stem for p in PACKAGE.glob("*.py")}


def petbreeds_imports(path: Path) -> set[str]:
    """The petbreeds modules one file imports, anywhere in it (``import petbreeds.x``, ``from petbreeds.x import``,
    ``from petbreeds import x``, relative forms); ``__init__`` when it names the package itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: in src/petbreeds, `.` is the package
                base = f"petbreeds.{base}".rstrip(".")
            # `from petbreeds import x`: x may be a module (else a name of the package's __init__)
            targets = [f"{base}.{a.name}" for a in node.names] if base == "petbreeds" else [base]
        for target in targets:
            parts = target.split(".")
            if parts[0] != "petbreeds":
                continue
            module = parts[1] if len(parts) > 1 and parts[1] in MODULES else "__init__"
            found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: petbreeds_imports(PACKAGE / f"{m}.py") - {m} for m in sorted(MODULES)}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None if the graph is acyclic (depth-first, three colours)."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" once all its descendants are explored
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_petbreeds_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in src/petbreeds: " + " -> ".join(cycle or [])


def test_the_graph_sees_lazy_and_package_relative_imports(tmp_path: Path) -> None:
    source = (
        "import os\n"
        "from petbreeds.errors import PetbreedsError\n"
        "from petbreeds import config\n"
        "from . import atomic\n"
        "def f():\n"
        "    from petbreeds.live import LiveRun\n"
        "    import petbreeds.relog\n"
    )
    (tmp_path / "m.py").write_text(source)
    assert petbreeds_imports(tmp_path / "m.py") == {"errors", "config", "atomic", "live", "relog"}
    # the real lazy import in stage.py is an edge of the graph
    assert "live" in import_graph()["stage"]


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
