"""The pipeline against a real MLflow tracking server (README "Working as a team"): `mlflow server` as a subprocess
(sqlite backend, artifacts in a temporary folder, served through the server), two queued experiments run in
parallel by `dvc queue start -j 2`, and a run made while the server is down caught up by `petbreeds mlflow-relog`.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dvc_project import BIN, COMMIT_RESULTS, DVC, PETBREEDS, commit, make_project, run, run_command, stages_run
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


class MlflowServer:
    """`mlflow server` on 127.0.0.1:``port`` with its store and artifacts under ``folder``; stopped and started again
    on the same port and store, as a team's server that goes down and comes back."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts = folder / "artifacts"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer /health in 120 s:\n{(self.folder / 'server.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def pipeline_runs(self) -> dict[str, Run]:
        """The parent runs by name, read in a new client (the server, not a cache, is what is checked)."""
        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name("petbreeds")
        assert experiment is not None, "no experiment petbreeds on the server"
        runs = client.search_runs([experiment.experiment_id], "tags.`petbreeds.run_type` = 'pipeline'")
        return {r.info.run_name: r for r in runs}

    def logged_models(self, run: Run) -> list[str]:
        """Names of the LoggedModels whose source run is ``run``."""
        client = MlflowClient(tracking_uri=self.uri)
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        return [m.name for m in models]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), port)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, server: MlflowServer) -> Path:
    """The tiny project reproduced and committed, its baseline logged to the server."""
    repo = make_project(tmp_path_factory.mktemp("server") / "project")
    out = run(repo, DVC, "repro", MLFLOW_TRACKING_URI=server.uri)
    assert "mlflow: logged" in out and "warning" not in out.lower(), out
    run(repo, *COMMIT_RESULTS)
    commit(repo, "baseline results")
    return repo


def wait_for_queue(repo: Path) -> str:
    status = ""
    for _ in range(450):
        status = run(repo, DVC, "queue", "status")
        if "Running" not in status and "Queued" not in status:
            return status
        time.sleep(2)
    pytest.fail(f"the queue did not finish in 15 minutes:\n{status}")


def assert_complete(server: MlflowServer, name: str) -> None:
    run_ = server.pipeline_runs()[name]
    assert run_.info.status == "FINISHED", name
    assert "evaluate/error_rate" in run_.data.metrics and run_.data.params["model.arch"] == "resnet18", name
    assert server.logged_models(run_), f"{name}: no logged model"


def test_two_queued_experiments_in_parallel_each_log_a_complete_run_with_its_model(
    repo: Path, server: MlflowServer
) -> None:
    for name, change in (("q1", "train_unfrozen.epochs=2"), ("q2", "train_frozen.epochs=2")):
        run(repo, DVC, "exp", "run", "--queue", "-n", name, "-S", change)
    # The workers inherit this environment: the README's `export MLFLOW_TRACKING_URI=... && dvc queue start -j 2`
    run(repo, DVC, "queue", "start", "-j", "2", MLFLOW_TRACKING_URI=server.uri)
    status = wait_for_queue(repo)
    assert "Failed" not in status, status
    for name in ("q1", "q2"):
        assert "warning" not in run(repo, DVC, "queue", "logs", name).lower(), name
        assert_complete(server, name)
    (baseline,) = [name for name in server.pipeline_runs() if name.startswith("repro@")]  # the fixture's dvc repro
    assert_complete(server, baseline)
    # Everything went to the server: no store in the project, the artifacts in the server's folder
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()
    assert list(server.artifacts.rglob("evaluate.json")), "no artifacts in the server's --artifacts-destination"


def test_a_run_while_the_server_is_down_succeeds_and_relog_catches_up(repo: Path, server: MlflowServer) -> None:
    server.stop()
    out = run_command(
        repo, DVC, "exp", "run", "-n", "offline", "-S", "train_frozen.lr=0.002", MLFLOW_TRACKING_URI=server.uri
    )
    assert out.returncode == 0, out.stdout + out.stderr
    said = out.stdout + out.stderr
    # the quick probe's message, not MLflow's minutes of retries
    assert f"the MLflow tracking server {server.uri} (MLFLOW_TRACKING_URI) is unreachable" in said, said
    assert "run `petbreeds mlflow-relog offline` with the same MLFLOW_TRACKING_URI" in said, said
    assert "train_frozen" in stages_run(said)
    assert not (repo / "mlflow.db").exists()  # no silent fallback to another store

    server.start()
    assert "offline" not in server.pipeline_runs()
    relog = run(repo, PETBREEDS, "mlflow-relog", "offline", MLFLOW_TRACKING_URI=server.uri)
    assert "mlflow: logged offline" in relog, relog
    assert_complete(server, "offline")
    runs = server.pipeline_runs()
    assert runs["offline"].data.params["train_frozen.lr"] == "0.002"
    # logging the same result again changes nothing
    again = run(repo, PETBREEDS, "mlflow-relog", "offline", MLFLOW_TRACKING_URI=server.uri)
    assert "already logged" in again and len(server.pipeline_runs()) == len(runs)
