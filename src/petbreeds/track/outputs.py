"""What the pipeline's stages left in a project folder, read as the parent run logs it: params, numbers (series and
finals by stage), the training data as a dataset, the model and its input example.

The parent run is built from these files (``metrics/``, ``plots/``, ``reports/``, ``dvc.lock``, ``params.yaml``),
not while training, because DVC restores stages from its run cache without running them (see
``petbreeds.track.parent_run``).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric
from ruamel.yaml import YAML

from petbreeds.config import NOT_RUN, flatten
from petbreeds.errors import PetbreedsError
from petbreeds.track.provenance import RUN_INFO_DIR

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
# The result's model, logged as the run's MLflow model (petbreeds.serve.mlflow_model) with a validation image as its
# input example; the evaluate stage's numbers are linked to it as its metrics.
MODEL_FILE = "models/model.pt"
ONNX_FILE = "models/model.onnx"  # the export stage's: logged as a second MLflow model, served without torch
SPLIT_TABLE = "data/split.csv"
RAW_DIR = "data/raw"
MODEL_METRICS_STAGE = "evaluate"


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
            continue  # why a stage did not do its work: a tag and the note say it (not_run_stages), not a metric
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


def not_run_stages(root: Path) -> dict[str, str]:
    """``{stage: why}`` for each stage whose report says it did not do its work (an lr finder that did not sweep,
    ``lr_find.run``): the run says why, where its curve has no points and its picture says "not run"."""
    found = {}
    for path in sorted((root / "reports").glob("*.json")):
        report = _read_json(path)
        if isinstance(report, dict) and NOT_RUN in report:
            found[path.stem] = str(report[NOT_RUN])
    return found


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


def has_model(lock: Mapping[str, Any]) -> bool:
    """Whether the result of ``lock`` (dvc.lock's content) has a model: train_unfrozen recorded one."""
    return out_md5(lock, "train_unfrozen", MODEL_FILE) is not None


def has_onnx_model(lock: Mapping[str, Any]) -> bool:
    """Whether the result of ``lock`` has an exported ONNX model: the export stage recorded one."""
    return out_md5(lock, "export", ONNX_FILE) is not None


def example_image(root: Path) -> str:
    """The model's input example, relative to ``root``: the first validation image of ``data/split.csv``."""
    from petbreeds.data.splitting import read_split_table  # here only: it imports torch, which most logging never needs

    valid = read_split_table(root / SPLIT_TABLE).query("split == 'valid'")
    if valid.empty:
        raise PetbreedsError(f"{root / SPLIT_TABLE}: no validation image to show the model with; re-run `dvc repro`")
    return f"{RAW_DIR}/{valid['path'].iloc[0]}"


def epoch_ms(iso: str | None) -> int:
    """An ISO time of a run_info sidecar in milliseconds since the epoch, as MLflow stamps; now without one."""
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
    start_ms, end_ms = epoch_ms(info.get("started")), epoch_ms(info.get("finished"))
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


def _stage_metrics(outputs: PipelineOutputs, stage: str, model_id: str | None) -> list[Metric]:
    """A stage's series (``plots/<stage>.csv``) and every number of ``metrics/<stage>.json`` (the columns of ``dvc exp
    show``) and ``reports/<stage>.json`` as ``<stage>/<key>``, at the series' last step (0 without one), timed at the
    stage's end.

    MLflow shows a metric's point of the highest step, the latest of them, so the runs table and the run page show
    the final numbers. A final number that is already the series' last point is not logged twice. The finals are
    linked to the MLflow model ``model_id`` (its metrics) when given.
    """
    series = _series(outputs, stage) if stage in SERIES else []
    step = max((m.step for m in series), default=0)
    ts = max([epoch_ms(outputs.run_info.get(stage, {}).get("finished")), *(m.timestamp for m in series)])
    last_points = {(m.key, m.value) for m in series if m.step == step}
    finals = [
        Metric(f"{stage}/{key}", value, ts, step, model_id=model_id)
        for key, value in outputs.metrics.get(stage, {}).items()
    ]
    return series + [m for m in finals if (m.key, m.value) not in last_points]


def run_metrics(outputs: PipelineOutputs, model_id: str | None = None) -> list[Metric]:
    """Every number of the result, stage by stage (:func:`_stage_metrics`); the evaluate stage's linked to the MLflow
    model ``model_id`` when given."""
    return [
        m
        for stage in sorted(set(outputs.metrics) | set(SERIES))
        for m in _stage_metrics(outputs, stage, model_id if stage == MODEL_METRICS_STAGE else None)
    ]


def param_texts(outputs: PipelineOutputs) -> dict[str, str]:
    """params.yaml's values as MLflow keeps params, text: strings as they are, anything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in outputs.params.items()}


def training_dataset(outputs: PipelineOutputs) -> DatasetInput | None:
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
    data_raw = Dataset(f"oxford-iiit-pet ({source})", digest, source_type, json.dumps(where))
    return DatasetInput(data_raw, tags=[InputTag("mlflow.data.context", "training")])
