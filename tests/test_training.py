"""The training loop on real parts: JPEGs written with Pillow, make_loader, BatchAugment, a PetModel with a tiny
body (fastai's head and 3 groups), real AdamW/OneCycleLR steps on the CPU; and the three stages end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from petbreeds.augment import BatchAugment
from petbreeds.config import load_params
from petbreeds.dataloaders import make_loader
from petbreeds.errors import PetbreedsError
from petbreeds.model import PetModel, create_head
from petbreeds.training import SmoothLoss, fit_one_cycle, get_preds, validate

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 50, 40)}


def tiny_model(n_classes: int = 3) -> PetModel:
    """A PetModel with a resnet-like body of 8 children (param_groups cuts resnets at 6) but ~3k parameters."""
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
    )
    return PetModel("resnet18", body, create_head(16, n_classes))


def write_pets(root: Path, per_class: int = 12, side: int = 48) -> pd.DataFrame:
    """JPEGs ``images/<colour>_<n>.jpg`` of a noisy colour per class; a split table (every 3rd image valid)."""
    (root / "images").mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    rows = []
    for label, rgb in COLOURS.items():
        for n in range(per_class):
            noise = torch.randint(-60, 61, (side, side, 3), generator=rng)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            path = f"images/{label}_{n}.jpg"
            Image.fromarray(pixels).save(root / path, quality=90)
            rows.append({"path": path, "label": label, "split": "valid" if n % 3 == 0 else "train"})
    return pd.DataFrame(rows)


@pytest.fixture
def pets(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    return tmp_path, write_pets(tmp_path)


def _setup(root: Path, table: pd.DataFrame, seed: int = 0):
    params = load_params(ROOT / "params.yaml")
    data = dataclasses.replace(params.data, item_size=40, size=32, batch_size=8, num_workers=0)
    vocab = sorted(COLOURS)
    train = make_loader(table[table.split == "train"].reset_index(drop=True), root, vocab, data, train=True, seed=seed)
    valid = make_loader(table[table.split == "valid"].reset_index(drop=True), root, vocab, data, train=False, seed=seed)
    torch.manual_seed(seed)
    return tiny_model(), train, valid, BatchAugment(params.augment, 32, seed, CPU)


def _fit(model, train, valid, augment, epochs: int, lr: float = 1e-2, stage: str = "train_frozen", on_epoch=None):
    return fit_one_cycle(
        model,
        train,
        valid,
        augment,
        epochs=epochs,
        lrs=[lr] * 3,
        pct_start=0.25,
        div=25.0,
        div_final=1e5,
        wd=0.01,
        device=CPU,
        dtype=None,
        channels_last=True,
        stage=stage,
        on_epoch=on_epoch,
    )


def test_smooth_loss_is_fastais_debiased_ema() -> None:
    smooth = SmoothLoss()
    assert smooth.add(2.0) == pytest.approx(2.0)  # debiasing makes the first value the loss itself
    assert smooth.add(1.0) == pytest.approx((0.98 * 0.02 * 2.0 + 0.02 * 1.0) / (1 - 0.98**2))


def test_fit_one_cycle_learns_and_reports_the_books_columns(pets, capsys) -> None:
    model, train, valid, augment = _setup(*pets)
    loss_before, _ = validate(model, valid, augment, CPU, None, channels_last=True)
    seen = []
    history = _fit(model, train, valid, augment, epochs=4, on_epoch=seen.append)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert seen == history
    assert set(history[0]) == {"epoch", "train_loss", "valid_loss", "error_rate", "lr", "seconds", "images_per_s"}
    assert history[-1]["valid_loss"] < loss_before
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["error_rate"] < 1 / 3  # chance is 2/3; the colours are easy
    assert history[-1]["lr"] == pytest.approx(1e-2 / 1e5)  # torch's last batch runs on the floor (schedule.py)
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
    model, _, valid, augment = _setup(root, table)
    logits, targets = get_preds(model, valid, augment, CPU, None, channels_last=False)
    expected = [sorted(COLOURS).index(label) for label in table[table.split == "valid"]["label"]]
    assert logits.dtype == torch.float32 and logits.shape == (12, 3)
    assert targets.dtype == torch.int64 and targets.tolist() == expected
    assert not model.training


def _run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PETBREEDS_MLFLOW_LIVE": "0", "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_stages_lr_find_train_frozen_train_unfrozen(tmp_path: Path) -> None:
    """The three stage scripts on a tiny project: resnet18 without pretrained weights, 32 px, real JPEGs."""
    table = write_pets(tmp_path / "data" / "raw", per_class=16)
    table.to_csv(tmp_path / "data" / "split.csv", index=False)
    (tmp_path / "data" / "vocab.json").write_text(json.dumps({"vocab": sorted(COLOURS)}))
    (tmp_path / "models" / "pretrained").mkdir(parents=True)
    (tmp_path / "models" / "pretrained" / "weights.json").write_text(
        json.dumps({"arch": "resnet18", "weights": "none"})
    )
    params = (ROOT / "params.yaml").read_text()
    for old, new in [
        ("arch: efficientnet_lite0", "arch: resnet18"),
        ("weights: imagenet ", "weights: none "),
        ("item_size: 160", "item_size: 40"),
        ("size: 128", "size: 32"),
        ("batch_size: 32", "batch_size: 8"),
        ("num_workers: -1", "num_workers: 0"),
        ("num_it: 100", "num_it: 20"),
    ]:
        assert old in params
        params = params.replace(old, new)
    (tmp_path / "params.yaml").write_text(params)

    for stage in ("lr_find", "train_frozen", "train_unfrozen"):
        done = _run_stage(stage, tmp_path)
        assert done.returncode == 0, done.stderr

    lr_find = json.loads((tmp_path / "metrics" / "lr_find.json").read_text())
    assert set(lr_find) == {"valley", "minimum", "steep", "slide", "chosen", "seconds", "iterations"}
    assert lr_find["chosen"] == lr_find["valley"] and lr_find["iterations"] <= 20
    assert (tmp_path / "plots" / "lr_find.csv").read_text().startswith("lr,loss\n")
    for png in ("lr_find", "show_batch_train", "show_batch_valid"):
        assert (tmp_path / "reports" / f"{png}.png").stat().st_size > 0
    frozen = json.loads((tmp_path / "metrics" / "train_frozen.json").read_text())
    assert frozen["lr"] == lr_find["valley"] and frozen["epochs"] == 2
    unfrozen = json.loads((tmp_path / "metrics" / "train_unfrozen.json").read_text())
    assert (unfrozen["lr_lo"], unfrozen["lr_hi"], unfrozen["epochs"]) == (1e-5, 1e-3, 3)
    history = pd.read_csv(tmp_path / "plots" / "train_unfrozen.csv")
    assert list(history.columns) == ["epoch", "train_loss", "valid_loss", "error_rate", "lr", "seconds"]
    assert history["epoch"].tolist() == [0, 1, 2]
    for ckpt in ("frozen.pt", "model.pt"):
        assert torch.load(tmp_path / "models" / ckpt, weights_only=True)["arch"] == "resnet18"

    # A stale or missing input is a one-line error naming the file, not a traceback.
    shutil.rmtree(tmp_path / "models" / "pretrained")
    failed = _run_stage("train_frozen", tmp_path)
    assert failed.returncode == 1
    assert "models/pretrained/weights.json" in failed.stderr and "Traceback" not in failed.stderr
