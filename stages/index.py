"""Stage index: data/raw → data/index.csv, data/vocab.json, reports/index_excluded.csv, reports/index.json."""

from __future__ import annotations

import sys
from pathlib import Path

from petbreeds.atomic import atomic_output, atomic_write_json
from petbreeds.config import Params
from petbreeds.labelling import index_images
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    result = index_images(Path("data/raw"), params.index)
    with atomic_output("data/index.csv") as tmp:
        result.table.to_csv(tmp, index=False)
    atomic_write_json("data/vocab.json", {"vocab": result.vocab})
    with atomic_output("reports/index_excluded.csv") as tmp:
        result.excluded.to_csv(tmp, index=False)
    atomic_write_json("reports/index.json", result.metrics())
    print(result.summary())
    warning = result.warning()
    if warning:
        print(warning, file=sys.stderr)


if __name__ == "__main__":
    run_stage("index", main)
