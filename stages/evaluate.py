"""Stage evaluate: models/model.pt over the validation (and test) split → metrics, confusion matrix, top losses."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params
from petbreeds.dataloaders import make_loader
from petbreeds.device import pick_device, resolve_precision
from petbreeds.errors import PetbreedsError
from petbreeds.interpret import classification_metrics, write_valid_reports
from petbreeds.model import load_checkpoint
from petbreeds.predict import checkpoint_data, valid_augment
from petbreeds.stage import StageContext, run_stage
from petbreeds.training import get_preds

RAW = Path("data/raw")


def split_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = table[table["split"] == split].reset_index(drop=True)
    if len(rows) == 0 and split == "test":
        raise PetbreedsError(
            "params.yaml: evaluate.splits lists test, but data/split.csv has no test rows: this source has no "
            "official test list (or split.method is not official); set split.method: official with "
            "fetch.source oxford-iiit-pet, or evaluate.splits: [valid]"
        )
    return rows


def main(params: Params, ctx: StageContext) -> None:
    device = pick_device()
    model, ckpt = load_checkpoint(Path("models/model.pt"), device)
    dtype = resolve_precision(params.train.precision, device)
    # keep_default_na=False: a label such as "NA" stays a string.
    table = pd.read_csv("data/split.csv", keep_default_na=False)
    # The model's own transforms; batching as params.data says.
    data = checkpoint_data(ckpt, params.data.batch_size, params.data.num_workers)
    metrics = {}
    # The reports are always of the validation split (DVC declares them); metrics for every listed split.
    for split in dict.fromkeys(["valid", *params.evaluate.splits]):
        rows = split_rows(table, split)
        loader = make_loader(rows, RAW, ckpt.vocab, data, train=False, seed=0)  # valid order = table order
        logits, targets = get_preds(
            model, loader, valid_augment(ckpt, device), device, dtype, params.train.channels_last
        )
        if split in params.evaluate.splits:
            metrics[split] = classification_metrics(logits, targets)
            print(f"evaluate {split}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[split].items()))
        if split == "valid":
            write_valid_reports(
                logits,
                targets,
                rows["path"].tolist(),
                ckpt.vocab,
                # the presized item the model saw (before the resize to data.size), from the loader's dataset
                loader.dataset.__getitem__,
                top_losses_k=params.evaluate.top_losses_k,
                min_val=params.evaluate.most_confused_min_val,
            )
    atomic_write_json("metrics/evaluate.json", metrics)


if __name__ == "__main__":
    run_stage("evaluate", main)
