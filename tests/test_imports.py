"""The modules of src/petbreeds import each other without a cycle, and the subpackages in one direction only.

A cycle between two modules makes one of them half-initialised while the other runs, and it usually means two
jobs are tangled in one module. Imports inside functions count too: a lazy import only hides a cycle until the
function runs.

The subpackages are layers, in pipeline order: ``data`` < ``learn`` < ``serve`` < ``track``. A module may import
its own subpackage and the ones below it, never one above; the top-level plumbing splits in two: the base
(``config``, ``errors``, ``atomic``, ``digest``, ``runtime``, ``machine``, ``world``) imports no subpackage, and the
entry points (``stage``, ``cli``, the package's ``__init__``) may import any.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "petbreeds"
LAYERS = ("data", "learn", "serve", "track")  # bottom to top
ENTRY_POINTS = {"stage", "cli", "__init__"}


def module_name(path: Path) -> str:
    """``src/petbreeds/learn/training.py`` → ``learn.training``; a package's ``__init__.py`` → its name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def petbreeds_imports(path: Path, package: tuple[str, ...] = ()) -> set[str]:
    """The petbreeds modules one file imports, anywhere in it (``import petbreeds.x``, ``from petbreeds.x import``,
    ``from petbreeds import x``, relative forms from a file in subpackage ``package``); a subpackage's or the
    package's name (``__init__``) when the import names the package itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.` is the file's own (sub)package
                here = package[: len(package) - (node.level - 1)]
                base = ".".join(["petbreeds", *here, *([base] if base else [])])
            # `from petbreeds.sub import x`: x may be a module (else a name of the package's __init__)
            targets = [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            parts = target.split(".")
            if parts[0] != "petbreeds":
                continue
            # the longest prefix that names a module: petbreeds.learn.training.fit_one_cycle -> learn.training
            for end in range(len(parts), 1, -1):
                if (name := ".".join(parts[1:end])) in MODULES:
                    found.add(name)
                    break
            else:
                found.add("__init__")
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = path.relative_to(PACKAGE).parent.parts
        graph[name] = petbreeds_imports(path, package) - {name}
    return dict(sorted(graph.items()))


def layer(module: str) -> int | None:
    """The layer index of a subpackage's module; None for the top-level modules."""
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def layering_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import that goes up: from a lower subpackage to a higher one, or from the base into any subpackage."""
    found = []
    for module, imports in graph.items():
        if module in ENTRY_POINTS:
            continue
        for imported in sorted(imports):
            mine, theirs = layer(module), layer(imported)
            if theirs is not None and (mine is None or theirs > mine):
                found.append(f"{module} imports {imported}")
    return found


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


def test_subpackages_import_only_their_own_layer_and_those_below() -> None:
    assert set(LAYERS) <= MODULES, "a layer named in this test is not a subpackage of src/petbreeds"
    assert layering_violations(import_graph()) == []


def test_every_module_lives_in_a_layer_or_is_top_level_plumbing() -> None:
    top_level = {m for m in MODULES if "." not in m} - set(LAYERS)
    base = {"config", "errors", "atomic", "digest", "runtime", "machine", "world", "progress"}
    assert top_level == {*base, *ENTRY_POINTS}


def test_layering_names_an_import_that_goes_up() -> None:
    graph = {"data.show": {"learn.model"}, "config": {"data.fetch"}, "learn.model": {"data.augment", "errors"}}
    graph["stage"] = {"track.live"}  # an entry point may import any layer
    assert sorted(layering_violations(graph)) == ["config imports data.fetch", "data.show imports learn.model"]


def test_the_graph_sees_lazy_and_package_relative_imports(tmp_path: Path) -> None:
    source = (
        "import os\n"
        "from petbreeds.errors import PetbreedsError\n"
        "from petbreeds import config\n"
        "from petbreeds.learn import training\n"
        "from . import augment\n"
        "from .. import atomic\n"
        "def f():\n"
        "    from petbreeds.track.live import LiveRun\n"
        "    import petbreeds.track.relog\n"
    )
    (tmp_path / "m.py").write_text(source)
    found = petbreeds_imports(tmp_path / "m.py", package=("data",))
    assert found == {"errors", "config", "learn.training", "data.augment", "atomic", "track.live", "track.relog"}
    # the real lazy import in stage.py is an edge of the graph
    assert "track.live" in import_graph()["stage"]


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


# What a trained model's predictions need, and what they must not: the training loop and all it alone runs.
INFERENCE_USERS = ("stages/evaluate.py", "serve.predict", "serve.mlflow_model")
TRAINING_ONLY = {"learn.training", "learn.callbacks", "learn.lr_find", "learn.schedule", "learn.resume"}
TRAINING_ONLY |= {"learn.calibration", "learn.distributed"}


def reaches(start: set[str], graph: Mapping[str, set[str]]) -> set[str]:
    """Every module ``start``'s modules import, directly or through others (``start`` included). The walk stops at
    the entry points: the stage runner imports the distributed code only for the stages that train."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        if (module := todo.pop()) not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()) if module not in ENTRY_POINTS else ())
    return seen


def test_evaluate_predict_and_the_served_model_import_nothing_of_training() -> None:
    """A change to how the model trains (its loop, schedule, resume state, precision calibration, the distributed
    code) neither re-runs evaluate nor reaches the predict code and the MLflow model."""
    graph = import_graph()
    for user in INFERENCE_USERS:
        start = petbreeds_imports(ROOT / user) if user.endswith(".py") else {user}
        assert start <= graph.keys() | {"__init__"}, user
        assert reaches(start, graph) & TRAINING_ONLY == set(), f"{user} imports training code"
