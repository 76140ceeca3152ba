"""Stages lr_find and lr_find_unfrozen: the learning-rate finder at the start of a phase,
``python stages/lr_find.py frozen|unfrozen``.

frozen (stage lr_find): on the new frozen model, as fastai's lr_find after vision_learner; also a look at the
batches, reports/show_batch_{train,valid}.png. unfrozen (stage lr_find_unfrozen): on models/frozen.pt, unfrozen (the
book's ``unfreeze()`` then ``lr_find()``); as fastai's finder on an unfrozen learner (docs/fastai.md §6), with the
beta1 the frozen phase's one cycle ended on. Either sweeps one lr for every parameter group with its phase's weight
decay and batches, and writes plots/<stage>.csv (lr, smoothed loss), reports/<stage>.png and reports/<stage>.json
(every suggestion, the chosen one, iterations: the phase's dep, so no timings; the sweep's seconds are a fact in
reports/run_info/<stage>.json). The chosen one is what a null train_<phase>.lr trains at. Where lr_find.run leaves
the sweep out, the same outputs say "not run" and why (petbreeds.learn.lr_find), and the batches are still shown.
"""

from __future__ import annotations

import time
from pathlib import Path

from petbreeds.config import Params
from petbreeds.data.show import save_show_batch
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.learn.callbacks import LiveSweep, SweepProgress
from petbreeds.learn.lr_find import LR_FIND_BETA1, lr_find, plan_sweep, write_lr_find
from petbreeds.learn.schedule import last_beta1
from petbreeds.learn.training import phase_model, phase_seed, training_data
from petbreeds.stage import StageContext, phase_argument, run_stage

START = {"frozen": Path("models/pretrained"), "unfrozen": Path("models/frozen.pt")}


def main(params: Params, ctx: StageContext, phase: str) -> None:
    stage = "lr_find" if phase == "frozen" else "lr_find_unfrozen"
    plan, result = plan_sweep(params, stage), None
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=phase_seed(params, phase), world=ctx.world)
    ctx.record(**data.compute.facts())
    if plan.runs:
        model = phase_model(params, phase, len(vocab), START[phase], data.compute.device)
        wd = (params.train_frozen if phase == "frozen" else params.train_unfrozen).wd  # the phase's optimizer's
        # fastai's finder keeps the optimizer's beta1: a fresh learner's, or where the frozen phase's one cycle left it
        frozen_steps = params.train_frozen.epochs * len(data.train_loader)
        beta1 = (
            last_beta1(params.train_frozen.pct_start, frozen_steps)
            if phase == "unfrozen" and frozen_steps
            else LR_FIND_BETA1
        )
        started = time.perf_counter()
        shown = [LiveSweep(ctx.log_metrics), SweepProgress(stage, params.lr_find.num_it)]
        callbacks = shown if ctx.world.is_main else []
        result = lr_find(model, data, params.lr_find, wd, callbacks, beta1=beta1)
        ctx.record(sweep_seconds=f"{time.perf_counter() - started:.1f}")
    if not ctx.world.is_main:
        return
    curve, plot, report = Path(f"plots/{stage}.csv"), Path(f"reports/{stage}.png"), Path(f"reports/{stage}.json")
    write_lr_find(result, plan, curve=curve, plot=plot, report=report)
    print(plan.summary(result))
    if phase == "frozen":
        for split, loader in (("train", data.train_loader), ("valid", data.valid_loader)):
            x, y = next(iter(loader))
            save_show_batch(x, y, vocab, data.augment, Path(f"reports/show_batch_{split}.png"), train=split == "train")


if __name__ == "__main__":
    phase = phase_argument()
    stage = "lr_find" if phase == "frozen" else "lr_find_unfrozen"
    run_stage(stage, lambda params, ctx: main(params, ctx, phase), distributed=True, live_run=True)
