"""weights stage: ImageNet weights for the body into models/pretrained (see petbreeds.learn.pretrained)."""

from petbreeds.config import Params
from petbreeds.learn.pretrained import prepare_pretrained
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    prepare_pretrained(params.model, ctx.root / "models" / "pretrained")


if __name__ == "__main__":
    run_stage("weights", main)
