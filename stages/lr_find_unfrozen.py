"""Stage lr_find_unfrozen: the learning-rate finder on models/frozen.pt, unfrozen (the book's ``unfreeze()`` then
``lr_find()``, before ``fit_one_cycle(6, lr_max=1e-5)``).

As fastai's finder on an unfrozen learner (docs/fastai.md §6): one lr for every parameter group, the whole model
training, with the unfrozen phase's weight decay and batches and the beta1 the frozen phase's one cycle ended on.
Writes plots/lr_find_unfrozen.csv (lr, smoothed loss), reports/lr_find_unfrozen.png and
reports/lr_find_unfrozen.json (every suggestion; the chosen one is what a null train_unfrozen.lr trains at). Where
lr_find.run leaves the sweep out, the same outputs say "not run" and why (petbreeds.learn.lr_find).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from petbreeds.config import Params
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.learn.checkpoint import load_checkpoint
from petbreeds.learn.lr_find import LR_FIND_BETA1, lr_find, plan_sweep, write_lr_find
from petbreeds.learn.model import unfreeze
from petbreeds.learn.schedule import last_beta1
from petbreeds.learn.training import training_data
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    plan = plan_sweep(params, "lr_find_unfrozen")
    curve, plot = Path("plots/lr_find_unfrozen.csv"), Path("reports/lr_find_unfrozen.png")
    report = Path("reports/lr_find_unfrozen.json")
    if not plan.runs:
        if ctx.world.is_main:
            write_lr_find(None, plan, curve=curve, plot=plot, report=report)
            print(plan.summary(None))
        return
    seed = params.seed + 1  # the unfrozen phase's batches and dropout masks (stages/train_unfrozen.py)
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=seed, world=ctx.world)
    ctx.record(**data.compute.facts())
    model, _ = load_checkpoint(Path("models/frozen.pt"), data.compute.device)
    unfreeze(model)
    torch.manual_seed(seed)
    wd = params.train_unfrozen.wd  # the optimizer the unfrozen phase will train with
    # fastai's finder keeps the optimizer's beta1: where the frozen phase's one cycle left it
    frozen_steps = params.train_frozen.epochs * len(data.train_loader)
    beta1 = last_beta1(params.train_frozen.pct_start, frozen_steps) if frozen_steps else LR_FIND_BETA1

    def log_step(i: int, lr: float, loss: float) -> None:
        ctx.log_metrics({"lr": lr, "loss": loss}, i)

    started = time.perf_counter()
    result = lr_find(model, data, params.lr_find, wd, log_step, beta1=beta1)
    ctx.record(sweep_seconds=f"{time.perf_counter() - started:.1f}")
    if not ctx.world.is_main:
        return
    write_lr_find(result, plan, curve=curve, plot=plot, report=report)
    print(plan.summary(result))


if __name__ == "__main__":
    run_stage("lr_find_unfrozen", main, distributed=True, live_run=True)
