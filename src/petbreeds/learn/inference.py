"""Predictions from a model, apart from training: batches to the model's inputs, logits and targets out. The
training loop validates through it; evaluate, ``petbreeds predict`` and the MLflow model use it alone, so none of
them imports the loop, its schedule, resume state, calibration or the distributed code.

    compute = compute_as_trained(params.train, device, Path("reports/run_info/train_unfrozen.json"))
    logits, targets = get_preds(model, loader, ckpt.valid_augment(device), compute)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from petbreeds.config import TrainParams
from petbreeds.errors import PetbreedsError
from petbreeds.learn.device import Compute, configure_gpu, resolve_precision
from petbreeds.learn.feed import ahead_to_device

# The augment stage: uint8 [B, 3, item, item] on the device -> float32 normalised [B, 3, size, size].
Augment = Callable[..., torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


def batch_inputs(batch: Batch, augment: Augment, compute: Compute, train: bool) -> Batch:
    """A batch already on the device (uint8 [B,3,item,item], int64 [B]) -> (float32 normalised [B,3,size,size],
    int64 [B]): augmented (train) or resized (valid), in the model's memory layout."""
    x, y = batch
    x = augment(x, train=train)
    if compute.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


@torch.no_grad()
def predict_on_device(
    model: nn.Module, batches: Iterable[Batch], augment: Augment, compute: Compute, augmented: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 [N, C] and targets int64 [N] over ``batches`` already on the device (``ahead_to_device``,
    ``KeptBatches``), left there: no batch waits for the one before. Leaves ``model`` in eval mode. ``augmented``:
    the batches go through ``augment``'s training path (test-time augmentation), the model still in eval mode."""
    compute.place(model)
    model.eval()
    logits, targets = [], []
    for batch in batches:
        x, y = batch_inputs(batch, augment, compute, train=augmented)
        with compute.autocast():
            out = model(x)
        logits.append(out.float())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def get_preds(
    model: nn.Module, batches: Iterable[Batch], augment: Augment, compute: Compute, augmented: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 [N, C] and targets int64 [N], on the CPU, in loader order; leaves ``model`` in eval mode.
    ``batches``: any iterable of host batches (a loader, a list); ``augmented``: see :func:`predict_on_device`."""
    on_device = ahead_to_device(batches, compute.device)
    logits, targets = predict_on_device(model, on_device, augment, compute, augmented)
    return logits.cpu(), targets.cpu()


def compute_as_trained(train: TrainParams, device: torch.device, run_info: Path) -> Compute:
    """How evaluate computes: in the precision the model was trained in. ``train.precision: auto`` on a CPU became
    what a calibration chose for the training stage (``petbreeds.learn.training.training_compute``), which that
    stage recorded in its ``run_info`` (``facts``); every other setting means the same here as there."""
    name, choice = train.precision, "set in params.yaml"
    if name == "auto" and device.type == "cpu":
        try:
            facts = json.loads(run_info.read_text(encoding="utf-8"))["facts"]
            name, choice = facts["precision"], f"as trained ({run_info}: {facts['precision_choice']})"
        except (OSError, ValueError, KeyError) as e:
            raise PetbreedsError(
                f"{run_info}: no precision of the trained model in it ({type(e).__name__}: {e}); train.precision "
                "auto evaluates in the training stage's: re-run `dvc repro train_unfrozen`"
            ) from None
    dtype = resolve_precision(name, device)
    if device.type == "cuda":
        configure_gpu(train.deterministic)
        if name == "auto":
            choice = "auto on CUDA: " + ("bf16 supported" if dtype == torch.bfloat16 else "no bf16, fp16")
    return Compute(device, dtype, train.channels_last, precision_choice=choice)
