"""Shared test fixtures: real files only (JPEGs written with Pillow, real params.yaml)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

if TYPE_CHECKING:
    import torch

    from petbreeds.config import DataParams

ROOT = Path(__file__).resolve().parents[1]
SHARED_SUBSET = ROOT.parent / "shared" / "data" / "oxford-iiit-pet-subset"

# One torch thread per test process, as in the pipelines the tests start (tests/dvc_project.py): two pytest-xdist
# workers already use both cores of a 2-core machine, and OpenMP threads competing for a busy core wait on each
# other (a training step of the tiny resnet took 3x as long with 2 threads as with 1 while another process ran).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DVC project after `dvc repro`, results committed (tests/dvc_project.py ``finished_project``): built
    once per test run, for every pytest-xdist worker; never change it: work on ``copy_project(finished, dest)``."""
    from dvc_project import finished_project  # imports dvc: only the tests that use it pay for it

    base = tmp_path_factory.getbasetemp()
    return finished_project(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


@pytest.fixture
def pet_subset() -> Path:
    """The real 1,029-image subset in ../shared, or a clean skip when it is absent."""
    if not (SHARED_SUBSET / "images").is_dir():
        pytest.skip(f"{SHARED_SUBSET} not present")
    return SHARED_SUBSET


# --------------------------------------------------------------------------------------------------
# The pipeline's outputs written by hand, for the MLflow tests (test_tracking.py, test_mlflow_ui.py)

FAKE_BASELINE = "ab" + "c" * 38
FAKE_FROZEN_ROWS = [
    {"epoch": 0, "train_loss": 3.1, "valid_loss": 2.5, "error_rate": 0.8, "lr": 0.002, "seconds": 4.0},
    {"epoch": 1, "train_loss": 2.2, "valid_loss": 1.9, "error_rate": 0.6, "lr": 1.0e-7, "seconds": 5.0},
]


@pytest.fixture
def fake_baseline() -> str:
    """The baseline commit the fake outputs name (``DVC_EXP_BASELINE_REV``)."""
    return FAKE_BASELINE


@pytest.fixture
def frozen_rows() -> list[dict[str, float]]:
    """The rows of the fake ``plots/train_frozen.csv``."""
    return [dict(row) for row in FAKE_FROZEN_ROWS]


def _write_fake_outputs(
    root: Path, exp_name: str | None = "exp-a", executed: tuple[str, ...] = ("train_frozen",)
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    lock = {
        "schema": "2.0",
        "stages": {
            "fetch": {"cmd": "python stages/fetch.py", "outs": [{"path": "data/raw", "md5": "0" * 32 + ".dir"}]},
            "train_unfrozen": {"cmd": "python stages/train.py unfrozen", "outs": [{"path": "models/model.pt"}]},
        },
    }
    (root / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/evaluate.json").write_text(json.dumps({"error_rate": 0.25, "valid_loss": 0.75}))
    (root / "plots").mkdir(exist_ok=True)
    with (root / "plots/train_frozen.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(FAKE_FROZEN_ROWS[0]))
        writer.writeheader()
        writer.writerows(FAKE_FROZEN_ROWS)
    (root / "plots/lr_find.csv").write_text("lr,loss\n1e-07,3.7\n1e-06,3.6\n1e-05,3.1\n")
    (root / "reports/run_info").mkdir(parents=True, exist_ok=True)
    (root / "reports/lr_find.json").write_text(json.dumps({"valley": 1.0e-3, "steep": 2.0e-3}))
    for stage in ("fetch", "lr_find", "train_frozen"):
        producer = exp_name if stage in executed else "an-older-exp"
        info = {"stage": stage, "dvc_exp_name": producer, "baseline_rev": FAKE_BASELINE, "mlflow_child_run_id": None}
        info |= {"started": "2026-11-23T10:00:00+00:00", "finished": "2026-11-23T10:00:09+00:00"}
        (root / f"reports/run_info/{stage}.json").write_text(json.dumps(info))


@pytest.fixture
def write_fake_outputs() -> Callable[..., None]:
    """``write_fake_outputs(root, exp_name="exp-a", executed=("train_frozen",))``: a project folder as the pipeline
    leaves it (params.yaml, dvc.lock, metrics/, plots/, reports/); ``executed`` stages name ``exp_name`` as their
    producer, the others an older experiment."""
    return _write_fake_outputs


@pytest.fixture
def exp_identity() -> Callable[..., Any]:
    """``exp_identity(name="exp-a")``: the ``RunIdentity`` of a DVC experiment on the fake baseline."""
    from petbreeds.track.identity import RunIdentity  # imports mlflow: only the tests that use it pay for it

    def identity(name: str = "exp-a") -> RunIdentity:
        return RunIdentity(name=name, exp_name=name, baseline_rev=FAKE_BASELINE, git_commit=FAKE_BASELINE)

    return identity


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()``: a localhost TCP port nothing listens on (at the time of the call)."""

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


# --------------------------------------------------------------------------------------------------
# Numeric tests: `make test-avx2` runs them again with another CPU's kernels

# Test modules whose results come out of floating-point kernels: they train, run lr_find, predict, evaluate, or
# compare floats computed by torch. torch picks its kernels by CPU (AVX-512, AVX2, AMX ...), so such a test can pass
# on one CPU and fail on another; CI runs them a second time with the AVX2 kernels forced.
NUMERIC_MODULES = frozenset(
    {
        "test_augment.py",
        "test_device.py",
        "test_evaluate.py",
        "test_export.py",
        "test_interpret.py",
        "test_lr_find.py",
        "test_model.py",
        "test_pipeline_e2e.py",
        "test_predict.py",
        "test_presizing.py",
        "test_pretrained.py",
        "test_schedule.py",
        "test_training.py",
        "test_tta.py",
        "test_vs_fastai.py",
    }
)


# The files that take longest, longest first, from `make test`'s 15 slowest (AMD EPYC 2-core, 2026-12-07): each runs
# in one worker, so the run lasts at least as long as the longest.
LONGEST_FILES = ("test_mlflow_server.py", "test_pipeline_e2e.py", "test_resume.py", "test_pipeline_ddp.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in NUMERIC_MODULES:
            item.add_marker(pytest.mark.numeric)
    # The longest files first, then the other files with end-to-end tests (marker `slow`): pytest-xdist hands out
    # files in this order, so the long ones start at once and the short ones fill in beside them, instead of one long
    # file running alone at the end.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def order(item: pytest.Item) -> tuple[int, bool]:
        name = item.path.name
        if name in LONGEST_FILES:
            return LONGEST_FILES.index(name), False
        return len(LONGEST_FILES), item.path not in slow_files

    items.sort(key=order)


# --------------------------------------------------------------------------------------------------
# A tiny trained model and its colour "breeds", for predict and evaluate (test_predict.py, test_evaluate.py)

# Three breeds told apart by one dominant colour each, under pixel noise: trivially separable.
BREED_COLOURS = {"blue_dog": (40, 70, 210), "green_cat": (50, 190, 70), "red_dog": (210, 50, 40)}
BREEDS = sorted(BREED_COLOURS)
# The model trains until, on held-out images, the true breed's logit beats every other one by this much
# (probability > 0.96 among 3). The tests rely on that margin, checked here, and not on how a tiny model converges
# in a fixed number of steps: that depends on the CPU's kernels (it named the wrong breeds on Sapphire Rapids).
MIN_LOGIT_MARGIN = 4.0
MAX_TRAIN_STEPS = 1000


def _write_breed_images(images: Path, per_breed: int, first_seed: int) -> pd.DataFrame:
    """``per_breed`` JPEGs per breed named as the archive's (``<breed>_<n>.jpg``); table ``path,label``.

    Each is its breed's colour plus noise; sizes vary so that presizing has something to crop.
    """
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, breed in enumerate(BREEDS):
        for n in range(first_seed, first_seed + per_breed):
            rng = np.random.default_rng(1000 * k + n)
            height, width = 40 + int(rng.integers(0, 20)), 40 + int(rng.integers(0, 30))
            pixels = np.asarray(BREED_COLOURS[breed], dtype=np.float64) + rng.normal(0, 25, (height, width, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / f"{breed}_{n}.jpg", quality=90)
            rows.append({"path": f"images/{breed}_{n}.jpg", "label": breed})
    return pd.DataFrame(rows)


def _as_predicted(root: Path, table: pd.DataFrame, data: DataParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(model inputs, class indices) of the table's images, through predict's and evaluate's transforms."""
    import torch

    from petbreeds.data.augment import ValidAugment
    from petbreeds.data.presizing import PresizedImages

    items = PresizedImages(
        [root / p for p in table["path"]], [BREEDS.index(b) for b in table["label"]], data, train=False, seed=0
    )
    x = torch.stack([items[i][0] for i in range(len(items))])
    augment = ValidAugment(data.size, torch.device("cpu"))  # the valid path, as Checkpoint.valid_augment
    return augment(x, train=False), torch.tensor(items.targets)


def _logit_margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The smallest amount by which an image's true-class logit beats its best other class."""
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
    return float((true - others).min())


def _train_tiny_model(raw: Path, out: Path) -> Path:
    """A resnet18 (no weights) whose head is trained at 32 px on ``raw/images`` until the held-out images in
    ``raw/held_out`` are classified with :data:`MIN_LOGIT_MARGIN`; saved as a real checkpoint at ``out``.

    A plain torch loop, so that the fixture does not depend on the training module's API.
    """
    import torch
    import torch.nn.functional as F

    from petbreeds.config import DataParams, load_params
    from petbreeds.learn.checkpoint import save_checkpoint
    from petbreeds.learn.model import create_model

    data = DataParams(item_size=40, size=32, resize_method="crop", pad_mode="reflection", batch_size=8, num_workers=0)
    torch.manual_seed(0)
    # Eval mode throughout: batch norms keep fixed statistics and dropout is off, so the function trained is exactly
    # the one predict and evaluate compute. The body stays random and frozen, so its features are computed once.
    model = create_model("resnet18", len(BREEDS), None).eval()
    with torch.no_grad():
        x, y = _as_predicted(raw, _write_breed_images(raw / "images", per_breed=8, first_seed=0), data)
        held_x, held_y = _as_predicted(
            raw / "held_out", _write_breed_images(raw / "held_out" / "images", per_breed=5, first_seed=300), data
        )
        features, held_features = model.body(x), model.body(held_x)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    margin = float("-inf")
    for _ in range(MAX_TRAIN_STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model.head(features), y).backward()
        optimizer.step()
        with torch.no_grad():
            margin = _logit_margin(model.head(held_features), held_y)
        if margin >= MIN_LOGIT_MARGIN:
            break
    else:
        pytest.fail(
            f"tests/conftest.py: the tiny model's held-out logit margin is {margin:.2f} after {MAX_TRAIN_STEPS} steps "
            f"(needs {MIN_LOGIT_MARGIN}); the colour breeds should be trivially separable: check BREED_COLOURS "
            "and the training loop"
        )
    augment = load_params(ROOT / "params.yaml").augment
    save_checkpoint(out, model, arch="resnet18", vocab=BREEDS, data=data, augment=augment)
    return out


@pytest.fixture(scope="session")
def breeds() -> list[str]:
    """The tiny model's vocab: its colour breeds, sorted."""
    return list(BREEDS)


@pytest.fixture(scope="session")
def write_breed_images() -> Callable[[Path, int, int], pd.DataFrame]:
    """``write_breed_images(images_dir, per_breed, first_seed)``: JPEGs ``<breed>_<n>.jpg`` of the colour breeds,
    ``n`` from ``first_seed``; returns the table ``path`` (``images/<name>``), ``label``."""
    return _write_breed_images


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of a tiny model that names the colour breeds of unseen images with a clear margin."""
    root = tmp_path_factory.mktemp("tiny_model")
    return _train_tiny_model(root / "raw", root / "model.pt")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tiny_model` exported to ONNX by the command a user types (``petbreeds export``)."""
    from petbreeds import cli

    out = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    assert cli.main(["export", "--model", str(tiny_model), "--out", str(out)]) == 0
    return out
