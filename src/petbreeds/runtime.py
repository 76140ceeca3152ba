"""Where petbreeds runs and how much it prints: the project root, and quiet output unless asked for more.

Light on purpose (no torch, no mlflow): the CLI and every stage use it before importing anything heavy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from petbreeds.errors import PetbreedsError

# PETBREEDS_VERBOSE=1 (or `petbreeds -v`) keeps the libraries' own INFO lines. Env var, not a param: the stages
# run under DVC, and a param would invalidate them.
VERBOSE_ENV = "PETBREEDS_VERBOSE"
# MLflow reads it when it is imported (``mlflow/__init__.py`` configures its loggers from it), in this process
# and in every child (torchrun's ranks).
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"
# MLflow reads it each time it copies artifacts.
MLFLOW_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def project_root() -> Path:
    """``DVC_ROOT`` when DVC runs us, else the nearest folder from the cwd up that holds dvc.yaml (else the cwd)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / "dvc.yaml").is_file()), cwd)


DEFAULT_MODEL = Path("models/model.pt")  # where train_unfrozen writes it, in the project root


def default_model() -> Path:
    """``models/model.pt`` in the current folder, else in the project root; a :class:`PetbreedsError` naming both."""
    cwd, root = Path.cwd().resolve(), project_root()
    for candidate in (cwd / DEFAULT_MODEL, root / DEFAULT_MODEL):
        if candidate.is_file():
            return candidate
    project = str(root) if (root / "dvc.yaml").is_file() else "none: no folder from here up holds dvc.yaml"
    raise PetbreedsError(
        f"no model given, and {DEFAULT_MODEL} is in neither the current folder ({cwd}) nor the project root "
        f"({project}); pass --model PATH (model_path= in Python), or train the project's model with `dvc repro`"
    )


# What the stages cache on this machine (train.precision auto's calibration, train.compile's kernels), outside git
# and DVC (.gitignore, .dvcignore): it depends on the machine and the torch build, not on the experiment.
CACHE_DIR = ".cache"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def cache_dir() -> Path:
    """The project's ``.cache/``; for a queued experiment too, which runs in a temporary copy of the project
    (``DVC_ROOT`` names the real one): what one experiment calibrated or compiled serves the next."""
    return project_root() / CACHE_DIR


def use_project_cache() -> Path:
    """Point torch.compile's cache at ``.cache/torchinductor`` (:func:`cache_dir`; unless ``TORCHINDUCTOR_CACHE_DIR``
    is set already); returns it. torch's default is a folder in /tmp, which a reboot empties."""
    return Path(os.environ.setdefault(INDUCTOR_CACHE_ENV, str(cache_dir() / "torchinductor")))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_by_default() -> None:
    """MLflow's logging at WARNING unless verbose (``PETBREEDS_VERBOSE=1``) or ``MLFLOW_LOGGING_LEVEL`` says otherwise;
    its artifact progress bars off.

    Without it every stage prints MLflow's start-up lines (database creation, the system metrics monitor starting
    and stopping) into DVC's output and the queue's logs, and mlflow_log a progress bar (MLflow loads the model it
    logs, to check its input example).
    """
    if verbose():
        return
    level = os.environ.setdefault(MLFLOW_LEVEL_ENV, "WARNING")
    os.environ.setdefault(MLFLOW_PROGRESS_ENV, "false")
    # mlflow may be imported already (stages/mlflow_log.py imports it before run_stage), its level set from the env
    logging.getLogger("mlflow").setLevel(level.upper())
