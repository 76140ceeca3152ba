"""params.yaml as one typed, validated config object.

Every knob of the pipeline lives in params.yaml; this module turns it into frozen pydantic models (strict: ``true``
is no integer, ``"3"`` no number; an integer is a number) and refuses anything it does not understand, naming the
key and the expected form:

    params.yaml: train_frozen.epochs must be an integer >= 0, got -1

A field's ``description`` is that expected form; without one it follows from the type. The file is read with
ruamel.yaml (YAML 1.2, what DVC itself uses): PyYAML would read ``1e-06``, the form ``dvc exp run -S`` writes, as a
string.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from petbreeds.errors import PetbreedsError

Source = Literal["sample", "oxford-iiit-pet", "local"]
SplitMethod = Literal["random", "official", "stratified", "folder", "csv_column"]
LabelFrom = Literal["filename_regex", "parent_folder", "csv"]
ResizeMethod = Literal["crop", "pad", "squish"]
PadMode = Literal["zeros", "border", "reflection"]
Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_lite0"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Suggestion = Literal["valley", "minimum", "steep", "slide"]
Finder = Literal["lr_find", "lr_find_unfrozen"]
EvalSplit = Literal["valid", "test"]
Backend = Literal["auto", "nccl", "gloo"]


class ParamsError(PetbreedsError):
    """params.yaml is missing, unreadable, or has a wrong key, type or value."""


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _float_text(value: Any) -> Any:
    # A YAML 1.1 writer (PyYAML) quotes nothing but reads '1e-06' back as text: accept the number.
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()) else value


def _require(ok: Callable[[Any], bool]) -> AfterValidator:
    """A check beyond pydantic's constraints; its message is the field's description."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError("out of range")
        return value

    return AfterValidator(check)


Number = Annotated[float, BeforeValidator(_float_text)]
PositiveInt = Annotated[int, Field(gt=0, description="an integer > 0")]
NonNegativeInt = Annotated[int, Field(ge=0, description="an integer >= 0")]
Positive = Annotated[Number, Field(gt=0, description="a number > 0")]
NonNegative = Annotated[Number, Field(ge=0, description="a number >= 0")]
Probability = Annotated[Number, Field(ge=0, le=1, description="a number between 0 and 1")]
Fraction = Annotated[Number, Field(ge=0, lt=1, description="a number in [0, 1)")]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# The schema. Field order is the order of params.yaml; the comments of params.yaml explain each key.


class SampleParams(_Model):
    per_breed: PositiveInt
    seed: int
    min_side: int = Field(ge=32, description="an integer >= 32")
    max_side: int


class OxfordParams(_Model):
    images_url: str
    images_md5: str
    annotations_url: str
    annotations_md5: str


class FetchParams(_Model):
    source: Source
    sample: SampleParams
    oxford_iiit_pet: OxfordParams
    local_path: str
    retries: NonNegativeInt
    timeout_s: Positive


class LabelsCsvParams(_Model):
    path: str = Field(min_length=1, description="a path inside the source folder, e.g. labels.csv")
    prefix: str
    file_column: str = Field(min_length=1, description="a column name")
    label_column: str = Field(min_length=1, description="a column name")


class IndexParams(_Model):
    label_from: LabelFrom = "filename_regex"
    label_regex: str
    labels_csv: LabelsCsvParams = LabelsCsvParams(
        path="labels.csv", prefix="", file_column="file", label_column="label"
    )
    min_class_images: PositiveInt
    workers: NonNegativeInt


class SplitParams(_Model):
    method: SplitMethod
    valid_pct: Number = Field(gt=0, lt=1, description="a number strictly between 0 and 1")
    seed: int
    train_folder: str = Field("train", min_length=1, description="a folder name")
    valid_folder: str = Field("valid", min_length=1, description="a folder name")
    valid_column: str = Field("is_valid", min_length=1, description="a column name")


class DataParams(_Model):
    item_size: PositiveInt
    size: PositiveInt
    resize_method: ResizeMethod
    pad_mode: PadMode
    batch_size: PositiveInt
    num_workers: int = Field(
        ge=-1, description="an integer >= 0, or -1 for the default (none on a CPU; on a GPU the cores less two, 1-16)"
    )


class AugmentParams(_Model):
    mult: NonNegative
    do_flip: bool
    max_rotate: NonNegative
    min_zoom: Positive
    max_zoom: Number
    max_warp: Fraction
    max_lighting: Fraction
    p_affine: Probability
    p_lighting: Probability
    min_scale: Number = Field(gt=0, le=1, description="a number in (0, 1]")


class ModelParams(_Model):
    arch: Arch
    weights: Literal["imagenet", "none"]
    resnet50_weights: Literal["IMAGENET1K_V1", "IMAGENET1K_V2"]


class TrainParams(_Model):
    precision: Precision
    channels_last: bool
    compile: bool
    deterministic: bool = False


# lr_find.run: which finders sweep, by rule or by name
LrFindRun = Literal["always", "auto", "never"] | Annotated[list[Finder], _require(lambda v: len(set(v)) == len(v))]


class LrFindParams(_Model):
    run: LrFindRun = Field(
        "always",
        description="always, auto (a finder sweeps where its phase's lr is null), never, or a list of the finders "
        "that sweep (lr_find, lr_find_unfrozen), e.g. [lr_find_unfrozen]",
    )
    start_lr: Positive
    end_lr: Number
    num_it: int = Field(ge=6, description="an integer >= 6 (fastai's minimum)")
    stop_div: bool
    suggestion: Suggestion

    def run_text(self) -> str:
        """``run`` as params.yaml writes it: ``auto``, ``[lr_find_unfrozen]``."""
        return self.run if isinstance(self.run, str) else "[" + ", ".join(self.run) + "]"


class OneCycleParams(_Model):
    """Fields shared by both training phases (fastai's fit_one_cycle arguments)."""

    epochs: NonNegativeInt
    pct_start: Probability
    div: Positive
    div_final: Positive
    wd: NonNegative


class PhaseParams(OneCycleParams):
    """A training phase (train_frozen, train_unfrozen): fit_one_cycle's arguments and its lr_max."""

    # fastai's lr_max forms: a float for every group, slice(lo, hi) as [lo, hi], slice(hi) as [hi]
    lr: (
        Annotated[Number, Field(gt=0)]
        | Annotated[list[Number], _require(lambda v: len(v) in (1, 2) and 0 < v[0] <= v[-1])]
        | None
    ) = Field(
        description="a number > 0, a list [lo, hi] with 0 < lo <= hi (fastai's slice(lo, hi)), a list [hi] with "
        "hi > 0 (slice(hi): hi/10 for all groups but the head), or null for the suggestion of the phase's lr "
        "finder (lr_find, lr_find_unfrozen)"
    )


class TTAParams(_Model):
    """fastai's ``learn.tta(n, beta, use_max)`` (petbreeds.learn.tta); ``n: 0`` evaluates without it."""

    n: NonNegativeInt
    beta: Probability
    use_max: bool


class EvaluateParams(_Model):
    splits: Annotated[
        list[EvalSplit],
        _require(lambda v: len(v) > 0 and len(set(v)) == len(v)),
        Field(description="a non-empty list of valid/test"),
    ]
    top_losses_k: NonNegativeInt
    most_confused_min_val: PositiveInt
    tta: TTAParams


class DistributedParams(_Model):
    nproc_per_node: PositiveInt
    nnodes: PositiveInt
    rdzv_endpoint: str
    backend: Backend
    sync_bn: bool
    timeout_s: Positive


class ResumeParams(_Model):
    every_epochs: NonNegativeInt


class Params(_Model):
    seed: int
    fetch: FetchParams
    index: IndexParams
    split: SplitParams
    data: DataParams
    augment: AugmentParams
    model: ModelParams
    train: TrainParams
    lr_find: LrFindParams
    train_frozen: PhaseParams
    train_unfrozen: PhaseParams
    evaluate: EvaluateParams
    distributed: DistributedParams
    resume: ResumeParams


# Each lr finder (a stage) and the training phase whose null lr trains at its suggestion.
FINDER_PHASES: dict[Finder, Literal["train_frozen", "train_unfrozen"]] = {
    "lr_find": "train_frozen",
    "lr_find_unfrozen": "train_unfrozen",
}
# The key of a finder's report (reports/<finder>.json) when it did not sweep: why. Written by petbreeds.learn.lr_find,
# read by petbreeds.track.outputs (which keeps the training code out of the mlflow_log stage).
NOT_RUN = "not_run"


def sweep_runs(p: Params, finder: Finder) -> bool:
    """Whether ``finder`` sweeps, as ``lr_find.run`` says: ``auto`` where its phase's lr is null."""
    run = p.lr_find.run
    if run == "auto":
        return getattr(p, FINDER_PHASES[finder]).lr is None
    return run == "always" or (isinstance(run, list) and finder in run)


def _cross_checks(p: Params) -> list[str]:
    """Checks that involve more than one key."""
    problems = []
    if p.fetch.sample.max_side < p.fetch.sample.min_side:
        problems.append("fetch.sample.max_side must be >= fetch.sample.min_side")
    if p.augment.max_zoom < p.augment.min_zoom:
        problems.append("augment.max_zoom must be >= augment.min_zoom")
    if p.lr_find.end_lr <= p.lr_find.start_lr:
        problems.append("lr_find.end_lr must be > lr_find.start_lr")
    for finder, phase in FINDER_PHASES.items():
        if getattr(p, phase).lr is None and not sweep_runs(p, finder):
            problems.append(
                f"{phase}.lr is null, which trains at {finder}'s suggestion, but lr_find.run is "
                f"{p.lr_find.run_text()}, which does not run {finder}: set {phase}.lr, or lr_find.run to auto"
            )
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
# pydantic's errors in our words.


def _expected(tp: Any, field: FieldInfo | None = None) -> str:
    if field is not None and field.description:
        return field.description
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping with keys " + ", ".join(tp.model_fields)
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _field_path(loc: tuple[int | str, ...]) -> tuple[str, ...]:
    """The leading parts of an error's ``loc`` that name fields of nested models (not list indices or the tags
    pydantic gives the members of a union)."""
    path: list[str] = []
    model: Any = Params
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields):
            break
        path.append(str(part))
        model = model.model_fields[part].annotation
    return tuple(path)


def _message(e: ValidationError, raw: Any) -> str:
    """The first problem, unknown keys first (a typo there explains the rest), as ``params.yaml: ...``."""
    errors = e.errors()
    error = min(errors, key=lambda err: err["type"] != "extra_forbidden")
    extra = error["type"] == "extra_forbidden"
    # the section holding an unknown key; else the key itself (a list item's or a union member's problem is the key's)
    path = error["loc"][:-1] if extra else _field_path(error["loc"])
    model, field, value = Params, None, raw
    for name in path:
        field = model.model_fields[name]
        model, value = field.annotation, value.get(name) if isinstance(value, dict) else None
    key = ".".join(map(str, path)) or "the top level"
    if extra:
        unknown = [err["loc"] for err in errors if err["type"] == "extra_forbidden" and err["loc"][:-1] == path]
        keys, known = ", ".join(sorted(".".join(map(str, u)) for u in unknown)), ", ".join(model.model_fields)
        return f"params.yaml: unknown key {keys} (known keys under {key}: {known})"
    if error["type"] == "missing":
        return f"params.yaml: missing key {key} (expected {_expected(model, field)})"
    return f"params.yaml: {key} must be {_expected(model, field)}, got {value!r}"


def parse_params(raw: Any) -> Params:
    """Validate an already-loaded mapping (the content of params.yaml)."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_message(e, raw)) from None
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
    """``Params`` (or any nested model/dict) as ``{"train_frozen.lr": 0.003, ...}`` for trackers."""
    if isinstance(obj, BaseModel):
        obj = dict(obj)
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}
