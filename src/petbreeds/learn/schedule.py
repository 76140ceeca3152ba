"""fastai's optimizer and one-cycle schedule, on torch's AdamW and LambdaLR (docs/fastai.md §4, §5).

    lrs = group_lrs([1e-6, 1e-4], 3)                  # [1e-6, 1e-5, 1e-4]: fastai's slice(1e-6, 1e-4)
    opt = make_optimizer(param_groups(model), lrs, wd=0.01)
    sched = make_one_cycle(opt, total_steps, pct_start=0.25, div=25.0, div_final=1e5)
    ... opt.step(); sched.step()                      # once per training batch

The schedule is fastai's own formula: batch ``s`` (0-based, of ``N`` in the fit) runs at ``combined_cos`` of
pos = s/N, for the lr of every group and for beta1. (torch's OneCycleLR puts its boundaries a batch earlier,
warms up by s/(pct·N - 1), ends on the floor and divides by zero when pct_start is 1.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from petbreeds.learn.model import ParamGroup

# fastai's Adam (docs/fastai.md §4): beta2 = sqr_mom 0.99 and eps 1e-5 (not torch's defaults).
ADAM_BETA2 = 0.99
ADAM_EPS = 1e-5
# fastai's fit_one_cycle moms=(0.95, 0.85, 0.95): beta1 falls while the lr warms up, then rises again.
MOM_MAX = 0.95
MOM_MIN = 0.85


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """``n`` values from ``start`` to ``stop`` in equal ratios: start·(stop/start)^(i/(n-1)) (fastcore)."""
    if n == 1:
        return [stop]
    step = (stop / start) ** (1 / (n - 1))
    return [start * step**i for i in range(n)]


def group_lrs(lr: float | Sequence[float], n: int) -> list[float]:
    """One lr per parameter group, as fastai's set_hyper: a float for all ``n`` groups; ``[lo, hi]`` =
    slice(lo, hi), geometric from lo to hi; ``[hi]`` = slice(hi), hi/10 for every group but the last (the head)."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * n
    if len(lr) == 1:
        return [float(lr[0]) / 10] * (n - 1) + [float(lr[0])]
    if len(lr) == 2:
        return even_mults(float(lr[0]), float(lr[1]), n)
    raise ValueError(f"expected a float, [lo, hi] or [hi], got {lr!r}")


def make_optimizer(
    groups: Sequence[ParamGroup], lrs: Sequence[float], wd: float, beta1: float = MOM_MAX
) -> torch.optim.AdamW:
    """torch AdamW behaving as fastai's Adam: decoupled wd, none on norm params and biases.

    Two torch param groups per model group, in order: ``2k`` = group k's decay params (weight_decay ``wd``),
    ``2k+1`` = its no-decay params (0), both at ``lrs[k]``. Frozen params keep ``grad None`` and AdamW skips
    them entirely, weight decay included, as fastai does. On a GPU the update is torch's fused kernel (one launch
    for all parameters, the step counts on the device: nothing read on the host); on a CPU the reference one.
    """
    if len(lrs) != len(groups):
        raise ValueError(f"{len(groups)} parameter groups but {len(lrs)} learning rates")
    torch_groups = []
    for group, lr in zip(groups, lrs, strict=True):
        torch_groups.append({"params": group.decay, "lr": lr, "weight_decay": wd})
        torch_groups.append({"params": group.no_decay, "lr": lr, "weight_decay": 0.0})
    on_gpu = any(p.is_cuda for group in groups for p in (*group.decay, *group.no_decay))
    return torch.optim.AdamW(torch_groups, betas=(beta1, ADAM_BETA2), eps=ADAM_EPS, fused=True if on_gpu else None)


def combined_cos(pct: float, start: float, middle: float, end: float, pos: float) -> float:
    """fastai's ``combined_cos(pct, start, middle, end)`` at ``pos`` in [0, 1): a cosine from start to middle over
    [0, pct), then from middle to end over [pct, 1)."""

    def cos(a: float, b: float, p: float) -> float:
        return a + (1 + math.cos(math.pi * (1 - p))) * (b - a) / 2

    return cos(start, middle, pos / pct) if pos < pct else cos(middle, end, (pos - pct) / (1 - pct))


class OneCycle(LambdaLR):
    """fastai's fit_one_cycle hypers: before batch s of ``total_steps``, pos = s/total_steps sets each group's lr
    to combined_cos(pct_start, max/div, max, max/div_final) and beta1 to combined_cos(pct_start, 0.95, 0.85, 0.95).

    LambdaLR scales each group's max (its lr when the schedule is made); beta1, which LambdaLR does not know
    about, is set in :meth:`step`.
    """

    def __init__(
        self, opt: torch.optim.Optimizer, total_steps: int, pct_start: float, div: float, div_final: float
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"a one-cycle schedule needs at least one step, got total_steps={total_steps}")
        self.total_steps = total_steps
        self.pct_start = pct_start
        super().__init__(opt, lambda s: combined_cos(pct_start, 1 / div, 1.0, 1 / div_final, self.pos(s)))

    def pos(self, step: int) -> float:
        """fastai's pos of batch ``step``. The step after the last batch keeps the last batch's hypers, as fastai
        leaves them after a fit (and pos 1 would divide by zero for pct_start 1)."""
        return min(step, self.total_steps - 1) / self.total_steps

    def step(self) -> None:  # type: ignore[override]  # no epoch argument: the step count is the schedule
        super().step()
        beta1 = combined_cos(self.pct_start, MOM_MAX, MOM_MIN, MOM_MAX, self.pos(self.last_epoch))
        for group in self.optimizer.param_groups:
            group["betas"] = (beta1, group["betas"][1])


def last_beta1(pct_start: float, total_steps: int) -> float:
    """The beta1 a one-cycle fit of ``total_steps`` leaves on the optimizer: its last batch's. fastai keeps hypers
    after a fit, and its lr_find does not schedule momentum, so a finder run after that fit trains with it."""
    return combined_cos(pct_start, MOM_MAX, MOM_MIN, MOM_MAX, (total_steps - 1) / total_steps)


def make_one_cycle(
    opt: torch.optim.Optimizer, total_steps: int, pct_start: float, div: float, div_final: float
) -> OneCycle:
    """fastai's fit_one_cycle schedule on ``opt``: per group max/div -> max -> max/div_final, cosine both ways.

    The max of each group is its current ``lr`` (from :func:`make_optimizer`); beta1 cycles 0.95 -> 0.85 -> 0.95.
    The hypers of the first batch are set at once; call ``step()`` after every optimizer step, ``total_steps``
    times in all.
    """
    return OneCycle(opt, total_steps, pct_start, div, div_final)
