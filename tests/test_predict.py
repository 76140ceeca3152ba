"""predict: a tiny model really trained on three "breeds" of coloured JPEGs, then asked about new ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import petbreeds
from petbreeds import cli
from petbreeds.augment import BatchAugment
from petbreeds.config import DataParams, load_params
from petbreeds.dataloaders import make_loader
from petbreeds.errors import PetbreedsError
from petbreeds.model import create_model, load_checkpoint, save_checkpoint
from petbreeds.predict import Prediction, predict, valid_augment
from petbreeds.training import fit_one_cycle, get_preds

# The module trains a tiny model first (~1 min on 2 busy cores).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Three "breeds" a tiny net tells apart in a few steps: one dominant colour each, under pixel noise.
COLOURS = {"blue_dog": (40, 70, 210), "green_cat": (50, 190, 70), "red_dog": (210, 50, 40)}
VOCAB = sorted(COLOURS)
DATA = DataParams(item_size=40, size=32, resize_method="crop", pad_mode="reflection", batch_size=8, num_workers=0)


def write_jpeg(path: Path, breed: str, seed: int) -> Path:
    """A JPEG of ``breed``'s colour with noise; sizes vary so that presizing has something to crop."""
    rng = np.random.default_rng(seed)
    height, width = 40 + int(rng.integers(0, 20)), 40 + int(rng.integers(0, 30))
    pixels = np.asarray(COLOURS[breed], dtype=np.float64) + rng.normal(0, 25, (height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def write_dataset(images: Path, per_breed: int, first_seed: int) -> pd.DataFrame:
    """``per_breed`` JPEGs per breed named as the archive's (``<breed>_<n>.jpg``); table path, label."""
    rows = []
    for k, breed in enumerate(VOCAB):
        for n in range(per_breed):
            name = f"{breed}_{first_seed + n}.jpg"
            write_jpeg(images / name, breed, seed=1000 * k + first_seed + n)
            rows.append({"path": f"images/{name}", "label": breed})
    return pd.DataFrame(rows)


def train_tiny_model(raw: Path, out: Path) -> Path:
    """resnet18 (no weights) trained for a few steps at 32 px on ``raw/images``; saved as a real checkpoint."""
    table = write_dataset(raw / "images", per_breed=8, first_seed=0)
    augment_params = load_params(ROOT / "params.yaml").augment
    torch.manual_seed(0)
    model = create_model("resnet18", len(VOCAB), None)
    device = torch.device("cpu")
    fit_one_cycle(
        model,
        make_loader(table, raw, VOCAB, DATA, train=True, seed=0),
        make_loader(table, raw, VOCAB, DATA, train=False, seed=0),
        BatchAugment(augment_params, DATA.size, seed=0, device=device),
        epochs=8,
        lrs=[1e-2] * 3,
        pct_start=0.25,
        div=25.0,
        div_final=1e5,
        wd=0.01,
        device=device,
        dtype=None,
        channels_last=False,
        stage="test",
    )
    save_checkpoint(out, model, arch="resnet18", vocab=VOCAB, data=DATA)
    return out


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_model")
    return train_tiny_model(root / "raw", root / "model.pt")


@pytest.fixture
def new_images(tmp_path: Path) -> Path:
    """Two unseen images per breed (seeds the training never used)."""
    folder = tmp_path / "new"
    write_dataset(folder, per_breed=2, first_seed=500)
    return folder


def test_predict_names_the_breeds_of_unseen_images(model_path, new_images):
    predictions = predict(new_images, model_path, top_k=3, device=torch.device("cpu"))
    assert [p.path.name for p in predictions] == sorted(p.name for p in new_images.iterdir())
    for p in predictions:
        assert p.breed == p.path.name.rsplit("_", 1)[0], p
        assert [breed for breed, _ in p.top_k] != [] and len(p.top_k) == 3
        probs = [prob for _, prob in p.top_k]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # 3 classes: top-3 is everything
        assert p.probability > 0.5


def test_predict_uses_the_evaluate_stage_transforms(model_path, new_images):
    """Same probabilities as the validation loader path (make_loader + BatchAugment valid + get_preds)."""
    device = torch.device("cpu")
    model, ckpt = load_checkpoint(model_path, device)
    table = pd.DataFrame({"path": sorted(p.name for p in new_images.iterdir())})
    table["label"] = [name.rsplit("_", 1)[0] for name in table["path"]]
    logits, _ = get_preds(
        model,
        make_loader(table, new_images, VOCAB, DATA, train=False, seed=0),
        valid_augment(ckpt, device),
        device,
        None,
        False,
    )
    expected = logits.softmax(dim=1)
    predictions = predict([new_images / name for name in table["path"]], model_path, top_k=1, device=device)
    for row, p in zip(expected, predictions, strict=True):
        assert p.breed == VOCAB[int(row.argmax())]
        assert p.probability == pytest.approx(float(row.max()), abs=1e-6)


def test_top_k_larger_than_vocab_gives_every_breed(model_path, new_images):
    (p,) = predict(sorted(new_images.iterdir())[0], model_path, top_k=10, device=torch.device("cpu"))
    assert sorted(breed for breed, _ in p.top_k) == VOCAB


def test_package_level_predict_and_cheap_import(model_path, new_images):
    image = sorted(new_images.iterdir())[0]
    result = petbreeds.predict(image, model_path=model_path, top_k=2)
    assert isinstance(result[0], Prediction) and len(result[0].top_k) == 2
    code = (
        "import sys, petbreeds; assert 'torch' not in sys.modules; "
        "from petbreeds import predict; assert callable(predict)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_one_image_prints_readable_lines(model_path, new_images, capsys):
    image = new_images / "green_cat_500.jpg"
    assert cli.main(["predict", str(image), "--model", str(model_path), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    breed, prob = lines[0].split()
    assert breed == "green_cat" and 0.5 < float(prob) <= 1.0


def test_cli_folder_writes_csv_and_lists_skipped_files(model_path, new_images, tmp_path, capsys, caplog):
    (new_images / "notes.txt").write_text("not a picture")
    (new_images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (new_images / ".DS_Store").write_bytes(b"\0")  # hidden: not an input at all
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", str(new_images), "--model", str(model_path), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table.columns.tolist() == ["path", "pred_1", "prob_1", "pred_2", "prob_2", "pred_3", "prob_3"]
    assert len(table) == 6
    assert (table["pred_1"] == table["path"].map(lambda p: Path(p).name.rsplit("_", 1)[0])).all()
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert any("broken.jpg" in m and "not an image" in m for m in skipped)
    assert any("notes.txt" in m for m in skipped)

    assert cli.main(["predict", str(new_images), "--model", str(model_path)]) == 0  # CSV on stdout
    assert capsys.readouterr().out.splitlines()[0].startswith("path,pred_1,prob_1")


def test_explicit_non_image_is_a_clear_error(model_path, tmp_path, capsys):
    notes = tmp_path / "notes.jpg"
    notes.write_text("hello")
    assert cli.main(["predict", str(notes), "--model", str(model_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.jpg: not an image" in err and "Traceback" not in err


def test_missing_path_and_empty_folder(model_path, tmp_path):
    with pytest.raises(PetbreedsError, match="nothing.jpg: no such file or folder"):
        predict(tmp_path / "nothing.jpg", model_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PetbreedsError, match="empty: the folder holds no files"):
        predict(tmp_path / "empty", model_path)


def test_missing_model(new_images, tmp_path, capsys):
    missing = tmp_path / "models" / "model.pt"
    assert cli.main(["predict", str(new_images), "--model", str(missing)]) == 1
    assert f"{missing}: checkpoint not found" in capsys.readouterr().err


def test_checkpoint_of_another_format(new_images, model_path, tmp_path):
    old = tmp_path / "old.pt"
    state = torch.load(model_path, weights_only=True)
    torch.save({**state, "format": "petbreeds-model/0"}, old)
    with pytest.raises(PetbreedsError, match=r"old.pt: checkpoint format 'petbreeds-model/0'"):
        predict(new_images, old)
    not_torch = tmp_path / "model.pt"
    not_torch.write_text("a text file")
    with pytest.raises(PetbreedsError, match="not a petbreeds checkpoint"):
        predict(new_images, not_torch)


def test_real_gif_and_rgba_png_named_jpg(model_path, pet_subset):
    images = [pet_subset / "images" / "Abyssinian_34.jpg", pet_subset / "images" / "Abyssinian_5.jpg"]
    predictions = predict(images, model_path, top_k=1, device=torch.device("cpu"))
    assert [p.path for p in predictions] == images
    assert all(p.breed in VOCAB for p in predictions)
