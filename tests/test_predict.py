"""predict: a tiny model really trained on three "breeds" of coloured JPEGs (tests/conftest.py's ``tiny_model``),
then asked about new ones."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import petbreeds
from petbreeds import cli
from petbreeds.data.dataloaders import make_loader
from petbreeds.errors import PetbreedsError
from petbreeds.learn.checkpoint import load_checkpoint
from petbreeds.learn.device import Compute
from petbreeds.learn.inference import get_preds
from petbreeds.serve.predict import Prediction, predict


@pytest.fixture
def new_images(tmp_path: Path, write_breed_images) -> Path:
    """Two unseen images per breed (seeds neither the training nor the fixture's held-out check used)."""
    folder = tmp_path / "new"
    write_breed_images(folder, 2, 500)
    return folder


def test_predict_names_the_breeds_of_unseen_images(tiny_model, new_images):
    predictions = predict(new_images, tiny_model, top_k=3, device=torch.device("cpu"))
    assert [p.path.name for p in predictions] == sorted(p.name for p in new_images.iterdir())
    for p in predictions:
        assert p.breed == p.path.name.rsplit("_", 1)[0], p
        assert [breed for breed, _ in p.top_k] != [] and len(p.top_k) == 3
        probs = [prob for _, prob in p.top_k]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # 3 classes: top-3 is everything
        assert p.probability > 0.5


def test_predict_uses_the_evaluate_stage_transforms(tiny_model, new_images, breeds):
    """Same probabilities as the validation loader path (make_loader + BatchAugment valid + get_preds)."""
    device = torch.device("cpu")
    model, ckpt = load_checkpoint(tiny_model, device)
    table = pd.DataFrame({"path": sorted(p.name for p in new_images.iterdir())})
    table["label"] = [name.rsplit("_", 1)[0] for name in table["path"]]
    logits, _ = get_preds(
        model,
        make_loader(table, new_images, breeds, ckpt.data_params(batch_size=8), train=False, seed=0),
        ckpt.valid_augment(device),
        Compute(device, None, channels_last=False),
    )
    expected = logits.softmax(dim=1)
    predictions = predict([new_images / name for name in table["path"]], tiny_model, top_k=1, device=device)
    for row, p in zip(expected, predictions, strict=True):
        assert p.breed == breeds[int(row.argmax())]
        assert p.probability == pytest.approx(float(row.max()), abs=1e-6)


def test_top_k_larger_than_vocab_gives_every_breed(tiny_model, new_images, breeds):
    (p,) = predict(sorted(new_images.iterdir())[0], tiny_model, top_k=10, device=torch.device("cpu"))
    assert sorted(breed for breed, _ in p.top_k) == breeds


def test_package_level_predict_and_cheap_import(tiny_model, new_images):
    image = sorted(new_images.iterdir())[0]
    result = petbreeds.predict(image, model_path=tiny_model, top_k=2)
    assert isinstance(result[0], Prediction) and len(result[0].top_k) == 2
    code = (
        "import sys, petbreeds; assert 'torch' not in sys.modules; "
        "import types; from petbreeds import predict; assert isinstance(predict, types.FunctionType)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_one_image_prints_readable_lines(tiny_model, new_images, capsys):
    image = new_images / "green_cat_500.jpg"
    assert cli.main(["predict", str(image), "--model", str(tiny_model), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    breed, prob = lines[0].split()
    assert breed == "green_cat" and 0.5 < float(prob) <= 1.0


def test_cli_folder_writes_csv_and_lists_skipped_files(tiny_model, new_images, tmp_path, capsys, caplog):
    (new_images / "notes.txt").write_text("not a picture")
    (new_images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (new_images / ".DS_Store").write_bytes(b"\0")  # hidden: not an input at all
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", str(new_images), "--model", str(tiny_model), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table.columns.tolist() == ["path", "pred_1", "prob_1", "pred_2", "prob_2", "pred_3", "prob_3"]
    assert len(table) == 6
    assert (table["pred_1"] == table["path"].map(lambda p: Path(p).name.rsplit("_", 1)[0])).all()
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert any("broken.jpg" in m and "not an image" in m for m in skipped)
    assert any("notes.txt" in m for m in skipped)
    # the folder's progress on stderr, not a terminal here: a line per ~10 % of its 8 files, at most one per file
    bars = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict: ")]
    assert 1 <= len(bars) <= 8 and bars[-1].startswith("predict: 100%|") and "8/8" in bars[-1]

    assert cli.main(["predict", str(new_images), "--model", str(tiny_model)]) == 0  # CSV on stdout
    assert capsys.readouterr().out.splitlines()[0].startswith("path,pred_1,prob_1")


def test_explicit_non_image_is_a_clear_error(tiny_model, tmp_path, capsys):
    notes = tmp_path / "notes.jpg"
    notes.write_text("hello")
    assert cli.main(["predict", str(notes), "--model", str(tiny_model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.jpg: not an image" in err and "Traceback" not in err


def test_missing_path_and_empty_folder(tiny_model, tmp_path):
    with pytest.raises(PetbreedsError, match="nothing.jpg: no such file or folder"):
        predict(tmp_path / "nothing.jpg", tiny_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PetbreedsError, match="empty: the folder holds no files"):
        predict(tmp_path / "empty", tiny_model)


def test_missing_model(new_images, tmp_path, capsys):
    missing = tmp_path / "models" / "model.pt"
    assert cli.main(["predict", str(new_images), "--model", str(missing)]) == 1
    assert f"{missing}: checkpoint not found" in capsys.readouterr().err


def test_default_model_is_found_from_inside_the_project(tiny_model, new_images, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    shutil.copy(tiny_model, project / "models" / "model.pt")
    (project / "photos").mkdir()
    image = shutil.copy(new_images / "green_cat_500.jpg", project / "photos")

    monkeypatch.chdir(project / "photos")  # below the root: the project's model
    assert cli.main(["predict", "green_cat_500.jpg"]) == 0
    assert capsys.readouterr().out.split()[0] == "green_cat"

    # a models/model.pt in the current folder comes first (the project's is made unreadable to tell)
    (project / "photos" / "models").mkdir()
    shutil.move(project / "models" / "model.pt", project / "photos" / "models" / "model.pt")
    (project / "models" / "model.pt").write_text("not a checkpoint")
    assert [p.breed for p in predict(image)] == ["green_cat"]


def test_no_default_model_names_both_places(new_images, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    project = tmp_path / "project"
    (project / "photos").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(project / "photos")
    assert cli.main(["predict", str(new_images)]) == 1
    err = capsys.readouterr().err
    here, root = project.resolve() / "photos", project.resolve()
    assert f"models/model.pt is in neither the current folder ({here}) nor the project root ({root})" in err
    assert "--model PATH" in err

    outside = tmp_path / "elsewhere"  # no dvc.yaml from here up
    outside.mkdir()
    monkeypatch.chdir(outside)
    with pytest.raises(PetbreedsError, match="no folder from here up holds dvc.yaml"):
        predict(new_images)


def test_checkpoint_of_another_format(new_images, tiny_model, tmp_path):
    old = tmp_path / "old.pt"
    state = torch.load(tiny_model, weights_only=True)
    torch.save({**state, "format": "petbreeds-model/0"}, old)
    with pytest.raises(PetbreedsError, match=r"old.pt: checkpoint format 'petbreeds-model/0'"):
        predict(new_images, old)
    not_torch = tmp_path / "model.pt"
    not_torch.write_text("a text file")
    with pytest.raises(PetbreedsError, match="not a petbreeds checkpoint"):
        predict(new_images, not_torch)


def test_real_gif_and_rgba_png_named_jpg(tiny_model, pet_subset, breeds):
    images = [pet_subset / "images" / "Abyssinian_34.jpg", pet_subset / "images" / "Abyssinian_5.jpg"]
    predictions = predict(images, tiny_model, top_k=1, device=torch.device("cpu"))
    assert [p.path for p in predictions] == images
    assert all(p.breed in breeds for p in predictions)


def test_cli_tta_predicts_with_augmented_passes(tiny_model, new_images, capsys):
    image = new_images / "green_cat_500.jpg"
    assert cli.main(["predict", str(image), "--model", str(tiny_model), "--top-k", "1", "--tta", "2"]) == 0
    breed, prob = capsys.readouterr().out.split()
    (plain,) = predict(image, tiny_model, top_k=1, device=torch.device("cpu"))
    assert breed == plain.breed == "green_cat" and float(prob) != pytest.approx(plain.probability, abs=1e-3)
    assert cli.main(["predict", str(image), "--model", str(tiny_model), "--tta", "-1"]) == 1
    assert "tta must be >= 0" in capsys.readouterr().err
