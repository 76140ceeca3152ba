"""Where the pipeline's MLflow runs live, and the one way numbers are written to them.

Store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project root>/mlflow.db`` with artifacts in
``<project root>/mlartifacts``. The project root is ``DVC_ROOT``, which DVC points at the real repo even for
queued experiments (their cwd is a temporary copy that is deleted afterwards), so nothing is written into it.
Only the explicit-run client API is used (``MlflowClient``): fluent calls without a run create stray runs.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from petbreeds.errors import PetbreedsError

EXPERIMENT = "petbreeds"
MAX_METRICS, MAX_PARAMS = 1000, 100  # MLflow's log_batch limits


class TrackingUnavailable(PetbreedsError):
    """The tracking store cannot be reached; the DVC outputs stay the record, re-log them later."""


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` or the project's sqlite store; relative sqlite paths are taken from ``root``.

    A relative path would otherwise land in a queued experiment's temporary copy and be deleted with it.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        uri = f"sqlite:///{db if db.is_absolute() else root / db}"
    return uri


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a sqlite store (``mlartifacts/``); a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def _check_reachable(uri: str) -> None:
    # The client retries an unreachable server for minutes; one quick probe gives a clear message instead.
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as e:
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable ({e}); start it, or unset "
            "MLFLOW_TRACKING_URI to use the project's sqlite store"
        ) from None


def open_experiment(root: Path) -> tuple[MlflowClient, str]:
    """A client on the project's store and the id of the ``petbreeds`` experiment (created on first use)."""
    uri = tracking_uri(root)
    _check_reachable(uri)
    # Two processes migrating a fresh sqlite DB at once crash in alembic (dvc queue start -j 2), and two
    # experiment get-or-creates race: one lock file in the project root serialises both.
    with FileLock(root / ".mlflow.lock"):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return client, experiment.experiment_id
        return client, client.create_experiment(EXPERIMENT, artifact_location=_artifact_location(uri))


def ui_url(root: Path, base: str) -> str:
    """The MLflow UI page (served at ``base``) that lists the experiment's runs, in the UI's training view.

    MLflow 3.17's UI chooses between its "GenAI" view (an experiment page of traces, no runs) and its "Model
    training" view from the page's ``workflowType`` query parameter, else from the browser's last use of the sidebar
    toggle (localStorage ``mlflow.workflowType_v1``), else GenAI. It reads neither a server setting nor the
    experiment's ``mlflow.experimentKind`` tag for it, so the link carries the parameter; the experiment page's own
    links keep it.
    """
    _, experiment_id = open_experiment(root)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def log_batch(
    client: MlflowClient, run_id: str, *, metrics: Sequence[Metric] = (), params: Sequence[Param] = ()
) -> None:
    """Write ``params``, then ``metrics`` to run ``run_id``, in as many ``log_batch`` calls as MLflow's limits ask:
    the one way the pipeline's numbers reach MLflow (the parent run and the live runs)."""
    for i in range(0, len(params), MAX_PARAMS):
        client.log_batch(run_id, params=list(params[i : i + MAX_PARAMS]))
    for i in range(0, len(metrics), MAX_METRICS):
        client.log_batch(run_id, metrics=list(metrics[i : i + MAX_METRICS]))
