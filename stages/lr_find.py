"""Stage lr_find: the learning-rate finder on the frozen model (as fastai's lr_find after vision_learner).

Writes plots/lr_find.csv (lr, smoothed loss), reports/lr_find.png, reports/lr_find.json (every suggestion, the
chosen one, iterations: train_frozen's dep, so no timings; the sweep's seconds are a fact in
reports/run_info/lr_find.json) and a look at the batches: reports/show_batch_{train,valid}.png.
"""

from __future__ import annotations

import time
from pathlib import Path

from petbreeds.config import Params
from petbreeds.data.show import save_show_batch
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.learn.lr_find import lr_find, write_lr_find
from petbreeds.learn.training import new_frozen_model, training_data
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=params.seed, world=ctx.world)
    ctx.record(**data.compute.facts())
    model = new_frozen_model(params, len(vocab), Path("models/pretrained"))
    started = time.perf_counter()
    wd = params.train_frozen.wd  # the optimizer the frozen phase will train with
    result = lr_find(model, data, params.lr_find, wd, lambda i, lr, loss: ctx.log_metrics({"lr": lr, "loss": loss}, i))
    ctx.record(sweep_seconds=f"{time.perf_counter() - started:.1f}")
    if not ctx.world.is_main:
        return
    chosen = params.lr_find.suggestion
    curve, plot, report = Path("plots/lr_find.csv"), Path("reports/lr_find.png"), Path("reports/lr_find.json")
    write_lr_find(result, chosen, curve=curve, plot=plot, report=report)
    print("lr_find: " + ", ".join(f"{name} {lr:.2e}" for name, lr in result.suggestions.items()) + f"; {chosen} used")
    for split, loader in (("train", data.train_loader), ("valid", data.valid_loader)):
        x, y = next(iter(loader))
        save_show_batch(x, y, vocab, data.augment, Path(f"reports/show_batch_{split}.png"), train=split == "train")


if __name__ == "__main__":
    run_stage("lr_find", main, distributed=True, live_run=True)
