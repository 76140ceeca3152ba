"""A trained model answering for new images: ``predict`` (``petbreeds predict`` and ``petbreeds.predict(...)``) and
the MLflow pyfunc that ``mlflow models serve`` runs (``mlflow_model``, built from ``mlflow_model_code``), one path
from image bytes to breeds; ``export``, the model as one ONNX file with its preprocessing inside, and ``onnx_model``,
that file run by onnxruntime alone (no torch) and its MLflow pyfunc. Builds on ``learn`` and ``data``; never imports
``track``.
"""
