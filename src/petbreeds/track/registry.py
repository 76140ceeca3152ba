"""``petbreeds register EXPERIMENT [--name petbreeds] [--alias champion]``: an experiment's model into MLflow's
Model Registry, to be served.

EXPERIMENT is a DVC experiment's name (its pipeline run is tagged ``dvc.exp_name``; runs superseded by a rerun are
left out) or a run's name (``repro@abc1234``). The new version's source is the run's logged model
(``models:/<model_id>``, :mod:`petbreeds.serve.mlflow_model`); it is tagged with the run's DVC experiment, git commit
and data md5, and the alias points at it. The store is the project's (``MLFLOW_TRACKING_URI`` or its sqlite file), as
for every petbreeds command; serve the alias with ``mlflow models serve -m models:/NAME@ALIAS --env-manager local``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlflow.entities import LoggedModelStatus, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from petbreeds.errors import PetbreedsError
from petbreeds.runtime import project_root
from petbreeds.serve.mlflow_model import MODEL_NAME, fluent_tracking_uri
from petbreeds.serve.onnx_model import ONNX_MODEL
from petbreeds.track.parent_run import MODEL_TAGS
from petbreeds.track.provenance import git_commit
from petbreeds.track.store import open_experiment, tracking_uri


def find_run(client: MlflowClient, experiment_id: str, name: str, head: str | None) -> Run:
    """The finished pipeline run of DVC experiment ``name`` (not superseded), else the one named ``name``.

    Two experiments of one name on different baselines: the one on ``head`` (the current commit), else the latest.
    """
    pipeline = "tags.`petbreeds.run_type` = 'pipeline' and attributes.status = 'FINISHED'"
    for where in (f"tags.`dvc.exp_name` = '{name}'", f"attributes.run_name = '{name}'"):
        runs = [
            r
            for r in client.search_runs([experiment_id], f"{pipeline} and {where}", order_by=["start_time DESC"])
            if r.data.tags.get("dvc.superseded") != "true"
        ]
        if runs:
            return next((r for r in runs if r.data.tags.get("dvc.baseline_rev") == head), runs[0])
    raise PetbreedsError(
        f"no MLflow run of the DVC experiment or run name {name!r} in {client.tracking_uri}: run it first "
        f"(`dvc exp run -n {name}`), or log it if the store was unreachable (`petbreeds mlflow-relog {name}`); "
        "`dvc exp ls` and `make ui` list what exists"
    )


def logged_model_id(client: MlflowClient, run: Run, kind: str = MODEL_NAME) -> str:
    """The id of the MLflow model named ``kind`` that ``run`` logged (the latest, if it logged several), checked to
    be READY: ``petbreeds`` (torch) or ``petbreeds-onnx`` (the exported model, served without torch)."""
    outputs = sorted(run.outputs.model_outputs if run.outputs else [], key=lambda o: o.step)
    models = [m for m in (client.get_logged_model(o.model_id) for o in outputs) if m.name == kind]
    name, run_id = run.info.run_name, run.info.run_id
    if not models:
        raise PetbreedsError(
            f"run {name} ({run_id}) has no logged model {kind!r}: it was logged before petbreeds logged such models; "
            f"delete that run (`mlflow runs delete --run-id {run_id}`, or in the UI) and log it again "
            "(`petbreeds mlflow-relog`, with the experiment's name for an experiment)"
        )
    model = models[-1]
    if model.status != LoggedModelStatus.READY:
        raise PetbreedsError(
            f"the model {model.model_id} of run {name} is {model.status}, not READY: its logging did not "
            f"finish; log the run again (delete run {run_id}, then `petbreeds mlflow-relog`)"
        )
    return model.model_id


def register(root: Path, experiment: str, name: str, alias: str | None, kind: str = MODEL_NAME) -> ModelVersion:
    """A new version of registered model ``name`` from ``experiment``'s logged model ``kind``, tagged, with
    ``alias``."""
    client, experiment_id = open_experiment(root)
    run = find_run(client, experiment_id, experiment, git_commit(root))
    model_id = logged_model_id(client, run, kind)
    tags = {k: run.data.tags[k] for k in MODEL_TAGS if run.data.tags.get(k)}
    try:
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        # A sqlite registry reads a models:/ source through the fluent tracking URI: this client's store, meanwhile.
        with fluent_tracking_uri(client.tracking_uri):
            version = client.create_model_version(
                name, f"models:/{model_id}", run_id=run.info.run_id, tags=tags, model_id=model_id
            )
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as e:
        raise PetbreedsError(f"MLflow refused to register {experiment!r} as {name!r}: {e.message}") from None
    return version


def register_cli(argv: list[str]) -> int:
    """``petbreeds register EXPERIMENT [--name petbreeds] [--alias ALIAS]``."""
    parser = argparse.ArgumentParser(
        prog="petbreeds register",
        description="Register the MLflow model of a DVC experiment (or of a run, e.g. repro@abc1234) in MLflow's "
        "Model Registry as a new version of NAME, tagged with its experiment, commit and data md5.",
    )
    parser.add_argument("experiment", metavar="EXPERIMENT", help="a DVC experiment's name, or an MLflow run's name")
    parser.add_argument("--name", default="petbreeds", help="the registered model's name (petbreeds)")
    parser.add_argument("--alias", help="an alias to point at the new version, e.g. champion")
    parser.add_argument(
        "--onnx", action="store_true", help="the exported ONNX model (served without torch) instead of the torch one"
    )
    args = parser.parse_args(argv)
    root = project_root()
    version = register(root, args.experiment, args.name, args.alias, ONNX_MODEL.name if args.onnx else MODEL_NAME)
    uri = f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{version.version}"
    print(f"registered {args.experiment} as {uri} (version {version.version})")
    # The server reads the registry from the environment; 5001: `make ui` serves on 5000.
    serve = f"mlflow models serve -m {uri} --env-manager local -p 5001"
    print(f"serve it: MLFLOW_TRACKING_URI={tracking_uri(root)} {serve}")
    return 0
