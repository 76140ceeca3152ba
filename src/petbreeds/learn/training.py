"""The training loop: fastai's fit_one_cycle as one readable loop, plus validation and predictions.

    data = training_data(params, table, vocab, raw, seed=params.seed, world=world)
    history = fit_one_cycle(model, data, params.train_frozen, lrs=[3e-3] * 3, stage="train_frozen")
    logits, targets = get_preds(model, loader, augment, compute)

Each training batch: augment on the device -> forward under autocast -> cross-entropy in fp32 -> backward (scaled
for fp16; gradients averaged over the ranks by DDP) -> AdamW step -> one-cycle step (docs/fastai.md §10.2). Every
fit gets a new optimizer and schedule, which is what fastai's freeze()/unfreeze() give (they clear the optimizer
state) in the book's recipes. With several processes (``petbreeds.learn.distributed``) each rank trains on its
share of every global batch; losses are averaged and validation predictions gathered, so every rank reports the
global numbers.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from petbreeds.atomic import atomic_output
from petbreeds.config import OneCycleParams, Params
from petbreeds.data.augment import BatchAugment
from petbreeds.data.dataloaders import EpochShuffle, batch_stream, make_loader, mark_consumed, to_device
from petbreeds.errors import PetbreedsError
from petbreeds.learn.calibration import CACHE_NAME, cpu_autocast_dtype
from petbreeds.learn.device import Compute, HostCopy, configure_gpu, pick_device, resolve_precision
from petbreeds.learn.distributed import from_rank_0, gather, mean, sync_buffers, wrap
from petbreeds.learn.feed import KeptBatches, ahead_to_device
from petbreeds.learn.model import PetModel, create_model, freeze, param_groups
from petbreeds.learn.resume import Resume
from petbreeds.learn.schedule import make_one_cycle, make_optimizer
from petbreeds.runtime import cache_dir
from petbreeds.world import World, world_size_of

# The augment stage: uint8 [B, 3, item, item] on the device -> float32 normalised [B, 3, size, size].
Augment = Callable[..., torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
# plots/<stage>.csv: the per-epoch history for `dvc plots`. `epoch` is numbered 0..n-1 within each phase;
# `global_epoch` counts on over the phases (the unfrozen phase's first follows the frozen phase's last), so that the
# plots of dvc.yaml draw one phase after the other on one axis. `global_iteration`: the batches trained by the epoch's
# end, over the phases (fastai's Recorder.iters), where the loss-per-batch plot marks the epoch's valid_loss.
CSV_COLUMNS = ("epoch", "global_epoch", "global_iteration", "train_loss", "valid_loss", "error_rate", "lr", "seconds")
# plots/<stage>_batches.csv: per training batch, fastai's Recorder.losses and .lrs. `iteration` = batches trained in
# the phase with this one (1..n), `global_iteration` the same over the phases.
BATCH_CSV_COLUMNS = ("iteration", "global_iteration", "train_loss", "lr")


class SmoothLoss:
    """fastai's AvgSmoothLoss: an EMA of the batch losses (β 0.98), debiased by 1 - β^count (docs/fastai.md §10.3)."""

    def __init__(self, beta: float = 0.98) -> None:
        self.beta = beta
        self.avg = 0.0
        self.count = 0

    def add(self, loss: float) -> float:
        """Take one batch loss; return the smoothed value."""
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta**self.count)


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
    """How the training stages and evaluate compute: ``train.precision``, ``train.channels_last``, ``train.compile``.

    ``auto`` on a CPU is what a calibration measured faster on this CPU model for ``model.arch`` at ``data.size``
    with a rank's share of ``data.batch_size`` (:func:`petbreeds.learn.calibration.cpu_autocast_dtype`, cached in
    ``cache_file``, by default the project's ``.cache/cpu_precision.json``). The share comes from
    ``distributed:``, not from ``world``: evaluate, one process, then reads the entry the training ranks used and
    evaluates in their precision. With several ranks, rank 0's choice holds for all of them (``auto`` only: the
    other names mean the same everywhere), so that ranks on different CPUs or GPUs never mix precisions.
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


def new_frozen_model(params: Params, n_classes: int, pretrained: Path) -> PetModel:
    """The learner's model as vision_learner makes it: pretrained body, fresh head seeded from params, frozen."""
    torch.manual_seed(params.seed)
    model = create_model(params.model.arch, n_classes, pretrained)
    freeze(model)
    return model


def batch_inputs(batch: Batch, augment: Augment, compute: Compute, train: bool) -> Batch:
    """Loader batch (uint8 [B,3,item,item], int64 [B]) -> (float32 normalised [B,3,size,size], int64 [B]) on device."""
    x, y = to_device(batch, compute.device)
    x = augment(x, train=train)
    if compute.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


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


@torch.no_grad()
def get_preds(
    model: nn.Module, batches: Iterable[Batch], augment: Augment, compute: Compute
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 [N, C] and targets int64 [N], on the CPU, in loader order; leaves ``model`` in eval mode."""
    logits, targets = _predict(model, ahead_to_device(batches, compute.device), augment, compute)
    return logits.cpu(), targets.cpu()


@torch.no_grad()
def _predict(
    model: nn.Module, batches: Iterable[Batch], augment: Augment, compute: Compute
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`get_preds`'s logits and targets over ``batches`` fed to the device (``ahead_to_device``,
    ``KeptBatches``), left there: no batch waits for the one before."""
    compute.place(model)
    model.eval()
    logits, targets = [], []
    for batch in batches:
        x, y = batch_inputs(batch, augment, compute, train=False)
        with compute.autocast():
            out = model(x)
        logits.append(out.float())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def validate(model: nn.Module, data: TrainingData) -> tuple[float, float]:
    """(mean cross-entropy, error rate) over every validation item of every rank (fastai's valid_loss and
    error_rate): each rank predicts its share with rank 0's BatchNorm statistics, the shares are gathered.
    Both numbers reach the host in one read, after the last batch."""
    sync_buffers(data.world, model)
    logits, targets = _predict(model, data.valid_batches, data.augment, data.compute)
    logits, targets = gather(data.world, logits), gather(data.world, targets)
    loss = F.cross_entropy(logits, targets)
    error_rate = (logits.argmax(dim=1) != targets).float().mean()
    valid_loss, error = torch.stack([loss, error_rate]).tolist()
    return valid_loss, error


def _format_row(values: Sequence[Any]) -> str:
    return "".join(f"{v:<12.6f}" if isinstance(v, float) else f"{v!s:<12}" for v in values).rstrip()


def fit_one_cycle(
    model: PetModel,
    data: TrainingData,
    phase: OneCycleParams,
    lrs: Sequence[float],
    *,
    stage: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[dict[str, float]], None] | None = None,
    resume: Resume | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` (its current freeze state) for ``phase.epochs`` of one cycle; a history row per epoch.

    ``lrs``: the max lr of each of the model's parameter groups. A row holds the book's columns (train_loss =
    the smoothed loss at the epoch's end, reset per fit; valid_loss; error_rate), ``lr`` (the last group's, last
    batch), ``seconds`` (training + validation), ``images_per_s`` (training, all ranks) and ``iteration`` (the
    batches trained so far in the fit). Rank 0 prints the book's table and calls ``on_epoch``, and ``on_batch``
    after every training batch with fastai's Recorder record: ``iteration`` (1..n), the smoothed ``train_loss``,
    the batch's ``lr`` (the last group's). A non-finite loss stops every rank with a :class:`PetbreedsError`
    naming ``stage``, the epoch, the batch and the lr.

    ``resume``: after every ``resume.every_epochs`` epochs (not the last) the loop's whole state is saved; a fit that
    finds one continues after its epoch, its history and batch records first replayed through the table and the
    callbacks, and trains on to the end exactly as the fit that saved it would have.
    """
    if phase.epochs == 0:
        return []
    world, compute = data.world, data.compute
    show = world.is_main
    no_bar = None if show else True  # a bar on rank 0, only on a terminal (None): queue logs get the table alone
    compute.place(model)
    net = compute.for_training(wrap(world, model, compute.device))
    opt = make_optimizer(param_groups(model), lrs, phase.wd)
    sched = make_one_cycle(opt, phase.epochs * len(data.train_loader), phase.pct_start, phase.div, phase.div_final)
    scaler = compute.grad_scaler()
    smooth = SmoothLoss()
    history: list[dict[str, float]] = []
    records: list[dict[str, float]] = []  # on_batch's, kept for the resume state
    iteration = start = 0
    generators = {"augment": data.augment.generator}  # the data's own RNG; the shuffle follows from seed, epoch
    loop = _Loop(model, opt, sched, scaler, smooth, data.train_loader.sampler)
    state = resume.load(phase.epochs) if resume is not None else None
    if resume is not None and state is not None:
        start, iteration, history, records = state["epoch"], state["iteration"], state["history"], state["records"]
        loop.restore(state, resume, generators)
        if show:
            print(f"{stage}: resuming at {resume.resumed_at} from {resume.path}", flush=True)
    if show:
        print(_format_row(("epoch", "train_loss", "valid_loss", "error_rate", "time")))
        for row in history:
            _print_row(row)
            if on_epoch is not None:
                on_epoch(row)
        if on_batch is not None:
            for saved in records:
                on_batch(saved)

    def record(epoch: int, i: int, lr: float, loss: HostCopy) -> float:
        """Batch i's loss, read once the next batch is queued: checked, smoothed, recorded; the smoothed loss."""
        nonlocal iteration
        value = loss.value()
        if not math.isfinite(value):
            raise PetbreedsError(
                f"{stage} diverged: the training loss is {value} at epoch {epoch}, batch {i} (lr {lr:.3g}); "
                f"lower the learning rate under {stage} in params.yaml"
            )
        iteration += 1
        records.append({"iteration": iteration, "train_loss": smooth.add(value), "lr": lr})
        if show and on_batch is not None:
            on_batch(records[-1])
        return records[-1]["train_loss"]

    # One iterator for the whole fit: the loader's workers go on preparing batches across epoch ends and validation.
    stream = ahead_to_device(batch_stream(data.train_loader), compute.device)
    per_epoch = len(data.train_loader)
    for epoch in range(start, phase.epochs):
        started = time.perf_counter()
        net.train()
        images = 0
        batches = tqdm(
            itertools.islice(stream, per_epoch),
            total=per_epoch,
            desc=f"{stage} epoch {epoch}",
            leave=False,
            unit="batch",
            disable=no_bar,
        )
        queued: tuple[int, int, float, HostCopy] | None = None  # the batch before: read after this one's step
        for i, batch in enumerate(batches):
            x, y = batch_inputs(batch, data.augment, compute, train=True)
            lr = opt.param_groups[-1]["lr"]
            loss = HostCopy(mean(world, train_step(net, opt, scaler, x, y, compute)))
            sched.step()
            images += len(y) * world.world_size
            if queued is not None:
                record(*queued)
            queued = (epoch, i, lr, loss)
        assert queued is not None  # the loader has at least one batch (make_loader checks)
        train_loss = record(*queued)
        mark_consumed(data.train_loader, per_epoch)  # where a later pass (another fit, a resumed one) goes on
        train_seconds = time.perf_counter() - started
        valid_loss, error_rate = validate(model, data)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "error_rate": error_rate,
            "lr": lr,
            "seconds": seconds,
            "images_per_s": images / train_seconds,
            "iteration": iteration,
        }
        history.append(row)
        if show:
            _print_row(row)
            if on_epoch is not None:
                on_epoch(row)
        if resume is not None and resume.due(epoch + 1, phase.epochs):
            records_so_far = {"epoch": epoch + 1, "iteration": iteration, "history": history, "records": records}
            resume.save({**records_so_far, **loop.state()}, generators)
    return history


def _print_row(row: dict[str, float]) -> None:
    minutes, secs = divmod(round(row["seconds"]), 60)
    values = (int(row["epoch"]), row["train_loss"], row["valid_loss"], row["error_rate"], f"{minutes:02d}:{secs:02d}")
    print(_format_row(values), flush=True)


@dataclass
class _Loop:
    """The objects a fit's resume state is taken from and put back into (``Resume.save``, ``Resume.load``)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    smooth: SmoothLoss
    sampler: object  # the train loader's; an EpochShuffle carries the epoch its next permutation is for

    def state(self) -> dict[str, Any]:
        """What the fit needs, besides its epoch, records and RNGs, to go on exactly where it is."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedule": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "smooth": [self.smooth.avg, self.smooth.count],
            "shuffle_epoch": getattr(self.sampler, "epoch", 0),
        }

    def restore(self, state: dict[str, Any], resume: Resume, generators: dict[str, torch.Generator]) -> None:
        """Put :meth:`state` and this rank's RNG states back (after DDP's wrap, which reseeds ranks > 0)."""
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["schedule"])
            self.scaler.load_state_dict(state["scaler"])
            self.smooth.avg, self.smooth.count = state["smooth"]
            if isinstance(self.sampler, EpochShuffle):
                self.sampler.epoch = state["shuffle_epoch"]
            resume.restore_rng(state, generators)
        except (KeyError, ValueError, RuntimeError) as e:
            raise resume.damaged(f"{type(e).__name__}: {e}") from None


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
    """The per-batch records of ``fit_one_cycle``'s ``on_batch`` as CSV (:data:`BATCH_CSV_COLUMNS`), for the
    loss-per-batch plot (fastai's ``plot_loss``); ``first_iteration``: the batches the phases before trained."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BATCH_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({**row, "global_iteration": first_iteration + int(row["iteration"])} for row in batches)
