"""Stage lr_find: the learning-rate finder on the frozen model (as fastai's lr_find after vision_learner).

Writes plots/lr_find.csv (lr, smoothed loss), reports/lr_find.png, reports/lr_find.json (every suggestion, the
chosen one, iterations: train_frozen's dep, so no timings; the sweep's seconds are a fact in
reports/run_info/lr_find.json) and a look at the batches: reports/show_batch_{train,valid}.png. Where lr_find.run
leaves the sweep out, the same outputs say "not run" and why (petbreeds.learn.lr_find), and the batches are shown.
"""

from __future__ import annotations

import time
from pathlib import Path

from petbreeds.config import Params
from petbreeds.data.show import save_show_batch
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.learn.lr_find import lr_find, plan_sweep, write_lr_find
from petbreeds.learn.training import new_frozen_model, training_data
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=params.seed, world=ctx.world)
    ctx.record(**data.compute.facts())
    plan, result = plan_sweep(params, "lr_find"), None
    if plan.runs:
        model = new_frozen_model(params, len(vocab), Path("models/pretrained"))
        started = time.perf_counter()
        wd = params.train_frozen.wd  # the optimizer the frozen phase will train with

        def log_step(i: int, lr: float, loss: float) -> None:
            ctx.log_metrics({"lr": lr, "loss": loss}, i)

        result = lr_find(model, data, params.lr_find, wd, log_step)
        ctx.record(sweep_seconds=f"{time.perf_counter() - started:.1f}")
    if not ctx.world.is_main:
        return
    curve, plot, report = Path("plots/lr_find.csv"), Path("reports/lr_find.png"), Path("reports/lr_find.json")
    write_lr_find(result, plan, curve=curve, plot=plot, report=report)
    print(plan.summary(result))
    for split, loader in (("train", data.train_loader), ("valid", data.valid_loader)):
        x, y = next(iter(loader))
        save_show_batch(x, y, vocab, data.augment, Path(f"reports/show_batch_{split}.png"), train=split == "train")


if __name__ == "__main__":
    run_stage("lr_find", main, distributed=True, live_run=True)
