"""show_batch PNGs and the summary walk, on real JPEGs and a real params.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from ruamel.yaml import YAML

from petbreeds.cli import main as cli_main
from petbreeds.config import load_params
from petbreeds.data.augment import BatchAugment
from petbreeds.data.show import collate_items, save_show_batch
from petbreeds.errors import PetbreedsError

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["Bengal", "beagle", "pug"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder: params.yaml (tiny sizes), data/split.csv, data/vocab.json and JPEGs in data/raw."""
    yaml = YAML()
    params = yaml.load((ROOT / "params.yaml").read_text())
    params["data"].update(item_size=40, size=32, batch_size=4, num_workers=0)
    with (tmp_path / "params.yaml").open("w") as f:
        yaml.dump(params, f)
    images = tmp_path / "data" / "raw" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = LABELS[i % 3]
        pixels = rng.integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{label}_{i}.jpg")
        rows.append({"path": f"images/{label}_{i}.jpg", "label": label, "split": "valid" if i >= 8 else "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "split.csv", index=False)
    (tmp_path / "data" / "vocab.json").write_text(json.dumps({"vocab": sorted(LABELS)}))
    return tmp_path


def args(project: Path, *extra: str) -> list[str]:
    return ["--params", str(project / "params.yaml"), "--data", str(project / "data"), *extra]


def test_save_show_batch_writes_a_labelled_png(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    aug = BatchAugment(params.augment, 32, seed=0, device=torch.device("cpu"))
    x = torch.randint(0, 255, (5, 3, 40, 40), dtype=torch.uint8)
    for train in (True, False):
        path = tmp_path / f"grid_{train}.png"
        save_show_batch(x, torch.tensor([0, 1, 2, 0, 1]), LABELS, aug, path, train=train, max_n=4)
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (400, 400)  # 2x2 cells of 2 inches at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid_False.png", "grid_True.png"]  # no temp files left


def test_show_batch_command_writes_train_and_valid(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = project / "reports"
    assert cli_main(["show-batch", *args(project, "--out", str(out))]) == 0
    for split in ("train", "valid"):
        with Image.open(out / f"show_batch_{split}.png") as png:
            assert png.size[0] > 100
    assert "show_batch_valid.png" in capsys.readouterr().out


def test_summary_walks_every_step(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["summary", *args(project)]) == 0
    out = capsys.readouterr().out
    assert "Bengal_0.jpg → label 'Bengal' → class index 0" in out
    assert "file JPEG RGB 50x30 → decoded RGB 50x30" in out
    assert "torch.uint8 [3, 40, 40]" in out
    assert "x torch.uint8 [4, 3, 40, 40]" in out and "y torch.int64 [4]" in out
    assert "train torch.float32 [4, 3, 32, 32]" in out
    assert "FAILED" not in out


def test_summary_stops_at_the_failing_step(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "data" / "raw" / "images" / "Bengal_0.jpg").write_bytes(b"not an image")
    assert cli_main(["summary", *args(project)]) == 1
    out = capsys.readouterr().out
    assert "3. sample: decode: FAILED" in out and "Bengal_0.jpg" in out
    assert "4." not in out
    (project / "data" / "split.csv").unlink()
    assert cli_main(["summary", *args(project)]) == 1
    assert "1. params and split table: FAILED" in capsys.readouterr().out


def test_collation_of_different_sizes_says_so() -> None:
    items = [(torch.zeros(3, 40, 40, dtype=torch.uint8), 0), (torch.zeros(3, 40, 52, dtype=torch.uint8), 1)]
    with pytest.raises(PetbreedsError, match=r"different sizes.*data\.item_size"):
        collate_items(items)
    x, y = collate_items(items[:1] * 2)
    assert x.shape == (2, 3, 40, 40) and y.tolist() == [0, 0]
