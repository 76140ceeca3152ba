"""even_mults, group_lrs, the optimizer's fastai settings, and OneCycleLR's values against the formulas of
docs/fastai.md §5."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from petbreeds.model import ParamGroup, create_model, freeze, param_groups
from petbreeds.schedule import even_mults, group_lrs, make_one_cycle, make_optimizer


def test_even_mults_is_geometric() -> None:
    assert even_mults(1e-6, 1e-4, 3) == pytest.approx([1e-6, 1e-5, 1e-4], rel=1e-12)
    assert even_mults(1.0, 16.0, 5) == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0], rel=1e-12)
    assert even_mults(2e-3, 5.0, 1) == [5.0]


def test_group_lrs_float_and_slice() -> None:
    assert group_lrs(3e-3, 3) == [3e-3, 3e-3, 3e-3]
    assert group_lrs([1e-5, 1e-3], 3) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
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
    """(lrs per torch group, beta1 of group 0) used by each of the n batches."""
    opt = make_optimizer(_groups(len(lrs)), lrs, wd=0.01)
    sched = make_one_cycle(opt, n, pct, div, div_final)
    seen_lrs, seen_moms = [], []
    for _ in range(n):
        seen_lrs.append([g["lr"] for g in opt.param_groups])
        seen_moms.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return seen_lrs, seen_moms


def test_one_cycle_values_at_known_steps() -> None:
    n, pct, div, div_final = 20, 0.25, 25.0, 1e5  # warm-up ends at batch pct·n - 1 = 4 in torch, 5 in fastai
    lrs, moms = _run_schedule(n, pct, [1e-4, 1e-3], div, div_final)
    head = [step[-1] for step in lrs]
    assert lrs[0] == pytest.approx([1e-4 / div] * 2 + [1e-3 / div] * 2, rel=1e-9)  # each group from its own max/div
    assert head[0] == pytest.approx(fastai_combined_cos(pct, 1e-3 / div, 1e-3, 1e-3 / div_final, 0.0), rel=1e-9)
    assert head[4] == pytest.approx(1e-3, rel=1e-9)  # torch peaks one batch before fastai (pos 5/20 = pct)
    assert head[-1] == pytest.approx(1e-3 / div_final, rel=1e-6)  # torch ends on the floor; fastai at pos 19/20
    # Warm-up: torch's fraction is s/(pct·n - 1), fastai's s/(pct·n).
    assert head[2] == pytest.approx(fastai_combined_cos(pct, 1e-3 / div, 1e-3, 1e-3 / div_final, 0.5 * pct), rel=1e-9)
    # Anneal: torch's batch s runs at fastai's lr of batch s+1.
    for s in range(4, n):
        expected = fastai_combined_cos(pct, 1e-3 / div, 1e-3, 1e-3 / div_final, (s + 1) / n)
        assert head[s] == pytest.approx(expected, rel=1e-9), s
    # beta1 mirrors the lr: 0.95 -> 0.85 (at the peak) -> 0.95.
    assert moms[0] == pytest.approx(0.95)
    assert moms[4] == pytest.approx(0.85)
    assert moms[12] == pytest.approx(fastai_combined_cos(pct, 0.95, 0.85, 0.95, 13 / n), rel=1e-9)
    assert moms[-1] == pytest.approx(0.95)


def test_one_cycle_fine_tune_frozen_epoch() -> None:
    # fine_tune's frozen phase: pct 0.99 over one 25-batch epoch. fastai never anneals (last pos 24/25 < 0.99);
    # torch peaks at batch 23 (24.75 - 1 rounds down) and spends the last batch on the floor.
    lrs, _ = _run_schedule(25, 0.99, [2e-3], 25.0, 1e5)
    head = [step[-1] for step in lrs]
    assert head[0] == pytest.approx(2e-3 / 25)
    assert head[23] == pytest.approx(2e-3, rel=5e-3)
    assert head[24] == pytest.approx(2e-3 / 1e5, rel=1e-6)


def test_one_cycle_one_step_warm_up_does_not_divide_by_zero() -> None:
    # torch's OneCycleLR raises ZeroDivisionError when pct_start·total_steps == 1; make_one_cycle avoids it.
    lrs, _ = _run_schedule(4, 0.25, [1e-3], 25.0, 1e5)
    head = [step[-1] for step in lrs]
    assert head[0] == pytest.approx(1e-3 / 25)
    for s in (1, 2, 3):  # then the anneal, again torch's batch s at fastai's s+1
        assert head[s] == pytest.approx(fastai_combined_cos(0.25, 1e-3 / 25, 1e-3, 1e-3 / 1e5, (s + 1) / 4), rel=1e-5)
