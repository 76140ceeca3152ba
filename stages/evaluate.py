"""Stage evaluate: models/model.pt over the validation (and test) split → metrics, confusion matrix, top losses.

metrics/evaluate.json holds the few numbers experiments are compared by (``dvc exp show``); reports/evaluate.json
the rest of each split's numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params
from petbreeds.data.dataloaders import make_loader
from petbreeds.data.splitting import read_split_table
from petbreeds.errors import PetbreedsError
from petbreeds.learn.checkpoint import load_checkpoint
from petbreeds.learn.device import pick_device
from petbreeds.learn.inference import compute_as_trained, get_preds
from petbreeds.learn.interpret import (
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
from petbreeds.learn.tta import tta_metrics, tta_probs
from petbreeds.progress import progress
from petbreeds.stage import StageContext, run_stage

RAW = Path("data/raw")
# The numbers of metrics/evaluate.json, by their name in classification_metrics and tta_metrics -> their name for
# the validation split, which sits at the top level (fastai's names); a test split's sit under "test". Four at most
# (two without TTA), so that `dvc exp show` at 120 columns still has room for the params an experiment changed.
COMPARED = {
    "error_rate": "error_rate",
    "loss": "valid_loss",
    "error_rate_tta": "error_rate_tta",
    "loss_tta": "valid_loss_tta",
}


def split_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = table[table["split"] == split].reset_index(drop=True)
    if len(rows) == 0 and split == "test":
        raise PetbreedsError(
            "params.yaml: evaluate.splits lists test, but data/split.csv has no test rows: this source has no "
            "official test list (or split.method is not official); set split.method: official with "
            "fetch.source oxford-iiit-pet, or evaluate.splits: [valid]"
        )
    return rows


def metrics_and_report(per_split: dict[str, dict[str, float | int]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics/evaluate.json (the :data:`COMPARED` numbers a split has: the TTA ones only with evaluate.tta.n > 0)
    and reports/evaluate.json (the others) from each split's numbers, the validation split's at the top level and
    any other's under its name."""
    metrics: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for split, numbers in per_split.items():
        rest = {key: value for key, value in numbers.items() if key not in COMPARED}
        if split == "valid":
            metrics.update({name: numbers[key] for key, name in COMPARED.items() if key in numbers})
            report.update(rest)
        else:
            metrics[split], report[split] = {key: numbers[key] for key in COMPARED if key in numbers}, rest
    return metrics, report


def main(params: Params, ctx: StageContext) -> None:
    device = pick_device()
    model, ckpt = load_checkpoint(Path("models/model.pt"), device)
    compute = compute_as_trained(params.train, device, Path("reports/run_info/train_unfrozen.json"))
    ctx.record(**compute.facts())
    table = read_split_table(Path("data/split.csv"))
    # The model's own transforms; batching as params.data says.
    data = ckpt.data_params(params.data.batch_size, params.data.num_workers)
    per_split = {}
    tta = params.evaluate.tta
    # The validation split always (the reports are of it); the test split when evaluate.splits lists it.
    for split in dict.fromkeys(["valid", *params.evaluate.splits]):
        rows = split_rows(table, split)
        loader = make_loader(rows, RAW, ckpt.vocab, data, train=False, seed=0)  # valid order = table order
        batches = progress(loader, f"evaluate {split}")
        logits, targets = get_preds(model, batches, ckpt.valid_augment(device), compute)
        per_split[split] = classification_metrics(logits, targets)
        if tta.n > 0:
            # fastai's learn.tta: tta.n more passes through the training transforms, seeded by params.seed
            passes = make_loader(rows, RAW, ckpt.vocab, data, train=False, seed=params.seed, passes=tta.n)
            augmented = progress(passes, f"evaluate {split}, {tta.n} TTA passes")
            probs = tta_probs(model, logits, augmented, ckpt.train_augment(device, params.seed), compute, tta)
            per_split[split].update(tta_metrics(probs, targets))
        print(f"evaluate {split}: " + ", ".join(f"{k} {v:.4g}" for k, v in per_split[split].items()))
        if split != "valid":
            continue
        # the interpretation is of the plain predictions (fastai's ClassificationInterpretation's), TTA or not
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
    metrics, report = metrics_and_report(per_split)
    atomic_write_json("metrics/evaluate.json", metrics)
    atomic_write_json("reports/evaluate.json", report)


if __name__ == "__main__":
    run_stage("evaluate", main)
