"""docs/img/*.png from one default run, and docs/img/PICTURES.md naming the run each picture came from.

    make pictures                                         # dvc repro here, then this script
    .venv/bin/python scripts/pictures.py [--project DIR] [--out DIR]

``--project``: a project folder after ``dvc repro`` (default: this repository); ``--out``: where the pictures go
(default: this repository's docs/img). From the project it copies the PNGs the pipeline draws (reports/: lr_find,
show_batch_train/valid, confusion_matrix, top_losses), draws docs/img/sample_grid.png from the fetched images
(data/raw/images), and screenshots the run's MLflow page with headless Chromium against a local ``mlflow ui`` on the
project's store (docs/img/mlflow_run.png). Pictures that nothing regenerates go stale without anyone noticing; these
are redrawn by one command and each caption says which commit, model and metrics it shows.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from petbreeds.atomic import atomic_output, atomic_write_text
from petbreeds.machine import cpu_model
from petbreeds.track.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
# docs/img name -> what the picture shows (its caption's first words); the pipeline draws them under reports/
PIPELINE_PNGS = {
    "lr_find.png": "The frozen model's lr_find sweep: smoothed training loss against learning rate, with the "
    "suggestions. `slide` sits far left, on the flat start, because that is what fastai's `slide` rule gives on such a "
    "curve: it moves a 15-point window leftwards from the end while the loss's slopes at the window's two ends differ "
    "by more than 0.005, and on this curve they do almost down to the start (`tests/test_vs_fastai.py` checks our "
    "suggestions against fastai's own); the pipeline trains at `valley` (`lr_find.suggestion`)",
    "show_batch_train.png": "A training batch as the model sees it (presized, then augmented)",
    "show_batch_valid.png": "A validation batch as the model sees it (presized, centre crop)",
    "confusion_matrix.png": "The validation set's confusion matrix",
    "top_losses.png": "The validation images with the largest losses: predicted / actual / loss / probability",
}
LABEL = re.compile(r"(.+)_(\d+)\.jpg$")  # the pets' file names, as params.yaml's index.label_regex
GRID_BREEDS, GRID_IMAGES, GRID_CELL = 12, 7, 72  # sample_grid.png: rows, images per row, pixels per cell
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",  # let the React app fetch the run before the screenshot
    "--window-size=1032,1700",
]
# The UI is served on this loopback address, not localhost / 127.0.0.1: there MLflow 3.17 opens its Assistant chat
# panel over the run page on a browser's first visit. Its host and origin checks are told to accept it.
UI_HOST = "127.0.0.2"


@dataclass(frozen=True)
class Run:
    """The run a picture comes from: what a reader needs to find or redo it."""

    commit: str  # the code's: the last commit that changed more than the results (see code_commit)
    results_committed: bool  # HEAD is a commit of the results on top of it, as the README's "Baseline results"
    params_changed: bool  # params.yaml differs from the commit's: the commit alone does not say what ran
    model_md5: str
    error_rate: float
    valid_loss: float
    cpu: str
    date: str

    def caption(self) -> str:
        """The words every caption ends with."""
        changed = " with params.yaml changed" if self.params_changed else ""
        committed = " with its results committed" if self.results_committed else ""
        return (
            f"git commit `{self.commit[:7]}`{committed}{changed}, models/model.pt md5 `{self.model_md5}` (dvc.lock), "
            f"validation error_rate {self.error_rate:.4f}, valid_loss {self.valid_loss:.4f}; {self.cpu}, {self.date}"
        )


def fail(message: str) -> SystemExit:
    """The exit for a missing input: ``error:`` and what to do, no traceback."""
    return SystemExit(f"error: {message}")


# What the README's quick start commits after `make repro` ("Baseline results"): the run's results, not its code
RESULTS = ("dvc.lock", "metrics", "plots", "reports")


def code_commit(project: Path) -> str | None:
    """The last commit that changed more than :data:`RESULTS`: a commit of the results alone is the project's own, not
    one a reader can find, so the captions name the code it ran."""
    excluded = [f":(exclude){path}" for path in RESULTS]
    log = ["git", "log", "-1", "--format=%H", "--", ".", *excluded]
    return subprocess.run(log, cwd=project, capture_output=True, text=True, check=False).stdout.strip() or None


def read_run(project: Path) -> Run:
    """The run in ``project``: its git commit, dvc.lock's model md5, metrics/evaluate.json, the day its evaluate
    stage finished (reports/run_info/), and this machine's CPU (``make pictures`` runs the pipeline here)."""
    lock, metrics = project / "dvc.lock", project / "metrics" / "evaluate.json"
    evaluated = project / "reports" / "run_info" / "evaluate.json"
    for path in (lock, metrics, evaluated):
        if not path.is_file():
            raise fail(f"{path}: missing; run `dvc repro` in {project} first (or pass --project)")
    from petbreeds.track.outputs import out_md5, read_yaml  # here: importing mlflow takes seconds

    md5 = out_md5(read_yaml(lock), "train_unfrozen", "models/model.pt")
    if md5 is None:
        raise fail("dvc.lock: no md5 for models/model.pt; run `dvc repro` in the project first")
    status = ["git", "status", "--porcelain", "--", "params.yaml"]  # modified, or not committed at all
    changed = subprocess.run(status, cwd=project, capture_output=True, text=True, check=False).stdout.strip()
    numbers = json.loads(metrics.read_text(encoding="utf-8"))
    head, code = git_commit(project), code_commit(project)
    return Run(
        commit=code or head or "no-git",
        results_committed=code is not None and code != head,
        params_changed=bool(changed),
        model_md5=md5,
        error_rate=numbers["error_rate"],
        valid_loss=numbers["valid_loss"],
        cpu=cpu_model(),
        date=json.loads(evaluated.read_text(encoding="utf-8"))["finished"][:10],  # ISO 8601, UTC
    )


def copy_pipeline_pngs(project: Path, out: Path) -> None:
    """The pipeline's own PNGs (reports/) into ``out``, unchanged."""
    for name in PIPELINE_PNGS:
        source = project / "reports" / name
        if not source.is_file():
            raise fail(f"{source}: missing; run `dvc repro` in {project} first")
        with atomic_output(out / name) as tmp:
            shutil.copyfile(source, tmp)


def grid_breeds(images: Path) -> dict[str, list[Path]]:
    """The first :data:`GRID_BREEDS` breeds (sorted) with their first :data:`GRID_IMAGES` images (by number)."""
    by_breed: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for path in images.glob("*.jpg"):
        match = LABEL.match(path.name)
        if match:
            by_breed[match.group(1)].append((int(match.group(2)), path))
    breeds = sorted(by_breed)[:GRID_BREEDS]
    if not breeds:
        raise fail(f"{images}: no images named <breed>_<n>.jpg; run `dvc repro fetch` in the project first")
    return {breed: [path for _, path in sorted(by_breed[breed])[:GRID_IMAGES]] for breed in breeds}


def draw_sample_grid(breeds: dict[str, list[Path]], path: Path) -> None:
    """One row per breed, each image shrunk to fit its cell with its aspect kept, on white: what the data look like
    before presizing (the sides and aspects vary)."""
    grid = Image.new("RGB", (GRID_IMAGES * GRID_CELL, len(breeds) * GRID_CELL), "white")
    for row, paths in enumerate(breeds.values()):
        for col, image_path in enumerate(paths):
            with Image.open(image_path) as image:
                thumb = image.convert("RGB")
                thumb.thumbnail((GRID_CELL, GRID_CELL))
                grid.paste(thumb, (col * GRID_CELL, row * GRID_CELL))
    with atomic_output(path) as tmp:  # 256 colours: a third of the bytes, no difference at thumbnail size
        grid.quantize(colors=256).save(tmp, format="png", optimize=True)


def free_port() -> int:
    """A TCP port nothing listens on now, so that a running `make ui` (port 5000) is left alone."""
    with socket.socket() as s:
        s.bind((UI_HOST, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    """Until ``mlflow ui`` answers /health; an exit or a timeout stops with where its log is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise fail(f"mlflow ui exited ({server.returncode}) before it served {url}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise fail(f"mlflow ui not healthy at {url} after {timeout_s:.0f} s")


def run_page(project: Path, base: str) -> tuple[str, str]:
    """The MLflow run of the project's outputs (the name mlflow_log gave it: ``repro@<commit>[+dirty-<hash>]``), not
    merely the newest run of the store: its "Model metrics" tab (in the training view, see
    petbreeds.track.store.ui_url) and its name."""
    from mlflow import MlflowClient  # here, not at the top: importing mlflow takes seconds the captions do not need

    from petbreeds.track.identity import current_identity
    from petbreeds.track.store import EXPERIMENT

    name = current_identity(project).name
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    where = f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'"
    runs = [] if experiment is None else client.search_runs([experiment.experiment_id], where, max_results=1)
    if not runs:
        raise fail(f"{project / 'mlflow.db'}: no finished run {name}; run `dvc repro` (its mlflow_log stage) first")
    run = f"{base}/#/experiments/{experiment.experiment_id}/runs/{runs[0].info.run_id}"
    page = f"{run}/model-metrics?workflowType=machine_learning"  # the run's curves
    return page, name


def screenshot_mlflow_run(project: Path, path: Path) -> str:
    """The run's MLflow page of curves, served by a local ``mlflow ui`` on the project's store, as Chromium draws it
    with a fresh profile; returns the run's name."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise fail("chromium not installed: apt-get install -y chromium (the Debian package)")
    port = free_port()
    base = f"http://{UI_HOST}:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
           "--artifacts-destination", str(project / "mlartifacts"), "--host", UI_HOST, "--port", str(port),
           "--allowed-hosts", f"{UI_HOST}:{port}", "--cors-allowed-origins", base, "--workers", "1"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pictures.") as tmp:
        with open(Path(tmp) / "ui.log", "w") as log:
            server = subprocess.Popen(cmd, cwd=project, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(base, server)
            url, name = run_page(project, base)
            shot = Path(tmp) / "mlflow_run.png"
            chrome = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'chromium'}", f"--screenshot={shot}"]
            subprocess.run([*chrome, url], capture_output=True, timeout=180, check=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
        with atomic_output(path) as out:
            shutil.copyfile(shot, out)
    return name


def pictures_md(run: Run, breeds: list[str], mlflow_run: str) -> str:
    """docs/img/PICTURES.md: one caption per picture, each naming the run it came from."""
    lines = [
        "# docs/img: where each picture comes from",
        "",
        "Generated by `make pictures` (`scripts/pictures.py`): the default pipeline (`dvc repro` with params.yaml",
        "as committed, on the embedded generated sample, unless a caption says params.yaml changed), then these",
        "pictures from its outputs. Do not edit them by hand; rerun the command.",
        "",
    ]
    captions = {name: f"{what}; the pipeline's `reports/{name}`" for name, what in PIPELINE_PNGS.items()}
    captions["sample_grid.png"] = (
        f"The fetched sample (data/raw/images), {len(breeds)} breeds × {GRID_IMAGES} images as they are on disk, "
        f"before presizing; rows: {', '.join(breeds)}"
    )
    captions["mlflow_run.png"] = (
        f'The run\'s curves in MLflow, its "Model metrics" tab (`{mlflow_run}`), served by `mlflow ui` on the '
        "project's store, drawn by headless Chromium"
    )
    for name, what in captions.items():
        lines += [f"## {name}", "", f"![{name}]({name})", "", f"{what}. Run: {run.caption()}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=ROOT, help="project after `dvc repro` (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder (default: %(default)s)")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    run = read_run(project)
    copy_pipeline_pngs(project, args.out)
    breeds = grid_breeds(project / "data" / "raw" / "images")
    draw_sample_grid(breeds, args.out / "sample_grid.png")
    mlflow_run = screenshot_mlflow_run(project, args.out / "mlflow_run.png")
    atomic_write_text(args.out / "PICTURES.md", pictures_md(run, list(breeds), mlflow_run))
    print(f"pictures of {run.caption()} written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
