"""fastai's optimizer and one-cycle schedule, built from torch's AdamW and OneCycleLR (docs/fastai.md §4, §5).

    lrs = group_lrs([1e-6, 1e-4], 3)                  # [1e-6, 1e-5, 1e-4]: fastai's slice(1e-6, 1e-4)
    opt = make_optimizer(param_groups(model), lrs, wd=0.01)
    sched = make_one_cycle(opt, total_steps, pct_start=0.25, div=25.0, div_final=1e5)
    ... opt.step(); sched.step()                      # once per training batch

Torch's OneCycleLR places the phase boundaries one step earlier than fastai. fastai sets the hypers of batch
``s`` (0-based, of ``N`` in the fit) from pos = s/N: warm-up while s < pct·N with fraction s/(pct·N), then the
anneal with fraction (s - pct·N)/(N - pct·N), so its last batch never quite reaches max/div_final. Torch
warms up while s <= pct·N - 1 with fraction s/(pct·N - 1), then anneals with fraction (s - pct·N + 1)/(N - pct·N):
torch's lr at batch s is fastai's at batch s+1 throughout the anneal, and its last batch runs at exactly
max/div_final. Both start at max/div and use the same cosine. tests/test_schedule.py pins these values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import OneCycleLR

from petbreeds.model import ParamGroup

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
    """One lr per parameter group, as fastai's set_hyper: a float for all ``n`` groups, ``[lo, hi]`` = slice(lo, hi)."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * n
    if len(lr) != 2:
        raise ValueError(f"expected a float or [lo, hi], got {lr!r}")
    return even_mults(float(lr[0]), float(lr[1]), n)


def make_optimizer(
    groups: Sequence[ParamGroup], lrs: Sequence[float], wd: float, beta1: float = MOM_MAX
) -> torch.optim.AdamW:
    """torch AdamW behaving as fastai's Adam: decoupled wd, none on norm params and biases.

    Two torch param groups per model group, in order: ``2k`` = group k's decay params (weight_decay ``wd``),
    ``2k+1`` = its no-decay params (0), both at ``lrs[k]``. Frozen params keep ``grad None`` and AdamW skips
    them entirely, weight decay included, as fastai does.
    """
    if len(lrs) != len(groups):
        raise ValueError(f"{len(groups)} parameter groups but {len(lrs)} learning rates")
    torch_groups = []
    for group, lr in zip(groups, lrs, strict=True):
        torch_groups.append({"params": group.decay, "lr": lr, "weight_decay": wd})
        torch_groups.append({"params": group.no_decay, "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(torch_groups, betas=(beta1, ADAM_BETA2), eps=ADAM_EPS)


def make_one_cycle(
    opt: torch.optim.Optimizer, total_steps: int, pct_start: float, div: float, div_final: float
) -> OneCycleLR:
    """fastai's fit_one_cycle schedule on ``opt``: per group max/div -> max -> max/div_final, cosine both ways.

    The max of each group is its current ``lr`` (from :func:`make_optimizer`); beta1 cycles 0.95 -> 0.85 -> 0.95.
    Call ``step()`` after every optimizer step, ``total_steps`` times in all.
    """
    # torch divides the warm-up by pct_start·total_steps - 1, which is 0 for a warm-up of exactly one step
    # (e.g. 4 steps at 0.25). Moving the boundary a millionth of a step later gives the limit of torch's
    # schedule from that side, which starts at max/div as fastai's does.
    if pct_start * total_steps == 1:
        pct_start += 1e-6 / total_steps
    return OneCycleLR(
        opt,
        max_lr=[group["lr"] for group in opt.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=MOM_MIN,
        max_momentum=MOM_MAX,
        div_factor=div,
        final_div_factor=div_final / div,  # torch's floor is max/(div·final_div_factor); fastai's is max/div_final
    )
