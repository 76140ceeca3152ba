"""Stage train_unfrozen: models/frozen.pt, unfrozen, one cycle with discriminative lrs (train_unfrozen.lr_slice).

Writes models/model.pt, plots/train_unfrozen.csv (per epoch) and metrics/train_unfrozen.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params
from petbreeds.model import load_checkpoint, unfreeze
from petbreeds.schedule import group_lrs
from petbreeds.stage import StageContext, run_stage
from petbreeds.training import load_training_data, train_phase


def main(params: Params, ctx: StageContext) -> None:
    lo, hi = params.train_unfrozen.lr_slice
    lrs = group_lrs([lo, hi], 3)
    print("train_unfrozen: lrs " + ", ".join(f"{lr:.3g}" for lr in lrs) + " (early body, late body, head)")
    seed = params.seed + 1  # new batches and dropout masks, not a replay of the frozen phase's
    data = load_training_data(params, seed=seed)
    model, _ = load_checkpoint(Path("models/frozen.pt"), data.device)
    unfreeze(model)
    torch.manual_seed(seed)
    metrics = train_phase(
        model,
        data,
        params,
        params.train_unfrozen,
        lrs,
        stage="train_unfrozen",
        checkpoint=Path("models/model.pt"),
        log_metrics=ctx.log_metrics,
    )
    atomic_write_json("metrics/train_unfrozen.json", {**metrics, "lr_lo": lo, "lr_hi": hi})


if __name__ == "__main__":
    run_stage("train_unfrozen", main, live_run=True)
