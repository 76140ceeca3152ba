"""Stage export: models/model.pt as models/model.onnx, one file with its preprocessing inside that runs with
onnxruntime alone (petbreeds.serve.export)."""

from pathlib import Path

from petbreeds.config import Params
from petbreeds.serve.export import export_onnx
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    export_onnx(Path("models/model.pt"), Path("models/model.onnx"))


if __name__ == "__main__":
    run_stage("export", main)
