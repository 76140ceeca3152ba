"""The experiment's one MLflow run per pipeline result, built from the DVC outputs by the final stage ``mlflow_log``.

Why the parent is built by a final stage (``mlflow_log``, always changed) instead of inside the training code:
DVC restores stages from its run cache without running them, so logging done while training would leave holes
in every experiment that reused a stage. ``mlflow_log`` reads what the stages wrote (``petbreeds.track.outputs``)
and is complete however they were produced. The training stages also stream live curves and system metrics into a
child run (``petbreeds.track.live.LiveRun``) that the parent adopts through the ``reports/run_info/<stage>.json``
sidecars (see ``petbreeds.stage``). ``petbreeds mlflow-relog`` (``petbreeds.track.relog``) logs results again when
the store was unreachable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from requests.exceptions import RequestException

from petbreeds.errors import PetbreedsError
from petbreeds.runtime import project_root
from petbreeds.serve.mlflow_model import TORCH_MODEL, ServedModel, log_model
from petbreeds.serve.onnx_model import ONNX_MODEL
from petbreeds.track.identity import RunIdentity, current_identity, producer, result_key, stage_status
from petbreeds.track.outputs import (
    MODEL_FILE,
    ONNX_FILE,
    PipelineOutputs,
    epoch_ms,
    example_image,
    not_run_stages,
    out_md5,
    param_texts,
    read_outputs,
    run_metrics,
    training_dataset,
)
from petbreeds.track.store import TrackingUnavailable, log_batch, open_experiment, tracking_uri

# The folders and files logged as artifacts, as they are in the project.
ARTIFACT_DIRS = ("metrics", "plots", "reports")
ARTIFACT_FILES = ("params.yaml", "dvc.lock")
# The run's tags the model carries too: which experiment, code and data it comes from.
MODEL_TAGS = ("dvc.exp_name", "git.commit", "data.md5", "model.md5")


def _tags(outputs: PipelineOutputs, identity: RunIdentity, key: str) -> dict[str, str]:
    tags = {
        "petbreeds.run_type": "pipeline",
        "petbreeds.result_key": key,
        "dvc.run_kind": "exp" if identity.exp_name else "repro",
        "dvc.exp_name": identity.exp_name or "",
        "dvc.baseline_rev": identity.baseline_rev or "",
        "git.commit": identity.git_commit or "",
        "data.md5": out_md5(outputs.lock, "fetch", "data/raw") or "",
        "model.md5": out_md5(outputs.lock, "train_unfrozen", MODEL_FILE) or "",
    }
    by_status: dict[str, list[str]] = {}
    for stage, info in outputs.run_info.items():
        status = stage_status(info, identity)
        by_status.setdefault(status, []).append(stage)
        tags[f"stage.{stage}.status"] = status
        tags[f"stage.{stage}.producer"] = producer(info)
        if info.get("mlflow_child_run_id"):
            tags[f"stage.{stage}.live_run"] = info["mlflow_child_run_id"]
        for fact, value in (info.get("facts") or {}).items():  # e.g. the precision train.precision auto became
            tags[f"stage.{stage}.{fact}"] = str(value)
    what = f"DVC experiment `{identity.exp_name}`" if identity.exp_name else "`dvc repro`"
    lines = [f"{what} at commit `{(identity.git_commit or '?')[:7]}`, built from the DVC outputs by `mlflow_log`."]
    lines += [f"- {status}: {', '.join(stages)}" for status, stages in sorted(by_status.items())]
    for stage, why in not_run_stages(outputs.root).items():
        tags[f"stage.{stage}.not_run"] = why
        lines.append(f"- {stage} not run: {why}")
    tags["mlflow.note.content"] = "\n".join(lines)
    return {k: v for k, v in tags.items() if v}


def _span_ms(outputs: PipelineOutputs, identity: RunIdentity) -> tuple[int, int] | None:
    """The run's start and end (ms): from the first start to the last finish of the stages this result executed, or
    of all its stages when it executed none (restored whole from the run cache, or a re-log of a plain `dvc repro`,
    which cannot tell): when its outputs were made. None without sidecars.
    """
    timed = [i for i in outputs.run_info.values() if i.get("started") and i.get("finished")]
    chosen = [i for i in timed if stage_status(i, identity) == "executed"] or timed
    if not chosen:
        return None
    return min(epoch_ms(i["started"]) for i in chosen), max(epoch_ms(i["finished"]) for i in chosen)


def _parents(client: MlflowClient, experiment_id: str, where: str) -> list[Run]:
    return list(client.search_runs([experiment_id], f"tags.`petbreeds.run_type` = 'pipeline' and {where}"))


def _log_contents(client: MlflowClient, run_id: str, outputs: PipelineOutputs, model_id: str | None) -> None:
    params = [Param(k, v) for k, v in param_texts(outputs).items()]
    log_batch(client, run_id, params=params, metrics=run_metrics(outputs, model_id))
    dataset = training_dataset(outputs)
    if dataset is not None:
        client.log_inputs(run_id, datasets=[dataset])
    for name in ARTIFACT_DIRS:
        if (outputs.root / name).is_dir():
            client.log_artifacts(run_id, str(outputs.root / name), name)
    for name in ARTIFACT_FILES:
        client.log_artifact(run_id, str(outputs.root / name))


def _log_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    outputs: PipelineOutputs,
    tags: Mapping[str, str],
    kind: ServedModel,
    stage: str,
    file: str,
) -> str | None:
    """``file`` (``stage``'s output) as the run's MLflow model of ``kind``, with the run's params, provenance tags and
    input example; its id, or None for a result without it (dvc.lock records none)."""
    if out_md5(outputs.lock, stage, file) is None:
        return None
    path = outputs.root / file
    if not path.is_file():
        raise PetbreedsError(f"{path}: not found, though dvc.lock lists it; run `dvc checkout` or `dvc repro`")
    return log_model(
        client,
        experiment_id,
        run_id,
        path,
        outputs.root / example_image(outputs.root),
        params=param_texts(outputs),
        tags={k: tags[k] for k in MODEL_TAGS if k in tags},
        kind=kind,
    )


def _adopt_children(client: MlflowClient, run_id: str, outputs: PipelineOutputs) -> None:
    """Live child runs of the stages executed for this result become this run's children.

    A child that already has a parent was made for an earlier experiment whose stage this one reused;
    it stays there (the ``stage.<name>.live_run`` tag links it).
    """
    for info in outputs.run_info.values():
        child_id = info.get("mlflow_child_run_id")
        if not child_id:
            continue
        try:
            child = client.get_run(child_id)
        except MlflowException:
            continue  # logged to another store
        if "mlflow.parentRunId" not in child.data.tags:
            client.set_tag(child_id, "mlflow.parentRunId", run_id)


def log_pipeline(files_root: Path, identity: RunIdentity, store_root: Path) -> str:
    """Log the outputs under ``files_root`` as one parent run in the store of ``store_root``; its id.

    A result already logged (same name, baseline and dvc.lock) is left as it is; a newer result of the same
    DVC experiment (``dvc exp run -f``) tags the older runs ``dvc.superseded``.
    """
    outputs = read_outputs(files_root)
    client, experiment_id = open_experiment(store_root)
    key = result_key(outputs.lock, identity)
    for run in _parents(client, experiment_id, f"tags.`petbreeds.result_key` = '{key}'"):
        if run.info.status == "FINISHED":
            print(f"mlflow: {identity.name} is already logged as run {run.info.run_id}")
            return run.info.run_id
        client.delete_run(run.info.run_id)  # an interrupted attempt: replace it, and its model
        for output in run.outputs.model_outputs if run.outputs else []:
            client.delete_logged_model(output.model_id)
    # The stages' real times, not this logging's: the UI's Duration is the pipeline's (MLflow's default is now).
    start_ms, end_ms = _span_ms(outputs, identity) or (None, None)
    tags = _tags(outputs, identity, key)
    run_id = client.create_run(experiment_id, start_time=start_ms, run_name=identity.name, tags=tags).info.run_id
    try:
        # The model before the metrics: MLflow links every metric a run already has at the model's step to the
        # model; _log_contents links the model's own (the evaluate stage's).
        model_id = _log_model(client, experiment_id, run_id, outputs, tags, TORCH_MODEL, "train_unfrozen", MODEL_FILE)
        onnx_id = _log_model(client, experiment_id, run_id, outputs, tags, ONNX_MODEL, "export", ONNX_FILE)
        _log_contents(client, run_id, outputs, model_id)
        _adopt_children(client, run_id, outputs)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED", end_time=end_ms)
    if identity.exp_name:
        same_exp = (
            f"tags.`dvc.exp_name` = '{identity.exp_name}' and tags.`dvc.baseline_rev` = '{identity.baseline_rev}'"
        )
        for old in _parents(client, experiment_id, same_exp):
            if old.info.run_id != run_id:
                client.set_tag(old.info.run_id, "dvc.superseded", "true")
    model = f", its model models:/{model_id}" if model_id else ""
    model += f" (ONNX: models:/{onnx_id})" if onnx_id else ""
    print(f"mlflow: logged {identity.name} as run {run_id}{model} in {tracking_uri(store_root)}")
    return run_id


def log_pipeline_or_warn(files_root: Path) -> None:
    """The ``mlflow_log`` stage: tracking problems are a warning, never a failed pipeline."""
    store_root = project_root()
    identity = current_identity(files_root)
    try:
        log_pipeline(files_root, identity, store_root)
    except (TrackingUnavailable, MlflowException, RequestException, OSError) as e:
        relog = " ".join(["petbreeds mlflow-relog", *([identity.exp_name] if identity.exp_name else [])])
        server = " with the same MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else ""
        print(
            f"warning: MLflow logging failed at {tracking_uri(store_root)}: {e}\n"
            f"warning: the DVC outputs are complete; once the store is back, run `{relog}`{server} in {store_root}",
            file=sys.stderr,
        )
