"""The trained model as an MLflow model: a pyfunc that names the breeds of images, logged with the pipeline's run.

    model = mlflow.pyfunc.load_model("models:/petbreeds@champion")  # or models:/<model_id>, from any process
    model.predict(pd.DataFrame({"image": [jpeg_base64_text, jpeg_bytes]}), params={"top_k": 3, "tta": 0})
    #    breed  probability  top_k ([{"breed": ..., "probability": ...}, ...], most probable first)

Input: a DataFrame column ``image``, one image per row: an image file's bytes as base64 text (what a JSON request to
``mlflow models serve`` carries), or the bytes themselves. Never a path: a model that opened the files its clients
name would read the server's files for them. A local caller that wants paths opts in when loading,
``mlflow.pyfunc.load_model(uri, model_config={"read_paths": True})``; the scoring server loads without it.
Predictions go through :class:`petbreeds.serve.predict.Predictor`, the code of ``petbreeds predict``: the
checkpoint's own validation transforms; the param ``tta`` (default 0: none) adds that many passes through its
training transforms, combined as fastai's ``learn.tta`` does.

What one request may cost is bounded (:data:`LIMITS`, model config keys: at most ``max_images`` rows, each image at
most ``max_pixels`` pixels, checked from its header before it is decoded, and at most ``max_tta`` augmented passes).
An input that is no image, or over a limit, raises an ``MlflowException`` with INVALID_PARAMETER_VALUE, which the
scoring server answers with HTTP 400 and its message (any other exception would be a 400 carrying a traceback); the
message never depends on the server's files.

The logged model holds the checkpoint (artifact ``checkpoint``) and this package (``code_paths``), so it loads
where only the packages of :func:`requirements` are installed; its requirements are given, not inferred (inference
would load the model in a subprocess).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema
from PIL import Image

from petbreeds.errors import PetbreedsError
from petbreeds.serve.prediction import Prediction

if TYPE_CHECKING:
    from petbreeds.data.presizing import ImageSource
    from petbreeds.serve.predict import Predictor

MODEL_NAME = "petbreeds"  # the LoggedModel's name in its run (the registry's name is the user's choice)
CHECKPOINT = "checkpoint"  # the artifact holding models/model.pt
IMAGE = "image"  # the input column
DEFAULT_TOP_K = 3
DEFAULT_TTA = 0  # augmented passes (petbreeds.learn.tta)
# What one request may cost the server: images per request, pixels per image (a 12,000 x 12,000 PNG of 445 KB
# decodes to 432 MB), augmented passes per request (each costs what the plain pass does). Model config keys, changed
# where the model is loaded: `load_model(uri, model_config={...})`, or for `mlflow models serve` the environment,
# SERVING_MODEL_CONFIG='{"max_images": 64}'.
LIMITS = {"max_images": 32, "max_pixels": 50_000_000, "max_tta": 16}
READ_PATHS = "read_paths"  # model config: text naming a file where the model runs is read (local use only)
# Logged with the model: MLflow lets a loader change only the keys a model was logged with (others are ignored
# with a warning that lists these).
MODEL_CONFIG = {**LIMITS, READ_PATHS: False}
SERVING_CONFIG_HINT = "model_config at load time; SERVING_MODEL_CONFIG='{...}' for mlflow models serve"
PACKAGE = Path(__file__).resolve().parents[1]  # src/petbreeds, all of it: travels with the model (code_paths)
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")  # builds the pyfunc (MLflow's models from code)
# Where the model is loaded, the predict path needs these (torch, the model zoo, decoding, params' types, the table).
RUNTIME_PACKAGES = ("torch", "torchvision", "timm", "pillow", "numpy", "pandas", "pydantic", "ruamel.yaml", "tqdm")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE)]),  # bytes pass the schema too (it checks strings loosely)
    outputs=Schema(
        [
            ColSpec("string", "breed"),
            ColSpec("double", "probability"),
            ColSpec(Array(Object([Property("breed", "string"), Property("probability", "double")])), "top_k"),
        ]
    ),
    params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K), ParamSpec("tta", "long", DEFAULT_TTA)]),
)


class BreedClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: a column ``image`` in, ``breed``, ``probability`` and ``top_k`` out, row for row."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # Imported here: the process that logs the model needs no torch.
        from petbreeds.serve.predict import Predictor

        config = {**MODEL_CONFIG, **(context.model_config or {})}  # the logged config with the loader's changes
        self._limits = {key: int(config[key]) for key in LIMITS}
        self._read_paths = bool(config[READ_PATHS])
        self._predictor: Predictor = Predictor(Path(context.artifacts[CHECKPOINT]))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        tta = int((params or {}).get("tta", DEFAULT_TTA))
        if not 0 <= tta <= self._limits["max_tta"]:
            raise MlflowException.invalid_parameter_value(
                f"tta = {tta}: augmented passes must be between 0 and max_tta = {self._limits['max_tta']}; ask for "
                f"fewer, or raise max_tta ({SERVING_CONFIG_HINT})"
            )
        images, names = request_images(model_input, self._limits, self._read_paths)
        try:
            predictions = self._predictor(images, top_k, names=names, tta=tta)
        except PetbreedsError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return response_frame(predictions)


def request_images(
    model_input: pd.DataFrame, limits: Mapping[str, int], read_paths: bool
) -> tuple[list[ImageSource], list[str]]:
    """A request's images and their names (``image row i``), within ``limits``: the rules every served petbreeds
    model applies (this pyfunc and the ONNX one, :mod:`petbreeds.serve.onnx_model`). A refusal is an
    ``MlflowException`` (HTTP 400)."""
    values = model_input[IMAGE]
    if len(values) > limits["max_images"]:
        raise MlflowException.invalid_parameter_value(
            f"{len(values)} images in one request, more than max_images = {limits['max_images']}; send "
            f"fewer per request, or raise max_images ({SERVING_CONFIG_HINT})"
        )
    images = [_image_source(value, row, read_paths) for row, value in enumerate(values)]
    for row, image in enumerate(images):
        if isinstance(image, bytes):
            _check_pixels(image, row, limits["max_pixels"])
    return images, [f"{IMAGE} row {row}" for row in range(len(images))]


def response_frame(predictions: Sequence[Prediction]) -> pd.DataFrame:
    """The served answer (:data:`SIGNATURE`'s outputs), a row per image."""
    rows = [
        {
            "breed": p.breed,
            "probability": p.probability,
            "top_k": [{"breed": breed, "probability": prob} for breed, prob in p.top_k],
        }
        for p in predictions
    ]
    return pd.DataFrame(rows, columns=["breed", "probability", "top_k"])


def _image_source(value: object, row: int, read_paths: bool) -> ImageSource:
    """An ``image`` cell as bytes: bytes as they are, text as base64; with ``read_paths``, text naming an existing
    file is that file. Without it no text is ever looked up on disk, so the answer cannot tell which files exist."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        if read_paths:
            try:
                if Path(value).is_file():
                    return Path(value)
            except OSError:
                pass  # base64 text far longer than a file name can be
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            pass
    what = "neither base64 nor a file's path" if read_paths else "not base64"
    raise MlflowException.invalid_parameter_value(
        f"{IMAGE} row {row}: {what}; send each image file's bytes base64-encoded"
    )


def _check_pixels(data: bytes, row: int, max_pixels: int) -> None:
    """Refuse an image larger than ``max_pixels`` from its header, before anything decodes it. Pillow's own
    decompression-bomb guard (a warning past 89 MP, an error past 179 MP) is stricter than nothing but looser than
    a server wants, so it is silenced here and this limit applies instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        size, too_large = f"{width} x {height} = {width * height:,} pixels", width * height > max_pixels
    except Image.DecompressionBombError:
        size, too_large = "over 179 million pixels", True
    except (OSError, SyntaxError, ValueError):
        return  # not an image: the predictor says so, in its own words
    if too_large:
        raise MlflowException.invalid_parameter_value(
            f"{IMAGE} row {row}: {size}, more than max_pixels = {max_pixels:,}; send a smaller image, or raise "
            f"max_pixels ({SERVING_CONFIG_HINT})"
        )


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent tracking URI set to ``uri`` meanwhile, for the MLflow functions that read it instead of taking a
    client; afterwards the URI they read before. ``MLFLOW_TRACKING_URI`` is kept as it was: MLflow's
    ``set_tracking_uri`` overwrites it, and petbreeds reads it to find the store."""
    env, before = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


@dataclass(frozen=True)
class ServedModel:
    """One kind of the run's MLflow models: its LoggedModel name, the file MLflow runs to build it, the artifact
    holding its model file, and the packages it needs where it is loaded."""

    name: str
    code: Path
    artifact: str
    packages: tuple[str, ...]

    def requirements(self) -> list[str]:
        """The packages the model needs where it is loaded, pinned to the versions it was logged with."""
        return [f"{name}=={importlib.metadata.version(name)}" for name in self.packages]


# The checkpoint, predicted by torch through petbreeds predict's code.
TORCH_MODEL = ServedModel(MODEL_NAME, MODEL_CODE, CHECKPOINT, RUNTIME_PACKAGES)


def log_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    model_file: Path,
    example: Path,
    *,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    kind: ServedModel = TORCH_MODEL,
) -> str:
    """Log ``model_file`` as a ``kind`` pyfunc LoggedModel of run ``run_id`` (an output of the run) in the store of
    ``client``; ``example`` is the input example, base64 as served. The model's id.

    The model is created with the explicit client, in the run's experiment: MLflow's own creation would put it in
    the fluent API's current experiment (the Default one). Log it before the run's metrics: MLflow links every
    metric already logged at the model's step to it, and the caller links the model's own.
    """
    model = client.create_logged_model(
        experiment_id, name=kind.name, source_run_id=run_id, params=dict(params), tags=dict(tags)
    )
    example_frame = pd.DataFrame({IMAGE: [base64.b64encode(example.read_bytes()).decode("ascii")]})
    # Model.log writes through the fluent tracking URI: point it at this client's store while it does.
    with fluent_tracking_uri(client.tracking_uri):
        Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=model.model_id,
            python_model=str(kind.code),
            artifacts={kind.artifact: str(model_file)},
            code_paths=[str(PACKAGE)],
            signature=SIGNATURE,
            model_config=MODEL_CONFIG,
            input_example=example_frame,
            pip_requirements=kind.requirements(),
        )
    return model.model_id
