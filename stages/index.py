"""Stage index: data/raw → data/index.csv, data/vocab.json, reports/index_excluded.csv, reports/index.json."""

from __future__ import annotations

import sys
from pathlib import Path

from petbreeds.atomic import atomic_output, atomic_write_json
from petbreeds.config import Params
from petbreeds.data.labelling import index_images
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    result = index_images(Path("data/raw"), params.index)
    with atomic_output("data/index.csv") as tmp:
        result.table.to_csv(tmp, index=False)
    atomic_write_json("data/vocab.json", {"vocab": result.vocab})
    excluded_report = "reports/index_excluded.csv"
    with atomic_output(excluded_report) as tmp:
        result.excluded.to_csv(tmp, index=False)
    atomic_write_json("reports/index.json", result.metrics())
    # Name where the excluded files are: a count alone leaves the user to guess which images were dropped and why.
    print(result.summary() + (f"; each file and why: {excluded_report}" if len(result.excluded) else ""))
    warning = result.warning()
    if warning:
        print(warning, file=sys.stderr)


if __name__ == "__main__":
    run_stage("index", main)
