"""Tiny real parts for the training tests, importable by pytest tests and by the scripts they run under torchrun
(a conftest fixture cannot reach a subprocess): a PetModel with a tiny body, and JPEGs of coloured "pets"."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import nn

from petbreeds.learn.model import PetModel, create_head

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 50, 40)}
VOCAB = sorted(COLOURS)


def stage_argv(name: str) -> list[str]:
    """The command that runs stage ``name`` as dvc.yaml's ``cmd`` says (``python stages/train.py frozen``), with
    this interpreter and the checkout's script."""
    from ruamel.yaml import YAML

    _, script, *args = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"].split()
    return [sys.executable, str(ROOT / script), *args]


def tiny_net(n_classes: int = 3) -> PetModel:
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


def tiny_project(root: Path, per_class: int = 16, **changes: str) -> Path:
    """A project folder for the training stage scripts: pets in data/raw, split.csv, vocab.json, no pretrained
    weights (resnet18 arch, random body), params.yaml with tiny sizes; ``changes``: more params text edits."""
    table = write_pets(root / "data" / "raw", per_class=per_class)
    table.to_csv(root / "data" / "split.csv", index=False)
    (root / "data" / "vocab.json").write_text(json.dumps({"vocab": VOCAB}))
    (root / "models" / "pretrained").mkdir(parents=True)
    (root / "models" / "pretrained" / "weights.json").write_text(json.dumps({"arch": "resnet18", "weights": "none"}))
    params = (ROOT / "params.yaml").read_text()
    edits = {
        "arch: efficientnet_lite0": "arch: resnet18",
        "weights: imagenet ": "weights: none ",
        "item_size: 160": "item_size: 40",
        "size: 128": "size: 32",
        "batch_size: 32": "batch_size: 8",
        "num_workers: -1": "num_workers: 0",
        "num_it: 100": "num_it: 20",
        **changes,
    }
    for old, new in edits.items():
        assert old in params, old
        params = params.replace(old, new)
    (root / "params.yaml").write_text(params)
    return root
