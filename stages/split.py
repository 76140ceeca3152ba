"""Stage split: data/index.csv → data/split.csv (the index plus a `split` column), reports/split.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from petbreeds.atomic import atomic_output, atomic_write_json
from petbreeds.config import Params
from petbreeds.data.labelling import read_labels_csv
from petbreeds.data.splitting import split_items, split_metrics
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    # keep_default_na=False: a label such as "NA" stays a string, not a missing value.
    index = pd.read_csv("data/index.csv", keep_default_na=False)
    vocab = json.loads(Path("data/vocab.json").read_text(encoding="utf-8"))["vocab"]
    raw = Path("data/raw")
    csv = params.index.labels_csv
    labels_csv = read_labels_csv(raw, csv, [csv.file_column]) if params.split.method == "csv_column" else None
    table = split_items(index, params.split, raw, labels_csv)
    with atomic_output("data/split.csv") as tmp:
        table.to_csv(tmp, index=False)
    metrics = split_metrics(table, vocab)
    atomic_write_json("reports/split.json", metrics)
    print("split: " + ", ".join(f"{metrics[name]} {name}" for name in ("train", "valid", "test", "unlisted")))


if __name__ == "__main__":
    run_stage("split", main)
