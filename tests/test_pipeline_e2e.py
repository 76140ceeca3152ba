"""The whole pipeline under real `dvc exp run` (workspace, run cache, queue) logging to a real MLflow store.

One temporary git repo holds a copy of the project; MLFLOW_TRACKING_URI is unset, so the default store must be
`<DVC_ROOT>/mlflow.db` of that repo — and nothing may leak into this checkout's store. It follows the README's
workflow: `dvc repro`, commit the results, experiments (workspace, queued sweep), compare them, apply and commit one.
"""

from __future__ import annotations

import csv
import difflib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import dvc.api
import pytest
from dvc_project import (
    COMMIT_RESULTS,
    DVC,
    ROOT,
    STAGES,
    commit,
    exp_run,
    make_project,
    run,
    run_command,
    stages_run,
)
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from petbreeds.track.relog import experiment_refs

# The README's comparison of experiments
COMPARE = (
    "exp",
    "show",
    "--only-changed",
    "--keep",
    "error_rate|valid_loss",
    "--drop",
    "State|Executor",
    "--sort-by",
    "error_rate",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_project(tmp_path_factory.mktemp("e2e") / "project")
    out = run(repo, DVC, "repro")
    assert stages_run(out) == list(STAGES) and "WARNING" not in out, out
    run(repo, *COMMIT_RESULTS)
    commit(repo, "baseline results")
    return repo


def parents(repo: Path) -> dict[str, object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("petbreeds")
    runs = client.search_runs([experiment.experiment_id], "tags.`petbreeds.run_type` = 'pipeline'")
    names = sorted(r.info.run_name for r in runs)
    assert len(names) == len(set(names)), f"two MLflow runs of one name: {names}"
    return {r.info.run_name: r for r in runs}


def assert_history_matches_csv(repo: Path, run_id: str, stage: str, exp_name: str) -> None:
    (commit,) = [r.commit for r in experiment_refs(repo) if r.name == exp_name]
    text = dvc.api.read(f"plots/{stage}.csv", repo=str(repo), rev=commit)  # a DVC-cached output
    rows = list(csv.DictReader(text.splitlines()))
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    history = client.get_metric_history(run_id, f"{stage}/valid_loss")
    assert [(m.step, m.value) for m in history] == [(int(r["epoch"]), float(r["valid_loss"])) for r in rows]


@pytest.mark.slow
def test_experiments_run_cache_and_queue_each_give_one_complete_parent_run(repo: Path) -> None:
    own_store = ROOT / "mlflow.db"
    own_before = own_store.stat().st_mtime if own_store.exists() else None
    # the finder run again: the same suggestions, so train_frozen, which depends on its report, stays up to date
    lr_find_report = (repo / "reports/lr_find.json").read_bytes()
    assert stages_run(run(repo, DVC, "repro", "-f", "-s", "lr_find")) == ["lr_find"]
    assert (repo / "reports/lr_find.json").read_bytes() == lr_find_report
    assert "up to date" in run(repo, DVC, "status", "train_frozen")
    # a stage that fails under DVC: DVC removed its outputs before running it, and the error says how to restore them
    frozen = (repo / "models/frozen.pt").read_bytes()
    # (-s: train_frozen alone; lr_find, which depends on train_frozen.lr too, is left as it is)
    failed = run_command(repo, DVC, "exp", "run", "-S", "train_frozen.lr=1e30", "-s", "train_frozen")
    assert failed.returncode != 0 and "error: stage train_frozen: train_frozen diverged" in failed.stderr, failed.stderr
    assert "`dvc checkout train_frozen` restores them" in failed.stderr and not (repo / "models/frozen.pt").exists()
    run(repo, "git", "checkout", "params.yaml")
    run(repo, DVC, "checkout", "train_frozen")
    assert (repo / "models/frozen.pt").read_bytes() == frozen
    run(repo, *COMMIT_RESULTS)  # lr_find's new run_info (times) is the committed baseline's
    commit(repo, "lr_find again")
    # the committed baseline reproduced: nothing to run but mlflow_log, and its run takes the commit's name
    head = run(repo, "git", "rev-parse", "--short=7", "HEAD").strip()
    assert stages_run(run(repo, DVC, "repro")) == ["mlflow_log"]
    assert f"repro@{head}" in parents(repo)
    # models/model.pt is the run's MLflow model, READY (tests/test_mlflow_model.py loads, registers and serves one)
    (model,) = parents(repo)[f"repro@{head}"].outputs.model_outputs
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert str(client.get_logged_model(model.model_id).status) == "READY"

    exp_run(repo, "train_frozen.lr=0.001", name="e1")
    exp_run(repo, "train_frozen.lr=0.002", name="e2")
    runs = parents(repo)
    assert {name for name in runs if not name.startswith("repro@")} == {"e1", "e2"}
    for name, lr in (("e1", "0.001"), ("e2", "0.002")):
        run_ = runs[name]
        assert run_.data.params["train_frozen.lr"] == lr and run_.data.params["data.size"] == "32"
        assert run_.data.tags["stage.train_frozen.status"] == "executed"
        assert_history_matches_csv(repo, run_.info.run_id, "train_frozen", name)
        assert_history_matches_csv(repo, run_.info.run_id, "train_unfrozen", name)
    # e1 and e2 changed train_frozen.lr, which lr_find depends on (lr_find.run auto decides by it): under the default,
    # always, it sweeps again, to the same report, and the runs say so
    for name in ("e1", "e2"):
        assert runs[name].data.tags["stage.lr_find.status"] == "executed"
        assert runs[name].data.tags["stage.lr_find.producer"].startswith(f"{name} at "), name

    # The first experiment's params again: DVC restores e1's training and evaluation from its run cache without
    # running them, the run says so for each stage, and it holds e1's results.
    exp_run(repo, "train_frozen.lr=0.001", name="e3")
    assert any((repo / ".dvc" / "cache" / "runs").iterdir())
    e3, e1 = parents(repo)["e3"], parents(repo)["e1"]
    for stage in ("lr_find", "train_frozen", "lr_find_unfrozen", "train_unfrozen", "evaluate"):
        assert e3.data.tags[f"stage.{stage}.status"] == "reused", stage
        assert e3.data.tags[f"stage.{stage}.producer"].startswith("e1 at "), stage
    timing = ("seconds", "images_per_s")
    results = {k: v for k, v in e1.data.metrics.items() if not k.endswith(timing)}
    assert {k: v for k, v in e3.data.metrics.items() if not k.endswith(timing)} == results

    # e1 applied to the workspace and reproduced before it is committed: nothing runs, and the run is not named
    # after the commit, whose name the baseline's results have (parents() checks that no name is taken twice)
    run(repo, DVC, "exp", "apply", "e1")
    assert stages_run(run(repo, DVC, "repro")) == ["mlflow_log"]
    runs = parents(repo)
    (applied,) = [name for name in runs if name.startswith(f"repro@{head}+dirty-")]
    assert runs[applied].data.params["train_frozen.lr"] == "0.001"
    assert runs[f"repro@{head}"].data.params["train_frozen.lr"] == "null"
    run(repo, *COMMIT_RESULTS)  # e1 becomes the baseline of the next experiments
    commit(repo, "e1")

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
    for name in ("q1", "q2"):  # a queued run checks out the committed baseline's outputs: no missing hashes
        assert "WARNING" not in run(repo, DVC, "queue", "logs", name), name
    # `-S` rewrote only the key it set: the experiment's params.yaml differs from the baseline's by one line
    (q1,) = [r.commit for r in experiment_refs(repo) if r.name == "q1"]
    baseline, q1_params = (run(repo, "git", "show", f"{rev}:params.yaml") for rev in ("HEAD", q1))
    changed = [line for line in difflib.ndiff(baseline.splitlines(), q1_params.splitlines()) if line[:1] in "+-"]
    assert [" ".join(line.split("#")[0].split()) for line in changed] == ["- epochs: 1", "+ epochs: 2"], changed

    # README's comparison at 120 columns, as a terminal shows DVC's paged table (`less -S`): the error rate, the
    # validation loss and the params the experiments changed, with the baseline's numbers, best first
    assert shlex.join(("dvc", *COMPARE)) in (ROOT / "README.md").read_text()
    table = run(repo, DVC, *COMPARE, COLUMNS="120")
    assert "WARNING" not in table and "!" not in table, table
    shown = [line[:120] for line in table.splitlines()]
    (header,) = [line for line in shown if "Experiment" in line]
    assert all(name in header for name in ("error_rate", "valid_loss", "train_unfrozen.epochs", "train_frozen.epochs"))
    rows = [line for line in shown if "[q1]" in line or "[q2]" in line or line.strip().startswith(("master", "main"))]
    assert len(rows) == 3, table
    ranked = list(csv.DictReader(run(repo, DVC, *COMPARE, "--csv").splitlines()))
    errors = [float(row["error_rate"]) for row in ranked if row["Experiment"] in ("q1", "q2")]
    assert len(errors) == 2 and errors == sorted(errors)

    # dvc plots diff: one plot per idea, titled and labelled as dvc.yaml says; lr_find on a log axis
    plots = json.loads(run(repo, DVC, "plots", "diff", "--json", "HEAD", "q1", "q2"))["data"]
    definitions = {k: v for d in YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["plots"] for k, v in d.items()}
    assert sorted(plots) == sorted(definitions)
    for name, definition in definitions.items():
        (plot,) = plots[name]
        spec = json.dumps(plot["content"])
        assert plot["revisions"] == ["HEAD", "q1", "q2"], name
        for text in (definition["title"], definition["x_label"], definition["y_label"]):
            assert json.dumps(text) in spec, (name, text)
    assert plots["lr_find"][0]["content"]["encoding"]["x"]["scale"] == {"type": "log"}

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
    """`dvc exp run -S distributed.nproc_per_node=2`: both finders and both training stages run as 2 gloo ranks."""
    exp_run(repo, "distributed.nproc_per_node=2", name="ddp2")
    for stage in ("lr_find", "train_frozen", "lr_find_unfrozen", "train_unfrozen"):
        info = json.loads((repo / "reports" / "run_info" / f"{stage}.json").read_text())
        assert info["world_size"] == 2, stage
    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"]
    outs = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    assert len(outs) > 20 and all((repo / path).exists() for path in outs)  # every output dvc.yaml declares
    n_valid = json.loads((repo / "reports" / "evaluate.json").read_text())["n_items"]
    assert n_valid == 22  # int(0.2 * 111): the whole validation split, not one rank's half
    for stage in ("train_frozen", "train_unfrozen"):
        error_rate = json.loads((repo / "reports" / f"{stage}.json").read_text())["error_rate"]
        assert error_rate * n_valid == pytest.approx(round(error_rate * n_valid), abs=1e-6), stage  # over all 22
    # A new process: this one's MLflow store still reads the database the first test deleted.
    query = (
        "import json, sys; from mlflow.tracking import MlflowClient; c = MlflowClient(tracking_uri=sys.argv[1]); "
        "e = c.get_experiment_by_name('petbreeds').experiment_id; "
        "(r,) = c.search_runs([e], \"attributes.run_name = 'ddp2'\"); "
        "live = c.search_runs([e], \"tags.`petbreeds.run_type` = 'live_stage' and tags.`dvc.exp_name` = 'ddp2'\"); "
        "stages = sorted(x.data.tags['dvc.stage'] for x in live); "
        "print(json.dumps([r.data.metrics['train_unfrozen/error_rate'], stages]))"
    )
    out = run(repo, sys.executable, "-c", query, f"sqlite:///{repo / 'mlflow.db'}").splitlines()[-1]
    logged_error_rate, live = json.loads(out)
    assert logged_error_rate == pytest.approx(error_rate)
    assert live == ["lr_find", "lr_find_unfrozen", "train_frozen", "train_unfrozen"]  # rank 0's


@pytest.mark.slow
def test_an_experiment_without_sweeps_writes_every_output_and_compares_with_one_that_swept(repo: Path) -> None:
    """`lr_find.run=auto` with both lrs set: neither finder sweeps, every output dvc.yaml declares is there saying so,
    the results are those of the same run with its (unused) sweeps, and DVC and MLflow compare the two."""
    same = ("train_frozen.lr=0.001", "distributed.nproc_per_node=1")  # an earlier test's experiment may be applied
    exp_run(repo, *same, name="swept")  # the default, always: both finders sweep
    swept_lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"]
    swept_metrics = (repo / "metrics" / "evaluate.json").read_bytes()
    out = exp_run(repo, *same, "lr_find.run=auto", name="unswept")
    assert "lr_find: not run: train_frozen.lr is set (1e-3) and lr_find.run is auto" in out, out
    why = "train_unfrozen.lr is set (slice(1e-5, 1e-3)) and lr_find.run is auto"
    assert f"lr_find_unfrozen: not run: {why}" in out, out
    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"]
    outs = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    assert all((repo / path).exists() for path in outs)  # show_batch pictures included
    assert json.loads((repo / "reports" / "lr_find_unfrozen.json").read_text()) == {"not_run": why}
    # the sweeps' suggestions were not used: the same model and numbers
    model = [
        out["md5"]
        for stage in (lock, swept_lock)
        for out in stage["train_unfrozen"]["outs"]
        if out["path"] == "models/model.pt"
    ]
    assert model[0] == model[1] and (repo / "metrics" / "evaluate.json").read_bytes() == swept_metrics

    # dvc plots diff: the finders' curves of the experiment that swept, every training curve of both
    plots = json.loads(run(repo, DVC, "plots", "diff", "--json", "swept", "unswept"))
    assert not plots.get("errors"), plots
    for name in ("lr_find", "lr_find_unfrozen"):
        assert [plot["revisions"] for plot in plots["data"][name]] == [["swept"]], name
    assert [plot["revisions"] for plot in plots["data"]["loss"]] == [["swept", "unswept"]]
    table = run(repo, DVC, *COMPARE, COLUMNS="120")
    assert "!" not in table and "lr_find.run" in table, table

    # MLflow: the run says why, and has no finder curve
    unswept = parents(repo)["unswept"]
    assert unswept.data.tags["stage.lr_find_unfrozen.not_run"] == why
    assert not [key for key in unswept.data.metrics if key.startswith(("lr_find/", "lr_find_unfrozen/"))]
    assert "lr_find/loss" in parents(repo)["swept"].data.metrics
