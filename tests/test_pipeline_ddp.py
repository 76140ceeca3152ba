"""The whole pipeline as an experiment on two processes: `dvc exp run -S distributed.nproc_per_node=2` runs both
finders and both training stages as 2 gloo ranks under torchrun, on a copy of the tiny project after `dvc repro`
(the ``finished`` fixture); rank 0 writes every output and logs one run. tests/test_distributed.py tests the launch,
a dead rank and a hung rank stage by stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dvc_project import copy_project, exp_run, run
from ruamel.yaml import YAML


@pytest.mark.slow
def test_an_experiment_on_two_processes_writes_every_output_and_logs_one_run(finished: Path, tmp_path: Path) -> None:
    repo = copy_project(finished, tmp_path / "project")
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
    # in a new process, as a user's query would be
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
