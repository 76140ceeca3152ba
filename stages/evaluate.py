"""Stage evaluate: models/model.pt over the validation (and test) split → metrics, confusion matrix, top losses."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from petbreeds.atomic import atomic_write_json
from petbreeds.checkpoint import load_checkpoint
from petbreeds.config import Params
from petbreeds.dataloaders import make_loader
from petbreeds.device import Compute, pick_device, resolve_precision
from petbreeds.errors import PetbreedsError
from petbreeds.interpret import (
    classification_metrics,
    confusion_matrix,
    most_confused,
    most_confused_table,
    per_class_table,
    save_confusion_png,
    save_top_losses_png,
    top_loss_rows,
    top_losses_table,
    write_confusion_json,
    write_csv,
)
from petbreeds.splitting import read_split_table
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
    compute = Compute(device, resolve_precision(params.train.precision, device), params.train.channels_last)
    table = read_split_table(Path("data/split.csv"))
    # The model's own transforms; batching as params.data says.
    data = ckpt.data_params(params.data.batch_size, params.data.num_workers)
    metrics = {}
    # The reports are always of the validation split (DVC declares them); metrics for every listed split.
    for split in dict.fromkeys(["valid", *params.evaluate.splits]):
        rows = split_rows(table, split)
        loader = make_loader(rows, RAW, ckpt.vocab, data, train=False, seed=0)  # valid order = table order
        logits, targets = get_preds(model, loader, ckpt.valid_augment(device), compute)
        if split in params.evaluate.splits:
            metrics[split] = classification_metrics(logits, targets)
            print(f"evaluate {split}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[split].items()))
        if split != "valid":
            continue
        preds = logits.argmax(dim=1)
        cm = confusion_matrix(preds, targets, len(ckpt.vocab))
        cells = most_confused(cm, ckpt.vocab, params.evaluate.most_confused_min_val)
        print(f"most_confused(min_val={params.evaluate.most_confused_min_val}):", cells)
        top = top_loss_rows(logits, targets, rows["path"].tolist(), ckpt.vocab, params.evaluate.top_losses_k)
        write_confusion_json(Path("plots/confusion.json"), preds, targets, ckpt.vocab)
        save_confusion_png(Path("reports/confusion_matrix.png"), cm, ckpt.vocab, "Confusion matrix (validation)")
        # each image as the model saw it: the presized item (before the resize to data.size), from the loader
        images = [loader.dataset[row.index][0] for row in top]
        save_top_losses_png(Path("reports/top_losses.png"), top, images)
        write_csv(Path("reports/top_losses.csv"), top_losses_table(top))
        write_csv(Path("reports/most_confused.csv"), most_confused_table(cells))
        write_csv(Path("reports/per_class.csv"), per_class_table(cm, ckpt.vocab))
    atomic_write_json("metrics/evaluate.json", metrics)


if __name__ == "__main__":
    run_stage("evaluate", main)
