"""The whole pipeline under real `dvc exp run` (workspace, run cache, queue) logging to a real MLflow store.

One temporary git repo holds a copy of the project; MLFLOW_TRACKING_URI is unset, so the default store must be
`<DVC_ROOT>/mlflow.db` of that repo — and nothing may leak into this checkout's store.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from petbreeds.relog import experiment_refs

ROOT = Path(__file__).resolve().parents[1]
DVC = str(ROOT / ".venv/bin/dvc") if (ROOT / ".venv/bin/dvc").exists() else "dvc"
STAGES = ("fetch", "index", "split", "weights", "lr_find", "train_frozen", "train_unfrozen", "evaluate", "mlflow_log")
TINY = [
    "fetch.sample.per_breed=3",
    "data.item_size=48",
    "data.size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.arch=resnet18",
    "model.weights=none",
    "lr_find.num_it=20",
    "lr_find.stop_div=false",
    "train_frozen.epochs=1",
    "train_unfrozen.epochs=1",
]


def run(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "MLFLOW_RUN_ID")}
    env |= {"DVC_NO_ANALYTICS": "1", "PATH": f"{ROOT / '.venv/bin'}:{env['PATH']}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def exp_run(repo: Path, *overrides: str, name: str, queue: bool = False) -> str:
    sets = [a for o in (*TINY, *overrides) for a in ("-S", o)]
    return run(repo, DVC, "exp", "run", "-n", name, *(["--queue"] if queue else []), *sets)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [s for s in STAGES if not (ROOT / "stages" / f"{s}.py").is_file()]
    if missing:
        pytest.skip(f"stage scripts not written yet: {', '.join(missing)}")
    repo = tmp_path_factory.mktemp("e2e") / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(repo, "git", "init", "-q")
    run(repo, DVC, "init", "-q")
    run(repo, DVC, "config", "core.analytics", "false")
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    return repo


def parents(repo: Path) -> dict[str, object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("petbreeds")
    runs = client.search_runs([experiment.experiment_id], "tags.`petbreeds.run_type` = 'pipeline'")
    return {r.info.run_name: r for r in runs}


def assert_history_matches_csv(repo: Path, run_id: str, stage: str, prefix: str, exp_name: str) -> None:
    (commit,) = [r.commit for r in experiment_refs(repo) if r.name == exp_name]
    text = run(repo, "git", "show", f"{commit}:plots/{stage}.csv")
    rows = list(csv.DictReader(text.splitlines()))
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    history = client.get_metric_history(run_id, f"{prefix}/valid_loss")
    assert [(m.step, m.value) for m in history] == [(int(r["epoch"]), float(r["valid_loss"])) for r in rows]


@pytest.mark.slow
def test_experiments_run_cache_and_queue_each_give_one_complete_parent_run(repo: Path) -> None:
    own_store = ROOT / "mlflow.db"
    own_before = own_store.stat().st_mtime if own_store.exists() else None

    exp_run(repo, "train_frozen.lr=0.001", name="e1")
    exp_run(repo, "train_frozen.lr=0.002", name="e2")
    runs = parents(repo)
    assert set(runs) == {"e1", "e2"}
    for name, lr in (("e1", "0.001"), ("e2", "0.002")):
        run_ = runs[name]
        assert run_.data.params["train_frozen.lr"] == lr and run_.data.params["data.size"] == "32"
        assert run_.data.tags["stage.train_frozen.status"] == "executed"
        assert_history_matches_csv(repo, run_.info.run_id, "train_frozen", "frozen", name)
        assert_history_matches_csv(repo, run_.info.run_id, "train_unfrozen", "unfrozen", name)
    # e2 changed only train_frozen.lr: DVC keeps e1's lr_find outputs, and the run says so
    assert runs["e1"].data.tags["stage.lr_find.status"] == "executed"
    assert runs["e2"].data.tags["stage.lr_find.status"] == "reused"

    # The first experiment's params again: DVC restores e1's training and evaluation from its run cache without
    # running them, the run says so for each stage, and it holds e1's results.
    exp_run(repo, "train_frozen.lr=0.001", name="e3")
    assert any((repo / ".dvc" / "cache" / "runs").iterdir())
    e3, e1 = parents(repo)["e3"], parents(repo)["e1"]
    for stage in ("lr_find", "train_frozen", "train_unfrozen", "evaluate"):
        assert e3.data.tags[f"stage.{stage}.status"] == "reused", stage
        assert e3.data.tags[f"stage.{stage}.producer"].startswith("e1 at "), stage
    timing = ("seconds", "images_per_s")
    results = {k: v for k, v in e1.data.metrics.items() if not k.endswith(timing)}
    assert {k: v for k, v in e3.data.metrics.items() if not k.endswith(timing)} == results

    # Two queued experiments in parallel on a fresh database (the alembic race the lock prevents).
    (repo / "mlflow.db").unlink()
    exp_run(repo, "train_unfrozen.epochs=2", name="q1", queue=True)
    exp_run(repo, "train_frozen.epochs=2", name="q2", queue=True)
    run(repo, DVC, "queue", "start", "-j", "2")
    status = ""
    for _ in range(600):
        status = run(repo, DVC, "queue", "status")
        if "Running" not in status and "Queued" not in status:
            break
        subprocess.run(["sleep", "2"], check=True)
    assert "Failed" not in status, status
    # A new process: this one's MLflow store still holds the deleted database open.
    query = (
        "import sys; from mlflow.tracking import MlflowClient; c = MlflowClient(tracking_uri=sys.argv[1]); "
        "e = c.get_experiment_by_name('petbreeds'); "
        "runs = c.search_runs([e.experiment_id], \"tags.`petbreeds.run_type` = 'pipeline'\"); "
        "print(sorted(r.info.run_name for r in runs))"
    )
    names = run(repo, sys.executable, "-c", query, f"sqlite:///{repo / 'mlflow.db'}")
    assert "['q1', 'q2']" in names, names

    # e1 logged again from its git commit, its reports/ (run_info sidecars included) read from DVC's cache
    run(repo, str(ROOT / ".venv" / "bin" / "petbreeds"), "mlflow-relog", "e1")
    query = (
        "import json, sys; from mlflow.tracking import MlflowClient; c = MlflowClient(tracking_uri=sys.argv[1]); "
        "e = c.get_experiment_by_name('petbreeds'); "
        "(r,) = c.search_runs([e.experiment_id], \"attributes.run_name = 'e1'\"); print(json.dumps(r.data.tags))"
    )
    tags = json.loads(run(repo, sys.executable, "-c", query, f"sqlite:///{repo / 'mlflow.db'}").splitlines()[-1])
    assert tags["stage.train_frozen.status"] == "executed" and tags["stage.evaluate.producer"].startswith("e1 at ")
    assert json.loads(run(repo, DVC, "exp", "show", "--json"))  # dvc sees the same experiments

    assert (own_store.stat().st_mtime if own_store.exists() else None) == own_before  # nothing leaked here
    assert not list(repo.glob(".dvc/tmp/exps/*/mlflow.db"))


@pytest.mark.slow
def test_an_experiment_on_two_processes_writes_every_output_and_logs_one_run(repo: Path) -> None:
    """`dvc exp run -S distributed.nproc_per_node=2`: lr_find and both training stages run as 2 gloo ranks."""
    exp_run(repo, "distributed.nproc_per_node=2", name="ddp2")
    for stage in ("lr_find", "train_frozen", "train_unfrozen"):
        info = json.loads((repo / "reports" / "run_info" / f"{stage}.json").read_text())
        assert info["world_size"] == 2, stage
    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"]
    outs = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    assert len(outs) > 20 and all((repo / path).exists() for path in outs)  # every output dvc.yaml declares
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())["valid"]
    n_valid = evaluate["n_items"]
    assert n_valid == 22  # int(0.2 * 111): the whole validation split, not one rank's half
    for stage in ("train_frozen", "train_unfrozen"):
        error_rate = json.loads((repo / "metrics" / f"{stage}.json").read_text())["error_rate"]
        assert error_rate * n_valid == pytest.approx(round(error_rate * n_valid), abs=1e-6), stage  # over all 22
    run_ = parents(repo)["ddp2"]
    assert run_.data.metrics["train_unfrozen/error_rate"] == pytest.approx(error_rate)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    live = client.search_runs(
        [run_.info.experiment_id], "tags.`petbreeds.run_type` = 'live_stage' and tags.`dvc.exp_name` = 'ddp2'"
    )
    assert sorted(r.data.tags["dvc.stage"] for r in live) == ["lr_find", "train_frozen", "train_unfrozen"]  # rank 0's
