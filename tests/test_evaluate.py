"""Stage evaluate end to end on a tiny trained model: the files dvc.yaml declares, with consistent content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from petbreeds.config import load_params
from petbreeds.errors import PetbreedsError
from petbreeds.learn.inference import compute_as_trained
from petbreeds.stage import StageContext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(
    tmp_path: Path, tiny_model: Path, breeds: list[str], write_breed_images, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A project folder as the pipeline leaves it before evaluate: data/raw, data/split.csv, models/model.pt."""
    table = write_breed_images(tmp_path / "data" / "raw" / "images", 3, 700)
    table["split"] = ["train", "valid", "valid"] * len(breeds)
    table.to_csv(tmp_path / "data" / "split.csv", index=False)
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_model, tmp_path / "models" / "model.pt")
    # fp32: auto would time efficientnet_lite0 at 128 px (20 s on 2 cores) in every test's fresh .cache/
    params = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("\n  precision: auto ", "\n  precision: fp32 ", 1))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_evaluate(project: Path) -> None:
    import stages.evaluate as evaluate

    evaluate.main(load_params(project / "params.yaml"), StageContext(name="evaluate", root=project))


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def test_evaluate_writes_every_declared_output(project, breeds, capsys):
    run_evaluate(project)
    # what experiments are compared by (dvc exp show), in fastai's names; the rest of the numbers in the report
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert list(metrics) == ["error_rate", "valid_loss", "error_rate_tta", "valid_loss_tta"]
    assert metrics["valid_loss_tta"] != metrics["valid_loss"]  # evaluate.tta.n: 4 augmented passes beside the plain
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    assert list(report) == ["accuracy", "top5_accuracy", "macro_precision", "macro_recall", "n_items"]
    assert report["n_items"] == 6
    assert metrics["error_rate"] == pytest.approx(1 - report["accuracy"])
    assert report["top5_accuracy"] == 1.0  # 3 classes

    records = json.loads((project / "plots" / "confusion.json").read_text())
    assert len(records) == 6 and {r["actual"] for r in records} == set(breeds)
    wrong = sum(r["actual"] != r["predicted"] for r in records)
    assert metrics["error_rate"] == pytest.approx(wrong / 6)

    top = pd.read_csv(project / "reports" / "top_losses.csv")
    assert len(top) == 6  # top_losses_k 9 > 6 items: all of them, largest loss first
    assert top["loss"].is_monotonic_decreasing
    assert all((project / "data" / "raw" / p).is_file() for p in top["path"])
    per_class = pd.read_csv(project / "reports" / "per_class.csv")
    assert per_class["breed"].tolist() == breeds and per_class["support"].tolist() == [2, 2, 2]
    confused = pd.read_csv(project / "reports" / "most_confused.csv")
    assert confused.columns.tolist() == ["actual", "predicted", "count"]
    for png in ("confusion_matrix.png", "top_losses.png"):
        with Image.open(project / "reports" / png) as img:
            assert img.format == "PNG"
    assert "most_confused(min_val=2):" in capsys.readouterr().out


def test_evaluate_is_deterministic(project):
    run_evaluate(project)
    first = (project / "metrics" / "evaluate.json").read_text()
    assert "valid_loss_tta" in first  # the TTA numbers too: their passes draw from seeded generators
    run_evaluate(project)
    assert (project / "metrics" / "evaluate.json").read_text() == first


def test_tta_n_0_leaves_the_plain_metrics_alone(project):
    run_evaluate(project)
    with_tta = json.loads((project / "metrics" / "evaluate.json").read_text())
    params_path = project / "params.yaml"
    params_path.write_text(params_path.read_text().replace("\n    n: 4 ", "\n    n: 0 ", 1))
    run_evaluate(project)
    plain = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert plain == {"error_rate": with_tta["error_rate"], "valid_loss": with_tta["valid_loss"]}


def test_test_split_without_official_list_is_explained(project):
    params_path = project / "params.yaml"
    params_path.write_text(params_path.read_text().replace("  - valid\n", "  - valid\n  - test\n"))
    with pytest.raises(PetbreedsError, match="no official test list.*split.method: official"):
        run_evaluate(project)


def test_a_test_split_is_compared_under_its_name():
    from stages.evaluate import metrics_and_report

    numbers = {"error_rate": 0.25, "accuracy": 0.75, "top5_accuracy": 1.0, "loss": 0.5, "n_items": 4}
    tta = {"error_rate_tta": 0.0, "loss_tta": 0.4}
    metrics, report = metrics_and_report({"valid": {**numbers, **tta}, "test": {**numbers, "n_items": 8, **tta}})
    assert metrics == {
        "error_rate": 0.25,
        "valid_loss": 0.5,
        "error_rate_tta": 0.0,
        "valid_loss_tta": 0.4,
        "test": {"error_rate": 0.25, "loss": 0.5, **tta},
    }
    rest = {"accuracy": 0.75, "top5_accuracy": 1.0}
    assert report == {**rest, "n_items": 4, "test": {**rest, "n_items": 8}}


def test_auto_evaluates_on_a_cpu_in_the_precision_training_recorded(tmp_path: Path) -> None:
    train = load_params(ROOT / "params.yaml").train.model_copy(update={"precision": "auto"})
    run_info = tmp_path / "train_unfrozen.json"
    cpu = torch.device("cpu")
    with pytest.raises(PetbreedsError, match=r"train_unfrozen\.json: no precision .* `dvc repro train_unfrozen`"):
        compute_as_trained(train, cpu, run_info)
    run_info.write_text(json.dumps({"facts": {"precision": "bf16", "precision_choice": "calibrated on X"}}))
    compute = compute_as_trained(train, cpu, run_info)
    assert compute.dtype == torch.bfloat16 and "calibrated on X" in compute.precision_choice
    fp32 = compute_as_trained(train.model_copy(update={"precision": "fp32"}), cpu, tmp_path / "absent.json")
    assert fp32.dtype is None  # a named precision means the same here as in training: nothing is read
