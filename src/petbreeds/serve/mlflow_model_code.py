"""The MLflow model's code, as MLflow's "models from code" wants it: MLflow runs this file to build the pyfunc when
the model is logged and wherever it is loaded (a pickled model would not load: MLflow 3 refuses pickles by default).
petbreeds never imports it."""

from mlflow.models import set_model

from petbreeds.serve.mlflow_model import BreedClassifier

set_model(BreedClassifier())
