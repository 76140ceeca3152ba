"""The training loop on real parts: JPEGs written with Pillow, make_loader, BatchAugment, a PetModel with a tiny
body (fastai's head and 3 groups), real AdamW/one-cycle steps on the CPU; and the three stages end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny import COLOURS, ROOT, VOCAB, stage_argv, tiny_net, tiny_project, write_pets

from petbreeds.config import load_params
from petbreeds.errors import PetbreedsError
from petbreeds.learn.callbacks import Callback, DivergenceStop, LiveEpochs, Recorder, SmoothLoss, Table
from petbreeds.learn.inference import get_preds
from petbreeds.learn.schedule import combined_cos
from petbreeds.learn.training import TrainingData, fit_one_cycle, training_data, validate
from petbreeds.stage import phase_argument
from petbreeds.world import SINGLE_PROCESS

CPU = torch.device("cpu")


@pytest.fixture
def pets(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    return tmp_path, write_pets(tmp_path)


def _setup(root: Path, table: pd.DataFrame, seed: int = 0) -> tuple[torch.nn.Module, TrainingData]:
    params = load_params(ROOT / "params.yaml")
    data = params.data.model_copy(update={"item_size": 40, "size": 32, "batch_size": 8, "num_workers": 0})
    train = params.train.model_copy(update={"precision": "fp32"})  # the loop's numbers, not auto's calibration
    params = params.model_copy(update={"data": data, "train": train})
    torch.manual_seed(seed)
    return tiny_net(), training_data(params, table, VOCAB, root, seed=seed, world=SINGLE_PROCESS)


def _fit(model, data, epochs: int, lr: float = 1e-2, stage: str = "train_frozen", callbacks: list[Callback] = ()):
    phase = load_params(ROOT / "params.yaml").train_frozen.model_copy(
        update={"epochs": epochs, "pct_start": 0.25, "div": 25.0, "div_final": 1e5, "wd": 0.01}
    )
    return fit_one_cycle(model, data, phase, [lr] * 3, [DivergenceStop(stage), *callbacks])


def test_smooth_loss_is_fastais_debiased_ema() -> None:
    smooth = SmoothLoss()
    assert smooth.add(2.0) == pytest.approx(2.0)  # debiasing makes the first value the loss itself
    assert smooth.add(1.0) == pytest.approx((0.98 * 0.02 * 2.0 + 0.02 * 1.0) / (1 - 0.98**2))


def test_fit_one_cycle_learns_and_reports_the_books_columns(pets, capsys) -> None:
    model, data = _setup(*pets)
    loss_before, _ = validate(model, data)
    seen, recorder = [], Recorder()
    history = _fit(model, data, epochs=4, callbacks=[recorder, Table(), LiveEpochs(seen.append)])
    batches = recorder.batches
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert seen == history
    columns = {"epoch", "train_loss", "valid_loss", "error_rate", "lr", "seconds", "images_per_s", "iteration"}
    assert set(history[0]) == columns
    # fastai's Recorder: the smoothed loss and the lr of every batch; an epoch's train_loss is its last batch's
    per_epoch = len(data.train_loader)
    assert [b["iteration"] for b in batches] == list(range(1, 4 * per_epoch + 1))
    assert [row["iteration"] for row in history] == [per_epoch * (e + 1) for e in range(4)]
    assert [batches[row["iteration"] - 1]["train_loss"] for row in history] == [row["train_loss"] for row in history]
    assert batches[-1]["lr"] == history[-1]["lr"] and batches[0]["lr"] == pytest.approx(1e-2 / 25)
    assert history[-1]["valid_loss"] < loss_before
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["error_rate"] < 1 / 3  # chance is 2/3; the colours are easy
    n = 4 * len(data.train_loader)  # fastai's last batch, pos (n-1)/n, stays above the floor 1e-2/1e5
    assert history[-1]["lr"] == pytest.approx(combined_cos(0.25, 1e-2 / 25, 1e-2, 1e-2 / 1e5, (n - 1) / n))
    assert all(row["images_per_s"] > 0 and row["seconds"] > 0 for row in history)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["epoch", "train_loss", "valid_loss", "error_rate", "time"]
    assert table[4].split()[0] == "3" and table[4].split()[-1].count(":") == 1


def test_same_seed_gives_identical_history(pets) -> None:
    runs = []
    for _ in range(2):
        history = _fit(*_setup(*pets), epochs=2)
        runs.append([{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in history])
    assert runs[0] == runs[1]
    different_seed = _fit(*_setup(*pets, seed=1), epochs=2)
    assert different_seed[-1]["train_loss"] != runs[0][-1]["train_loss"]


def test_non_finite_loss_names_stage_epoch_batch_and_lr(pets) -> None:
    # lr 1e30: the first step puts weights near 1e28, the next forward overflows float32.
    with pytest.raises(
        PetbreedsError, match=r"train_unfrozen diverged: .* at epoch 0, batch 1 \(lr .*\); .* under train_unfrozen"
    ):
        _fit(*_setup(*pets), epochs=1, lr=1e30, stage="train_unfrozen")


def test_get_preds_in_loader_order(pets) -> None:
    root, table = pets
    model, data = _setup(root, table)
    logits, targets = get_preds(model, data.valid_loader, data.augment, data.compute)
    expected = [sorted(COLOURS).index(label) for label in table[table.split == "valid"]["label"]]
    assert logits.dtype == torch.float32 and logits.shape == (12, 3)
    assert targets.dtype == torch.int64 and targets.tolist() == expected
    assert not model.training


def _run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PETBREEDS_MLFLOW_LIVE": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(stage_argv(name), cwd=cwd, env=env, capture_output=True, text=True)


def _results(project: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """Every number the three stages wrote (timings left out) and the final model's weights."""
    timing = ("seconds", "images_per_s")
    numbers = {
        path.name: {k: v for k, v in json.loads(path.read_text()).items() if k not in timing}
        for path in sorted((project / "reports").glob("*.json"))
    }
    for path in sorted((project / "plots").glob("*.csv")):
        numbers[path.name] = pd.read_csv(path).drop(columns="seconds", errors="ignore").to_dict("list")
    state = torch.load(project / "models" / "model.pt", weights_only=True)["state_dict"]
    return numbers, state


TRAINING_STAGES = ("lr_find", "train_frozen", "lr_find_unfrozen", "train_unfrozen")


@pytest.mark.slow
def test_stages_lr_find_train_frozen_train_unfrozen(tmp_path: Path) -> None:
    """The four stage scripts on a tiny project: resnet18 without pretrained weights, 32 px, real JPEGs."""
    tiny_project(tmp_path)
    # what train.precision auto becomes and why, printed and kept in the sidecar (MLflow's tags
    # stage.<stage>.precision, .precision_choice); on a CPU the first stage calibrates, the others read its cache
    cuda = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else None
    became = set()
    for stage in TRAINING_STAGES:
        done = _run_stage(stage, tmp_path)
        assert done.returncode == 0, done.stderr
        facts = json.loads((tmp_path / "reports" / "run_info" / f"{stage}.json").read_text())["facts"]
        sweep = {"sweep_seconds"} if stage.startswith("lr_find") else set()  # not in the report a phase depends on
        assert set(facts) == {"precision", "precision_choice", *sweep}
        assert all(float(facts[key]) > 0 for key in sweep)
        assert f"{stage}: precision {facts['precision']}, precision_choice {facts['precision_choice']}" in done.stdout
        assert facts["precision"] in ((cuda,) if cuda else ("fp32", "bf16"))
        if facts["precision_choice"].startswith("calibrated"):
            assert facts["precision_choice"].endswith("(cached)") == (stage != "lr_find")
        became.add(facts["precision"])
        # progress without a terminal (as in `dvc queue logs`): the sweep's bar a line per ~10 % of its 20 batches,
        # a training bar a line per epoch (of 3 batches); the validation bar is the terminal's alone
        bars = [line for line in done.stderr.splitlines() if line.startswith(stage)]
        epochs = {"lr_find": 0, "train_frozen": 2, "lr_find_unfrozen": 0, "train_unfrozen": 3}[stage]
        if epochs:
            assert [line.split("|")[0] for line in bars] == [f"{stage} epoch {e}: 100%" for e in range(epochs)]
        else:
            assert 1 <= len(bars) <= 10 and all(line.startswith(f"{stage} sweep: ") for line in bars), bars
        assert len(done.stderr.splitlines()) <= 12, done.stderr
    assert len(became) == 1  # one precision for the whole run

    lr_find = json.loads((tmp_path / "reports" / "lr_find.json").read_text())
    assert set(lr_find) == {"valley", "minimum", "steep", "slide", "chosen", "iterations"}
    assert lr_find["chosen"] == lr_find["valley"] and lr_find["iterations"] <= 20
    assert (tmp_path / "plots" / "lr_find.csv").read_text().startswith("lr,loss\n")
    for png in ("lr_find", "show_batch_train", "show_batch_valid"):
        assert (tmp_path / "reports" / f"{png}.png").stat().st_size > 0
    frozen = json.loads((tmp_path / "reports" / "train_frozen.json").read_text())
    assert frozen["lr"] == lr_find["valley"] and frozen["epochs"] == 2
    # the finder after unfreezing: its own curve and suggestions, from frozen.pt
    unfrozen_find = json.loads((tmp_path / "reports" / "lr_find_unfrozen.json").read_text())
    assert set(unfrozen_find) == set(lr_find) and unfrozen_find["iterations"] <= 20
    assert (tmp_path / "plots" / "lr_find_unfrozen.csv").read_text().startswith("lr,loss\n")
    assert (tmp_path / "reports" / "lr_find_unfrozen.png").stat().st_size > 0
    unfrozen = json.loads((tmp_path / "reports" / "train_unfrozen.json").read_text())
    assert (unfrozen["lr_lo"], unfrozen["lr_hi"], unfrozen["epochs"]) == (1e-5, pytest.approx(1e-3), 3)
    history = pd.read_csv(tmp_path / "plots" / "train_unfrozen.csv")
    columns = ["epoch", "global_epoch", "global_iteration", "train_loss", "valid_loss", "error_rate", "lr", "seconds"]
    assert list(history.columns) == columns
    assert history["epoch"].tolist() == [0, 1, 2] and history["global_epoch"].tolist() == [2, 3, 4]  # after 2 frozen
    # per batch (fastai's plot_loss): the iterations count on over both phases; each epoch's row sits on its last
    per_epoch = 3  # 30 training images (10 of 16 per colour), batch 8, drop_last
    frozen_batches = pd.read_csv(tmp_path / "plots" / "train_frozen_batches.csv")
    batches = pd.read_csv(tmp_path / "plots" / "train_unfrozen_batches.csv")
    assert list(batches.columns) == ["iteration", "global_iteration", "train_loss", "lr"]
    assert frozen_batches["global_iteration"].tolist() == list(range(1, 2 * per_epoch + 1))
    assert batches["iteration"].tolist() == list(range(1, 3 * per_epoch + 1))
    assert batches["global_iteration"].tolist() == list(range(2 * per_epoch + 1, 5 * per_epoch + 1))
    assert history["global_iteration"].tolist() == [per_epoch * epochs for epochs in (3, 4, 5)]
    ends = batches.set_index("global_iteration").loc[history["global_iteration"], "train_loss"]
    assert ends.tolist() == history["train_loss"].tolist()
    for ckpt in ("frozen.pt", "model.pt"):
        assert torch.load(tmp_path / "models" / ckpt, weights_only=True)["arch"] == "resnet18"

    # Same machine, same torch build, same params and data: the same numbers and weights, run after run.
    first = _results(tmp_path)
    for stage in TRAINING_STAGES:
        assert _run_stage(stage, tmp_path).returncode == 0
    again = _results(tmp_path)
    assert again[0] == first[0]
    assert again[1].keys() == first[1].keys() and all(torch.equal(again[1][k], v) for k, v in first[1].items())

    # A stale or missing input is a one-line error naming the file, not a traceback.
    shutil.rmtree(tmp_path / "models" / "pretrained")
    failed = _run_stage("train_frozen", tmp_path)
    assert failed.returncode == 1
    assert "models/pretrained/weights.json" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.slow
def test_the_phases_take_fastais_lr_forms(tmp_path: Path) -> None:
    """train_frozen.lr [hi] is fastai's slice(hi): hi/10 for the body's groups, hi for the head (no lr_find run).
    A null train_unfrozen.lr is lr_find_unfrozen's suggestion, one lr for every group (the book's unfreeze(),
    lr_find(), fit_one_cycle(6, lr_max=1e-5))."""
    lr = "  lr:                         # a number"
    tiny_project(
        tmp_path,
        **{
            lr: "  lr: [2.0e-3]                # a number",
            "  epochs: 2\n": "  epochs: 1\n",
            "  epochs: 3\n": "  epochs: 1\n",
            "  - 1.0e-5\n  - 1.0e-3\n": "",  # train_unfrozen.lr: null
        },
    )
    done = _run_stage("train_frozen", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train_frozen: max lr per group 0.0002, 0.0002, 0.002" in done.stdout
    assert load_params(tmp_path / "params.yaml").train_unfrozen.lr is None
    # lr_find_unfrozen's report (the stage itself runs in the test above): the suggestion lr_find.suggestion names
    (tmp_path / "reports" / "lr_find_unfrozen.json").write_text(json.dumps({"valley": 3e-4, "steep": 1e-5}))
    done = _run_stage("train_unfrozen", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train_unfrozen: max lr per group 0.0003, 0.0003, 0.0003" in done.stdout
    unfrozen = json.loads((tmp_path / "reports" / "train_unfrozen.json").read_text())
    assert unfrozen["lr_lo"] == unfrozen["lr_hi"] == 3e-4


def _losses(model: torch.nn.Module, data: TrainingData) -> tuple[list[dict[str, float]], list[float]]:
    """Two epochs: the history and the smoothed training loss after each batch."""
    recorder = Recorder()
    history = _fit(model, data, epochs=2, callbacks=[recorder])
    return history, [row["train_loss"] for row in recorder.batches]


def _compiled_fit(
    root: Path, table: pd.DataFrame, cache: Path
) -> tuple[list[dict[str, float]], list[float], list[str]]:
    """:func:`_losses` with train.compile true, compiling into ``cache``; and the cache's files."""
    model, data = _setup(root, table)
    compiled = replace(data, compute=replace(data.compute, compile=True))
    history, batches = _losses(model, compiled)
    return history, batches, sorted(p.name for p in cache.rglob("*") if p.is_file())


@pytest.mark.slow
def test_compiled_training_learns_like_eager_and_reuses_its_cache(pets, tmp_path, monkeypatch) -> None:
    root, table = pets
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    eager, eager_batches = _losses(*_setup(root, table))
    torch._dynamo.reset()
    compiled, compiled_batches, files = _compiled_fit(root, table, cache)
    assert files, "torch.compile wrote nothing into TORCHINDUCTOR_CACHE_DIR"
    # Compiled kernels round differently: the first batches agree to ~1e-6 (the same forward, dropout masks
    # included, and the same first update); the gap then grows with every update, to ~1e-3 after 2 epochs.
    assert compiled_batches[0] == pytest.approx(eager_batches[0], rel=1e-5)
    assert compiled_batches[1] == pytest.approx(eager_batches[1], rel=1e-4)
    assert eager[-1]["valid_loss"] < 0.5 * eager_batches[0]  # it learned, and the compiled run as much:
    for e, c in zip(eager, compiled, strict=True):
        assert c["valid_loss"] == pytest.approx(e["valid_loss"], abs=0.01)
    # a new process (here: dynamo's in-memory state dropped) finds the compiled graphs on disk
    torch._dynamo.reset()
    hits_before = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    again, _, files_again = _compiled_fit(root, table, cache)
    assert torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"] > hits_before
    assert files_again == files
    assert [r["valid_loss"] for r in again] == [r["valid_loss"] for r in compiled]


def test_a_two_phase_script_without_its_phase_stops_with_a_usage_line() -> None:
    assert phase_argument(["unfrozen"]) == "unfrozen"
    for wrong in ([], ["thawed"], ["frozen", "unfrozen"]):
        with pytest.raises(SystemExit, match=r"usage: python .* frozen\|unfrozen"):
            phase_argument(wrong)
