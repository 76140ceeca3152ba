"""even_mults, group_lrs, the optimizer's fastai settings, and the one-cycle schedule's values against the formulas
of docs/fastai.md §5 (tests/test_vs_fastai.py compares them with fastai's own functions)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from petbreeds.learn.model import ParamGroup, create_model, freeze, param_groups
from petbreeds.learn.schedule import even_mults, group_lrs, make_one_cycle, make_optimizer


def test_even_mults_is_geometric() -> None:
    assert even_mults(1e-6, 1e-4, 3) == pytest.approx([1e-6, 1e-5, 1e-4], rel=1e-12)
    assert even_mults(1.0, 16.0, 5) == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0], rel=1e-12)
    assert even_mults(2e-3, 5.0, 1) == [5.0]


def test_group_lrs_float_and_slices() -> None:
    assert group_lrs(3e-3, 3) == [3e-3, 3e-3, 3e-3]
    assert group_lrs([1e-5, 1e-3], 3) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
    assert group_lrs([2e-3], 3) == pytest.approx([2e-4, 2e-4, 2e-3], rel=1e-12)  # fine_tune's slice(2e-3)
    assert group_lrs([2e-3], 1) == [2e-3]
    with pytest.raises(ValueError, match="lo, hi"):
        group_lrs([1e-5, 1e-4, 1e-3], 3)


def _groups(n: int) -> list[ParamGroup]:
    return [ParamGroup(decay=[nn.Parameter(torch.ones(2))], no_decay=[nn.Parameter(torch.ones(2))]) for _ in range(n)]


def test_optimizer_is_fastai_adam() -> None:
    opt = make_optimizer(_groups(3), [1e-5, 1e-4, 1e-3], wd=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-5, 1e-4, 1e-4, 1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0] * 3
    assert all(g["betas"] == (0.95, 0.99) and g["eps"] == 1e-5 for g in opt.param_groups)


def test_optimizer_skips_frozen_params_and_decays_the_rest() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", n_classes=3, pretrained_dir=None)
    freeze(model)
    conv_before = model.body[0].weight.detach().clone()
    head_before = model.head[4].weight.detach().clone()
    opt = make_optimizer(param_groups(model), [1e-2] * 3, wd=0.1)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    model.head[4].weight.grad.zero_()  # only the decoupled weight decay moves it: w·(1 - lr·wd)
    opt.step()
    assert torch.equal(model.body[0].weight, conv_before)  # frozen: no grad, no weight decay
    torch.testing.assert_close(model.head[4].weight.detach(), head_before * (1 - 1e-2 * 0.1))


def fastai_combined_cos(pct: float, a: float, b: float, c: float, pos: float) -> float:
    """docs/fastai.md §5: combined_cos(pct, a, b, c) at pos, with cos(a, b, p) = a + (1 + cos(π(1 - p)))·(b - a)/2."""

    def cos(start: float, end: float, p: float) -> float:
        return start + (1 + math.cos(math.pi * (1 - p))) * (end - start) / 2

    return cos(a, b, pos / pct) if pos < pct else cos(b, c, (pos - pct) / (1 - pct))


def _run_schedule(n: int, pct: float, lrs: list[float], div: float, div_final: float) -> tuple[list, list]:
    """(lrs per torch group, beta1 of every group) used by each of the n batches, and after the fit."""
    opt = make_optimizer(_groups(len(lrs)), lrs, wd=0.01)
    sched = make_one_cycle(opt, n, pct, div, div_final)
    seen_lrs, seen_moms = [], []
    for _ in range(n + 1):
        seen_lrs.append([g["lr"] for g in opt.param_groups])
        moms = {g["betas"][0] for g in opt.param_groups}
        assert len(moms) == 1 and all(g["betas"][1] == 0.99 for g in opt.param_groups)
        seen_moms.append(moms.pop())
        opt.step()
        sched.step()
    return seen_lrs, seen_moms


def _fastai_lrs(n: int, pct: float, lr: float, div: float, div_final: float) -> list[float]:
    return [fastai_combined_cos(pct, lr / div, lr, lr / div_final, s / n) for s in range(n)]


def test_one_cycle_values_at_known_steps() -> None:
    n, pct, div, div_final = 20, 0.25, 25.0, 1e5  # warm-up over batches 0-4, peak at batch 5 (pos = pct)
    lrs, moms = _run_schedule(n, pct, [1e-4, 1e-3], div, div_final)
    head = [step[-1] for step in lrs]
    assert lrs[0] == pytest.approx([1e-4 / div] * 2 + [1e-3 / div] * 2, rel=1e-12)  # each group from its own max/div
    assert head[5] == pytest.approx(1e-3, rel=1e-12)
    assert head[2] == pytest.approx(1e-3 / div + (1 - math.cos(math.pi * 2 / 5)) / 2 * (1e-3 - 1e-3 / div), rel=1e-12)
    assert head[:n] == pytest.approx(_fastai_lrs(n, pct, 1e-3, div, div_final), rel=1e-12)
    assert head[n - 1] > 1e-3 / div_final * 1.5  # the last batch stays above the floor (pos 19/20 < 1)
    assert head[n] == head[n - 1]  # after the fit the hypers keep the last batch's values, as fastai's do
    # beta1 mirrors the lr: 0.95 -> 0.85 (at the peak) -> 0.95.
    assert moms[0] == pytest.approx(0.95, rel=1e-12)
    assert moms[5] == pytest.approx(0.85, rel=1e-12)
    assert moms[12] == pytest.approx(fastai_combined_cos(pct, 0.95, 0.85, 0.95, 12 / n), rel=1e-12)


def test_one_cycle_fine_tune_frozen_epoch() -> None:
    # fine_tune's frozen phase: pct 0.99 over one 25-batch epoch. The last pos, 24/25, is below 0.99: fastai never
    # anneals, the last batch runs near the peak.
    lrs, _ = _run_schedule(25, 0.99, [2e-3], 25.0, 1e5)
    head = [step[-1] for step in lrs]
    assert head[0] == pytest.approx(2e-3 / 25, rel=1e-12)
    assert head[24] == pytest.approx(fastai_combined_cos(0.99, 2e-3 / 25, 2e-3, 2e-8, 24 / 25), rel=1e-12)
    assert head[24] == pytest.approx(0.998 * 2e-3, rel=1e-3)


@pytest.mark.parametrize(
    ("n", "pct"),
    [(4, 0.25), (20, 0.0), (20, 1.0), (1, 0.25), (1, 0.0), (1, 1.0), (10, 0.05), (7, 0.3), (92, 0.99)],
)
def test_one_cycle_is_fastais_formula_at_the_edges(n: int, pct: float) -> None:
    # pct·n = 1 (torch's OneCycleLR divided by zero there), pct 0 (no warm-up) and 1 (no anneal), a 1-batch fit,
    # pct·n < 1 (only batch 0 warms up).
    lrs, moms = _run_schedule(n, pct, [1e-3], 25.0, 1e5)
    head = [step[-1] for step in lrs]
    assert head[:n] == pytest.approx(_fastai_lrs(n, pct, 1e-3, 25.0, 1e5), rel=1e-12)
    assert moms[:n] == pytest.approx([fastai_combined_cos(pct, 0.95, 0.85, 0.95, s / n) for s in range(n)], rel=1e-12)
    assert head[0] == pytest.approx(1e-3 if pct == 0 else 1e-3 / 25, rel=1e-12)


def test_one_cycle_needs_a_step() -> None:
    with pytest.raises(ValueError, match="total_steps=0"):
        make_one_cycle(make_optimizer(_groups(1), [1e-3], wd=0.01), 0, 0.25, 25.0, 1e5)
