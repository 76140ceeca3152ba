"""Stage lr_find: the learning-rate finder on the frozen model (as fastai's lr_find after vision_learner).

Writes plots/lr_find.csv (lr, smoothed loss), reports/lr_find.png, metrics/lr_find.json (every suggestion, the
chosen one, seconds, iterations) and a look at the batches: reports/show_batch_{train,valid}.png.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from petbreeds.atomic import atomic_output, atomic_write_json
from petbreeds.config import Params
from petbreeds.lr_find import lr_find, save_lr_find_plot
from petbreeds.show import save_show_batch
from petbreeds.stage import StageContext, run_stage
from petbreeds.training import load_training_data, new_frozen_model


def main(params: Params, ctx: StageContext) -> None:
    data = load_training_data(params, seed=params.seed)
    model = new_frozen_model(params, len(data.vocab))
    started = time.perf_counter()
    result = lr_find(
        model,
        data.train_loader,
        data.augment,
        start_lr=params.lr_find.start_lr,
        end_lr=params.lr_find.end_lr,
        num_it=params.lr_find.num_it,
        stop_div=params.lr_find.stop_div,
        wd=params.train_frozen.wd,  # the optimizer the frozen phase will train with
        device=data.device,
        dtype=data.dtype,
        channels_last=params.train.channels_last,
        on_step=lambda i, lr, loss: ctx.log_metrics({"lr": lr, "loss": loss}, step=i),
    )
    seconds = time.perf_counter() - started
    chosen = params.lr_find.suggestion
    with atomic_output("plots/lr_find.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss"])
        writer.writerows(zip(result.lrs, result.losses, strict=True))
    save_lr_find_plot(result, chosen, Path("reports/lr_find.png"))
    metrics = {
        **result.suggestions,
        "chosen": result.suggestions[chosen],
        "seconds": seconds,
        "iterations": len(result.lrs),
    }
    atomic_write_json("metrics/lr_find.json", metrics)
    print("lr_find: " + ", ".join(f"{name} {lr:.2e}" for name, lr in result.suggestions.items()) + f"; {chosen} used")
    for split, loader in (("train", data.train_loader), ("valid", data.valid_loader)):
        x, y = next(iter(loader))
        save_show_batch(x, y, data.vocab, data.augment, Path(f"reports/show_batch_{split}.png"), train=split == "train")


if __name__ == "__main__":
    run_stage("lr_find", main, live_run=True)
