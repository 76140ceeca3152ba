"""One image's answer, whichever runtime computed it (torch's :class:`petbreeds.serve.predict.Predictor`, or
onnxruntime's :class:`petbreeds.serve.onnx_model.OnnxPredictor`); imports no runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prediction:
    """The ``top_k`` most probable breeds of one image, most probable first; ``path`` is None for image bytes."""

    path: Path | None
    top_k: list[tuple[str, float]]

    @property
    def breed(self) -> str:
        return self.top_k[0][0]

    @property
    def probability(self) -> float:
        return self.top_k[0][1]
