"""dvc.yaml stays honest: each stage's deps list exactly the library modules its script runs, DVC's run cache
can keep every stage that has outputs, and each plot is drawn once.

A module missing from deps means a code change silently reuses stale outputs; an extra one means
needless re-runs. Plumbing that cannot change a stage's results (params loading, atomic writes,
error type, stage runner, tracking, live MLflow runs, what the run prints) is exempt, and so is what only plumbing
imports: the walk stops at it, so stage.py's lazy import of live.py (the training stages' live runs) adds nothing.
A stage whose work is a plumbing module depends on it and on what it runs (mlflow_log: tracking, which logs the
model through the predict code).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "petbreeds"
# The MLflow parent run: the store, the DVC outputs read, the run's identity, the run itself.
TRACKING = frozenset({"track.store", "track.outputs", "track.identity", "track.parent_run"})
PLUMBING = {"__init__", "config", "atomic", "errors", "stage", "cli", *TRACKING, "track.live", "runtime"}
# A stage whose work is a plumbing module depends on it, and on what it runs: the MLflow run (and its model), the
# validation of params.yaml.
OWN_PLUMBING = {"mlflow_log": TRACKING, "check_params": frozenset({"config"})}


def module_file(module: str) -> Path:
    """``learn.training`` → ``src/petbreeds/learn/training.py``."""
    return PACKAGE.joinpath(*module.split(".")).with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """petbreeds modules imported by one file (``from petbreeds.x.y import`` / ``import petbreeds.x.y``), dotted
    below the package (``learn.training``)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports run nothing: not deps
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("petbreeds"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "petbreeds":
                continue
            for end in range(len(parts), 1, -1):  # the longest prefix that is a module file
                if module_file(module := ".".join(parts[1:end])).exists():
                    found.add(module)
                    break
    return found


def reachable(script: Path, own_plumbing: frozenset[str] = frozenset()) -> set[str]:
    todo, seen = list(imported_modules(script)), set()
    while todo:
        module = todo.pop()
        if module in seen or (module in PLUMBING and module not in own_plumbing):
            continue
        seen.add(module)
        todo.extend(imported_modules(module_file(module)))
    return seen


STAGES = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
# One script per kind of stage: `python stages/<name>.py`, or for a stage of one phase `python stages/<kind>.py <phase>`
CMD = re.compile(r"python (stages/\w+\.py)(?: (frozen|unfrozen))?")
PHASE_STAGES = {
    "lr_find": "frozen",
    "lr_find_unfrozen": "unfrozen",
    "train_frozen": "frozen",
    "train_unfrozen": "unfrozen",
}


def stage_script(cmd: str) -> str:
    match = CMD.fullmatch(cmd)
    assert match, f"cmd {cmd!r} is not `python stages/<script>.py [frozen|unfrozen]`"
    return match[1]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_runs_its_script_for_its_phase(name):
    match = CMD.fullmatch(STAGES[name]["cmd"])
    assert match, STAGES[name]["cmd"]
    script, phase = match[1], match[2]
    assert phase == PHASE_STAGES.get(name), f"stage {name}: cmd gives phase {phase}"
    assert script == (f"stages/{name}.py" if phase is None else f"stages/{name.replace(f'_{phase}', '')}.py")


def test_no_two_stages_scripts_are_one_script_copied():
    """One script per kind of stage: the phases' stages run one script with the phase as its argument."""
    scripts = [stage_script(stage["cmd"]) for stage in STAGES.values()]
    assert sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "stages").glob("*.py")) == sorted(set(scripts))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_match_imports(name):
    stage = STAGES[name]
    script = stage_script(stage["cmd"])
    assert (ROOT / script).exists(), f"{script} missing"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    assert script in deps
    listed = {
        ".".join(Path(d).relative_to("src/petbreeds").with_suffix("").parts)
        for d in deps
        if d.startswith("src/petbreeds/")
    }
    expected = reachable(ROOT / script, OWN_PLUMBING.get(name, frozenset()))
    assert listed == expected, f"stage {name}: deps list {sorted(listed)} but the script runs {sorted(expected)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_can_be_restored_from_the_run_cache(name):
    """DVC (dvc/stage/__init__.py, ``no_cache_outs``) saves no run cache for a stage with a ``cache: false`` out
    other than a metric or a plot: such a stage would run again on params it has already run with."""
    uncached = [next(iter(o)) for o in STAGES[name].get("outs", []) if isinstance(o, dict) and
                not next(iter(o.values())).get("cache", True)]  # fmt: skip
    assert not uncached, f"stage {name}: {uncached} have cache: false; declare them as metrics/plots or cache them"


SPEED_ONLY = (
    "data.num_workers",
    "index.workers",
    "distributed.backend",
    "distributed.rdzv_endpoint",
    "distributed.timeout_s",
)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_settings_that_change_only_speed_invalidate_no_stage(name):
    """A param dependency is a promise that the results depend on it: workers, the backend, the rendezvous
    address and the timeout do not, so changing them must re-run nothing (keys are listed one by one)."""
    params = [p for entry in STAGES[name].get("params", []) for p in ([entry] if isinstance(entry, str) else entry)]
    for key in SPEED_ONLY:
        section = key.split(".")[0]
        assert key not in params and section not in params, f"stage {name} depends on {key} (via {section!r}?)"


def test_each_plot_is_drawn_once_titled_and_labelled():
    """DVC draws a stage's `plots:` output on its own, besides every top-level plot that uses it (9 plots for 4, four
    of them `seconds` against `step`): the plot data are plain outputs, drawn only by the top-level `plots:`."""
    from dvc_render.vega_templates import TEMPLATES

    assert not [name for name, stage in STAGES.items() if "plots" in stage]
    outs = {o if isinstance(o, str) else next(iter(o)) for stage in STAGES.values() for o in stage.get("outs", [])}
    builtin = {template.DEFAULT_NAME for template in TEMPLATES}
    for plot in YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["plots"]:
        ((name, definition),) = plot.items()
        assert set(definition["y"]) <= outs, f"plot {name}: its data must be outputs of the pipeline"
        assert {"title", "x_label", "y_label"} <= set(definition), f"plot {name}: title and axis labels"
        template = definition["template"]
        assert template in builtin or (ROOT / ".dvc" / "plots" / f"{template}.json").is_file(), name
