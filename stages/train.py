"""Stages train_frozen and train_unfrozen: one cycle of a phase, ``python stages/train.py frozen|unfrozen``.

frozen: a new head on the pretrained body, the body frozen, at train_frozen.lr or lr_find's suggestion; writes
models/frozen.pt. unfrozen: models/frozen.pt, unfrozen, at train_unfrozen.lr (discriminative with [lo, hi]) or
lr_find_unfrozen's suggestion; writes models/model.pt. Each also writes plots/<stage>.csv (per epoch),
plots/<stage>_batches.csv (per batch) and reports/<stage>.json.
"""

from __future__ import annotations

from pathlib import Path

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.learn.callbacks import DivergenceStop, LiveEpochs, Progress, Recorder, ResumeState, Table
from petbreeds.learn.checkpoint import save_checkpoint
from petbreeds.learn.lr_find import phase_lr
from petbreeds.learn.model import param_groups
from petbreeds.learn.resume import Resume
from petbreeds.learn.schedule import group_lrs
from petbreeds.learn.training import (
    fit_one_cycle,
    phase_metrics,
    phase_model,
    phase_seed,
    training_data,
    write_batches,
    write_history,
)
from petbreeds.stage import StageContext, phase_argument, run_stage

START = {"frozen": Path("models/pretrained"), "unfrozen": Path("models/frozen.pt")}
LR_FIND_REPORT = {"frozen": Path("reports/lr_find.json"), "unfrozen": Path("reports/lr_find_unfrozen.json")}
MODEL = {"frozen": Path("models/frozen.pt"), "unfrozen": Path("models/model.pt")}


def main(params: Params, ctx: StageContext, phase: str) -> None:
    stage = f"train_{phase}"
    settings = params.train_frozen if phase == "frozen" else params.train_unfrozen
    lr = phase_lr(stage, settings.lr, LR_FIND_REPORT[phase], params.lr_find.suggestion)
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=phase_seed(params, phase), world=ctx.world)
    ctx.record(**data.compute.facts())
    model = phase_model(params, phase, len(vocab), START[phase], data.compute.device)  # as its lr_find's
    lrs = group_lrs(lr, len(param_groups(model)))
    resume, recorder = Resume.open(stage, params, ctx.world), Recorder()
    callbacks = [ResumeState(resume), DivergenceStop(stage), recorder]
    if ctx.world.is_main:
        print(f"{stage}: max lr per group " + ", ".join(f"{v:.3g}" for v in lrs) + " (early, late body, head)")
        callbacks += [Table(), Progress(stage, len(data.train_loader)), LiveEpochs(ctx.log_epoch)]
    history = fit_one_cycle(model, data, settings, lrs, callbacks)
    ctx.record(**resume.facts())
    metrics = phase_metrics(history, model, data)
    if ctx.world.is_main:
        save_checkpoint(
            MODEL[phase], model, arch=params.model.arch, vocab=vocab, data=params.data, augment=params.augment
        )
        # the unfrozen phase's epochs and batches follow the frozen phase's on the plots' axes (same batches per epoch)
        epochs_before = 0 if phase == "frozen" else params.train_frozen.epochs
        batches_before = epochs_before * len(data.train_loader)
        write_history(Path(f"plots/{stage}.csv"), history, epochs_before, batches_before)
        write_batches(Path(f"plots/{stage}_batches.csv"), recorder.batches, batches_before)
        lr_numbers = {"lr": lrs[-1]} if phase == "frozen" else {"lr_lo": lrs[0], "lr_hi": lrs[-1]}  # the head's
        atomic_write_json(f"reports/{stage}.json", {**metrics, **lr_numbers})
    resume.finish()  # after the outputs: a run killed while writing them resumes at its last epoch


if __name__ == "__main__":
    phase = phase_argument()
    run_stage(f"train_{phase}", lambda params, ctx: main(params, ctx, phase), distributed=True, live_run=True)
