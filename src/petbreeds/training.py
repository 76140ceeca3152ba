"""The training loop: fastai's fit_one_cycle as one readable loop, plus validation and predictions.

    history = fit_one_cycle(model, train_loader, valid_loader, augment, epochs=2, lrs=[3e-3] * 3,
                            pct_start=0.25, div=25.0, div_final=1e5, wd=0.01, device=device, dtype=None,
                            channels_last=True, stage="train_frozen")
    logits, targets = get_preds(model, valid_loader, augment, device, None, channels_last=True)

Each training batch: augment on the device -> forward under autocast -> cross-entropy in fp32 -> backward (scaled
for fp16) -> AdamW step -> OneCycleLR step (spec §10.2). Every fit gets a new optimizer and schedule, which is what
fastai's freeze()/unfreeze() give (they clear the optimizer state) in the book's recipes.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from petbreeds.atomic import atomic_output
from petbreeds.augment import BatchAugment
from petbreeds.config import OneCycleParams, Params
from petbreeds.dataloaders import make_loader, to_device
from petbreeds.device import autocast, make_grad_scaler, pick_device, resolve_precision
from petbreeds.errors import PetbreedsError
from petbreeds.model import PetModel, create_model, freeze, param_groups, save_checkpoint
from petbreeds.schedule import make_one_cycle, make_optimizer

# The augment stage: uint8 [B, 3, item, item] on the device -> float32 normalised [B, 3, size, size].
Augment = Callable[..., torch.Tensor]
# plots/<stage>.csv: the per-epoch history for `dvc plots` (epochs numbered 0..n-1 within each phase).
CSV_COLUMNS = ("epoch", "train_loss", "valid_loss", "error_rate", "lr", "seconds")


class SmoothLoss:
    """fastai's AvgSmoothLoss: an EMA of the batch losses (β 0.98), debiased by 1 - β^count (spec §10.3)."""

    def __init__(self, beta: float = 0.98) -> None:
        self.beta = beta
        self.avg = 0.0
        self.count = 0

    def add(self, loss: float) -> float:
        """Take one batch loss; return the smoothed value."""
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta**self.count)


def place(model: nn.Module, device: torch.device, channels_last: bool) -> None:
    """Move ``model`` to ``device``, in channels_last layout when asked (in place: the Parameters stay the same)."""
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def batch_inputs(
    batch: tuple[torch.Tensor, torch.Tensor], augment: Augment, device: torch.device, channels_last: bool, train: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loader batch (uint8 [B,3,item,item], int64 [B]) -> (float32 normalised [B,3,size,size], int64 [B]) on device."""
    x, y = to_device(batch, device)
    x = augment(x, train=train)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """One optimizer step on a batch; returns the batch's mean loss (fp32 scalar, detached)."""
    with autocast(device, dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)  # fp32, as fastai casts predictions right after the forward
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def get_preds(
    model: nn.Module,
    loader: DataLoader,
    augment: Augment,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 [N, C] and targets int64 [N], on the CPU, in loader order; leaves ``model`` in eval mode."""
    place(model, device, channels_last)
    model.eval()
    logits, targets = [], []
    for batch in loader:
        x, y = batch_inputs(batch, augment, device, channels_last, train=False)
        with autocast(device, dtype):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(y.cpu())
    return torch.cat(logits), torch.cat(targets)


def validate(
    model: nn.Module,
    loader: DataLoader,
    augment: Augment,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
) -> tuple[float, float]:
    """(mean cross-entropy, error rate) over every validation item (fastai's valid_loss and error_rate)."""
    logits, targets = get_preds(model, loader, augment, device, dtype, channels_last)
    loss = F.cross_entropy(logits, targets).item()
    error_rate = (logits.argmax(dim=1) != targets).float().mean().item()
    return loss, error_rate


def _format_row(values: Sequence[Any]) -> str:
    return "".join(f"{v:<12.6f}" if isinstance(v, float) else f"{v!s:<12}" for v in values).rstrip()


def fit_one_cycle(
    model: nn.Module,
    train_loader: DataLoader,
    valid_loader: DataLoader,
    augment: Augment,
    *,
    epochs: int,
    lrs: Sequence[float],
    pct_start: float,
    div: float,
    div_final: float,
    wd: float,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    stage: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` (its current freeze state) for ``epochs`` of one cycle; returns a history row per epoch.

    ``lrs``: the max lr of each of the model's 3 parameter groups. A row holds the book's columns (train_loss =
    the smoothed loss at the epoch's end, reset per fit; valid_loss; error_rate), ``lr`` (the last group's, last
    batch), ``seconds`` (training + validation) and ``images_per_s`` (training). A non-finite loss stops with a
    :class:`PetbreedsError` naming ``stage``, the epoch, the batch and the lr.
    """
    if epochs == 0:
        return []
    place(model, device, channels_last)
    opt = make_optimizer(param_groups(model), lrs, wd)
    sched = make_one_cycle(opt, epochs * len(train_loader), pct_start, div, div_final)
    scaler = make_grad_scaler(device, dtype)
    smooth = SmoothLoss()
    history: list[dict[str, float]] = []
    print(_format_row(("epoch", "train_loss", "valid_loss", "error_rate", "time")))
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        images = 0
        for i, batch in enumerate(tqdm(train_loader, desc=f"{stage} epoch {epoch}", leave=False, unit="batch")):
            x, y = batch_inputs(batch, augment, device, channels_last, train=True)
            lr = opt.param_groups[-1]["lr"]
            loss = train_step(model, opt, scaler, x, y, device, dtype).item()
            if not math.isfinite(loss):
                raise PetbreedsError(
                    f"{stage} diverged: the training loss is {loss} at epoch {epoch}, batch {i} (lr {lr:.3g}); "
                    f"lower the learning rate under {stage} in params.yaml"
                )
            sched.step()
            train_loss = smooth.add(loss)
            images += len(y)
        train_seconds = time.perf_counter() - started
        valid_loss, error_rate = validate(model, valid_loader, augment, device, dtype, channels_last)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "error_rate": error_rate,
            "lr": lr,
            "seconds": seconds,
            "images_per_s": images / train_seconds,
        }
        history.append(row)
        minutes, secs = divmod(round(seconds), 60)
        print(_format_row((epoch, train_loss, valid_loss, error_rate, f"{minutes:02d}:{secs:02d}")), flush=True)
        if on_epoch is not None:
            on_epoch(row)
    return history


# --------------------------------------------------------------------------------------------------
# What the lr_find and training stages share: their inputs from params, a phase's outputs.

RAW = Path("data/raw")


@dataclass
class TrainingData:
    """The loaders, the batch augmentation and where they run, built from params and the split stage's files."""

    vocab: list[str]
    train_loader: DataLoader
    valid_loader: DataLoader
    augment: BatchAugment
    device: torch.device
    dtype: torch.dtype | None


def load_training_data(params: Params, *, seed: int) -> TrainingData:
    """Read ``data/split.csv`` and ``data/vocab.json`` (cwd = project root) into loaders and augmentation.

    ``seed`` seeds the shuffling, the crops and the augmentation draws. A phase that follows another must use its
    own: with the same seed it replays the previous phase's batches, which its model has partly memorised
    (fastai's phases share one DataLoader, so every epoch draws new ones).
    """
    for needed in (Path("data/split.csv"), Path("data/vocab.json")):
        if not needed.is_file():
            raise PetbreedsError(f"{needed} not found; run `dvc repro split` first")
    table = pd.read_csv("data/split.csv", keep_default_na=False)  # a label such as "NA" stays a string
    vocab = json.loads(Path("data/vocab.json").read_text(encoding="utf-8"))["vocab"]
    device = pick_device()

    def loader(split: str) -> DataLoader:
        rows = table[table["split"] == split].reset_index(drop=True)
        return make_loader(rows, RAW, vocab, params.data, train=split == "train", seed=seed)

    return TrainingData(
        vocab=vocab,
        train_loader=loader("train"),
        valid_loader=loader("valid"),
        augment=BatchAugment(params.augment, params.data.size, seed, device),
        device=device,
        dtype=resolve_precision(params.train.precision, device),
    )


def new_frozen_model(params: Params, n_classes: int) -> PetModel:
    """The learner's model as vision_learner makes it: pretrained body, fresh head seeded from params, frozen."""
    torch.manual_seed(params.seed)
    model = create_model(params.model.arch, n_classes, Path("models/pretrained"))
    freeze(model)
    return model


def _without_epoch(row: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in row.items() if name != "epoch"}


def train_phase(
    model: PetModel,
    data: TrainingData,
    params: Params,
    phase: OneCycleParams,
    lrs: Sequence[float],
    *,
    stage: str,
    checkpoint: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, float]:
    """fit_one_cycle with ``phase``'s params; save the checkpoint and ``plots/<stage>.csv``; return final metrics.

    ``log_metrics(row without epoch, epoch)`` streams each epoch (the stage's ``ctx.log_metrics``).

    The metrics (numbers only): the last epoch's train_loss, valid_loss, error_rate; seconds (all epochs);
    images_per_s (mean over epochs); epochs. With 0 epochs the model is only validated.
    """
    history = fit_one_cycle(
        model,
        data.train_loader,
        data.valid_loader,
        data.augment,
        epochs=phase.epochs,
        lrs=lrs,
        pct_start=phase.pct_start,
        div=phase.div,
        div_final=phase.div_final,
        wd=phase.wd,
        device=data.device,
        dtype=data.dtype,
        channels_last=params.train.channels_last,
        stage=stage,
        on_epoch=None if log_metrics is None else lambda row: log_metrics(_without_epoch(row), int(row["epoch"])),
    )
    save_checkpoint(checkpoint, model, arch=params.model.arch, vocab=data.vocab, data=params.data)
    with atomic_output(Path("plots") / f"{stage}.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    if not history:
        valid_loss, error_rate = validate(
            model, data.valid_loader, data.augment, data.device, data.dtype, params.train.channels_last
        )
        return {"valid_loss": valid_loss, "error_rate": error_rate, "epochs": 0}
    last = history[-1]
    return {
        "train_loss": last["train_loss"],
        "valid_loss": last["valid_loss"],
        "error_rate": last["error_rate"],
        "seconds": sum(row["seconds"] for row in history),
        "images_per_s": sum(row["images_per_s"] for row in history) / len(history),
        "epochs": len(history),
    }
