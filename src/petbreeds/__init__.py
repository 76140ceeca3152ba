"""petbreeds: the fastai book's chapter 5 (Oxford-IIIT Pet) as a DVC pipeline on plain PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `petbreeds.predict(...)` (petbreeds.serve.predict.predict) after a bare `import petbreeds`, which stays cheap:
    # torch loads on first use.
    if name == "predict":
        return importlib.import_module("petbreeds.serve.predict").predict
    raise AttributeError(f"module 'petbreeds' has no attribute {name!r}")
