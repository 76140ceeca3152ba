"""A team sharing experiments through a bare git repo (``origin``) and a DVC remote on S3 (moto's S3 server on
127.0.0.1, tests/team_stack.py), with real clones.

The README's "Working as a team" / "A DVC remote": repo A commits the DVC remote (``s3://`` and its ``endpointurl``)
in .dvc/config and its credentials in .dvc/config.local, pushes to origin,
runs an experiment and shares it with ``petbreeds push``; a fresh clone B takes it with ``petbreeds pull`` and has
nothing left to run; a fresh clone C runs the same params and gets every stage with outputs from the team's run
cache. The baseline is committed without results (no `dvc repro` first): the experiment then runs the whole pipeline
once, which keeps the module short, and C's run restores every cached stage, not only training
(tests/test_pipeline_e2e.py follows the README's committed-baseline workflow).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc_project import DVC, PETBREEDS, STAGES, commit, make_project, run, run_command, stages_run
from ruamel.yaml import YAML
from team_stack import S3Server, add_s3_remote, s3_credentials

EXPERIMENT = "train_frozen.lr=0.001"
SEE = 'see README "Working as a team", "A DVC remote"'


BUCKET, PREFIX = "team-dvc", "petbreeds"
STORAGE = f"s3://{BUCKET}/{PREFIX}"


@dataclass(frozen=True)
class Team:
    origin: Path  # the bare git repo
    s3: S3Server  # holds the DVC remote, STORAGE
    a: Path  # the clone that ran experiment e1, left in its workspace
    pushed: str  # what `petbreeds push e1` printed


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as s3:
        s3.bucket(BUCKET)
        yield s3


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Team:
    root = tmp_path_factory.mktemp("team")
    origin = root / "origin.git"
    run(root, "git", "init", "-q", "--bare", str(origin))
    a = make_project(root / "a")
    add_s3_remote(a, s3, STORAGE)
    run(a, "git", "remote", "add", "origin", str(origin))
    run(a, "git", "add", ".dvc/config")
    commit(a, "the team's DVC remote")
    run(a, "git", "push", "-q", "origin", "HEAD")
    # No live MLflow child runs (3 s a training stage; not what is shared). It warns `No file hash info found`: the
    # baseline has no results
    run(a, DVC, "exp", "run", "-n", "e1", "-S", EXPERIMENT, PETBREEDS_MLFLOW_LIVE="0")
    return Team(origin, s3, a, run(a, PETBREEDS, "push", "e1"))


def clone(team: Team, path: Path, credentials: bool = True) -> Path:
    """A teammate's clone, with their credentials for the S3 remote (.dvc/config.local is not in git)."""
    run(path.parent, "git", "clone", "-q", str(team.origin), str(path))
    if credentials:
        s3_credentials(path)
    return path


@pytest.mark.slow
def test_push_shares_the_experiment_its_data_and_the_run_cache(team: Team) -> None:
    assert "$ dvc exp push -r storage --run-cache origin e1\n" in team.pushed
    assert "Pushed experiment e1 to Git remote 'origin'." in team.pushed
    assert "/e1\n" in run(team.a, "git", "ls-remote", "origin", "refs/exps/*")
    stored = team.s3.keys(BUCKET, f"{PREFIX}/")
    assert any(key.startswith(f"{PREFIX}/runs/") for key in stored), f"no run cache on the remote: {stored}"
    model_md5 = YAML(typ="safe").load((team.a / "dvc.lock").read_text())["stages"]["train_unfrozen"]["outs"]
    (md5,) = [out["md5"] for out in model_md5 if out["path"] == "models/model.pt"]
    assert f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}" in stored, "the experiment's model is not on the remote"


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
    d = clone(team, tmp_path / "d", credentials=False)  # its .dvc/config.local would name the removed remote
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
    # The S3 server that does not answer: the clone's own endpoint (.dvc/config.local) where nothing listens
    endpoint = f"http://127.0.0.1:{free_port()}"
    run(e, DVC, "remote", "modify", "--local", "storage", "endpointurl", endpoint)
    before = workspace(e)
    out = run_command(e, PETBREEDS, "push", "e1")
    assert out.returncode == 1
    ours = f"DVC remote 'storage' ({STORAGE}) cannot be reached or written from here"
    assert out.stderr.index("ERROR: failed to push cache") < out.stderr.index(ours), out.stderr
    assert "dvc remote modify --local storage" in out.stderr and SEE in out.stderr
    assert "Traceback" not in out.stderr
    assert workspace(e) == before  # nothing half-done: the same commit, files, experiments and DVC outputs


def workspace(repo: Path) -> tuple[str, ...]:
    """What a failed push must leave as it was: the commit, git's view of the files, the experiments' refs and
    DVC's view of the outputs."""
    return (
        run(repo, "git", "rev-parse", "HEAD"),
        run(repo, "git", "status", "--porcelain"),
        run(repo, "git", "for-each-ref", "refs/exps"),
        run(repo, DVC, "status", "--json"),
    )
