"""Stage fetch: params.fetch → data/raw (images/ and the official annotations/*.txt lists)."""

from pathlib import Path

from petbreeds.config import Params
from petbreeds.data.fetch import fetch
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    fetch(params.fetch, Path("data/raw"))


if __name__ == "__main__":
    run_stage("fetch", main)
