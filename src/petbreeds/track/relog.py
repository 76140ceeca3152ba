"""``petbreeds mlflow-relog [EXPERIMENT ...]``: log pipeline results to MLflow again from the DVC outputs.

For when the store was unreachable while ``mlflow_log`` ran. Without arguments it logs the workspace's outputs
(named after the experiment whose committed dvc.lock they are, else as ``dvc repro`` names them); with experiment
names it reads each one's outputs from its git commit (``refs/exps/...``) and ``plots/``, ``reports/`` from DVC's
cache. The run is built by ``petbreeds.track.parent_run.log_pipeline``, so a result already logged is left as it is.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from petbreeds.errors import PetbreedsError
from petbreeds.runtime import project_root
from petbreeds.track.identity import RunIdentity, repro_name, result_stages, uncommitted_results
from petbreeds.track.outputs import (
    MODEL_FILE,
    ONNX_FILE,
    SPLIT_TABLE,
    example_image,
    has_model,
    has_onnx_model,
    read_yaml,
)
from petbreeds.track.parent_run import log_pipeline
from petbreeds.track.provenance import git_commit


@dataclass(frozen=True)
class ExperimentRef:
    name: str
    baseline_rev: str
    commit: str


def experiment_refs(root: Path) -> list[ExperimentRef]:
    """DVC experiments as git keeps them: ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``."""
    out = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/")
    refs = []
    for line in out.splitlines():
        ref, commit = line.split(" ")
        parts = ref.split("/")
        if len(parts) == 5 and len(parts[2]) == 2 and len(parts[3]) == 38:  # not refs/exps/celery/..., stash
            refs.append(ExperimentRef(parts[4], parts[2] + parts[3], commit))
    return refs


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)
    if out.returncode != 0:
        raise PetbreedsError(f"git {' '.join(args)} in {root} failed: {out.stderr.decode(errors='replace').strip()}")
    return out.stdout.decode()


def _lock_stages(text: str) -> Any:
    return result_stages(YAML(typ="safe").load(text) or {})


def workspace_identity(root: Path) -> RunIdentity:
    """The experiment whose committed dvc.lock the workspace holds (after ``dvc exp run``), else ``dvc repro``."""
    commit = git_commit(root)
    lock = root / "dvc.lock"
    if commit and lock.is_file():
        ours = _lock_stages(lock.read_text(encoding="utf-8"))
        for ref in experiment_refs(root):
            if ref.baseline_rev == commit and _lock_stages(_git(root, "show", f"{ref.commit}:dvc.lock")) == ours:
                return RunIdentity(ref.name, ref.name, ref.baseline_rev, commit)
    return RunIdentity(repro_name(commit, uncommitted_results(root, commit)), None, None, commit)


def _find_experiment(root: Path, name: str) -> ExperimentRef:
    matches = [r for r in experiment_refs(root) if r.name == name]
    head = git_commit(root)
    if len(matches) > 1:
        matches = [r for r in matches if r.baseline_rev == head]
    if len(matches) != 1:
        found = "no" if not matches else "more than one"
        raise PetbreedsError(f"{found} DVC experiment named {name!r} (on this commit); see `dvc exp ls -A`")
    return matches[0]


def _export_commit(root: Path, commit: str, dest: Path) -> None:
    """An experiment's outputs as its commit holds them, into ``dest``: git keeps params.yaml, dvc.lock and metrics/
    (``cache: false``); plots/ and reports/ (run_info sidecars included) come from DVC's cache, read through DVC at
    that commit (they are cached so that DVC's run cache works, dvc.yaml), and so does the model with its input
    example (models/model.pt, data/split.csv and one image of data/raw) when dvc.lock records one, and
    models/model.onnx when the export stage made one."""
    archive = subprocess.run(["git", "archive", commit], cwd=root, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    import dvc.api  # here only: importing DVC takes a second that logging from the workspace never needs

    def export(path: str) -> None:
        try:
            data = dvc.api.read(path, repo=str(root), rev=commit, mode="rb")
        except Exception as e:  # DVC raises several types for an object its cache no longer has
            raise PetbreedsError(
                f"{path} of commit {commit[:7]}: not in DVC's cache ({type(e).__name__}: {e}); "
                "`dvc exp apply` the experiment and `dvc repro` it, then relog from the workspace"
            ) from None
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_bytes(data)

    lock = read_yaml(dest / "dvc.lock") or {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out["path"].startswith(("plots/", "reports/")) and not (dest / out["path"]).exists():
                export(out["path"])
    if has_model(lock):
        export(MODEL_FILE)
        export(SPLIT_TABLE)
        export(example_image(dest))
    if has_onnx_model(lock):
        export(ONNX_FILE)


def relog_cli(argv: list[str]) -> int:
    """``petbreeds mlflow-relog [EXPERIMENT ...]``: log DVC outputs to MLflow again (nothing logged twice)."""
    parser = argparse.ArgumentParser(
        prog="petbreeds mlflow-relog",
        description="Log pipeline results to MLflow from the DVC outputs, e.g. after the tracking server was "
        "unreachable. A result already logged is left as it is.",
    )
    parser.add_argument(
        "experiments",
        nargs="*",
        metavar="EXPERIMENT",
        help="DVC experiment names (`dvc exp ls`), read from their git commits; none: the workspace's outputs",
    )
    args = parser.parse_args(argv)
    root = project_root()
    if not args.experiments:
        log_pipeline(root, workspace_identity(root), root)
    for name in args.experiments:
        ref = _find_experiment(root, name)
        with tempfile.TemporaryDirectory() as tmp:
            _export_commit(root, ref.commit, Path(tmp))
            log_pipeline(Path(tmp), RunIdentity(ref.name, ref.name, ref.baseline_rev, ref.baseline_rev), root)
    return 0
