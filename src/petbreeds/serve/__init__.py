"""A trained model answering for new images: ``predict`` (``petbreeds predict`` and ``petbreeds.predict(...)``) and
the MLflow pyfunc that ``mlflow models serve`` runs (``mlflow_model``, built from ``mlflow_model_code``), one path
from image bytes to breeds. Builds on ``learn`` and ``data``; never imports ``track``.
"""
