"""Stage check_params: the whole of params.yaml, validated before any other stage runs.

Every stage validates the whole file when it runs (``run_stage`` loads it), but DVC runs only the stages whose
params changed: a key no stage lists (an unknown top-level key, or one under ``data``, ``index`` or
``distributed``, whose stages list single keys) would go unnoticed until the last stage, ``mlflow_log``. This stage
depends on every key of params.yaml, so it runs on any change to it, and it is first in dvc.yaml, so DVC runs it
before the stages that do not depend on it. It writes nothing.
"""

from petbreeds.config import Params
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    """Nothing more: ``run_stage`` has already validated params.yaml, or stopped with a message naming the key."""


if __name__ == "__main__":
    run_stage("check_params", main, write_run_info=False)
