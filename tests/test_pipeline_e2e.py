"""The whole pipeline under real `dvc exp run` (queue, workspace, run cache) logging to a real MLflow store.

One temporary git repo holds a copy of the project after `dvc repro` with its results committed (the ``finished``
fixture, whose build runs every stage); MLFLOW_TRACKING_URI is unset, so the default store must be
`<DVC_ROOT>/mlflow.db` of that repo — and nothing may leak into this checkout's store. It follows the README's
workflow: queued experiments run in parallel, compared, the baseline reproduced, a run-cache restore, one applied.
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
    commit,
    copy_project,
    exp_run,
    run,
    run_command,
    stages_run,
)
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from petbreeds.track.relog import experiment_refs

MODEL = "models/model.pt"

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
def repo(finished: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny project after `dvc repro`, its results committed (no MLflow store yet)."""
    return copy_project(finished, tmp_path_factory.mktemp("e2e") / "project")


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


def wait_for_queue(repo: Path) -> str:
    status = ""
    for _ in range(450):
        status = run(repo, DVC, "queue", "status")
        if "Running" not in status and "Queued" not in status:
            return status
        subprocess.run(["sleep", "2"], check=True)
    pytest.fail(f"the queue did not finish in 15 minutes:\n{status}")


@pytest.mark.slow
def test_experiments_run_cache_and_queue_each_give_one_complete_parent_run(repo: Path) -> None:
    own_store = ROOT / "mlflow.db"
    own_before = own_store.stat().st_mtime if own_store.exists() else None

    # Two queued experiments in parallel, the first to open the store: a fresh database (the alembic race the lock
    # prevents), then one parent run each with its params, statuses and curves.
    assert not (repo / "mlflow.db").exists()
    exp_run(repo, "train_frozen.lr=0.001", name="e1", queue=True)
    exp_run(repo, "train_frozen.lr=0.002", name="e2", queue=True)
    run(repo, DVC, "queue", "start", "-j", "2")
    status = wait_for_queue(repo)
    assert "Failed" not in status, status
    for name in ("e1", "e2"):  # a queued run checks out the committed baseline's outputs: no missing hashes
        assert "WARNING" not in run(repo, DVC, "queue", "logs", name), name
    runs = parents(repo)
    assert set(runs) == {"e1", "e2"}
    for name, lr in (("e1", "0.001"), ("e2", "0.002")):
        run_ = runs[name]
        assert run_.data.params["train_frozen.lr"] == lr and run_.data.params["data.size"] == "32"
        assert run_.data.tags["stage.train_frozen.status"] == "executed"
        assert_history_matches_csv(repo, run_.info.run_id, "train_frozen", name)
        assert_history_matches_csv(repo, run_.info.run_id, "train_unfrozen", name)
        # e1 and e2 changed train_frozen.lr, which lr_find depends on (lr_find.run auto decides by it): under the
        # default, always, it sweeps again, to the same report, and the runs say so
        assert run_.data.tags["stage.lr_find.status"] == "executed"
        assert run_.data.tags["stage.lr_find.producer"].startswith(f"{name} at "), name
    # `-S` rewrote only the key it set: the experiment's params.yaml differs from the baseline's by one line
    (e1,) = [r.commit for r in experiment_refs(repo) if r.name == "e1"]
    baseline, e1_params = (run(repo, "git", "show", f"{rev}:params.yaml") for rev in ("HEAD", e1))
    changed = [line for line in difflib.ndiff(baseline.splitlines(), e1_params.splitlines()) if line[:1] in "+-"]
    assert [" ".join(line.split("#")[0].split()) for line in changed] == ["- lr:", "+ lr: 0.001"], changed

    # README's comparison at 120 columns, as a terminal shows DVC's paged table (`less -S`): the error rate, the
    # validation loss and the params the experiments changed, with the baseline's numbers, best first
    assert shlex.join(("dvc", *COMPARE)) in (ROOT / "README.md").read_text()
    table = run(repo, DVC, *COMPARE, COLUMNS="120")
    assert "WARNING" not in table and "!" not in table, table
    shown = [line[:120] for line in table.splitlines()]
    (header,) = [line for line in shown if "Experiment" in line]
    assert all(name in header for name in ("error_rate", "valid_loss", "train_frozen.lr"))
    rows = [line for line in shown if "[e1]" in line or "[e2]" in line or line.strip().startswith(("master", "main"))]
    assert len(rows) == 3, table
    ranked = list(csv.DictReader(run(repo, DVC, *COMPARE, "--csv").splitlines()))
    errors = [float(row["error_rate"]) for row in ranked if row["Experiment"] in ("e1", "e2")]
    assert len(errors) == 2 and errors == sorted(errors)

    # dvc plots diff: one plot per idea, titled and labelled as dvc.yaml says; lr_find on a log axis
    plots = json.loads(run(repo, DVC, "plots", "diff", "--json", "HEAD", "e1", "e2"))["data"]
    definitions = {k: v for d in YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["plots"] for k, v in d.items()}
    assert sorted(plots) == sorted(definitions)
    for name, definition in definitions.items():
        (plot,) = plots[name]
        spec = json.dumps(plot["content"])
        assert plot["revisions"] == ["HEAD", "e1", "e2"], name
        for text in (definition["title"], definition["x_label"], definition["y_label"]):
            assert json.dumps(text) in spec, (name, text)
    assert plots["lr_find"][0]["content"]["encoding"]["x"]["scale"] == {"type": "log"}

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
    # the baseline's params back: written, not `git checkout`, which can skip the file (after DVC's failed run, git's
    # index may hold params.yaml's new size and times with the old content, so git takes the file as unchanged)
    (repo / "params.yaml").write_text(run(repo, "git", "show", "HEAD:params.yaml"))
    run(repo, DVC, "checkout", "train_frozen")
    assert (repo / "models/frozen.pt").read_bytes() == frozen
    run(repo, *COMMIT_RESULTS)  # lr_find's new run_info (times) is the committed baseline's
    commit(repo, "lr_find again")
    # the committed baseline reproduced: nothing to run but mlflow_log, and its run takes the commit's name
    head = run(repo, "git", "rev-parse", "--short=7", "HEAD").strip()
    assert stages_run(run(repo, DVC, "repro")) == ["mlflow_log"]
    assert f"repro@{head}" in parents(repo)
    # models/model.pt and models/model.onnx are the run's MLflow models, READY (tests/test_mlflow_model.py loads,
    # registers and serves them)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    outputs = parents(repo)[f"repro@{head}"].outputs.model_outputs
    models = {m.name: m for m in (client.get_logged_model(output.model_id) for output in outputs)}
    assert sorted(models) == ["petbreeds", "petbreeds-onnx"]
    assert all(str(m.status) == "READY" for m in models.values()), models

    # The first experiment's params again: DVC restores e1's training and evaluation from its run cache without
    # running them, the run says so for each stage, and it holds e1's results.
    exp_run(repo, "train_frozen.lr=0.001", name="e3")
    assert any((repo / ".dvc" / "cache" / "runs").iterdir())
    e3, e1_run = parents(repo)["e3"], parents(repo)["e1"]
    for stage in ("lr_find", "train_frozen", "lr_find_unfrozen", "train_unfrozen", "evaluate"):
        assert e3.data.tags[f"stage.{stage}.status"] == "reused", stage
        assert e3.data.tags[f"stage.{stage}.producer"].startswith("e1 at "), stage
    timing = ("seconds", "images_per_s")
    results = {k: v for k, v in e1_run.data.metrics.items() if not k.endswith(timing)}
    assert {k: v for k, v in e3.data.metrics.items() if not k.endswith(timing)} == results

    # lr_find.run=auto with both lrs set: neither finder sweeps, every output dvc.yaml declares is there saying so,
    # the results are e1's (the same lrs; its sweeps were not used), and DVC and MLflow compare the two
    out = exp_run(repo, "train_frozen.lr=0.001", "lr_find.run=auto", name="unswept")
    assert "lr_find: not run: train_frozen.lr is set (1e-3) and lr_find.run is auto" in out, out
    why = "train_unfrozen.lr is set (slice(1e-5, 1e-3)) and lr_find.run is auto"
    assert f"lr_find_unfrozen: not run: {why}" in out, out
    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"]
    outs = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    assert all((repo / path).exists() for path in outs)  # show_batch pictures included
    assert json.loads((repo / "reports" / "lr_find_unfrozen.json").read_text()) == {"not_run": why}
    e1_lock = YAML(typ="safe").load(run(repo, "git", "show", f"{e1}:dvc.lock"))["stages"]
    model = [
        out["md5"] for stages in (lock, e1_lock) for out in stages["train_unfrozen"]["outs"] if out["path"] == MODEL
    ]
    assert model[0] == model[1]
    assert (repo / "metrics" / "evaluate.json").read_text() == run(repo, "git", "show", f"{e1}:metrics/evaluate.json")
    # dvc plots diff: the finders' curves of the experiment that swept, every training curve of both
    plots = json.loads(run(repo, DVC, "plots", "diff", "--json", e1, "unswept"))
    assert not plots.get("errors"), plots
    for name in ("lr_find", "lr_find_unfrozen"):
        assert [plot["revisions"] for plot in plots["data"][name]] == [[e1]], name
    assert [plot["revisions"] for plot in plots["data"]["loss"]] == [[e1, "unswept"]]
    table = run(repo, DVC, *COMPARE, COLUMNS="120")
    assert "!" not in table and "lr_find.run" in table, table
    # MLflow: the run says why, and has no finder curve
    unswept = parents(repo)["unswept"]
    assert unswept.data.tags["stage.lr_find_unfrozen.not_run"] == why
    assert not [key for key in unswept.data.metrics if key.startswith(("lr_find/", "lr_find_unfrozen/"))]
    assert "lr_find/loss" in e1_run.data.metrics

    # e1 applied to the workspace and reproduced before it is committed: nothing runs, and the run is not named
    # after the commit, whose name the baseline's results have (parents() checks that no name is taken twice)
    run(repo, DVC, "exp", "apply", "e1")
    assert stages_run(run(repo, DVC, "repro")) == ["mlflow_log"]
    runs = parents(repo)
    (applied,) = [name for name in runs if name.startswith(f"repro@{head}+dirty-")]
    assert runs[applied].data.params["train_frozen.lr"] == "0.001"
    assert runs[f"repro@{head}"].data.params["train_frozen.lr"] == "null"

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
