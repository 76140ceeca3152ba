"""The team's stack of docs/team.md, end to end: `mlflow server` with its runs and registry in PostgreSQL and its
artifacts in S3 (proxied: the clients have no S3 credentials), a DVC remote on S3, and two clones of one git repo.

The engines are real and started here (tests/team_stack.py): a PostgreSQL cluster of its own, moto's S3 server, the
MLflow server on both. Clone A queues two experiments and runs them with `dvc queue start -j 2`; every point of
every curve the stages wrote reaches MLflow, in the pipeline run and in the training stages' live runs. A pushes
them, clone B pulls and shows them, registers one and serves it through the server's artifact proxy. The server
goes down for 10 s while a stage trains, and for a whole run (caught up by `petbreeds mlflow-relog`).
"""

from __future__ import annotations

import base64
import csv
import io
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc_project import COMMIT_RESULTS, DVC, PETBREEDS, command_env, commit, copy_project, run, run_command, stages_run
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML
from team_stack import MlflowServer, Postgres, S3Server, add_s3_remote, s3_credentials
from test_mlflow_model import invoke, served

pytestmark = pytest.mark.slow

ARTIFACTS_BUCKET, DVC_BUCKET = "team-mlflow", "team-dvc"
STORAGE = f"s3://{DVC_BUCKET}/petbreeds"
# Two experiments on the committed baseline, run side by side: each reruns training from the stage its change reaches
# (q1 both finders and both phases, q2 the unfrozen phase only)
EXPERIMENTS = {"q1": "train_frozen.lr=0.001", "q2": "train_unfrozen.epochs=2"}
LIVE_STAGES = ("lr_find", "train_frozen", "lr_find_unfrozen", "train_unfrozen")
# The stages' curves, plots/<stage>.csv, as the pipeline run names them: <stage>/<column>, two columns renamed
# (docs/experiments.md); the axes are steps, not series
RENAMED = {"lr": "epoch_end_lr", "seconds": "epoch_seconds"}
AXES = ("epoch", "global_epoch", "iteration", "global_iteration")
SERIES = (*LIVE_STAGES, "train_frozen_batches", "train_unfrozen_batches")


@dataclass(frozen=True)
class Team:
    origin: Path  # the team's bare git repo
    a: Path  # clone A: the baseline reproduced and committed, the DVC remote configured


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as s3:
        s3.bucket(ARTIFACTS_BUCKET)
        s3.bucket(DVC_BUCKET)
        yield s3


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with Postgres() as postgres:
        yield postgres


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres, s3: S3Server) -> Iterator[MlflowServer]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    with MlflowServer(folder, postgres.uri, f"s3://{ARTIFACTS_BUCKET}/mlflow", s3) as server:
        yield server


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, finished: Path, server: MlflowServer, s3: S3Server) -> Team:
    """Clone A: a copy of the finished tiny project with the team's S3 remote, its baseline logged to the server by
    `dvc repro` (nothing else to run) and committed, pushed to ``origin``."""
    root = tmp_path_factory.mktemp("team")
    origin = root / "origin.git"
    run(root, "git", "init", "-q", "--bare", str(origin))
    a = copy_project(finished, root / "a")
    add_s3_remote(a, s3, STORAGE)
    out = run(a, DVC, "repro", MLFLOW_TRACKING_URI=server.uri)
    assert stages_run(out) == ["mlflow_log"], out
    assert "mlflow: logged" in out and "warning" not in out.lower(), out
    run(a, *COMMIT_RESULTS, ".dvc/config")
    commit(a, "baseline results, the team's DVC remote")
    run(a, "git", "remote", "add", "origin", str(origin))
    run(a, "git", "push", "-q", "origin", "HEAD")
    return Team(origin, a)


@pytest.fixture(scope="module")
def queued(team: Team, server: MlflowServer) -> str:
    """The two experiments queued in A and run two at a time; the queue's final status."""
    for name, change in EXPERIMENTS.items():
        run(team.a, DVC, "exp", "run", "--queue", "-n", name, "-S", change)
    # The workers inherit this environment: docs/team.md's `export MLFLOW_TRACKING_URI=...; dvc queue start -j 2`
    run(team.a, DVC, "queue", "start", "-j", "2", MLFLOW_TRACKING_URI=server.uri)
    status = ""
    for _ in range(450):
        status = run(team.a, DVC, "queue", "status")
        if "Running" not in status and "Queued" not in status:
            return status
        time.sleep(2)
    pytest.fail(f"the queue did not finish in 15 minutes:\n{status}")


# --------------------------------------------------------------------------------------------------
# What the server holds, read in a new client each time (the server, not a cache, is what is checked)


def pipeline_runs(server: MlflowServer) -> dict[str, Run]:
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("petbreeds")
    assert experiment is not None, "no experiment petbreeds on the server"
    runs = client.search_runs([experiment.experiment_id], "tags.`petbreeds.run_type` = 'pipeline'")
    return {r.info.run_name: r for r in runs}


def live_runs(server: MlflowServer, parent: Run) -> dict[str, Run]:
    """The training stages' live runs adopted by ``parent``, by stage."""
    client = MlflowClient(tracking_uri=server.uri)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.data.tags["dvc.stage"]: r for r in children}


def history(server: MlflowServer, run_: Run, key: str) -> list[tuple[int, float]]:
    points = MlflowClient(tracking_uri=server.uri).get_metric_history(run_.info.run_id, key)
    return sorted((m.step, m.value) for m in points)


def assert_complete(server: MlflowServer, run_: Run) -> None:
    name = run_.info.run_name
    assert run_.info.status == "FINISHED", name
    assert "evaluate/error_rate" in run_.data.metrics and run_.data.params["model.arch"] == "resnet18", name
    models = MlflowClient(tracking_uri=server.uri).search_logged_models(
        experiment_ids=[run_.info.experiment_id], filter_string=f"source_run_id = '{run_.info.run_id}'"
    )
    assert models, f"{name}: no logged model"


# --------------------------------------------------------------------------------------------------
# What the stages wrote: an experiment's plots/*.csv, read from A's DVC cache by the md5s of its dvc.lock


def experiment_curves(repo: Path, name: str) -> dict[str, list[dict[str, str]]]:
    """The rows of each plots/<stage>.csv of experiment ``name`` (its commit in refs/exps), by stage."""
    (ref,) = [
        r
        for r in run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
        if r.endswith(f"/{name}")
    ]
    lock = YAML(typ="safe").load(run(repo, "git", "show", f"{ref}:dvc.lock"))
    md5s = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    curves = {}
    for stage in SERIES:
        md5 = md5s[f"plots/{stage}.csv"]
        text = (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text()
        curves[stage] = list(csv.DictReader(io.StringIO(text)))
    return curves


def step_of(row: dict[str, str], index: int) -> int:
    return int(float(row.get("epoch") or row.get("iteration") or index))


def assert_every_point_logged(server: MlflowServer, parent: Run, repo: Path, name: str, ran: list[str]) -> None:
    """Each value of each curve the experiment's stages wrote is in its pipeline run (exactly: the run is logged
    from these files) and, for the training stages that ran, in their live run (as streamed: the file rounds to 6
    digits); no point missing, none extra."""
    curves = experiment_curves(repo, name)
    lives = live_runs(server, parent)
    assert sorted(lives) == sorted(s for s in LIVE_STAGES if s in ran), f"{name}: live runs {sorted(lives)}, ran {ran}"
    for stage, rows in curves.items():
        assert rows, f"{name}: plots/{stage}.csv is empty"
        for column in [c for c in rows[0] if c not in AXES]:
            points = [(step_of(row, i), float(row[column])) for i, row in enumerate(rows)]
            key = f"{stage}/{RENAMED.get(column, column) if stage in ('train_frozen', 'train_unfrozen') else column}"
            assert history(server, parent, key) == sorted(points), f"{name}: {key}"
            if stage in lives:
                live = lives[stage]
                assert live.info.status == "FINISHED", f"{name}: live run of {stage}"
                streamed = history(server, live, column)
                assert [s for s, _ in streamed] == [s for s, _ in sorted(points)], f"{name}: live {stage} {column}"
                assert [v for _, v in streamed] == pytest.approx([v for _, v in sorted(points)], rel=1e-5)


def test_two_queued_experiments_at_j2_reach_the_server_with_every_point_of_every_curve(
    team: Team, server: MlflowServer, s3: S3Server, queued: str
) -> None:
    assert "Failed" not in queued, queued
    runs = pipeline_runs(server)
    for name in EXPERIMENTS:
        logs = run(team.a, DVC, "queue", "logs", name)
        assert "warning" not in logs.lower(), logs
        assert_complete(server, runs[name])
        assert_every_point_logged(server, runs[name], team.a, name, stages_run(logs))
    (baseline,) = [name for name in runs if name.startswith("repro@")]  # the fixture's dvc repro
    assert_complete(server, runs[baseline])
    # Everything went to the server: no store in the project; the artifacts, sent through the server, in its bucket
    assert not (team.a / "mlflow.db").exists() and not (team.a / "mlartifacts").exists()
    stored = s3.keys(ARTIFACTS_BUCKET, "mlflow/")
    for run_ in runs.values():
        assert any(k.endswith(f"/{run_.info.run_id}/artifacts/metrics/evaluate.json") for k in stored), run_.info
    assert any(k.endswith("/MLmodel") for k in stored), "no logged model in the artifact bucket"


def test_a_teammate_pulls_and_shows_the_experiments_and_serves_the_registered_champion(
    team: Team, server: MlflowServer, s3: S3Server, queued: str, tmp_path: Path, free_port
) -> None:
    pushed = run(team.a, PETBREEDS, "push", *EXPERIMENTS)
    assert f"$ dvc exp push -r storage --run-cache origin {' '.join(EXPERIMENTS)}\n" in pushed, pushed
    assert any(k.startswith("petbreeds/runs/") for k in s3.keys(DVC_BUCKET, "petbreeds/")), "no run cache on S3"

    b = tmp_path / "b"
    run(tmp_path, "git", "clone", "-q", str(team.origin), str(b))
    s3_credentials(b)
    run(b, DVC, "exp", "pull", "origin", *EXPERIMENTS)
    shown = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(run(b, DVC, "exp", "show", "--csv")))}
    in_a = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(run(team.a, DVC, "exp", "show", "--csv")))}
    runs = pipeline_runs(server)
    for name in EXPERIMENTS:
        # the same commit, params and metrics as where it ran (where it ran alone knows its queue task's state)
        assert {k: v for k, v in in_a[name].items() if k not in ("State", "Executor")} == shown[name], name
        assert float(shown[name]["error_rate"]) == runs[name].data.metrics["evaluate/error_rate"], name

    # B registers q1's model and serves it from the registry: the model's files come through the server's proxy
    registered = run(b, PETBREEDS, "register", "q1", "--alias", "champion", MLFLOW_TRACKING_URI=server.uri)
    assert "registered q1 as models:/petbreeds@champion (version 1)" in registered, registered
    champion = MlflowClient(tracking_uri=server.uri).get_model_version_by_alias("petbreeds", "champion")
    assert champion.run_id == runs["q1"].info.run_id
    run(b, DVC, "exp", "apply", "q1")  # q1's model and images from the S3 remote, to compare with
    image = min((b / "data/raw/images").glob("*.jpg"))
    breed, probability = run(b, PETBREEDS, "predict", str(image), "--model", "models/model.pt").split()[:2]
    with served(b, tmp_path, free_port(), MLFLOW_TRACKING_URI=server.uri) as base:
        status, answer = invoke(base, [base64.b64encode(image.read_bytes()).decode()])
    assert status == 200, answer
    (prediction,) = answer["predictions"]
    # the registry's model is the one DVC carried: the same breed and probability as petbreeds predict on it
    assert prediction["breed"] == breed and prediction["probability"] == pytest.approx(float(probability), abs=5e-4)


def test_the_server_down_for_10_s_while_a_stage_trains_loses_nothing(team: Team, server: MlflowServer) -> None:
    """What happens (docs/team.md § "An MLflow tracking server"): the live run's next write waits in the MLflow
    client's retries until the server is back, then the buffered metrics arrive; the run ends complete."""
    client = MlflowClient(tracking_uri=server.uri)
    experiment_id = client.get_experiment_by_name("petbreeds").experiment_id
    log = team.a.parent / "outage.log"
    with log.open("w") as out:
        exp = subprocess.Popen(
            [DVC, "exp", "run", "-n", "outage", "-S", "train_unfrozen.epochs=4"],
            cwd=team.a, env=command_env(MLFLOW_TRACKING_URI=server.uri), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        where = (
            "tags.`dvc.exp_name` = 'outage' and tags.`dvc.stage` = 'train_unfrozen' and attributes.status = 'RUNNING'"
        )
        deadline = time.monotonic() + 300
        while not client.search_runs([experiment_id], where):
            assert exp.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        server.stop()
        stopped_ms = int(time.time() * 1000)
        time.sleep(10)
        server.start()
        exp.wait(timeout=600)
    finally:
        if exp.poll() is None:
            exp.kill()
            exp.wait()
    said = log.read_text()
    assert exp.returncode == 0, said
    run_ = pipeline_runs(server)["outage"]
    assert_complete(server, run_)
    (live,) = client.search_runs(
        [experiment_id], "tags.`dvc.exp_name` = 'outage' and tags.`dvc.stage` = 'train_unfrozen'"
    )
    assert live.info.end_time > stopped_ms + 10_000, "the live run ended before the server came back"
    assert_every_point_logged(server, run_, team.a, "outage", stages_run(said))
    assert "warning" not in said.lower(), said  # the stage waited in MLflow's retries: nothing to warn about


def test_a_run_while_the_server_is_down_succeeds_and_relog_catches_up(team: Team, server: MlflowServer) -> None:
    server.stop()
    try:
        out = run_command(
            team.a, DVC, "exp", "run", "-n", "offline", "-S", "train_unfrozen.epochs=3", MLFLOW_TRACKING_URI=server.uri
        )
    finally:
        server.start()
    assert out.returncode == 0, out.stdout + out.stderr
    said = out.stdout + out.stderr
    # the quick probe's message, not MLflow's minutes of retries
    assert f"the MLflow tracking server {server.uri} (MLFLOW_TRACKING_URI) is unreachable" in said, said
    assert "run `petbreeds mlflow-relog offline` with the same MLFLOW_TRACKING_URI" in said, said
    assert "train_unfrozen" in stages_run(said)
    assert not (team.a / "mlflow.db").exists()  # no silent fallback to another store

    assert "offline" not in pipeline_runs(server)
    relog = run(team.a, PETBREEDS, "mlflow-relog", "offline", MLFLOW_TRACKING_URI=server.uri)
    assert "mlflow: logged offline" in relog, relog
    runs = pipeline_runs(server)
    assert_complete(server, runs["offline"])
    assert runs["offline"].data.params["train_unfrozen.epochs"] == "3"
    # logging the same result again changes nothing
    again = run(team.a, PETBREEDS, "mlflow-relog", "offline", MLFLOW_TRACKING_URI=server.uri)
    assert "already logged" in again and len(pipeline_runs(server)) == len(runs)
