"""scripts/pictures.py without a pipeline run: the captions name the run (commit, model md5, metrics, CPU, date), the
pipeline's PNGs are copied as they are, the sample grid shows the first breeds' first images, and a project without
its outputs stops with what to run. (The MLflow screenshot's approach is tests/test_mlflow_ui.py's.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from petbreeds.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MD5 = "0123456789abcdef0123456789abcdef"
# dvc.lock as DVC writes it, trimmed to the stage that writes the model and one other out
LOCK = f"""schema: '2.0'
stages:
  train_unfrozen:
    cmd: python stages/train.py unfrozen
    outs:
    - path: models/model.pt
      hash: md5
      md5: {MD5}
      size: 14000000
    - path: plots/train_unfrozen.csv
      hash: md5
      md5: ffffffffffffffffffffffffffffffff
"""


@pytest.fixture(scope="module")
def pictures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scripts_pictures", ROOT / "scripts" / "pictures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def fake_project(root: Path, pictures: ModuleType) -> str:
    """A git repository with what `dvc repro` leaves behind for the pictures; returns its commit."""
    (root / "metrics").mkdir(parents=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps({"error_rate": 0.254237, "valid_loss": 0.81234}))
    (root / "dvc.lock").write_text(LOCK)
    (root / "reports" / "run_info").mkdir(parents=True)
    info = {"stage": "evaluate", "finished": "2026-12-06T17:00:00+00:00"}
    (root / "reports" / "run_info" / "evaluate.json").write_text(json.dumps(info))
    for i, name in enumerate(pictures.PIPELINE_PNGS):
        Image.new("RGB", (20 + i, 10), (i, 0, 0)).save(root / "reports" / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "params.yaml").write_text("seed: 42\n")
    subprocess.run(["git", "-C", str(root), "add", "params.yaml"], check=True)
    subprocess.run([*git, "-C", str(root), "commit", "-q", "-m", "run"], check=True)
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_captions_name_the_run_each_picture_came_from(pictures: ModuleType, tmp_path: Path) -> None:
    commit = fake_project(tmp_path / "project", pictures)
    run = pictures.read_run(tmp_path / "project")
    assert (run.commit, run.model_md5, run.error_rate, run.valid_loss) == (commit, MD5, 0.254237, 0.81234)
    assert not run.params_changed
    text = pictures.pictures_md(run, ["Abyssinian", "Bengal"], "repro@abc1234+dirty-12345678")
    names = [*pictures.PIPELINE_PNGS, "sample_grid.png", "mlflow_run.png"]
    assert [line.removeprefix("## ") for line in text.splitlines() if line.startswith("## ")] == names
    captions = [line for line in text.splitlines() if line.endswith(f"{cpu_model()}, 2026-12-06.")]
    assert len(captions) == len(names)  # one caption per picture, each naming the run
    for caption in captions:
        assert f"git commit `{commit[:7]}`, models/model.pt md5 `{MD5}` (dvc.lock)" in caption
        assert "error_rate 0.2542, valid_loss 0.8123" in caption
    assert "rows: Abyssinian, Bengal" in text and "`repro@abc1234+dirty-12345678`" in text

    # the results committed on top (the README's "Baseline results"): the captions name the code's commit
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-C", str(tmp_path / "project")]
    subprocess.run([*git, "add", "dvc.lock", "metrics", "reports"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "Baseline results"], check=True)
    caption = pictures.read_run(tmp_path / "project").caption()
    assert caption.startswith(f"git commit `{commit[:7]}` with its results committed, models/model.pt md5")

    (tmp_path / "project" / "params.yaml").write_text("seed: 1\n")  # not the commit's: the captions say so
    assert "with params.yaml changed, models/model.pt" in pictures.read_run(tmp_path / "project").caption()


def test_the_pipeline_pngs_are_copied_unchanged(pictures: ModuleType, tmp_path: Path) -> None:
    fake_project(tmp_path / "project", pictures)
    pictures.copy_pipeline_pngs(tmp_path / "project", tmp_path / "img")
    for name in pictures.PIPELINE_PNGS:
        assert (tmp_path / "img" / name).read_bytes() == (tmp_path / "project" / "reports" / name).read_bytes()


def test_without_the_runs_outputs_it_says_what_to_run(pictures: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"error: .*dvc\.lock: missing; run `dvc repro`"):
        pictures.read_run(tmp_path)
    fake_project(tmp_path / "project", pictures)
    (tmp_path / "project" / "reports" / "top_losses.png").unlink()
    with pytest.raises(SystemExit, match=r"error: .*top_losses\.png: missing; run `dvc repro`"):
        pictures.copy_pipeline_pngs(tmp_path / "project", tmp_path / "img")
    (tmp_path / "project" / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.raises(SystemExit, match="no md5 for models/model.pt"):
        pictures.read_run(tmp_path / "project")


def test_the_sample_grid_shows_the_first_breeds_first_images(pictures: ModuleType, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    breeds = [f"breed{b:02d}" for b in range(pictures.GRID_BREEDS + 1)]
    for b, breed in enumerate(breeds):
        for n in range(1, pictures.GRID_IMAGES + 4):  # numbers to 10: sorted as numbers, not as text
            colour = (b * 20, n * 20, 0)
            Image.new("RGB", (300, 150 + 10 * n), colour).save(images / f"{breed}_{n}.jpg", quality=100)
    chosen = pictures.grid_breeds(images)
    assert list(chosen) == breeds[: pictures.GRID_BREEDS]
    assert [p.name for p in chosen["breed00"]] == [f"breed00_{n}.jpg" for n in range(1, pictures.GRID_IMAGES + 1)]
    pictures.draw_sample_grid(chosen, tmp_path / "grid.png")
    cell = pictures.GRID_CELL
    with Image.open(tmp_path / "grid.png") as png:
        grid = png.convert("RGB")  # written with a 256-colour palette
        assert grid.size == (pictures.GRID_IMAGES * cell, pictures.GRID_BREEDS * cell)
        red, green, _ = grid.getpixel((2 * cell + cell // 2, 3 * cell + 5))  # breed 3, image 3, near its top
        assert abs(red - 60) <= 3 and abs(green - 60) <= 3
        assert grid.getpixel((cell // 2, cell - 2)) == (255, 255, 255)  # below a wide image: white
