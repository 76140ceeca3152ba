"""The exported ONNX model (:mod:`petbreeds.serve.export`) predicting, with onnxruntime, numpy and Pillow: no torch.

    predictor = OnnxPredictor(Path("models/model.onnx"))
    predictor([jpeg_bytes, Path("photo.jpg")], top_k=3)   # [Prediction(path, [("beagle", 0.93), ...]), ...]

Images are decoded as ``petbreeds predict`` decodes them (:func:`decode`); the rest of the transforms is inside the
graph. :class:`OnnxBreedClassifier` is the MLflow pyfunc around it, with the torch pyfunc's input rules
(:func:`petbreeds.serve.mlflow_model.request_images`), logged with the run beside it and served by
``mlflow models serve`` from an environment of mlflow-skinny, onnxruntime, numpy, Pillow and pandas.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import onnxruntime as ort
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import Image

from petbreeds.errors import PetbreedsError
from petbreeds.serve.mlflow_model import (
    DEFAULT_TOP_K,
    DEFAULT_TTA,
    LIMITS,
    MODEL_CONFIG,
    READ_PATHS,
    ServedModel,
    request_images,
    response_frame,
)
from petbreeds.serve.prediction import Prediction

if TYPE_CHECKING:
    from petbreeds.data.presizing import ImageSource

ONNX_ARTIFACT = "onnx"  # the artifact holding models/model.onnx
# Logged beside the torch model: the petbreeds package travels as its code, but only this module and the request
# rules (mlflow_model, prediction, errors) are imported where it is loaded, so its environment has no torch. MLflow's
# client and scoring server (FastAPI, uvicorn) are all of mlflow-skinny; named, it stands for MLflow's full package
# (which MLflow adds otherwise: 0.6 GB of scikit-learn, scipy, pyarrow, matplotlib, the tracking server ...).
ONNX_MODEL = ServedModel(
    name="petbreeds-onnx",
    code=Path(__file__).with_name("onnx_model_code.py"),
    artifact=ONNX_ARTIFACT,
    packages=("mlflow-skinny", "onnxruntime", "numpy", "pillow", "pandas"),
)


def decode(source: ImageSource, item_size: int, name: str) -> np.ndarray:
    """An image file (or its bytes) as uint8 RGB ``[H, W, 3]``, decoded as petbreeds decodes it: a JPEG at the
    largest reduced scale (Pillow's ``draft``) that keeps both sides >= ``item_size``. Not an image: a
    :class:`PetbreedsError` naming ``name``."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.draft("RGB", (item_size, item_size))
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "no image format recognised" if isinstance(e, Image.UnidentifiedImageError) else e
        raise PetbreedsError(f"{name}: not an image Pillow can read ({reason}); pass a JPEG, PNG, ...") from None


class OnnxPredictor:
    """An exported model loaded once in onnxruntime, and the path from images to its breeds."""

    def __init__(self, model_path: Path) -> None:
        try:
            self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own unrelated types for a missing file and a bad one
            raise PetbreedsError(
                f"{model_path}: not an ONNX model onnxruntime can load ({e}); export one with `petbreeds export`"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.vocab: list[str] = json.loads(meta["vocab"])
            self.item_size = int(meta["item_size"])
        except (KeyError, ValueError):
            raise PetbreedsError(
                f"{model_path}: no petbreeds metadata (vocab, item_size); export it with `petbreeds export`"
            ) from None

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """float32 ``[N, classes]`` for uint8 ``[N, H, W, 3]`` images of one size."""
        return self.session.run(["probabilities"], {"image": pixels})[0]

    def __call__(
        self, images: Sequence[ImageSource], top_k: int = DEFAULT_TOP_K, names: Sequence[str] | None = None
    ) -> list[Prediction]:
        """The ``top_k`` breeds of each image, in input order. Images differ in size: one run per image."""
        if top_k < 1:
            raise PetbreedsError(f"top_k must be >= 1, got {top_k}")
        names = names or [str(s) if isinstance(s, Path) else f"image {i}" for i, s in enumerate(images)]
        pixels = [decode(image, self.item_size, name) for image, name in zip(images, names, strict=True)]
        predictions = []
        for image, array in zip(images, pixels, strict=True):
            probs = self.probabilities(array[None])[0]
            best = np.argsort(-probs, kind="stable")[: min(top_k, len(self.vocab))]
            path = image if isinstance(image, Path) else None
            predictions.append(Prediction(path, [(self.vocab[k], float(probs[k])) for k in best]))
        return predictions


class OnnxBreedClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc of the ONNX model: the torch pyfunc's input, output and refusals, without torch."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = {**MODEL_CONFIG, **(context.model_config or {})}
        self._limits = {key: int(config[key]) for key in LIMITS}
        self._read_paths = bool(config[READ_PATHS])
        self._predictor = OnnxPredictor(Path(context.artifacts[ONNX_ARTIFACT]))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        # the signature is the torch pyfunc's, param tta included: refused here rather than silently ignored
        if int((params or {}).get("tta", DEFAULT_TTA)) != DEFAULT_TTA:
            raise MlflowException.invalid_parameter_value(
                "tta: the ONNX model has no test-time augmentation (its graph is the validation transform); ask the "
                "torch model (petbreeds) for tta, or leave it out"
            )
        images, names = request_images(model_input, self._limits, self._read_paths)
        try:
            predictions = self._predictor(images, top_k, names=names)
        except PetbreedsError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return response_frame(predictions)
