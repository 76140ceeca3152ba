"""Stage train_frozen: one cycle with the body frozen, at train_frozen.lr or the lr_find suggestion.

Writes models/frozen.pt, plots/train_frozen.csv (per epoch), plots/train_frozen_batches.csv (per batch) and
reports/train_frozen.json.
"""

from __future__ import annotations

from pathlib import Path

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.learn.checkpoint import save_checkpoint
from petbreeds.learn.lr_find import phase_lr
from petbreeds.learn.model import param_groups
from petbreeds.learn.resume import Resume
from petbreeds.learn.schedule import group_lrs
from petbreeds.learn.training import (
    fit_one_cycle,
    new_frozen_model,
    phase_metrics,
    training_data,
    write_batches,
    write_history,
)
from petbreeds.stage import StageContext, run_stage


def main(params: Params, ctx: StageContext) -> None:
    lr = phase_lr("train_frozen", params.train_frozen.lr, Path("reports/lr_find.json"), params.lr_find.suggestion)
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=params.seed, world=ctx.world)
    ctx.record(**data.compute.facts())
    model = new_frozen_model(params, len(vocab), Path("models/pretrained"))  # seeded as in lr_find: the same head
    lrs = group_lrs(lr, len(param_groups(model)))
    if ctx.world.is_main:
        print("train_frozen: max lr per group " + ", ".join(f"{v:.3g}" for v in lrs))
    batches: list[dict[str, float]] = []
    resume = Resume.open("train_frozen", params, ctx.world)
    history = fit_one_cycle(
        model,
        data,
        params.train_frozen,
        lrs,
        stage="train_frozen",
        on_epoch=ctx.log_epoch,
        on_batch=batches.append,
        resume=resume,
    )
    ctx.record(**resume.facts())
    metrics = phase_metrics(history, model, data)
    if ctx.world.is_main:
        save_checkpoint(Path("models/frozen.pt"), model, arch=params.model.arch, vocab=vocab, data=params.data)
        write_history(Path("plots/train_frozen.csv"), history)
        write_batches(Path("plots/train_frozen_batches.csv"), batches)
        atomic_write_json("reports/train_frozen.json", {**metrics, "lr": lrs[-1]})  # the head's: a number
    resume.finish()  # after the outputs: a run killed while writing them resumes at its last epoch


if __name__ == "__main__":
    run_stage("train_frozen", main, distributed=True, live_run=True)
