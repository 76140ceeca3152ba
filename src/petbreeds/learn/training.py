"""The training loop: fastai's fit_one_cycle as one readable loop, and validation.

    data = training_data(params, table, vocab, raw, seed=params.seed, world=world)
    history = fit_one_cycle(model, data, params.train_frozen, [3e-3] * 3, [DivergenceStop("train_frozen"), Table()])

Each training batch: augment on the device -> forward under autocast -> cross-entropy in fp32 -> backward (scaled
for fp16; gradients averaged over the ranks by DDP) -> AdamW step -> one-cycle step (docs/fastai.md §10.2). Every
fit gets a new optimizer and schedule, which is what fastai's freeze()/unfreeze() give (they clear the optimizer
state) in the book's recipes. With several processes (``petbreeds.learn.distributed``) each rank trains on its
share of every global batch; losses are averaged and validation predictions gathered, so every rank reports the
global numbers. Printing, recording, the live run, saving the resume state and stopping on divergence are callbacks
(``petbreeds.learn.callbacks``); predictions are ``petbreeds.learn.inference``'s.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from petbreeds.atomic import atomic_output
from petbreeds.config import OneCycleParams, Params
from petbreeds.data.augment import BatchAugment
from petbreeds.data.dataloaders import make_loader
from petbreeds.learn.calibration import CACHE_NAME, cpu_autocast_dtype
from petbreeds.learn.callbacks import Callback, Fit, Row, run
from petbreeds.learn.checkpoint import load_checkpoint
from petbreeds.learn.device import Compute, HostCopy, configure_gpu, pick_device, resolve_precision
from petbreeds.learn.distributed import from_rank_0, gather, mean, sync_buffers, wrap
from petbreeds.learn.feed import KeptBatches, train_batches
from petbreeds.learn.inference import batch_inputs, predict_on_device
from petbreeds.learn.model import PetModel, create_model, freeze, param_groups, unfreeze
from petbreeds.learn.schedule import make_one_cycle, make_optimizer
from petbreeds.progress import progress
from petbreeds.runtime import cache_dir
from petbreeds.world import World, world_size_of

# plots/<stage>.csv: the per-epoch history for `dvc plots`. `epoch` is numbered 0..n-1 within each phase;
# `global_epoch` counts on over the phases (the unfrozen phase's first follows the frozen phase's last), so that the
# plots of dvc.yaml draw one phase after the other on one axis. `global_iteration`: the batches trained by the epoch's
# end, over the phases (fastai's Recorder.iters), where the loss-per-batch plot marks the epoch's valid_loss.
CSV_COLUMNS = ("epoch", "global_epoch", "global_iteration", "train_loss", "valid_loss", "error_rate", "lr", "seconds")
# plots/<stage>_batches.csv: per training batch, fastai's Recorder.losses and .lrs. `iteration` = batches trained in
# the phase with this one (1..n), `global_iteration` the same over the phases.
BATCH_CSV_COLUMNS = ("iteration", "global_iteration", "train_loss", "lr")


@dataclass
class TrainingData:
    """What a training loop consumes: this rank's loaders, the batch augmentation, where and how to compute.

    ``world``: the ranks training together (one process: ``World()``); the loaders hold this rank's share.
    ``valid_batches``: the validation loader's batches, kept on the device after the first pass when they fit.
    """

    vocab: list[str]
    train_loader: DataLoader
    valid_loader: DataLoader
    augment: BatchAugment
    compute: Compute
    world: World
    valid_batches: KeptBatches = field(init=False)

    def __post_init__(self) -> None:
        self.valid_batches = KeptBatches(self.valid_loader, self.compute.device, self.world.local_world_size)


def training_data(
    params: Params, table: pd.DataFrame, vocab: list[str], raw: Path, *, seed: int, world: World
) -> TrainingData:
    """Loaders over the split table's train and valid rows (image paths relative to ``raw``) and augmentation.

    ``seed`` seeds the shuffling, the crops and the augmentation draws. A phase that follows another must use its
    own: with the same seed it replays the previous phase's batches, which its model has partly memorised
    (fastai's phases share one DataLoader, so every epoch draws new ones).
    """
    device = pick_device(world.local_rank)
    train = table[table["split"] == "train"].reset_index(drop=True)
    valid = table[table["split"] == "valid"].reset_index(drop=True)
    valid = valid.iloc[list(world.shard(len(valid)))].reset_index(drop=True)
    return TrainingData(
        vocab=vocab,
        train_loader=make_loader(train, raw, vocab, params.data, train=True, seed=seed, world=world),
        valid_loader=make_loader(valid, raw, vocab, params.data, train=False, seed=seed, world=world),
        augment=BatchAugment(params.augment, params.data.size, seed, device, shard=(world.rank, world.world_size)),
        compute=training_compute(params, device, world),
        world=world,
    )


def training_compute(params: Params, device: torch.device, world: World, cache_file: Path | None = None) -> Compute:
    """How the training stages compute: ``train.precision``, ``train.channels_last``, ``train.compile``.

    ``auto`` on a CPU is what a calibration measured faster on this CPU model for ``model.arch`` at ``data.size``
    with a rank's share of ``data.batch_size`` (:func:`petbreeds.learn.calibration.cpu_autocast_dtype`, cached in
    ``cache_file``, by default the project's ``.cache/cpu_precision.json``); the share comes from
    ``distributed:``, not from ``world``. The stages record what it became, and evaluate computes in it. With
    several ranks, rank 0's choice holds for all of them (``auto`` only: the other names mean the same everywhere),
    so that ranks on different CPUs or GPUs never mix precisions.
    """
    name = params.train.precision

    def decide() -> tuple[torch.dtype | None, str]:
        if name == "auto" and device.type == "cpu":
            return _calibrated(params, world, cache_file or cache_dir() / CACHE_NAME)
        dtype = resolve_precision(name, device)
        if name != "auto":
            return dtype, "set in params.yaml"
        return dtype, "auto on CUDA: " + ("bf16 supported" if dtype == torch.bfloat16 else "no bf16, fp16")

    dtype, choice = from_rank_0(world, decide) if name == "auto" else decide()
    if device.type == "cuda":
        configure_gpu(params.train.deterministic)
    return Compute(device, dtype, params.train.channels_last, params.train.compile, choice)


def _calibrated(params: Params, world: World, cache_file: Path) -> tuple[torch.dtype | None, str]:
    batch = max(1, params.data.batch_size // world_size_of(params.distributed))
    calibration = cpu_autocast_dtype(params.model.arch, params.data.size, batch, params.train.channels_last, cache_file)
    if world.is_main and calibration.fp32_s is not None and not calibration.from_cache:
        print(calibration.announcement(cache_file), flush=True)  # the seconds it took: say why, once per machine
    return calibration.dtype, calibration.describe()


# The two phases of the book's run: the body frozen (a new head on the pretrained body), then the whole model.
PHASES = ("frozen", "unfrozen")


def phase_seed(params: Params, phase: str) -> int:
    """The seed of a phase's batches, crops, augmentation and dropout: the unfrozen phase's is its own, so that it
    draws new batches instead of replaying the frozen phase's (fastai's phases share one DataLoader)."""
    return params.seed if phase == "frozen" else params.seed + 1


def phase_model(params: Params, phase: str, n_classes: int, start: Path, device: torch.device) -> PetModel:
    """The model a phase's lr_find and training start from. frozen: the learner's model as vision_learner makes it,
    the pretrained body in ``start``, a fresh head seeded from params, frozen. unfrozen: the frozen phase's
    checkpoint ``start``, unfrozen, torch's RNG then seeded with the phase's seed (its dropout masks)."""
    if phase == "frozen":
        torch.manual_seed(params.seed)
        model = create_model(params.model.arch, n_classes, start)
        freeze(model)
        return model
    model, _ = load_checkpoint(start, device)
    unfreeze(model)
    torch.manual_seed(phase_seed(params, phase))
    return model


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    compute: Compute,
) -> torch.Tensor:
    """One optimizer step on a batch; returns the batch's mean loss (fp32 scalar, detached)."""
    with compute.autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)  # fp32, as fastai casts predictions right after the forward
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def validate(model: nn.Module, data: TrainingData) -> tuple[float, float]:
    """(mean cross-entropy, error rate) over every validation item of every rank (fastai's valid_loss and
    error_rate): each rank predicts its share with rank 0's BatchNorm statistics, the shares are gathered.
    Both numbers reach the host in one read, after the last batch."""
    sync_buffers(data.world, model)
    # a bar on rank 0's terminal only: in a log, the epoch's table row follows at once
    batches = progress(data.valid_batches, "validation", lines=0, enabled=data.world.is_main)
    logits, targets = predict_on_device(model, batches, data.augment, data.compute)
    logits, targets = gather(data.world, logits), gather(data.world, targets)
    loss = F.cross_entropy(logits, targets)
    error_rate = (logits.argmax(dim=1) != targets).float().mean()
    valid_loss, error = torch.stack([loss, error_rate]).tolist()
    return valid_loss, error


def fit_one_cycle(
    model: PetModel, data: TrainingData, phase: OneCycleParams, lrs: Sequence[float], callbacks: Sequence[Callback] = ()
) -> list[Row]:
    """Train ``model`` (its current freeze state) for ``phase.epochs`` of one cycle; a history row per epoch.

    ``lrs``: the max lr of each of the model's parameter groups. A row holds the book's columns (train_loss =
    the smoothed loss at the epoch's end, reset per fit; valid_loss; error_rate), ``lr`` (the last group's, last
    batch), ``seconds`` (training + validation), ``images_per_s`` (training, all ranks) and ``iteration`` (the
    batches trained so far in the fit). ``callbacks`` (``petbreeds.learn.callbacks``) see the fit at each event.
    """
    if phase.epochs == 0:
        return []
    world, compute = data.world, data.compute
    compute.place(model)
    net = compute.for_training(wrap(world, model, compute.device))
    opt = make_optimizer(param_groups(model), lrs, phase.wd)
    per_epoch = len(data.train_loader)
    sched = make_one_cycle(opt, phase.epochs * per_epoch, phase.pct_start, phase.div, phase.div_final)
    generators = {"augment": data.augment.generator}  # the data's own RNG; the shuffle follows from seed, epoch
    fit = Fit(model, opt, sched, compute.grad_scaler(), data.train_loader.sampler, generators, phase.epochs)
    run(callbacks, "before_fit", fit)  # a resume state puts the fit where it stopped

    def record(i: int, lr: float, loss: HostCopy) -> None:
        """Batch i's loss, read once the next batch is queued (the host never waits for the device): smoothed,
        recorded, handed to the callbacks."""
        fit.batch, fit.iteration = i, fit.iteration + 1
        fit.records.append({"iteration": fit.iteration, "train_loss": fit.smooth.add(loss.value()), "lr": lr})
        run(callbacks, "after_batch", fit, fit.records[-1])

    stream = train_batches(data.train_loader, compute.device)  # one iterator for the whole fit
    for epoch in range(fit.epoch, phase.epochs):  # from 0, or where a resume state put the fit
        fit.epoch = epoch
        run(callbacks, "before_epoch", fit)
        started = time.perf_counter()
        net.train()
        queued: tuple[int, float, HostCopy] | None = None  # the batch before: recorded after this one's step
        for i, batch in enumerate(itertools.islice(stream, per_epoch)):
            x, y = batch_inputs(batch, data.augment, compute, train=True)
            lr = opt.param_groups[-1]["lr"]
            loss = HostCopy(mean(world, train_step(net, opt, fit.scaler, x, y, compute)))
            sched.step()
            if queued is not None:
                record(*queued)
            queued = (i, lr, loss)
        assert queued is not None  # the loader has at least one batch (make_loader checks)
        record(*queued)
        train_seconds = time.perf_counter() - started
        valid_loss, error_rate = validate(model, data)
        last = fit.records[-1]
        row = {
            "epoch": fit.epoch,
            "train_loss": last["train_loss"],
            "valid_loss": valid_loss,
            "error_rate": error_rate,
            "lr": last["lr"],
            "seconds": time.perf_counter() - started,
            "images_per_s": per_epoch * data.train_loader.batch_size * world.world_size / train_seconds,
            "iteration": fit.iteration,
        }
        fit.history.append(row)
        run(callbacks, "after_epoch", fit, row)
    run(callbacks, "after_fit", fit)
    return fit.history


def phase_metrics(history: list[dict[str, float]], model: nn.Module, data: TrainingData) -> dict[str, float]:
    """A phase's numbers for ``reports/<stage>.json``: the last epoch's train_loss, valid_loss and error_rate;
    seconds (all epochs); images_per_s (mean over epochs); epochs. With no epoch the model is only validated."""
    if not history:
        valid_loss, error_rate = validate(model, data)
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


def write_history(path: Path, history: list[dict[str, float]], first_epoch: int = 0, first_iteration: int = 0) -> None:
    """The per-epoch history as CSV (:data:`CSV_COLUMNS`), for ``dvc plots``. ``first_epoch`` and
    ``first_iteration``: the epochs and the batches the phases before this one trained."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            epoch, iteration = first_epoch + int(row["epoch"]), first_iteration + int(row["iteration"])
            writer.writerow({**row, "global_epoch": epoch, "global_iteration": iteration})


def write_batches(path: Path, batches: list[dict[str, float]], first_iteration: int = 0) -> None:
    """The per-batch records of a fit (``petbreeds.learn.callbacks.Recorder``) as CSV (:data:`BATCH_CSV_COLUMNS`),
    for the loss-per-batch plot (fastai's ``plot_loss``); ``first_iteration``: the batches the phases before trained."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BATCH_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({**row, "global_iteration": first_iteration + int(row["iteration"])} for row in batches)
