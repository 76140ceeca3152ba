"""params.yaml as one typed, validated config object.

Every knob of the pipeline lives in params.yaml; this module turns it into frozen dataclasses and
refuses anything it does not understand, naming the key and the expected form:

    params.yaml: train_frozen.epochs must be an integer >= 0, got -1

The file is read with ruamel.yaml (YAML 1.2, what DVC itself uses): PyYAML would read ``1e-06``,
the form ``dvc exp run -S`` writes, as a string.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from petbreeds.errors import PetbreedsError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_lite0")

Source = Literal["sample", "oxford-iiit-pet", "local"]
SplitMethod = Literal["random", "official", "stratified"]
ResizeMethod = Literal["crop", "pad", "squish"]
PadMode = Literal["zeros", "border", "reflection"]
Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_lite0"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Suggestion = Literal["valley", "minimum", "steep", "slide"]
EvalSplit = Literal["valid", "test"]
Backend = Literal["auto", "nccl", "gloo"]


class ParamsError(PetbreedsError):
    """params.yaml is missing, unreadable, or has a wrong key, type or value."""


# --------------------------------------------------------------------------------------------------
# The schema. Field order is the order of params.yaml; the docstrings of params.yaml explain each key.


@dataclass(frozen=True)
class SampleParams:
    per_breed: int
    seed: int
    min_side: int
    max_side: int


@dataclass(frozen=True)
class OxfordParams:
    images_url: str
    images_md5: str
    annotations_url: str
    annotations_md5: str


@dataclass(frozen=True)
class FetchParams:
    source: Source
    sample: SampleParams
    oxford_iiit_pet: OxfordParams
    local_path: str
    retries: int
    timeout_s: float


@dataclass(frozen=True)
class IndexParams:
    label_regex: str
    min_class_images: int
    workers: int


@dataclass(frozen=True)
class SplitParams:
    method: SplitMethod
    valid_pct: float
    seed: int


@dataclass(frozen=True)
class DataParams:
    item_size: int
    size: int
    resize_method: ResizeMethod
    pad_mode: PadMode
    batch_size: int
    num_workers: int


@dataclass(frozen=True)
class AugmentParams:
    mult: float
    do_flip: bool
    max_rotate: float
    min_zoom: float
    max_zoom: float
    max_warp: float
    max_lighting: float
    p_affine: float
    p_lighting: float
    min_scale: float


@dataclass(frozen=True)
class ModelParams:
    arch: Arch
    weights: Literal["imagenet", "none"]
    resnet50_weights: Literal["IMAGENET1K_V1", "IMAGENET1K_V2"]


@dataclass(frozen=True)
class TrainParams:
    precision: Precision
    channels_last: bool


@dataclass(frozen=True)
class LrFindParams:
    start_lr: float
    end_lr: float
    num_it: int
    stop_div: bool
    suggestion: Suggestion


@dataclass(frozen=True)
class OneCycleParams:
    """Fields shared by both training phases (fastai's fit_one_cycle arguments)."""

    epochs: int
    pct_start: float
    div: float
    div_final: float
    wd: float


@dataclass(frozen=True)
class TrainFrozenParams(OneCycleParams):
    lr: float | None = None


@dataclass(frozen=True)
class TrainUnfrozenParams(OneCycleParams):
    lr_slice: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluateParams:
    splits: list[EvalSplit]
    top_losses_k: int
    most_confused_min_val: int


@dataclass(frozen=True)
class DistributedParams:
    nproc_per_node: int
    nnodes: int
    rdzv_endpoint: str
    backend: Backend
    sync_bn: bool
    timeout_s: float


@dataclass(frozen=True)
class Params:
    seed: int
    fetch: FetchParams
    index: IndexParams
    split: SplitParams
    data: DataParams
    augment: AugmentParams
    model: ModelParams
    train: TrainParams
    lr_find: LrFindParams
    train_frozen: TrainFrozenParams
    train_unfrozen: TrainUnfrozenParams
    evaluate: EvaluateParams
    distributed: DistributedParams


# --------------------------------------------------------------------------------------------------
# Value checks beyond types: (key, predicate, expected form).

_POSITIVE_INT = (lambda v: v > 0, "an integer > 0")
_NON_NEGATIVE_INT = (lambda v: v >= 0, "an integer >= 0")
_PROBABILITY = (lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")
_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")

_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "fetch.sample.per_breed": _POSITIVE_INT,
    "fetch.sample.min_side": (lambda v: v >= 32, "an integer >= 32"),
    "fetch.retries": _NON_NEGATIVE_INT,
    "fetch.timeout_s": _POSITIVE,
    "index.workers": _NON_NEGATIVE_INT,
    "index.min_class_images": _POSITIVE_INT,
    "split.valid_pct": (lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1"),
    "data.item_size": _POSITIVE_INT,
    "data.size": _POSITIVE_INT,
    "data.batch_size": _POSITIVE_INT,
    "data.num_workers": (lambda v: v >= -1, "an integer >= 0, or -1 for one per core"),
    "augment.mult": _NON_NEGATIVE,
    "augment.max_rotate": _NON_NEGATIVE,
    "augment.min_zoom": _POSITIVE,
    "augment.max_warp": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "augment.max_lighting": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "augment.p_affine": _PROBABILITY,
    "augment.p_lighting": _PROBABILITY,
    "augment.min_scale": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "lr_find.start_lr": _POSITIVE,
    "lr_find.num_it": (lambda v: v >= 6, "an integer >= 6 (fastai's minimum)"),
    "train_frozen.epochs": _NON_NEGATIVE_INT,
    "train_frozen.lr": (lambda v: v is None or v > 0, "a number > 0, or null for the lr_find suggestion"),
    "train_unfrozen.epochs": _NON_NEGATIVE_INT,
    "train_unfrozen.lr_slice": (
        lambda v: len(v) == 2 and 0 < v[0] <= v[1],
        "a list [lo, hi] with 0 < lo <= hi, e.g. [1.0e-6, 1.0e-4]",
    ),
    "evaluate.splits": (lambda v: len(v) > 0 and len(set(v)) == len(v), "a non-empty list of valid/test"),
    "evaluate.top_losses_k": _NON_NEGATIVE_INT,
    "evaluate.most_confused_min_val": _POSITIVE_INT,
    "distributed.nproc_per_node": _POSITIVE_INT,
    "distributed.nnodes": _POSITIVE_INT,
    "distributed.timeout_s": _POSITIVE,
}
for _phase in ("train_frozen", "train_unfrozen"):
    _CHECKS[f"{_phase}.pct_start"] = (lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")
    _CHECKS[f"{_phase}.div"] = _POSITIVE
    _CHECKS[f"{_phase}.div_final"] = _POSITIVE
    _CHECKS[f"{_phase}.wd"] = _NON_NEGATIVE


def _cross_checks(p: Params) -> list[str]:
    """Checks that involve more than one key."""
    problems = []
    if p.fetch.sample.max_side < p.fetch.sample.min_side:
        problems.append("fetch.sample.max_side must be >= fetch.sample.min_side")
    if p.augment.max_zoom < p.augment.min_zoom:
        problems.append("augment.max_zoom must be >= augment.min_zoom")
    if p.lr_find.end_lr <= p.lr_find.start_lr:
        problems.append("lr_find.end_lr must be > lr_find.start_lr")
    if p.fetch.source == "local" and not p.fetch.local_path:
        problems.append(
            "fetch.local_path is empty but fetch.source is local: set it to an archive or a folder "
            "holding images/ (e.g. ~/.fastai/data/oxford-iiit-pet)"
        )
    world_size = p.distributed.nproc_per_node * p.distributed.nnodes
    if p.data.batch_size % world_size:
        problems.append(
            f"data.batch_size {p.data.batch_size} is the global batch and must divide evenly over the "
            f"{world_size} processes (distributed.nproc_per_node x distributed.nnodes): change one of them"
        )
    if p.distributed.nnodes > 1 and not p.distributed.rdzv_endpoint:
        problems.append("distributed.rdzv_endpoint is empty but distributed.nnodes > 1: set it to HOST:PORT of node 0")
    try:
        re.compile(p.index.label_regex)
    except re.error as e:
        problems.append(f"index.label_regex is not a valid regular expression ({e})")
    return problems


# --------------------------------------------------------------------------------------------------
# The generic part: walk the dataclasses, convert and check every value.

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    wrong = ParamsError(f"params.yaml: {key} must be {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for option in get_args(tp):
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ParamsError:
                pass
        raise wrong
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise wrong
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item,) = get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # A YAML 1.1 writer (PyYAML) quotes nothing but reads '1e-06' back as text: accept the number.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"unsupported type {tp!r} for {key}")  # a schema bug, not a user error


def _build(cls: Any, raw: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {where} must be {_describe(cls)}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        keys = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ParamsError(f"params.yaml: unknown key {keys} (known keys under {where}: {', '.join(names)})")
    values = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ParamsError(f"params.yaml: missing key {key} (expected {_describe(hints[name])})")
        value = _convert(raw[name], hints[name], key)
        check = _CHECKS.get(key)
        if check is not None and not check[0](value):
            raise ParamsError(f"params.yaml: {key} must be {check[1]}, got {raw[name]!r}")
        values[name] = value
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded mapping (the content of params.yaml)."""
    params = _build(Params, raw, "")
    problems = _cross_checks(params)
    if problems:
        raise ParamsError("params.yaml: " + "; ".join(problems))
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is a :class:`ParamsError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root (where dvc.yaml is)")
    try:
        raw = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``Params`` (or any nested dataclass/dict) as ``{"train_frozen.lr": 0.003, ...}`` for trackers."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}
