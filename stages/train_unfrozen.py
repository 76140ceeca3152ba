"""Stage train_unfrozen: models/frozen.pt, unfrozen, one cycle with discriminative lrs (train_unfrozen.lr_slice).

Writes models/model.pt, plots/train_unfrozen.csv (per epoch) and reports/train_unfrozen.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from petbreeds.atomic import atomic_write_json
from petbreeds.checkpoint import load_checkpoint, save_checkpoint
from petbreeds.config import Params
from petbreeds.model import param_groups, unfreeze
from petbreeds.schedule import group_lrs
from petbreeds.splitting import read_split_table, read_vocab
from petbreeds.stage import StageContext, run_stage
from petbreeds.training import fit_one_cycle, phase_metrics, training_data, write_history


def main(params: Params, ctx: StageContext) -> None:
    seed = params.seed + 1  # new batches and dropout masks, not a replay of the frozen phase's
    table, vocab = read_split_table(Path("data/split.csv")), read_vocab(Path("data/vocab.json"))
    data = training_data(params, table, vocab, Path("data/raw"), seed=seed, world=ctx.world)
    model, _ = load_checkpoint(Path("models/frozen.pt"), data.compute.device)
    unfreeze(model)
    lo, hi = params.train_unfrozen.lr_slice
    lrs = group_lrs([lo, hi], len(param_groups(model)))
    if ctx.world.is_main:
        print("train_unfrozen: lrs " + ", ".join(f"{lr:.3g}" for lr in lrs) + " (early body, late body, head)")
    torch.manual_seed(seed)
    history = fit_one_cycle(model, data, params.train_unfrozen, lrs, stage="train_unfrozen", on_epoch=ctx.log_epoch)
    metrics = phase_metrics(history, model, data)
    if ctx.world.is_main:
        save_checkpoint(Path("models/model.pt"), model, arch=params.model.arch, vocab=vocab, data=params.data)
        # its epochs follow the frozen phase's on the plots' axis
        write_history(Path("plots/train_unfrozen.csv"), history, first_epoch=params.train_frozen.epochs)
        atomic_write_json("reports/train_unfrozen.json", {**metrics, "lr_lo": lo, "lr_hi": hi})


if __name__ == "__main__":
    run_stage("train_unfrozen", main, distributed=True, live_run=True)
