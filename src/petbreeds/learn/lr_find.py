"""fastai's learning-rate finder and its four suggestions (docs/fastai.md §6), and its outputs.

    plan = plan_sweep(params, "lr_find")  # lr_find.run: whether it sweeps, and what for
    live = [LiveSweep(ctx.log_metrics)]
    result = lr_find(model, data, params.lr_find, wd=0.01, callbacks=live) if plan.runs else None  # .suggestions
    write_lr_find(result, plan, curve=..., plot=..., report=Path("reports/lr_find.json"))  # None: says "not run"
    print(plan.summary(result))  # lr_find: valley 1.20e-03, ...; train_frozen.lr is null: train_frozen trains at ...
    phase_lr("train_frozen", params.train_frozen.lr, Path("reports/lr_find.json"), "valley")  # null -> suggestion

Training batch i runs at start·(end/start)^(i/num_it) on every group; the recorded loss is the smoothed training
loss (reset at the start); the sweep stops after ``num_it`` batches, or once the smoothed loss exceeds 4× its best.
The model's weights and BatchNorm buffers are put back bit-for-bit afterwards. With several processes the loss
is the global batch's (averaged over the ranks), so every rank records the same curve and stops at the same batch.

A finder that does not sweep (``lr_find.run``: ``auto`` where its phase's lr is set, ``never``, a list without it)
still writes its outputs, which DVC declares: the curve's header alone (``dvc plots`` draws no line for it), a
picture and a report saying why (``{"not_run": why}``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend
from torch.optim.lr_scheduler import LambdaLR

from petbreeds.atomic import atomic_output, atomic_write_json
from petbreeds.config import FINDER_PHASES, NOT_RUN, Finder, LrFindParams, Params, sweep_runs
from petbreeds.errors import PetbreedsError
from petbreeds.learn.callbacks import Callback, Fit, run
from petbreeds.learn.distributed import mean, wrap
from petbreeds.learn.feed import train_batches
from petbreeds.learn.inference import batch_inputs
from petbreeds.learn.model import PetModel, param_groups
from petbreeds.learn.schedule import make_optimizer
from petbreeds.learn.training import TrainingData, train_step

# fastai's Adam default mom: lr_find does not schedule momentum, so a fresh learner's 0.9 applies (after a fit, the
# beta1 that fit's schedule ended on).
LR_FIND_BETA1 = 0.9
DIVERGENCE_FACTOR = 4.0
CURVE_COLUMNS = ("lr", "loss")


@dataclass(frozen=True)
class LrFindResult:
    lrs: list[float]  # the lr of each recorded batch
    losses: list[float]  # the smoothed loss after that batch
    suggestions: dict[str, float]  # valley, minimum, steep, slide


# --------------------------------------------------------------------------------------------------
# Suggestions, on the recorded curve without its first 10% and last 5 points (docs/fastai.md §6)


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr 1/3 + 1/6 of the way into the longest strictly decreasing run of losses (ESRI's rule, fastai default).

    ``run[i]`` = length of the longest strictly decreasing subsequence ending at i; e = the first index where it
    peaks, s = e - run[e]. Python's negative indexing at s = -1 is kept, as in fastai. With no decreasing pair
    (a flat or rising curve) fastai never moves s and e from 0 and returns the first lr, the most cautious one.
    """
    run = [1] * len(losses)
    for i in range(len(losses)):
        for j in range(i):
            if losses[i] < losses[j]:
                run[i] = max(run[i], run[j] + 1)
    end = run.index(max(run))
    start = end - run[end] if run[end] > 1 else end
    third = (end - start) / 3
    return float(lrs[start + int(third) + int(third / 2)])


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """A tenth of the lr at the lowest loss."""
    return float(lrs[int(np.argmin(losses))]) / 10


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr where the loss falls fastest against log lr (the left point of the steepest segment)."""
    log_lrs = np.log(np.asarray(lrs, dtype=np.float64))
    slopes = np.diff(np.asarray(losses, dtype=np.float64)) / np.diff(log_lrs)
    return float(lrs[int(np.argmin(slopes))])


def slide(
    lrs: Sequence[float], losses: Sequence[float], lr_diff: int = 15, thresh: float = 0.005, adjust_value: float = 1.0
) -> float:
    """Slide a window of ``lr_diff`` points leftwards from the end while the loss gradients at its two ends differ
    by more than ``thresh``; return the last left end that differed (fastai's interval slide rule).

    With ``lr_diff`` points or fewer fastai would index out of range; the slide would end at the first point.
    """
    n = len(losses)
    if n <= lr_diff:
        return float(lrs[0]) * adjust_value
    grad = np.gradient(np.asarray(losses, dtype=np.float64))
    right, left = -1, -1 - lr_diff
    suggestion = lrs[left]
    while left >= -n and abs(grad[right] - grad[left]) > thresh:
        suggestion = lrs[left]
        right -= 1
        left -= 1
    return float(suggestion) * adjust_value


SUGGESTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "valley": valley,
    "minimum": minimum,
    "steep": steep,
    "slide": slide,
}


def suggest(lrs: Sequence[float], losses: Sequence[float], num_it: int) -> dict[str, float]:
    """Every suggestion on ``recorded[num_it//10 : -5]``, cut at the first NaN loss."""
    window_lrs = list(lrs[num_it // 10 : -5])
    window_losses = list(losses[num_it // 10 : -5])
    if any(math.isnan(v) for v in window_losses):
        first_nan = next(i for i, v in enumerate(window_losses) if math.isnan(v))
        window_lrs, window_losses = window_lrs[:first_nan], window_losses[:first_nan]
    if len(window_losses) < 2:
        raise PetbreedsError(
            f"lr_find recorded {len(losses)} batches, leaving {len(window_losses)} usable point(s) after dropping "
            f"the first num_it//10 and the last 5 (and any NaN): raise lr_find.num_it, lower lr_find.end_lr, "
            "or set lr_find.stop_div to false"
        )
    return {name: func(window_lrs, window_losses) for name, func in SUGGESTIONS.items()}


# --------------------------------------------------------------------------------------------------
# Whether a finder sweeps (lr_find.run), and what its sweep is for


def lr_text(lr: float | list[float]) -> str:
    """A phase's lr as fastai's code writes it: ``3e-3``, ``slice(2e-3)``, ``slice(1e-5, 1e-3)``."""

    def number(value: float) -> str:
        return str(np.format_float_scientific(value, trim="-", exp_digits=1))

    return number(lr) if isinstance(lr, float) else f"slice({', '.join(number(v) for v in lr)})"


@dataclass(frozen=True)
class SweepPlan:
    """What a finder's stage does (:func:`plan_sweep`), and the words for it."""

    finder: Finder
    runs: bool  # lr_find.run lets it sweep
    note: str  # what the sweep is for, or why it does not run
    suggestion: str  # lr_find.suggestion: what a null lr trains at

    def summary(self, result: LrFindResult | None) -> str:
        """The line the stage prints: every suggestion and what the sweep is for, or why it did not run."""
        if result is None:
            return f"{self.finder}: not run: {self.note}"
        found = ", ".join(f"{name} {lr:.2e}" for name, lr in result.suggestions.items())
        return f"{self.finder}: {found}; {self.note}"


def plan_sweep(params: Params, finder: Finder) -> SweepPlan:
    """Whether ``finder`` sweeps, and the note saying why: its phase's lr is null (it trains at the suggestion), or
    set (the sweep is shown, not used; or, as ``lr_find.run`` says, not run)."""
    phase = FINDER_PHASES[finder]
    lr, runs, suggestion = getattr(params, phase).lr, sweep_runs(params, finder), params.lr_find.suggestion
    if lr is None:
        note = f"{phase}.lr is null: {phase} trains at the {suggestion}"
    elif runs:
        note = f"{phase}.lr is set ({lr_text(lr)}): the sweep is shown, not used"
    else:
        note = f"{phase}.lr is set ({lr_text(lr)}) and lr_find.run is {params.lr_find.run_text()}"
    return SweepPlan(finder, runs, note, suggestion)


# --------------------------------------------------------------------------------------------------
# The sweep


def lr_find(
    model: PetModel,
    data: TrainingData,
    sweep: LrFindParams,
    wd: float,
    callbacks: Sequence[Callback] = (),
    *,
    beta1: float = LR_FIND_BETA1,
) -> LrFindResult:
    """Sweep the lr exponentially over training batches, one lr for every group; ``model`` comes back exactly as
    it was given.

    ``wd`` and ``beta1``: the weight decay and momentum of fastai's optimizer at this point (``beta1``: a fresh
    learner's 0.9, or what the fit before left, :func:`petbreeds.learn.schedule.last_beta1`). ``callbacks`` see the
    sweep as a fit of no epochs: ``before_fit``, ``after_batch`` (``iteration`` 1.., ``lr``, the smoothed
    ``train_loss``) and ``after_fit``.
    """
    compute, world = data.compute, data.world
    compute.place(model)
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    was_training = model.training
    net = compute.for_training(wrap(world, model, compute.device))
    groups = param_groups(model)
    opt = make_optimizer(groups, [sweep.start_lr] * len(groups), wd, beta1=beta1)
    sched = LambdaLR(opt, lambda i: (sweep.end_lr / sweep.start_lr) ** (i / sweep.num_it))
    generators = {"augment": data.augment.generator}
    fit = Fit(model, opt, sched, compute.grad_scaler(), data.train_loader.sampler, generators, epochs=0)
    best = math.inf
    run(callbacks, "before_fit", fit)
    try:
        net.train()
        for fit.batch, batch in enumerate(train_batches(data.train_loader, compute.device)):
            x, y = batch_inputs(batch, data.augment, compute, train=True)
            lr = opt.param_groups[-1]["lr"]
            loss = fit.smooth.add(mean(world, train_step(net, opt, fit.scaler, x, y, compute)).item())
            fit.iteration += 1
            fit.records.append({"iteration": fit.iteration, "train_loss": loss, "lr": lr})
            run(callbacks, "after_batch", fit, fit.records[-1])
            if loss < best:  # never true for NaN: a NaN loss neither sets the best nor stops the sweep (fastai)
                best = loss
            if (sweep.stop_div and loss > DIVERGENCE_FACTOR * best) or fit.iteration == sweep.num_it:
                break
            sched.step()
    finally:
        model.load_state_dict(saved)
        opt.zero_grad(set_to_none=True)
        model.train(was_training)
    run(callbacks, "after_fit", fit)
    lrs, losses = [r["lr"] for r in fit.records], [r["train_loss"] for r in fit.records]
    return LrFindResult(lrs=lrs, losses=losses, suggestions=suggest(lrs, losses, sweep.num_it))


def save_lr_find_plot(result: LrFindResult, chosen: str, path: Path) -> None:
    """The smoothed loss against the lr (log x), each suggestion marked, the chosen one in the legend's title."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses)
    markers = {"valley": "o", "minimum": "s", "steep": "^", "slide": "D"}
    for name, lr in result.suggestions.items():
        loss = float(np.interp(math.log(lr), np.log(result.lrs), result.losses))
        ax.plot([lr], [loss], markers[name], label=f"{name}: {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.legend(title=f"chosen: {chosen}")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp)


def save_not_run_picture(plan: SweepPlan, path: Path) -> None:
    """In place of the curve: a picture that says the finder did not sweep, and why."""
    fig = Figure(figsize=(6, 4), dpi=100)
    fig.text(0.5, 0.6, f"{plan.finder}: not run", ha="center", va="center", fontsize=14)
    fig.text(0.5, 0.4, plan.note, ha="center", va="center", wrap=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp)


def write_lr_find(result: LrFindResult | None, plan: SweepPlan, *, curve: Path, plot: Path, report: Path) -> None:
    """A finder's outputs: ``curve`` (CSV ``lr,loss``), its ``plot`` (PNG), and ``report`` (JSON: every
    suggestion, ``chosen`` = the one ``lr_find.suggestion`` names, ``iterations``), which a phase whose lr is null
    reads (:func:`phase_lr`). The report is a DVC dep of that phase, so it holds only what the sweep computed: the
    same sweep run again leaves it byte for byte the same, and the phase up to date (the sweep's seconds go to
    ``reports/run_info/``, ``StageContext.record``).

    ``result`` None (the finder did not sweep): the curve's header alone, a picture saying why, and the report
    ``{"not_run": why}``."""
    with atomic_output(curve) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CURVE_COLUMNS)
        writer.writerows(zip(result.lrs, result.losses, strict=True) if result is not None else [])
    if result is None:
        save_not_run_picture(plan, plot)
        atomic_write_json(report, {NOT_RUN: plan.note})
        return
    save_lr_find_plot(result, plan.suggestion, plot)
    numbers = {**result.suggestions, "chosen": result.suggestions[plan.suggestion], "iterations": len(result.lrs)}
    atomic_write_json(report, numbers)


def phase_lr(phase: str, lr: float | list[float] | None, report: Path, suggestion: str) -> float | list[float]:
    """A training phase's lr: its param ``lr`` (a float, ``[lo, hi]`` or ``[hi]``) or, when that is null, the
    ``suggestion`` in its finder's ``report`` (one number for every group, as fastai's ``lr_max=float``)."""
    if lr is not None:
        return lr
    if not report.is_file():
        raise PetbreedsError(f"{report} not found and {phase}.lr is null; run `dvc repro {report.stem}`")
    found = json.loads(report.read_text(encoding="utf-8"))
    if NOT_RUN in found:
        raise PetbreedsError(
            f"{report}: {report.stem} did not sweep ({found[NOT_RUN]}) and {phase}.lr is null; run `dvc repro "
            f"{report.stem}`"
        )
    return float(found[suggestion])
