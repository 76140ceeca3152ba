"""The ONNX MLflow model's code, as MLflow's "models from code" wants it (see mlflow_model_code.py): MLflow runs this
file to build the pyfunc when the model is logged and wherever it is loaded. petbreeds never imports it."""

from mlflow.models import set_model

from petbreeds.serve.onnx_model import OnnxBreedClassifier

set_model(OnnxBreedClassifier())
