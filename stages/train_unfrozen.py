"""Stage train_unfrozen: models/frozen.pt, unfrozen, one cycle at train_unfrozen.lr (discriminative with [lo, hi])
or the lr_find_unfrozen suggestion.

Writes models/model.pt, plots/train_unfrozen.csv (per epoch), plots/train_unfrozen_batches.csv (per batch) and
reports/train_unfrozen.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.learn.checkpoint import load_checkpoint, save_checkpoint
from petbreeds.learn.lr_find import phase_lr
from petbreeds.learn.model import param_groups, unfreeze
from petbreeds.learn.resume import Resume
from petbreeds.learn.schedule import group_lrs
from petbreeds.learn.training import fit_one_cycle, phase_metrics, training_data, write_batches, write_history
from petbreeds.stage import StageContext, run_stage

LR_FIND_REPORT = Path("reports/lr_find_unfrozen.json")


def main(params: Params, ctx: StageContext) -> None:
    lr = phase_lr("train_unfrozen", params.train_unfrozen.lr, LR_FIND_REPORT, params.lr_find.suggestion)
    seed = params.seed + 1  # new batches and dropout masks, not a replay of the frozen phase's
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=seed, world=ctx.world)
    ctx.record(**data.compute.facts())
    model, _ = load_checkpoint(Path("models/frozen.pt"), data.compute.device)
    unfreeze(model)
    lrs = group_lrs(lr, len(param_groups(model)))
    if ctx.world.is_main:
        print("train_unfrozen: max lr per group " + ", ".join(f"{v:.3g}" for v in lrs) + " (early, late body, head)")
    torch.manual_seed(seed)
    batches: list[dict[str, float]] = []
    resume = Resume.open("train_unfrozen", params, ctx.world)
    history = fit_one_cycle(
        model,
        data,
        params.train_unfrozen,
        lrs,
        stage="train_unfrozen",
        on_epoch=ctx.log_epoch,
        on_batch=batches.append,
        resume=resume,
    )
    ctx.record(**resume.facts())
    metrics = phase_metrics(history, model, data)
    if ctx.world.is_main:
        save_checkpoint(Path("models/model.pt"), model, arch=params.model.arch, vocab=vocab, data=params.data)
        # its epochs and batches follow the frozen phase's on the plots' axes (both phases load the same batches)
        frozen_epochs = params.train_frozen.epochs
        frozen_batches = frozen_epochs * len(data.train_loader)
        write_history(Path("plots/train_unfrozen.csv"), history, frozen_epochs, frozen_batches)
        write_batches(Path("plots/train_unfrozen_batches.csv"), batches, frozen_batches)
        atomic_write_json("reports/train_unfrozen.json", {**metrics, "lr_lo": lrs[0], "lr_hi": lrs[-1]})
    resume.finish()  # after the outputs: a run killed while writing them resumes at its last epoch


if __name__ == "__main__":
    run_stage("train_unfrozen", main, distributed=True, live_run=True)
