"""A real DVC project in a temporary git repo, for the end-to-end tests: a copy of this project's pipeline with tiny
params (a pipeline of seconds), and the commands a user types in it.

A support module, like tests/tiny.py: the end-to-end test modules (pipeline, MLflow server, DVC remote) share it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from dvc.utils.hydra import apply_overrides
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
DVC = str(BIN / "dvc") if (BIN / "dvc").exists() else "dvc"
PETBREEDS = str(BIN / "petbreeds") if (BIN / "petbreeds").exists() else "petbreeds"
STAGES = (
    "check_params",
    "fetch",
    "index",
    "split",
    "weights",
    "lr_find",
    "train_frozen",
    "lr_find_unfrozen",
    "train_unfrozen",
    "evaluate",
    "export",
    "mlflow_log",
)
# The baseline's params.yaml: a pipeline of seconds
TINY = [
    "fetch.sample.per_breed=3",
    "data.item_size=48",
    "data.size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.arch=resnet18",
    "model.weights=none",
    "lr_find.num_it=20",
    "lr_find.stop_div=false",
    "train_frozen.epochs=1",
    "train_unfrozen.epochs=1",
]
# The README's commands: committing results (after `dvc repro`, or `dvc exp apply`)
COMMIT_RESULTS = ("git", "add", "params.yaml", "dvc.lock", "metrics", "plots", "reports")
# Variables of this test process that must not reach the project's commands (each test sets what it needs). No S3
# credentials or endpoint: MLflow's clients reach artifacts through the tracking server, DVC reads its remote's
# from .dvc/config.local (tests/team_stack.py).
_NOT_INHERITED = (
    "MLFLOW_TRACKING_URI",
    "DVC_ROOT",
    "MLFLOW_RUN_ID",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "MLFLOW_S3_ENDPOINT_URL",
)


def command_env(**extra_env: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env |= {"DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}:{env['PATH']}", "OMP_NUM_THREADS": "1"}
    return env | extra_env


def run_command(repo: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """A command in ``repo``, whatever its exit status."""
    return subprocess.run(args, cwd=repo, env=command_env(**extra_env), capture_output=True, text=True, timeout=900)


def run(repo: Path, *args: str, **extra_env: str) -> str:
    """A command in ``repo`` that must succeed; its stdout and stderr."""
    out = run_command(repo, *args, **extra_env)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def exp_run(repo: Path, *overrides: str, name: str, queue: bool = False, **extra_env: str) -> str:
    sets = [a for o in overrides for a in ("-S", o)]
    out = run(repo, DVC, "exp", "run", "-n", name, *(["--queue"] if queue else []), *sets, **extra_env)
    assert "WARNING" not in out, out
    return out


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def stages_run(dvc_output: str) -> list[str]:
    return [line.split("'")[1] for line in dvc_output.splitlines() if line.startswith("Running stage")]


def make_project(repo: Path) -> Path:
    """A git + DVC repo at ``repo`` holding this project's pipeline with the :data:`TINY` params, committed."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(repo, "git", "init", "-q")
    run(repo, DVC, "init", "-q")
    run(repo, DVC, "config", "core.analytics", "false")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the plot templates dvc.yaml names
    apply_overrides(repo / "params.yaml", TINY)  # DVC's own writer, as `dvc exp run -S` uses it
    run(repo, "git", "add", "-A")
    commit(repo, "baseline")
    return repo


def finished_project(shared: Path) -> Path:
    """The :func:`make_project` project after `dvc repro` with its results committed (the README's quick start and
    baseline commit), at ``shared/finished_project``: built by the first caller, under a file lock so that
    pytest-xdist's workers build it once between them, and never changed after; tests work on a
    :func:`copy_project`. The build is itself a check: every stage runs, without a warning."""
    repo = shared / "finished_project"
    with FileLock(shared / "finished_project.lock"):
        if not (repo / ".git").is_dir():
            building = shared / "finished_project.building"
            shutil.rmtree(building, ignore_errors=True)  # what another worker's failed build left
            make_project(building)
            out = run(building, DVC, "repro")
            assert stages_run(out) == list(STAGES) and "WARNING" not in out, out
            run(building, *COMMIT_RESULTS)
            commit(building, "baseline results")
            building.rename(repo)  # git and DVC keep relative paths: the repo works where it lands
    return repo


def copy_project(source: Path, dest: Path) -> Path:
    """A copy of ``source`` to work on: its git repo, DVC cache, outputs and run cache (a copy is as cheap as a
    clone and keeps the workspace's uncommitted files). Not its MLflow store, whose experiment names its artifact
    folder by absolute path (the copy's runs would write into the original's), nor DVC's tmp/ (locks and the
    state of one folder): the copy makes its own."""

    def skip(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        if here == source:
            return {"mlflow.db", "mlartifacts", ".mlflow.lock"} & set(names)
        return {"tmp"} & set(names) if here == source / ".dvc" else set()

    shutil.copytree(source, dest, symlinks=True, ignore=skip)
    return dest
