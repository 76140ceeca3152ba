"""MLflow for the pipeline: the store, and one parent run per pipeline result, built from the DVC outputs.

Why the parent is built by a final stage (``mlflow_log``, always changed) instead of inside the training code:
DVC restores stages from its run cache without running them, so logging done while training would leave holes
in every experiment that reused a stage. ``mlflow_log`` reads what the stages wrote (``metrics/``, ``plots/``,
``reports/``, ``dvc.lock``, ``params.yaml``) and is complete however they were produced. The training stages
also stream live curves and system metrics into a child run (``petbreeds.track.live.LiveRun``) that the parent adopts
through the ``reports/run_info/<stage>.json`` sidecars (see ``petbreeds.stage``). ``petbreeds mlflow-relog``
(``petbreeds.track.relog``) logs results again when the store was unreachable.

Store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project root>/mlflow.db`` with artifacts in
``<project root>/mlartifacts``. The project root is ``DVC_ROOT``, which DVC points at the real repo even for
queued experiments (their cwd is a temporary copy that is deleted afterwards), so nothing is written into it.
Only the explicit-run client API is used (``MlflowClient``): fluent calls without a run create stray runs.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from requests.exceptions import RequestException
from ruamel.yaml import YAML

from petbreeds.config import flatten
from petbreeds.errors import PetbreedsError
from petbreeds.learn.lr_find import NOT_RUN
from petbreeds.runtime import project_root
from petbreeds.serve.mlflow_model import log_model
from petbreeds.track.provenance import RUN_INFO_DIR, dvc_invocation, git_commit

EXPERIMENT = "petbreeds"
PARENT_STAGE = "mlflow_log"  # excluded from the result key: its dvc.lock entry is written after it runs
# plots/<stage>.csv -> its columns renamed in the parent run. Each column becomes the step series ``<stage>/<column>``,
# beside the stage's numbers (``<stage>/<key>``, :func:`_stage_numbers`), so that a quantity has one name: a final
# number that is the series' last point (train_loss, valid_loss, error_rate) is logged as that point. Renamed: the
# epoch columns whose name reports/<stage>.json gives to another quantity, one of the whole phase (its max lr, its
# total seconds).
_EPOCH_COLUMNS = {"lr": "epoch_end_lr", "seconds": "epoch_seconds"}
SERIES: dict[str, dict[str, str]] = {
    "lr_find": {},  # lr and smoothed loss per iteration; reports/lr_find.json holds the suggestions
    "lr_find_unfrozen": {},
    "train_frozen": _EPOCH_COLUMNS,
    "train_unfrozen": _EPOCH_COLUMNS,
    "train_frozen_batches": {},  # smoothed train loss and lr per batch (fastai's plot_loss), step = the batch
    "train_unfrozen_batches": {},
}
# Columns of plots/*.csv that are axes (the step, or the x of a plot of dvc.yaml counted over both phases), not
# quantities.
_AXES = ("epoch", "global_epoch", "iteration", "global_iteration")
# The folders and files logged as artifacts, as they are in the project.
ARTIFACT_DIRS = ("metrics", "plots", "reports")
ARTIFACT_FILES = ("params.yaml", "dvc.lock")
# The result's model, logged as the run's MLflow model (petbreeds.serve.mlflow_model) with a validation image as its
# input example; the evaluate stage's numbers are linked to it as its metrics.
MODEL_FILE = "models/model.pt"
SPLIT_TABLE = "data/split.csv"
RAW_DIR = "data/raw"
MODEL_METRICS_STAGE = "evaluate"
# The run's tags the model carries too: which experiment, code and data it comes from.
MODEL_TAGS = ("dvc.exp_name", "git.commit", "data.md5", "model.md5")
MAX_METRICS, MAX_PARAMS = 1000, 100  # MLflow's log_batch limits


class TrackingUnavailable(PetbreedsError):
    """The tracking store cannot be reached; the DVC outputs stay the record, re-log them later."""


# --------------------------------------------------------------------------------------------------
# The store


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


@contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    # Two processes migrating a fresh sqlite DB at once crash in alembic (dvc queue start -j 2), and two
    # experiment get-or-creates race: one lock file in the project root serialises both.
    with open(root / ".mlflow.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_experiment(root: Path) -> tuple[MlflowClient, str]:
    """A client on the project's store and the id of the ``petbreeds`` experiment (created on first use)."""
    uri = tracking_uri(root)
    _check_reachable(uri)
    with _store_lock(root):
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


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size``: what one MLflow ``log_batch`` call takes."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------------------------------
# The DVC outputs


@dataclass(frozen=True)
class PipelineOutputs:
    """What the stages left in a project folder (the workspace, or an experiment's commit exported)."""

    root: Path
    params: dict[str, Any]  # params.yaml, flattened: {"train_frozen.epochs": 2, ...}
    lock: dict[str, Any]  # dvc.lock
    metrics: dict[str, dict[str, float]]  # metrics/<stage>.json and reports/<stage>.json, flattened, by stage
    run_info: dict[str, dict[str, Any]]  # reports/run_info/<stage>.json, by stage


def read_yaml(path: Path) -> Any:
    """A YAML file of the pipeline outputs; a :class:`PetbreedsError` naming it if unreadable."""
    try:
        return YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PetbreedsError(f"{path}: cannot read it ({e}); run `dvc repro` to produce the pipeline outputs") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PetbreedsError(f"{path}: not readable JSON ({e}); run `dvc repro` to rewrite it") from e


def _numbers(path: Path) -> dict[str, float]:
    values = {}
    for key, value in flatten(_read_json(path)).items():
        if key == NOT_RUN:
            continue  # why a stage did not do its work: a tag and the note say it (_not_run), not a metric
        if isinstance(value, (int, float)):  # bool included: True -> 1.0
            values[key] = float(value)
        else:
            print(f"warning: {path}: {key} is not a number ({value!r}); not logged as a metric", file=sys.stderr)
    return values


def _stage_numbers(root: Path) -> dict[str, dict[str, float]]:
    """The numbers of metrics/<stage>.json (what ``dvc exp show`` compares) and of reports/<stage>.json (counts,
    timings, training numbers), together by stage: the two files of a stage never share a key."""
    numbers: dict[str, dict[str, float]] = {}
    for path in [*sorted((root / "metrics").glob("*.json")), *sorted((root / "reports").glob("*.json"))]:
        numbers.setdefault(path.stem, {}).update(_numbers(path))
    return numbers


def read_outputs(root: Path) -> PipelineOutputs:
    """Read the pipeline's outputs under ``root``; raises :class:`PetbreedsError` naming a missing file."""
    for name in ("params.yaml", "dvc.lock"):
        if not (root / name).is_file():
            raise PetbreedsError(f"{root / name}: not found; run `dvc repro` (or `dvc exp run`) first")
    return PipelineOutputs(
        root=root,
        params=flatten(read_yaml(root / "params.yaml") or {}),
        lock=read_yaml(root / "dvc.lock") or {},
        metrics=_stage_numbers(root),
        run_info={p.stem: _read_json(p) for p in sorted((root / RUN_INFO_DIR).glob("*.json"))},
    )


def out_md5(lock: Mapping[str, Any], stage: str, path: str) -> str | None:
    """The md5 dvc.lock (parsed) records for ``stage``'s out ``path``, or None."""
    outs = lock.get("stages", {}).get(stage, {}).get("outs", [])
    return next((o.get("md5") for o in outs if o.get("path") == path), None)


def _ms(iso: str | None) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000) if iso else int(time.time() * 1000)


def _series(outputs: PipelineOutputs, stage: str) -> list[Metric]:
    """One step series per column of ``plots/<stage>.csv`` (named as :data:`SERIES` says); step = ``epoch`` if
    present, else ``iteration`` if present, else the row index.

    Timestamps: the stage's start plus the cumulative ``seconds`` column (the real end of each epoch), else its end.
    """
    path = outputs.root / "plots" / f"{stage}.csv"
    if not path.is_file():
        return []
    names = SERIES[stage]
    info = outputs.run_info.get(stage, {})
    start_ms, end_ms = _ms(info.get("started")), _ms(info.get("finished"))
    metrics, elapsed = [], 0.0
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = int(float(row.get("epoch") or row.get("iteration") or i))
            if row.get("seconds"):
                elapsed += float(row["seconds"])
            ts = start_ms + int(elapsed * 1000) if "seconds" in row else end_ms
            for column, value in row.items():
                if column not in _AXES and value not in (None, ""):
                    metrics.append(Metric(f"{stage}/{names.get(column, column)}", float(value), ts, step))
    return metrics


def _stage_metrics(outputs: PipelineOutputs, stage: str, model_id: str | None = None) -> list[Metric]:
    """A stage's series (``plots/<stage>.csv``) and every number of ``metrics/<stage>.json`` (the columns of ``dvc exp
    show``) and ``reports/<stage>.json`` as ``<stage>/<key>``, at the series' last step (0 without one), timed at the
    stage's end.

    MLflow shows a metric's point of the highest step, the latest of them, so the runs table and the run page show
    the final numbers. A final number that is already the series' last point is not logged twice. The finals are
    linked to the MLflow model ``model_id`` (its metrics) when given.
    """
    series = _series(outputs, stage) if stage in SERIES else []
    step = max((m.step for m in series), default=0)
    ts = max([_ms(outputs.run_info.get(stage, {}).get("finished")), *(m.timestamp for m in series)])
    last_points = {(m.key, m.value) for m in series if m.step == step}
    finals = [
        Metric(f"{stage}/{key}", value, ts, step, model_id=model_id)
        for key, value in outputs.metrics.get(stage, {}).items()
    ]
    return series + [m for m in finals if (m.key, m.value) not in last_points]


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _dataset(outputs: PipelineOutputs) -> DatasetInput | None:
    """``data/raw`` as the run's training input, its digest the md5 DVC recorded for it."""
    digest = out_md5(outputs.lock, "fetch", "data/raw")
    if digest is None:
        return None
    source = outputs.params.get("fetch.source")
    if source == "oxford-iiit-pet":
        source_type, where = "http", {"url": outputs.params.get("fetch.oxford_iiit_pet.images_url")}
    elif source == "local":
        source_type, where = "local", {"uri": outputs.params.get("fetch.local_path")}
    else:
        source_type, where = "local", {"uri": "data/raw"}  # the generated sample
    dataset = Dataset(f"oxford-iiit-pet ({source})", digest, source_type, json.dumps(where))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


# --------------------------------------------------------------------------------------------------
# Which result this is


@dataclass(frozen=True)
class RunIdentity:
    """Names the parent run: the DVC experiment, or ``repro@<short sha>`` for plain ``dvc repro``."""

    name: str
    exp_name: str | None
    baseline_rev: str | None
    git_commit: str | None
    invocation: str | None = None  # the running dvc process (see petbreeds.track.provenance.dvc_invocation)


def repro_name(commit: str | None, uncommitted: str | None = None) -> str:
    """The run name of a plain ``dvc repro`` at ``commit``: ``repro@<short sha>``, or with ``uncommitted`` (see
    :func:`uncommitted_results`) ``repro@<short sha>+dirty-<hash>``: results of params or code not committed yet
    never take the name of the commit's results."""
    name = f"repro@{commit[:7]}" if commit else "repro@no-git"
    return f"{name}+dirty-{uncommitted}" if uncommitted else name


def _committed_text(root: Path, commit: str, name: str) -> str | None:
    out = subprocess.run(["git", "show", f"{commit}:./{name}"], cwd=root, capture_output=True, text=True, check=False)
    return out.stdout if out.returncode == 0 else None


def _result_inputs(params_text: str | None, lock_text: str | None) -> dict[str, Any]:
    """What makes a result: params.yaml, and dvc.lock's stages (every dep, param and out; mlflow_log's left out,
    as DVC writes it after the stage has run)."""
    yaml = YAML(typ="safe")
    stages = ((yaml.load(lock_text) if lock_text else None) or {}).get("stages", {})
    return {
        "params": yaml.load(params_text) if params_text else None,
        "stages": {k: v for k, v in stages.items() if k != PARENT_STAGE},
    }


def uncommitted_results(root: Path, commit: str | None) -> str | None:
    """A short hash of the workspace's params.yaml and dvc.lock when they differ from ``commit``'s (after a
    ``dvc repro`` of changed params or code, or an applied experiment), else None."""
    if commit is None:
        return None
    files = ("params.yaml", "dvc.lock")
    here = _result_inputs(*((root / n).read_text(encoding="utf-8") if (root / n).is_file() else None for n in files))
    if here == _result_inputs(*(_committed_text(root, commit, n) for n in files)):
        return None
    return hashlib.sha256(json.dumps(here, sort_keys=True, default=str).encode()).hexdigest()[:8]


def current_identity(root: Path) -> RunIdentity:
    """From the environment DVC gives a stage (``DVC_EXP_NAME``, ``DVC_EXP_BASELINE_REV``)."""
    exp_name = os.environ.get("DVC_EXP_NAME") or None
    commit = git_commit(root)
    return RunIdentity(
        name=exp_name or repro_name(commit, uncommitted_results(root, commit)),
        exp_name=exp_name,
        baseline_rev=os.environ.get("DVC_EXP_BASELINE_REV") or None,
        git_commit=commit,
        invocation=dvc_invocation(),
    )


def stage_status(info: Mapping[str, Any], identity: RunIdentity) -> str:
    """``executed`` by this pipeline run, or ``reused`` (restored from DVC's run cache, or unchanged)."""
    same_exp = (info.get("dvc_exp_name"), info.get("baseline_rev")) == (identity.exp_name, identity.baseline_rev)
    if identity.invocation and info.get("invocation"):
        return "executed" if same_exp and info["invocation"] == identity.invocation else "reused"
    if identity.exp_name:
        return "executed" if same_exp else "reused"
    return "unknown"  # a re-log of a plain `dvc repro`: the sidecars still name their producers


def _producer(info: Mapping[str, Any]) -> str:
    return f"{info.get('dvc_exp_name') or repro_name(info.get('git_commit'))} at {info.get('started')}"


def result_key(outputs: PipelineOutputs, identity: RunIdentity) -> str:
    """Same name, baseline and dvc.lock → the same result: logging it again changes nothing."""
    stages = {k: v for k, v in outputs.lock.get("stages", {}).items() if k != PARENT_STAGE}
    key = {"name": identity.name, "baseline": identity.baseline_rev, "stages": stages}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# The parent run


def _not_run(root: Path) -> dict[str, str]:
    """``{stage: why}`` for each stage whose report says it did not do its work (an lr finder that did not sweep,
    ``lr_find.run``): the run says why, where its curve has no points and its picture says "not run"."""
    found = {}
    for path in sorted((root / "reports").glob("*.json")):
        report = _read_json(path)
        if isinstance(report, dict) and NOT_RUN in report:
            found[path.stem] = str(report[NOT_RUN])
    return found


def _tags(outputs: PipelineOutputs, identity: RunIdentity, key: str) -> dict[str, str]:
    tags = {
        "petbreeds.run_type": "pipeline",
        "petbreeds.result_key": key,
        "dvc.run_kind": "exp" if identity.exp_name else "repro",
        "dvc.exp_name": identity.exp_name or "",
        "dvc.baseline_rev": identity.baseline_rev or "",
        "git.commit": identity.git_commit or "",
        "data.md5": out_md5(outputs.lock, "fetch", "data/raw") or "",
        "model.md5": out_md5(outputs.lock, "train_unfrozen", "models/model.pt") or "",
    }
    by_status: dict[str, list[str]] = {}
    for stage, info in outputs.run_info.items():
        status = stage_status(info, identity)
        by_status.setdefault(status, []).append(stage)
        tags[f"stage.{stage}.status"] = status
        tags[f"stage.{stage}.producer"] = _producer(info)
        if info.get("mlflow_child_run_id"):
            tags[f"stage.{stage}.live_run"] = info["mlflow_child_run_id"]
        for fact, value in (info.get("facts") or {}).items():  # e.g. the precision train.precision auto became
            tags[f"stage.{stage}.{fact}"] = str(value)
    what = f"DVC experiment `{identity.exp_name}`" if identity.exp_name else "`dvc repro`"
    lines = [f"{what} at commit `{(identity.git_commit or '?')[:7]}`, built from the DVC outputs by `mlflow_log`."]
    lines += [f"- {status}: {', '.join(stages)}" for status, stages in sorted(by_status.items())]
    for stage, why in _not_run(outputs.root).items():
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
    return min(_ms(i["started"]) for i in chosen), max(_ms(i["finished"]) for i in chosen)


def _parents(client: MlflowClient, experiment_id: str, where: str) -> list[Run]:
    return list(client.search_runs([experiment_id], f"tags.`petbreeds.run_type` = 'pipeline' and {where}"))


def _log_contents(client: MlflowClient, run_id: str, outputs: PipelineOutputs, model_id: str | None) -> None:
    params = [Param(k, _param_text(v)) for k, v in outputs.params.items()]
    for batch in chunks(params, MAX_PARAMS):
        client.log_batch(run_id, params=list(batch))
    metrics = [
        m
        for stage in sorted(set(outputs.metrics) | set(SERIES))
        for m in _stage_metrics(outputs, stage, model_id if stage == MODEL_METRICS_STAGE else None)
    ]
    for batch in chunks(metrics, MAX_METRICS):
        client.log_batch(run_id, metrics=list(batch))
    dataset = _dataset(outputs)
    if dataset is not None:
        client.log_inputs(run_id, datasets=[dataset])
    for name in ARTIFACT_DIRS:
        if (outputs.root / name).is_dir():
            client.log_artifacts(run_id, str(outputs.root / name), name)
    for name in ARTIFACT_FILES:
        client.log_artifact(run_id, str(outputs.root / name))


def has_model(lock: Mapping[str, Any]) -> bool:
    """Whether the result of ``lock`` (dvc.lock's content) has a model: train_unfrozen recorded one."""
    return out_md5(lock, "train_unfrozen", MODEL_FILE) is not None


def example_image(root: Path) -> str:
    """The model's input example, relative to ``root``: the first validation image of ``data/split.csv``."""
    from petbreeds.data.splitting import read_split_table  # here only: it imports torch, which most logging never needs

    valid = read_split_table(root / SPLIT_TABLE).query("split == 'valid'")
    if valid.empty:
        raise PetbreedsError(f"{root / SPLIT_TABLE}: no validation image to show the model with; re-run `dvc repro`")
    return f"{RAW_DIR}/{valid['path'].iloc[0]}"


def _log_model(
    client: MlflowClient, experiment_id: str, run_id: str, outputs: PipelineOutputs, tags: Mapping[str, str]
) -> str | None:
    """``models/model.pt`` as the run's MLflow model, with the run's params and provenance tags; its id, or None for a
    result without a model (dvc.lock records none)."""
    if not has_model(outputs.lock):
        return None
    checkpoint = outputs.root / MODEL_FILE
    if not checkpoint.is_file():
        raise PetbreedsError(f"{checkpoint}: not found, though dvc.lock lists it; run `dvc checkout` or `dvc repro`")
    return log_model(
        client,
        experiment_id,
        run_id,
        checkpoint,
        outputs.root / example_image(outputs.root),
        params={k: _param_text(v) for k, v in outputs.params.items()},
        tags={k: tags[k] for k in MODEL_TAGS if k in tags},
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
    key = result_key(outputs, identity)
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
        model_id = _log_model(client, experiment_id, run_id, outputs, tags)
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
