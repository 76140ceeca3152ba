"""Interrupted training resumes: a stage killed with SIGKILL (between epochs, mid-epoch, one process or 2 gloo ranks)
and run again by `dvc repro` ends with the outputs of a run that never stopped, byte for byte; states of other
code, data or params are ignored; a damaged state is an error naming it and the command that discards it.

The wall-clock numbers (an epoch's ``seconds`` and ``images_per_s``, run_info's times) are the only differences
allowed: they differ between any two runs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from dvc.utils.hydra import apply_overrides
from dvc_project import DVC, command_env, copy_project, make_project, run
from tiny import ROOT, tiny_net, write_pets

from petbreeds.config import load_params
from petbreeds.errors import PetbreedsError
from petbreeds.learn.callbacks import Callback, Fit, Recorder, ResumeState
from petbreeds.learn.resume import Resume, resume_cli, stage_key
from petbreeds.learn.training import fit_one_cycle, training_data
from petbreeds.world import SINGLE_PROCESS

# no live MLflow runs (seconds of start-up per stage): resuming does not involve them
QUIET = {"PETBREEDS_MLFLOW_LIVE": "0"}
# `dvc repro -f -s STAGE`: that stage alone, run even where dvc.lock says it is done
FORCE = ("-f", "-s")
TIMING = {"seconds", "images_per_s"}  # wall clock: differs between any two runs
# epochs long enough to be killed in (about 0.5 s each on 2 AMD EPYC cores)
LONGER = {"data.item_size": 80, "data.size": 64, "train_frozen.epochs": 4, "train_unfrozen.epochs": 3}


# --- the loop, in one process ------------------------------------------------------------------------------------


def _fit(root: Path, table: pd.DataFrame, state: Path, stop_at_batch: int | None = None):
    """A fresh model and loaders (seeded as a stage seeds them), 3 epochs with a resume state at ``state``;
    ``stop_at_batch``: raise there, as a killed process stops."""
    params = load_params(ROOT / "params.yaml")
    data = params.data.model_copy(update={"item_size": 40, "size": 32, "batch_size": 8, "num_workers": 0})
    params = params.model_copy(update={"data": data, "train": params.train.model_copy(update={"precision": "fp32"})})
    torch.manual_seed(0)
    model = tiny_net()
    data = training_data(params, table, ["blue", "green", "red"], root, seed=0, world=SINGLE_PROCESS)
    phase = params.train_frozen.model_copy(update={"epochs": 3})
    resume = Resume("train_frozen", state, 1, SINGLE_PROCESS)
    recorder = Recorder()

    class Kill(Callback):
        def after_batch(self, fit: Fit, record: dict[str, float]) -> None:
            if record["iteration"] == stop_at_batch:
                raise KeyboardInterrupt

    history = fit_one_cycle(model, data, phase, [1e-2] * 3, [ResumeState(resume), Kill(), recorder])
    return model.state_dict(), history, recorder.batches, resume


def _without_timing(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_a_fit_stopped_mid_epoch_resumes_at_its_last_epoch_and_ends_identical(tmp_path, capsys) -> None:
    table = write_pets(tmp_path)
    weights, history, batches, _ = _fit(tmp_path, table, tmp_path / "reference.pt")
    per_epoch = len(batches) // 3
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, table, state, stop_at_batch=2 * per_epoch + 2)  # in epoch 2: the state after epoch 1 stays
    capsys.readouterr()
    resumed_weights, resumed_history, resumed_batches, resume = _fit(tmp_path, table, state)
    assert f"train_frozen: resuming at epoch 2 of 3 from {state}" in capsys.readouterr().out
    assert resume.facts() == {"resumed_at": f"epoch 2 of 3 from {state}"}
    assert resumed_weights.keys() == weights.keys()
    assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights), "weights differ from the reference's"
    assert _without_timing(resumed_history) == _without_timing(history)
    assert resumed_batches == batches  # the records before the stop from the state, then trained on


def test_a_damaged_state_is_an_error_naming_it_and_how_to_discard_it(tmp_path) -> None:
    table = write_pets(tmp_path)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, table, state, stop_at_batch=sum(table["split"] == "train") // 8 + 1)  # in epoch 1
    state.write_bytes(state.read_bytes()[:1000])  # truncated, as a full disk leaves it
    with pytest.raises(PetbreedsError, match=rf"{state}: damaged resume state \(.*\); `rm {state}` discards it"):
        _fit(tmp_path, table, state)
    torch.save({"format": "petbreeds-resume/1", "stage": "train_frozen"}, state)
    with pytest.raises(PetbreedsError, match=r"damaged resume state \(no epoch, machine, rng\)"):
        _fit(tmp_path, table, state)


def test_the_key_changes_with_each_dep_and_param_of_the_stage_and_nothing_else(tmp_path) -> None:
    project = make_project(tmp_path / "p")
    (project / "data" / "raw").mkdir(parents=True)
    (project / "data" / "raw" / "a.jpg").write_bytes(b"x")
    (project / "data" / "split.csv").write_text("path\n")
    key = stage_key("train_frozen", project)
    assert stage_key("train_frozen", project) == key  # a pure function of the files
    (project / "data" / "raw" / "a.jpg").write_bytes(b"y")  # data
    assert stage_key("train_frozen", project) != key
    key = stage_key("train_frozen", project)
    (project / "data" / "raw" / "b.jpg").write_bytes(b"y")  # a new image
    assert stage_key("train_frozen", project) != key
    key = stage_key("train_frozen", project)
    apply_overrides(project / "params.yaml", ["train_frozen.wd=0.02"])  # a param of the stage
    assert stage_key("train_frozen", project) != key
    key = stage_key("train_frozen", project)
    apply_overrides(project / "params.yaml", ["data.num_workers=2", "evaluate.top_losses_k=3", "resume.every_epochs=2"])
    assert stage_key("train_frozen", project) == key  # plumbing, and params of other stages
    code = project / "src" / "petbreeds" / "learn" / "training.py"
    code.write_text(code.read_text() + "\n")  # code
    assert stage_key("train_frozen", project) != key
    with pytest.raises(PetbreedsError, match="no stage nonesuch"):
        stage_key("nonesuch", project)


# --- the stages, killed ------------------------------------------------------------------------------------------


def _project(finished: Path, root: Path, **overrides: object) -> Path:
    """A copy of the finished tiny project with :data:`LONGER` epochs: `dvc repro` reruns only the training."""
    project = copy_project(finished, root)
    apply_overrides(project / "params.yaml", [f"{k}={v}" for k, v in (LONGER | overrides).items()])
    return project


def _epoch_seconds(project: Path, stage: str) -> float:
    """An epoch's wall time in the stage's last run (training and validation)."""
    return min(float(r["seconds"]) for r in csv.DictReader((project / "plots" / f"{stage}.csv").open()))


def _state_folder(project: Path, stage: str) -> Path:
    return project / ".cache" / "resume" / stage


def _states(project: Path, stage: str) -> list[Path]:
    return sorted(p for p in _state_folder(project, stage).glob("*.pt") if not p.name.startswith("."))


def _kill_after_saves(project: Path, stage: str, saves: int, delay_s: float, *args: str) -> str:
    """Start ``dvc repro`` (a new session: DVC, the stage, torchrun and its ranks), SIGKILL all of it ``delay_s``
    after the stage wrote its ``saves``-th resume state, as a machine that dies; its output."""
    proc = subprocess.Popen(
        [DVC, "repro", *args],
        cwd=project,
        env=command_env(**QUIET),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def written() -> set[tuple[int, int]]:
        found = set()
        for path in _states(project, stage):
            with contextlib.suppress(FileNotFoundError):  # replaced between the listing and the stat
                found.add((path.stat().st_ino, path.stat().st_mtime_ns))
        return found

    before, seen = written(), set()
    deadline = time.monotonic() + 600
    while len(seen - before) < saves:
        assert proc.poll() is None, f"the run ended before its resume state #{saves}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline
        seen |= written()
        time.sleep(0.002)
    time.sleep(delay_s)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def _outputs(project: Path, stage: str) -> dict[str, object]:
    """The stage's outputs as a run writes them, less the wall-clock numbers."""

    def rows(path: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(io.StringIO(path.read_text()))]

    report = json.loads((project / "reports" / f"{stage}.json").read_text())
    model = "model.pt" if stage == "train_unfrozen" else "frozen.pt"
    lock = json.dumps(_lock_outs(project, stage), sort_keys=True)
    return {
        model: (project / "models" / model).read_bytes(),
        "epochs": rows(project / "plots" / f"{stage}.csv"),
        "batches": (project / "plots" / f"{stage}_batches.csv").read_bytes(),
        "report": {k: v for k, v in report.items() if k not in TIMING},
        "dvc.lock": lock,
    }


def _lock_outs(project: Path, stage: str) -> dict[str, str]:
    """dvc.lock's md5 of each of the stage's outputs that a run writes identically (not run_info, not the reports
    and plots that hold seconds)."""
    from ruamel.yaml import YAML

    outs = YAML(typ="safe").load((project / "dvc.lock").read_text())["stages"][stage]["outs"]
    return {o["path"]: o["md5"] for o in outs if o["path"].startswith("models/") or o["path"].endswith("batches.csv")}


@pytest.mark.slow
def test_a_stage_killed_between_and_mid_epoch_resumes_under_dvc_repro_and_ends_byte_identical(
    finished: Path, tmp_path: Path
) -> None:
    """train_unfrozen in one process, killed twice."""
    stage = "train_unfrozen"
    project = _project(finished, tmp_path / "p", **{"train_frozen.epochs": 1, "train_unfrozen.epochs": 4})
    run(project, DVC, "repro", stage, **QUIET)
    reference = _outputs(project, stage)
    mid_epoch = 0.4 * _epoch_seconds(project, stage)
    assert _states(project, stage) == []  # a finished stage removes its state

    # -f: this project finished the same run (the reference), which `dvc repro` would check out from its cache
    # between epochs: killed the moment epoch 0's state is written; DVC removed the outputs before running
    _kill_after_saves(project, stage, 1, 0.0, *FORCE, stage)
    assert not (project / "models" / "model.pt").exists()
    # mid-epoch: the next run resumes at epoch 1, saves epoch 1's state and dies within epoch 2
    out = _kill_after_saves(project, stage, 1, mid_epoch, *FORCE, stage)
    assert f"{stage}: resuming at epoch 1 of 4 from " in out, out
    out = run(project, DVC, "repro", *FORCE, stage, **QUIET)
    assert f"{stage}: resuming at epoch 2 of 4 from " in out, out
    assert _outputs(project, stage) == reference
    assert _states(project, stage) == []
    facts = json.loads((project / "reports" / "run_info" / f"{stage}.json").read_text())["facts"]
    assert facts["resumed_at"].startswith("epoch 2 of 4 from "), facts


@pytest.mark.slow
def test_two_gloo_ranks_killed_mid_epoch_resume_byte_identical(finished: Path, tmp_path: Path) -> None:
    """train_frozen under torchrun: rank 0 writes the state, both ranks resume from it (each its own RNGs)."""
    stage = "train_frozen"
    project = _project(finished, tmp_path / "p", **{"distributed.nproc_per_node": 2, "train_frozen.epochs": 3})
    run(project, DVC, "repro", stage, **QUIET)
    reference = _outputs(project, stage)
    mid_epoch = 0.4 * _epoch_seconds(project, stage)
    _kill_after_saves(project, stage, 1, mid_epoch, *FORCE, stage)
    out = run(project, DVC, "repro", *FORCE, stage, **QUIET)
    assert f"{stage}: resuming at epoch 1 of 3 from " in out, out
    assert _outputs(project, stage) == reference


def test_a_state_of_another_machine_is_used_with_a_notice(tmp_path, capsys) -> None:
    table = write_pets(tmp_path)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, table, state, stop_at_batch=sum(table["split"] == "train") // 8 + 1)
    saved = torch.load(state, weights_only=True)
    torch.save({**saved, "machine": "torch 2.11.0 on NVIDIA H100"}, state)
    capsys.readouterr()
    _fit(tmp_path, table, state)
    out = capsys.readouterr().out
    assert "train_frozen: the resume state was saved by torch 2.11.0 on NVIDIA H100, this is torch " in out
    assert "train_frozen: resuming at epoch 1 of 3" in out


def test_outside_a_pipeline_a_stage_says_it_keeps_no_state(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no dvc.yaml: a stage script run on its own
    resume = Resume.open("train_frozen", load_params(ROOT / "params.yaml"), SINGLE_PROCESS)
    assert resume.path is None and not resume.due(1, 3) and resume.load(3) is None
    assert f"train_frozen: no resume state: {tmp_path / 'dvc.yaml'}: no stage train_frozen" in capsys.readouterr().out


def test_states_of_other_code_data_or_params_are_named_listed_and_cleaned(tmp_path, monkeypatch, capsys) -> None:
    project = make_project(tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    folder = _state_folder(project, "train_frozen")
    folder.mkdir(parents=True)
    current = folder / f"{stage_key('train_frozen', project)}.pt"
    stale = folder / ("0" * 32 + ".pt")  # another experiment's, or this one's before a code change
    for path in (current, stale):
        path.write_bytes(b"x" * 2**20)
    resume = Resume.open("train_frozen", load_params(project / "params.yaml"), SINGLE_PROCESS)
    assert resume.path == current
    assert capsys.readouterr().out == (
        f"train_frozen: ignoring 1 resume state(s) of other code, data or params in {folder} "
        "(`petbreeds resume --clean` removes them)\n"
    )
    assert resume_cli([]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"stale   train_frozen           1.0 MiB  {stale}",
        f"current train_frozen           1.0 MiB  {current}",
    ]
    resume_cli(["--clean"])
    assert capsys.readouterr().out.splitlines() == [
        f"removed {stale}",
        f"current train_frozen           1.0 MiB  {current}",  # kept, and listed
    ]
    assert current.exists() and not stale.exists()
    resume_cli(["--clean", "--all"])
    assert capsys.readouterr().out == f"removed {current}\n" and not current.exists()
    resume_cli([])
    assert capsys.readouterr().out == f"no resume states in {folder.parent}\n"
