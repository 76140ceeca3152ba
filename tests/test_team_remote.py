"""A team sharing experiments through a bare git repo (``origin``) and a DVC remote (a local folder), with real clones.

The README's "Working as a team" / "A DVC remote": repo A commits the DVC remote in .dvc/config, pushes to origin,
runs an experiment and shares it with ``petbreeds push``; a fresh clone B takes it with ``petbreeds pull`` and has
nothing left to run; a fresh clone C runs the same params and gets every stage with outputs from the team's run
cache. The baseline is committed without results (no `dvc repro` first): the experiment then runs the whole pipeline
once, which keeps the module short, and C's run restores every cached stage, not only training
(tests/test_pipeline_e2e.py follows the README's committed-baseline workflow).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc_project import DVC, PETBREEDS, STAGES, commit, make_project, run, run_command, stages_run
from ruamel.yaml import YAML

EXPERIMENT = "train_frozen.lr=0.001"
SEE = 'see README "Working as a team", "A DVC remote"'


@dataclass(frozen=True)
class Team:
    origin: Path  # the bare git repo
    storage: Path  # the DVC remote
    a: Path  # the clone that ran experiment e1, left in its workspace
    pushed: str  # what `petbreeds push e1` printed


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Team:
    root = tmp_path_factory.mktemp("team")
    origin, storage = root / "origin.git", root / "storage"
    run(root, "git", "init", "-q", "--bare", str(origin))
    a = make_project(root / "a")
    run(a, DVC, "remote", "add", "-d", "storage", str(storage))
    run(a, "git", "remote", "add", "origin", str(origin))
    run(a, "git", "add", ".dvc/config")
    commit(a, "the team's DVC remote")
    run(a, "git", "push", "-q", "origin", "HEAD")
    # No live MLflow child runs (3 s a training stage; not what is shared). It warns `No file hash info found`: the
    # baseline has no results
    run(a, DVC, "exp", "run", "-n", "e1", "-S", EXPERIMENT, PETBREEDS_MLFLOW_LIVE="0")
    return Team(origin, storage, a, run(a, PETBREEDS, "push", "e1"))


def clone(team: Team, path: Path) -> Path:
    run(path.parent, "git", "clone", "-q", str(team.origin), str(path))
    return path


@pytest.mark.slow
def test_push_shares_the_experiment_its_data_and_the_run_cache(team: Team) -> None:
    assert "$ dvc exp push -r storage --run-cache origin e1\n" in team.pushed
    assert "Pushed experiment e1 to Git remote 'origin'." in team.pushed
    assert "/e1\n" in run(team.a, "git", "ls-remote", "origin", "refs/exps/*")
    assert any((team.storage / "runs").rglob("*")), "no run cache on the remote"


@pytest.mark.slow
def test_a_teammate_pulls_the_experiment_with_nothing_left_to_run(team: Team, tmp_path: Path) -> None:
    b = clone(team, tmp_path / "b")
    out = run(b, PETBREEDS, "pull", "e1")
    assert "$ dvc exp pull -r storage --run-cache origin e1\n" in out and "$ dvc exp apply e1\n" in out, out
    assert YAML(typ="safe").load((b / "params.yaml").read_text())["train_frozen"]["lr"] == 0.001
    for path in ("metrics/evaluate.json", "models/model.pt"):
        assert (b / path).read_bytes() == (team.a / path).read_bytes(), path
    assert json.loads(run(b, DVC, "status", "--json")) == {"mlflow_log": ["always changed"]}
    assert stages_run(run(b, DVC, "repro")) == ["mlflow_log"]
    breeds = json.loads((b / "data" / "vocab.json").read_text())["vocab"]
    image = min((b / "data" / "raw" / "images").glob("*.jpg"))
    prediction = run(b, PETBREEDS, "predict", str(image), "--model", "models/model.pt")
    assert prediction.split()[0] in breeds, prediction


@pytest.mark.slow
def test_the_team_run_cache_restores_training_instead_of_running_it(team: Team, tmp_path: Path) -> None:
    c = clone(team, tmp_path / "c")
    # --pull: the run cache, and the outputs of the runs it restores (a run cache entry is no use without them)
    out = run(c, DVC, "exp", "run", "--pull", "-n", "again", "-S", EXPERIMENT)
    # check_params has no outputs, so DVC cannot cache it; evaluate's metrics/evaluate.json is `cache: false`, kept in
    # the local run cache but never pushed, so on another clone evaluate runs again (on the restored model)
    runs = ["check_params", "evaluate", "mlflow_log"]
    assert stages_run(out) == runs, out
    for stage in set(STAGES) - set(runs):
        assert f"Stage '{stage}' is cached - skipping run" in out, out
    assert (c / "models/model.pt").read_bytes() == (team.a / "models/model.pt").read_bytes()


@pytest.mark.slow
def test_a_missing_remote_stops_before_anything_is_pushed(team: Team, tmp_path: Path) -> None:
    d = clone(team, tmp_path / "d")
    run(d, "git", "remote", "remove", "origin")
    out = run_command(d, PETBREEDS, "push", "e1")
    assert out.returncode == 1
    assert out.stderr.index("error: No such remote 'origin'") < out.stderr.index("error: no git remote 'origin'")
    assert SEE in out.stderr, out.stderr  # git's message, then ours
    assert "$ dvc exp push" not in out.stdout

    run(d, "git", "remote", "add", "origin", str(team.origin))
    run(d, DVC, "remote", "remove", "storage")
    out = run_command(d, PETBREEDS, "push", "e1")
    assert out.returncode == 1
    assert "$ dvc remote default\nNo default remote set\n" in out.stdout  # DVC's message, then ours
    assert "error: no default DVC remote" in out.stderr and "`dvc remote add -d storage <url>`" in out.stderr
    assert "$ dvc exp push" not in out.stdout


@pytest.mark.slow
def test_an_unreachable_remote_is_named_after_dvc_s_message(
    team: Team, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    e = clone(team, tmp_path / "e")
    run(e, DVC, "exp", "pull", "origin", "e1")  # the experiment and its data, as a teammate would have them

    run(e, "git", "remote", "set-url", "origin", str(tmp_path / "moved.git"))
    out = run_command(e, PETBREEDS, "push", "e1")
    assert out.returncode == 1
    ours = f"error: git remote 'origin' ({tmp_path / 'moved.git'}) does not answer"
    assert out.stderr.index("ERROR: unexpected error - Git failed to push") < out.stderr.index(ours), out.stderr

    run(e, "git", "remote", "set-url", "origin", str(team.origin))
    url = f"http://127.0.0.1:{free_port()}/storage"  # nothing listens there
    run(e, DVC, "remote", "modify", "--local", "storage", "url", url)
    out = run_command(e, PETBREEDS, "push", "e1")
    assert out.returncode == 1
    ours = f"DVC remote 'storage' ({url}) cannot be reached or written from here"
    assert out.stderr.index("ERROR: failed to push cache") < out.stderr.index(ours), out.stderr
    assert "dvc remote modify --local storage" in out.stderr and SEE in out.stderr
