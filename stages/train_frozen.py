"""Stage train_frozen: one cycle with the body frozen, at train_frozen.lr or the lr_find suggestion.

Writes models/frozen.pt, plots/train_frozen.csv (per epoch) and metrics/train_frozen.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params
from petbreeds.errors import PetbreedsError
from petbreeds.schedule import group_lrs
from petbreeds.stage import StageContext, run_stage
from petbreeds.training import load_training_data, new_frozen_model, train_phase

LR_FIND_METRICS = Path("metrics/lr_find.json")


def frozen_lr(params: Params) -> float:
    """train_frozen.lr, or (null) the lr_find suggestion that lr_find.suggestion names."""
    if params.train_frozen.lr is not None:
        return params.train_frozen.lr
    if not LR_FIND_METRICS.is_file():
        raise PetbreedsError(f"{LR_FIND_METRICS} not found and train_frozen.lr is null; run `dvc repro lr_find`")
    return float(json.loads(LR_FIND_METRICS.read_text(encoding="utf-8"))[params.lr_find.suggestion])


def main(params: Params, ctx: StageContext) -> None:
    lr = frozen_lr(params)
    print(f"train_frozen: lr {lr:.3g} for all groups")
    data = load_training_data(params, seed=params.seed)
    model = new_frozen_model(params, len(data.vocab))  # seeded as in lr_find: the same initial head
    metrics = train_phase(
        model,
        data,
        params,
        params.train_frozen,
        group_lrs(lr, 3),
        stage="train_frozen",
        checkpoint=Path("models/frozen.pt"),
        log_metrics=ctx.log_metrics,
    )
    atomic_write_json("metrics/train_frozen.json", {**metrics, "lr": lr})


if __name__ == "__main__":
    run_stage("train_frozen", main, live_run=True)
