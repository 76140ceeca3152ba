"""What attaches to the training loop and the lr finder: fastai's callbacks, with the few events this loop has.

    fit_one_cycle(model, data, phase, lrs, [ResumeState(resume), DivergenceStop(stage), recorder, Table()])

The loop calls each callback in list order at ``before_fit``, ``before_epoch``, ``after_batch`` (with the batch's
record: ``iteration``, the smoothed ``train_loss``, ``lr``), ``after_epoch`` (with the epoch's history row) and
``after_fit``, handing it the running :class:`Fit`. A resumed fit starts with the history and records of the fit it
continues: the callbacks that show or keep them take them from the :class:`Fit` at ``before_fit``, so
:class:`ResumeState` comes first. Display and the live run belong on rank 0 only; the resume state and the
divergence stop on every rank (both are collective).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from petbreeds.data.dataloaders import EpochShuffle
from petbreeds.errors import PetbreedsError
from petbreeds.learn.resume import Resume
from petbreeds.progress import Bar

Row = dict[str, float]


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
class Fit:
    """A running fit (or lr_find sweep) as its callbacks see it: the loop's objects and where it stands.

    ``epoch``: the epoch running (after it, the one just done); ``batch``: the batch of the epoch last recorded;
    ``iteration``: the batches recorded in the fit; ``history``: a row per finished epoch; ``records``: a record per
    batch. ``sampler`` (the training loader's, which keeps the epoch count) and ``generators`` (the data's own RNGs)
    are what a resume state takes besides the model's, optimizer's and schedule's.
    """

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: object
    generators: dict[str, torch.Generator]
    epochs: int
    smooth: SmoothLoss = field(default_factory=SmoothLoss)
    epoch: int = 0
    batch: int = 0
    iteration: int = 0
    history: list[Row] = field(default_factory=list)
    records: list[Row] = field(default_factory=list)


class Callback:
    """fastai's Callback: every event a no-op unless a subclass says otherwise."""

    def before_fit(self, fit: Fit) -> None:
        pass

    def before_epoch(self, fit: Fit) -> None:
        pass

    def after_batch(self, fit: Fit, record: Row) -> None:
        pass

    def after_epoch(self, fit: Fit, row: Row) -> None:
        pass

    def after_fit(self, fit: Fit) -> None:
        pass


def run(callbacks: Sequence[Callback], event: str, fit: Fit, *args: Row) -> None:
    """Call ``event`` on every callback, in order."""
    for callback in callbacks:
        getattr(callback, event)(fit, *args)


class DivergenceStop(Callback):
    """A non-finite training loss stops the fit with a :class:`PetbreedsError` naming the stage, the epoch, the batch
    and the lr (the loss is the ranks' mean, so every rank stops at the same batch). Put it before the callbacks
    that keep or show the record."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def after_batch(self, fit: Fit, record: Row) -> None:
        loss = record["train_loss"]  # smoothed: non-finite from the first non-finite batch loss on, and as large
        if not math.isfinite(loss):
            raise PetbreedsError(
                f"{self.stage} diverged: the training loss is {loss} at epoch {fit.epoch}, batch {fit.batch} "
                f"(lr {record['lr']:.3g}); lower the learning rate under {self.stage} in params.yaml"
            )


class Recorder(Callback):
    """fastai's Recorder of losses and lrs: every batch's record of the fit (a resumed one's from its start), for
    the loss-per-batch plot."""

    def __init__(self) -> None:
        self.batches: list[Row] = []

    def before_fit(self, fit: Fit) -> None:
        self.batches = list(fit.records)

    def after_batch(self, fit: Fit, record: Row) -> None:
        self.batches.append(record)


def format_row(values: Sequence[Any]) -> str:
    return "".join(f"{v:<12.6f}" if isinstance(v, float) else f"{v!s:<12}" for v in values).rstrip()


class Table(Callback):
    """The book's table: a line per epoch (epoch, train_loss, valid_loss, error_rate, time), on stdout."""

    def before_fit(self, fit: Fit) -> None:
        print(format_row(("epoch", "train_loss", "valid_loss", "error_rate", "time")))
        for row in fit.history:
            self.after_epoch(fit, row)

    def after_epoch(self, fit: Fit, row: Row) -> None:
        minutes, secs = divmod(round(row["seconds"]), 60)
        values = (
            int(row["epoch"]),
            row["train_loss"],
            row["valid_loss"],
            row["error_rate"],
            f"{minutes:02d}:{secs:02d}",
        )
        print(format_row(values), flush=True)


class Progress(Callback):
    """fastai's ProgressCallback: a bar over each epoch's training batches; in a log, a line per epoch
    (``petbreeds.progress``)."""

    def __init__(self, stage: str, batches: int) -> None:
        self.stage, self.batches = stage, batches
        self.bar: Bar | None = None

    def before_epoch(self, fit: Fit) -> None:
        self.bar = Bar(self.batches, f"{self.stage} epoch {fit.epoch}", lines=1)

    def after_batch(self, fit: Fit, record: Row) -> None:
        if self.bar is not None:
            self.bar.update()

    def after_epoch(self, fit: Fit, row: Row) -> None:
        if self.bar is not None:
            self.bar.close()


class SweepProgress(Callback):
    """lr_find's bar: over the sweep's ``num_it`` batches (it may stop early, diverging); in a log, a line per ~10 %."""

    def __init__(self, stage: str, num_it: int) -> None:
        self.stage, self.num_it = stage, num_it
        self.bar: Bar | None = None

    def before_fit(self, fit: Fit) -> None:
        self.bar = Bar(self.num_it, f"{self.stage} sweep")

    def after_batch(self, fit: Fit, record: Row) -> None:
        if self.bar is not None:
            self.bar.update()

    def after_fit(self, fit: Fit) -> None:
        if self.bar is not None:
            self.bar.close()


class LiveEpochs(Callback):
    """Each epoch's row (a resumed fit's earlier ones first) to the stage's live MLflow run
    (``StageContext.log_epoch``)."""

    def __init__(self, log: Callable[[Row], None]) -> None:
        self.log = log

    def before_fit(self, fit: Fit) -> None:
        for row in fit.history:
            self.log(row)

    def after_epoch(self, fit: Fit, row: Row) -> None:
        self.log(row)


class LiveSweep(Callback):
    """Each lr_find batch's lr and smoothed loss to the stage's live MLflow run (``StageContext.log_metrics``), its
    0-based index as the step."""

    def __init__(self, log: Callable[[Mapping[str, float], int], None]) -> None:
        self.log = log

    def after_batch(self, fit: Fit, record: Row) -> None:
        self.log({"lr": record["lr"], "loss": record["train_loss"]}, int(record["iteration"]) - 1)


class ResumeState(Callback):
    """The fit's whole state saved after every ``resume.every_epochs`` epochs (not the last), on every rank (rank 0
    writes); a fit that finds one continues after its epoch with its history and records, and trains on exactly as
    the fit that saved it would have (``petbreeds.learn.resume``)."""

    def __init__(self, resume: Resume) -> None:
        self.resume = resume

    def before_fit(self, fit: Fit) -> None:
        state = self.resume.load(fit.epochs)
        if state is None:
            return
        try:
            fit.model.load_state_dict(state["model"])  # after DDP's wrap, which reseeds ranks > 0
            fit.opt.load_state_dict(state["optimizer"])
            fit.sched.load_state_dict(state["schedule"])
            fit.scaler.load_state_dict(state["scaler"])
            fit.smooth.avg, fit.smooth.count = state["smooth"]
            if isinstance(fit.sampler, EpochShuffle):
                fit.sampler.epoch = state["shuffle_epoch"]
            self.resume.restore_rng(state, fit.generators)
            fit.epoch, fit.iteration = state["epoch"], state["iteration"]
            fit.history, fit.records = state["history"], state["records"]
        except (KeyError, ValueError, RuntimeError) as e:
            raise self.resume.damaged(f"{type(e).__name__}: {e}") from None
        if self.resume.world.is_main:
            print(f"{self.resume.stage}: resuming at {self.resume.resumed_at} from {self.resume.path}", flush=True)

    def after_epoch(self, fit: Fit, row: Row) -> None:
        if not self.resume.due(fit.epoch + 1, fit.epochs):
            return
        state = {
            "epoch": fit.epoch + 1,
            "iteration": fit.iteration,
            "history": fit.history,
            "records": fit.records,
            "model": fit.model.state_dict(),
            "optimizer": fit.opt.state_dict(),
            "schedule": fit.sched.state_dict(),
            "scaler": fit.scaler.state_dict(),
            "smooth": [fit.smooth.avg, fit.smooth.count],
            "shuffle_epoch": getattr(fit.sampler, "epoch", 0),
        }
        self.resume.save(state, fit.generators)
