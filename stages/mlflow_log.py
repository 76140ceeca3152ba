"""Stage mlflow_log: the experiment's one MLflow run, built from the files the other stages wrote, with
models/model.pt as its MLflow model (petbreeds.serve.mlflow_model).

Always changed and last in the DAG, so the run is complete even when DVC restored the training stages from its
run cache. A tracking problem is a warning (re-log later with `petbreeds mlflow-relog`), never a failed pipeline.
"""

from petbreeds.config import Params
from petbreeds.stage import StageContext, run_stage
from petbreeds.track.parent_run import log_pipeline_or_warn


def main(params: Params, ctx: StageContext) -> None:
    log_pipeline_or_warn(ctx.root)


if __name__ == "__main__":
    run_stage("mlflow_log", main, write_run_info=False)
