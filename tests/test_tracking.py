"""The MLflow side of petbreeds.track (the store, the DVC outputs read, the run's identity, the parent run, relog,
live runs) and the run_info/live-run side of petbreeds.stage, on real temporary sqlite stores.

The DVC outputs here are written by hand (the ``write_fake_outputs`` fixture, tests/conftest.py) in the layout of
docs/architecture.md; tests/test_pipeline_e2e.py checks the same against a real `dvc exp run`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from petbreeds import runtime
from petbreeds.errors import PetbreedsError
from petbreeds.stage import run_stage
from petbreeds.track import relog
from petbreeds.track.identity import current_identity
from petbreeds.track.outputs import read_outputs
from petbreeds.track.parent_run import log_pipeline
from petbreeds.track.store import tracking_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated store: creating one costs ~8 s of alembic migrations, copying it nothing."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def project(tmp_path: Path, migrated_db: Path, monkeypatch: pytest.MonkeyPatch, write_fake_outputs) -> Path:
    """A fake project with its own default store (DVC_ROOT), MLFLOW_TRACKING_URI unset."""
    root = tmp_path / "project"
    write_fake_outputs(root)
    shutil.copy(migrated_db, root / "mlflow.db")
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    return root


def store(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def all_runs(root: Path) -> list:
    client = store(root)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return list(client.search_runs(ids, run_view_type=ViewType.ALL))


def assert_no_stray_runs(root: Path) -> None:
    """Every run in the store is one of ours; nothing landed in MLflow's Default experiment."""
    runs = all_runs(root)
    assert all(r.data.tags.get("petbreeds.run_type") in ("pipeline", "live_stage") for r in runs)
    assert all(r.info.experiment_id != "0" for r in runs)


def test_parent_run_holds_params_metrics_histories_dataset_and_artifacts(
    project: Path, exp_identity, frozen_rows
) -> None:
    run_id = log_pipeline(project, exp_identity(), project)

    client = store(project)
    run = client.get_run(run_id)
    assert run.info.run_name == "exp-a" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "petbreeds"
    # params: every key of params.yaml, flattened, lists and nulls as YAML would read them back
    assert run.data.params["train_unfrozen.lr"] == "[1e-05, 0.001]"
    assert run.data.params["train_frozen.lr"] == "null"
    assert run.data.params["model.arch"] == "efficientnet_lite0"
    # finals: exactly the numbers of metrics/*.json (what dvc exp show lists) and of reports/*.json
    assert run.data.metrics["evaluate/error_rate"] == 0.25
    assert run.data.metrics["lr_find/valley"] == 1.0e-3
    # per-epoch series under the stage's name, with the epoch as step and the real end of each epoch as timestamp
    history = client.get_metric_history(run_id, "train_frozen/valid_loss")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["valid_loss"]) for r in frozen_rows]
    assert history[1].timestamp - history[0].timestamp == 5000
    assert [m.value for m in client.get_metric_history(run_id, "lr_find/loss")] == [3.7, 3.6, 3.1]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == "0" * 32 + ".dir" and dataset.tags[0].value == "training"
    assert run.data.tags["data.md5"] == "0" * 32 + ".dir"
    assert run.data.tags["stage.train_frozen.status"] == "executed"
    assert run.data.tags["stage.lr_find.status"] == "reused"
    assert run.data.tags["stage.lr_find.producer"].startswith("an-older-exp")
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"dvc.lock", "params.yaml", "metrics", "plots", "reports"}
    assert {a.path for a in client.list_artifacts(run_id, "reports/run_info")} >= {"reports/run_info/lr_find.json"}
    assert not (project / "mlruns").exists()
    assert_no_stray_runs(project)


def test_a_finder_that_did_not_sweep_says_why_and_logs_no_curve(project: Path, exp_identity, capsys) -> None:
    why = "train_frozen.lr is set (slice(2e-3)) and lr_find.run is auto"
    (project / "plots/lr_find.csv").write_text("lr,loss\n")  # as petbreeds.learn.lr_find.write_lr_find leaves them
    (project / "reports/lr_find.json").write_text(json.dumps({"not_run": why}))
    run = store(project).get_run(log_pipeline(project, exp_identity(), project))
    assert run.data.tags["stage.lr_find.not_run"] == why
    assert f"- lr_find not run: {why}" in run.data.tags["mlflow.note.content"].splitlines()
    assert not [key for key in run.data.metrics if key.startswith("lr_find/")]
    assert "warning" not in capsys.readouterr().err  # the reason is no metric that failed to log


def test_one_name_per_quantity_and_the_run_shows_the_final_numbers(project: Path, exp_identity) -> None:
    """plots/train_frozen.csv, plots/train_frozen_batches.csv and reports/train_frozen.json as the training code
    writes them, logged together."""
    from petbreeds.learn.training import phase_metrics, write_batches, write_history

    history = [
        {"epoch": 0, "train_loss": 3.1, "valid_loss": 2.5, "error_rate": 0.8, "lr": 2e-3, "seconds": 4.0},
        {"epoch": 1, "train_loss": 2.2, "valid_loss": 1.9, "error_rate": 0.6, "lr": 1e-7, "seconds": 5.0},
    ]
    history = [{**row, "images_per_s": 30.0, "iteration": 2 * (row["epoch"] + 1)} for row in history]  # 2 batches
    write_history(project / "plots/train_frozen.csv", history)
    batches = [{"iteration": i + 1, "train_loss": loss, "lr": 1e-3} for i, loss in enumerate((3.5, 3.1, 2.6, 2.2))]
    write_batches(project / "plots/train_frozen_batches.csv", batches)
    finals = {**phase_metrics(history, None, None), "lr": 2e-3}  # type: ignore[arg-type]  # as the stage writes it
    (project / "reports/train_frozen.json").write_text(json.dumps(finals))

    run_id = log_pipeline(project, exp_identity(), project)

    client = store(project)
    metrics = client.get_run(run_id).data.metrics
    assert not [k for k in metrics if k.startswith(("frozen/", "unfrozen/"))]  # one section per stage
    axes = ("epoch", "global_epoch", "iteration", "global_iteration")  # the plots' x axes and the steps
    assert not [key for key in metrics if key.endswith(axes)]
    # per batch (fastai's plot_loss), its iteration as the step
    per_batch = client.get_metric_history(run_id, "train_frozen_batches/train_loss")
    assert [(m.step, m.value) for m in per_batch] == [(1, 3.5), (2, 3.1), (3, 2.6), (4, 2.2)]
    for key in metrics:  # a name with two values at one step would be two quantities under one name
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), key
    # each final number under its dvc exp show name, the value the run shows (the latest: the last step)
    for key, value in finals.items():
        assert metrics[f"train_frozen/{key}"] == value, key
    # a final number that is the last epoch's is that point of the series, not a second entry
    valid_loss = client.get_metric_history(run_id, "train_frozen/valid_loss")
    assert [(m.step, m.value) for m in valid_loss] == [(0, 2.5), (1, 1.9)]
    # the epoch columns whose names the phase's numbers take are renamed: the phase's total seconds and max lr
    seconds = client.get_metric_history(run_id, "train_frozen/seconds")
    assert [(m.step, m.value) for m in seconds] == [(1, 9.0)]
    epoch_seconds = client.get_metric_history(run_id, "train_frozen/epoch_seconds")
    assert [(m.step, m.value) for m in epoch_seconds] == [(0, 4.0), (1, 5.0)]
    assert [m.value for m in client.get_metric_history(run_id, "train_frozen/epoch_end_lr")] == [2e-3, 1e-7]
    # lr_find: the series per iteration, the suggestions at its last step
    assert metrics["lr_find/loss"] == 3.1
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr_find/valley")] == [(2, 1.0e-3)]


def set_stage_times(root: Path, times: dict[str, tuple[str, str]]) -> None:
    """Rewrite the sidecars' ``started``/``finished``."""
    for stage, (started, finished) in times.items():
        path = root / "reports/run_info" / f"{stage}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "started": started, "finished": finished}))


def test_the_run_lasts_as_long_as_the_stages_it_executed(project: Path, exp_identity) -> None:
    set_stage_times(
        project,
        {
            "fetch": ("2026-11-20T08:00:00+00:00", "2026-11-20T08:01:00+00:00"),  # reused from an older experiment
            "lr_find": ("2026-11-20T08:01:00+00:00", "2026-11-20T08:05:00+00:00"),  # reused
            "train_frozen": ("2026-11-23T10:00:00+00:00", "2026-11-23T10:05:30+00:00"),  # executed by exp-a
        },
    )
    run = store(project).get_run(log_pipeline(project, exp_identity(), project))
    assert run.info.start_time == int(datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp() * 1000)
    assert run.info.end_time - run.info.start_time == 330_000

    # a result that executed nothing (all restored from the run cache): when its outputs were made
    run = store(project).get_run(log_pipeline(project, exp_identity("exp-restored"), project))
    assert run.info.start_time == int(datetime(2026, 11, 20, 8, 0, tzinfo=UTC).timestamp() * 1000)
    assert run.info.end_time == int(datetime(2026, 11, 23, 10, 5, 30, tzinfo=UTC).timestamp() * 1000)


def test_logging_the_same_result_twice_keeps_one_run_and_a_rerun_supersedes(project: Path, exp_identity) -> None:
    first = log_pipeline(project, exp_identity(), project)
    assert log_pipeline(project, exp_identity(), project) == first

    # `dvc exp run -f` of the same experiment: a new result (the lock changed) under the same name
    lock = json.loads((project / "dvc.lock").read_text())
    lock["stages"]["fetch"]["outs"][0]["md5"] = "1" * 32 + ".dir"
    (project / "dvc.lock").write_text(json.dumps(lock))
    second = log_pipeline(project, exp_identity(), project)

    assert second != first
    assert store(project).get_run(first).data.tags["dvc.superseded"] == "true"
    assert "dvc.superseded" not in store(project).get_run(second).data.tags
    assert len(all_runs(project)) == 2


def test_unreachable_server_warns_the_stage_succeeds_and_relog_catches_up(project: Path, free_port) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    stage = subprocess.run(
        [sys.executable, str(ROOT / "stages/mlflow_log.py")], cwd=project, env=env, capture_output=True, text=True
    )
    assert stage.returncode == 0, stage.stderr
    assert "is unreachable" in stage.stderr and "petbreeds mlflow-relog" in stage.stderr
    assert all_runs(project) == []
    assert not (project / "reports/run_info/mlflow_log.json").exists()  # not an out of mlflow_log

    # The server is "back" (here: the default store) -> the workspace's outputs are logged, once.
    assert relog.relog_cli([]) == 0
    assert relog.relog_cli([]) == 0
    (run,) = all_runs(project)
    assert run.info.run_name == "repro@no-git" and run.data.tags["dvc.run_kind"] == "repro"
    assert run.data.metrics["evaluate/valid_loss"] == 0.75


def git(root: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_relog_reads_an_experiment_from_its_git_commit(project: Path) -> None:
    git(project, "init", "-q")
    git(project, "commit", "-q", "--allow-empty", "-m", "baseline")
    baseline = git(project, "rev-parse", "HEAD")
    git(project, "add", "-A", "-f", "params.yaml", "dvc.lock", "metrics", "plots", "reports")
    git(project, "commit", "-q", "-m", "exp")
    exp_commit = git(project, "rev-parse", "HEAD")
    git(project, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/exp-b", exp_commit)
    git(project, "reset", "-q", "--hard", baseline)  # the workspace no longer holds the experiment's files

    assert relog.relog_cli(["exp-b"]) == 0
    (run,) = all_runs(project)
    assert run.info.run_name == "exp-b" and run.data.tags["dvc.baseline_rev"] == baseline
    assert run.data.metrics["evaluate/error_rate"] == 0.25
    with pytest.raises(PetbreedsError, match="no DVC experiment named 'nope'"):
        relog.relog_cli(["nope"])


def test_a_repro_of_uncommitted_params_or_code_is_not_named_after_the_commit(project: Path) -> None:
    git(project, "init", "-q")
    git(project, "add", "-f", "params.yaml", "dvc.lock")
    git(project, "commit", "-q", "-m", "baseline")
    commit = git(project, "rev-parse", "HEAD")[:7]
    assert current_identity(project).name == f"repro@{commit}"
    lock = json.loads((project / "dvc.lock").read_text())
    lock["stages"]["mlflow_log"] = {"cmd": "python stages/mlflow_log.py"}  # DVC writes it after the stage ran
    (project / "dvc.lock").write_text(json.dumps(lock))
    assert current_identity(project).name == f"repro@{commit}"

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("seed: 42", "seed: 7", 1))
    dirty = current_identity(project).name
    assert dirty.startswith(f"repro@{commit}+dirty-") and len(dirty) == len(f"repro@{commit}+dirty-") + 8
    assert relog.workspace_identity(project).name == dirty  # a re-log of the workspace: the same name
    lock["stages"]["train_unfrozen"]["outs"] = [{"path": "models/model.pt", "md5": "1" * 32}]  # other results
    (project / "dvc.lock").write_text(json.dumps(lock))
    assert current_identity(project).name not in (dirty, f"repro@{commit}")


def test_run_stage_streams_into_a_live_child_that_the_parent_adopts(
    project: Path, monkeypatch: pytest.MonkeyPatch, exp_identity, frozen_rows, fake_baseline
) -> None:
    def main(params: object, ctx: object) -> None:
        ctx.record(precision="bf16")  # type: ignore[attr-defined]
        for epoch, row in enumerate(frozen_rows):
            ctx.log_metrics({"valid_loss": row["valid_loss"]}, step=epoch)  # type: ignore[attr-defined]

    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", fake_baseline)
    run_stage("train_frozen", main, live_run=True)

    info = json.loads((project / "reports/run_info/train_frozen.json").read_text())
    assert info["stage"] == "train_frozen" and info["dvc_exp_name"] == "exp-a" and info["device"] == "cpu"
    assert info["duration_s"] >= 0 and info["host"] and info["invocation"] is None  # not under dvc
    assert info["facts"] == {"precision": "bf16"}
    child_id = info["mlflow_child_run_id"]
    client = store(project)
    child = client.get_run(child_id)
    assert child.info.status == "FINISHED" and child.info.run_name == "exp-a:train_frozen"
    assert [m.value for m in client.get_metric_history(child_id, "valid_loss")] == [2.5, 1.9]

    parent_id = log_pipeline(project, exp_identity(), project)
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_run(parent_id).data.tags["stage.train_frozen.live_run"] == child_id
    assert client.get_run(parent_id).data.tags["stage.train_frozen.precision"] == "bf16"  # what auto became
    assert_no_stray_runs(project)


def test_live_metrics_are_written_in_batches_not_at_every_step(project: Path) -> None:
    """A step never waits on the store: metrics wait in the run until flush_every_s has passed or the run ends,
    each with the step and the time it was logged at."""
    from petbreeds.track.live import LiveRun

    live = LiveRun.start("lr_find", project)
    assert live is not None
    live.flush_every_s = 3600.0  # no flush by time in this test
    before = int(time.time() * 1000)
    for step in range(5):
        live.log_metrics({"loss": 5.0 - step, "lr": 10.0**-step}, step)
    client = store(project)
    assert client.get_metric_history(live.run_id, "loss") == []  # nothing written yet
    live.end("FINISHED")
    history = client.get_metric_history(live.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 5.0 - s) for s in range(5)]
    assert all(before <= m.timestamp <= int(time.time() * 1000) for m in history)
    assert client.get_run(live.run_id).info.status == "FINISHED"


def test_live_runs_are_switched_off_by_env_and_never_fail_a_stage(
    project: Path, monkeypatch: pytest.MonkeyPatch, free_port
) -> None:
    calls = []

    def main(params: object, ctx: object) -> None:
        ctx.log_metrics({"loss": 1.0}, step=0)  # type: ignore[attr-defined]
        calls.append(ctx)

    monkeypatch.setenv("PETBREEDS_MLFLOW_LIVE", "0")
    run_stage("lr_find", main, live_run=True)
    monkeypatch.delenv("PETBREEDS_MLFLOW_LIVE")
    assert calls[0].live is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    run_stage("train_unfrozen", main, live_run=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert calls[1].live is None
    assert json.loads((project / "reports/run_info/train_unfrozen.json").read_text())["mlflow_child_run_id"] is None
    assert all_runs(project) == []


LIVE_STAGE = """
from petbreeds.stage import run_stage


def main(params, ctx):
    ctx.log_metrics({"loss": 1.0}, step=0)


run_stage("train_frozen", main, live_run=True)
"""


def test_stages_print_no_mlflow_info_lines_unless_verbose(project: Path) -> None:
    """Under DVC's queue a stage's stderr is a log file, not a terminal: what the stages print lands there."""
    (project / "mlflow.db").unlink()  # a fresh store: MLflow announces creating its tables
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "PETBREEDS_VERBOSE")}
    (project / "live_stage.py").write_text(LIVE_STAGE)  # a training stage's shape: a live child run, system metrics

    def stage(*argv: str, **extra_env: str) -> str:
        out = subprocess.run([sys.executable, *argv], cwd=project, env={**env, **extra_env}, capture_output=True)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode() + out.stderr.decode()

    # mlflow_log imports mlflow before run_stage; the live stage imports it inside
    quiet = stage(str(ROOT / "stages/mlflow_log.py")) + stage("live_stage.py")
    assert "mlflow: logged" in quiet
    assert " INFO " not in quiet, quiet
    assert len(all_runs(project)) == 2  # the parent and the live child: quiet, not off

    verbose = stage("live_stage.py", PETBREEDS_VERBOSE="1")
    assert "INFO mlflow.system_metrics" in verbose


@pytest.mark.slow
def test_two_processes_on_a_fresh_database_both_succeed(tmp_path: Path) -> None:
    script = "import pathlib, petbreeds.track.store as s; print(s.open_experiment(pathlib.Path.cwd())[1])"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]  # one experiment, created once
    (experiment,) = [e for e in store(tmp_path).search_experiments() if e.name == "petbreeds"]
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_tracking_uri_is_absolute_from_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    # a relative sqlite path would land in a queued experiment's temporary copy: anchor it at the root
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(tmp_path) == "http://mlflow.example:5000"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert runtime.project_root() == tmp_path.resolve()


def test_missing_outputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PetbreedsError, match=r"params\.yaml: not found; run `dvc repro`"):
        read_outputs(tmp_path)
