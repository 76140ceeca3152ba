"""lr_find: the four suggestions on hand-computed curves, the window and NaN cut, and a real sweep that leaves
the model bit-for-bit as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from ruamel.yaml import YAML
from tiny import ROOT, VOCAB, tiny_net
from torch.utils.data import DataLoader, TensorDataset

from petbreeds.config import load_params, parse_params
from petbreeds.data.augment import BatchAugment
from petbreeds.errors import PetbreedsError
from petbreeds.learn.callbacks import Callback, Fit
from petbreeds.learn.device import Compute
from petbreeds.learn.lr_find import (
    LrFindResult,
    lr_find,
    minimum,
    phase_lr,
    plan_sweep,
    slide,
    steep,
    suggest,
    valley,
    write_lr_find,
)
from petbreeds.learn.model import freeze, unfreeze
from petbreeds.learn.training import TrainingData
from petbreeds.world import SINGLE_PROCESS

# Index i carries lr 10^i, so an answer reads as the index it came from.
LOSSES = [3.0, 2.0, 4.0, 1.0, 0.5, 5.0, 6.0, 0.1]
LRS = [10.0**i for i in range(len(LOSSES))]


def test_valley_longest_decreasing_run() -> None:
    # Longest strictly decreasing subsequence ending at each i: [1, 2, 1, 3, 4, 1, 1, 5] (3 > 2 > 1 > 0.5 > 0.1).
    # e = 7 (first max, 5), s = 7 - 5 = 2, third = 5/3, idx = 2 + int(1.67) + int(0.83) = 3.
    assert valley(LRS, LOSSES) == 1e3


def test_valley_run_from_the_first_point_keeps_fastais_negative_index() -> None:
    # Strictly decreasing from index 0: run[e] = e + 1, so s = -1. Three points: third = 1, idx = -1 + 1 + 0 = 0.
    assert valley([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == 1.0
    # Two points: third = 2/3, idx = -1 + 0 + 0 = -1, i.e. the last lr (fastai indexes the same way).
    assert valley([1.0, 2.0], [2.0, 1.0]) == 2.0


def test_valley_without_a_decrease_is_the_first_lr() -> None:
    # No strictly decreasing pair: fastai's s and e stay 0, so idx = 0, the smallest lr of the window.
    assert valley([1.0, 10.0], [2.0, 3.0]) == 1.0
    assert valley(LRS, [1.0] * len(LRS)) == 1.0  # flat
    assert valley(LRS, [float(i) for i in range(len(LRS))]) == 1.0  # rising
    assert valley([1.0, 10.0, 100.0], [2.0, 3.0, 2.5]) == 1.0  # one decrease (3 > 2.5): run [1, 1, 2], s = 0


def test_minimum_is_a_tenth_of_the_lowest_point() -> None:
    assert minimum(LRS, LOSSES) == pytest.approx(1e6)
    assert minimum([1.0, 2.0, 4.0], [0.5, 0.2, 0.2]) == pytest.approx(0.2)  # the first of equal minima


def test_steep_uses_the_slope_against_log_lr() -> None:
    # Slopes: (2.5 - 3)/ln 10 = -0.217 and (1 - 2.5)/ln 100 = -0.326: the second segment, left point 10.
    # Against the lr itself the first segment would win (-0.5/9 vs -1.5/990).
    assert steep([1.0, 10.0, 1000.0], [3.0, 2.5, 1.0]) == 10.0
    assert steep(LRS, LOSSES) == 1e6  # equal log steps: the largest drop, 6 -> 0.1


def test_slide_stops_where_the_gradients_agree() -> None:
    # 20 points: flat at 2.0 (0-4), falling by 0.1 (5-14), flat at 1.0 (14-19). np.gradient: 0 at 0-3, -0.05 at 4,
    # -0.1 at 5-13, -0.05 at 14, 0 at 15-19. Window (r, l) = (19, 4): |0 - -0.05| > 0.005 -> suggestion lrs[4];
    # then (18, 3): |0 - 0| -> stop.
    losses = [2.0] * 5 + [2.0 - 0.1 * k for k in range(1, 11)] + [1.0] * 5
    lrs = [float(i + 1) for i in range(20)]
    assert slide(lrs, losses) == 5.0
    assert slide(lrs, [1.0] * 20) == 5.0  # gradients agree at once: the starting left end, lrs[-16] = index 4
    # A parabola's gradient differs everywhere: the slide runs off the left end and keeps the first point.
    assert slide(lrs, [(i - 10.0) ** 2 for i in range(20)]) == 1.0
    assert slide(lrs[:10], losses[:10]) == 1.0  # fewer than lr_diff + 1 points: the first point


def test_suggest_windows_and_cuts_at_the_first_nan() -> None:
    num_it = 30
    lrs = [1e-7 * 10 ** (0.3 * i) for i in range(num_it)]
    losses = [3.0 - 0.1 * i for i in range(num_it)]  # falling: the minimum is the last point of the window
    losses[0] = -100.0  # inside the dropped first num_it//10 = 3 points
    losses[27] = -100.0  # inside the dropped last 5
    assert suggest(lrs, losses, num_it)["minimum"] == pytest.approx(lrs[24] / 10)
    losses[20] = math.nan
    losses[22] = -50.0  # after the NaN: must not count
    suggestions = suggest(lrs, losses, num_it)
    assert suggestions["minimum"] == pytest.approx(lrs[19] / 10)
    assert set(suggestions) == {"valley", "minimum", "steep", "slide"}


def test_suggest_with_too_few_points_names_the_params() -> None:
    with pytest.raises(PetbreedsError, match=r"lr_find\.num_it.*lr_find\.stop_div"):
        suggest([1e-3] * 8, [1.0] * 8, num_it=100)  # stopped after 8 batches: [10:-5] is empty


def _uint8_loader(n: int = 32, side: int = 40, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True, generator=g)


def _sweep(model: torch.nn.Module, channels_last: bool, callbacks=(), **settings):
    params = load_params(ROOT / "params.yaml")
    cpu = torch.device("cpu")
    # 4 batches per epoch: longer sweeps cycle the loader through several epochs
    data = TrainingData(
        vocab=VOCAB,
        train_loader=_uint8_loader(),
        valid_loader=_uint8_loader(),
        augment=BatchAugment(params.augment, size=32, seed=0, device=cpu),
        compute=Compute(cpu, None, channels_last),
        world=SINGLE_PROCESS,
    )
    return lr_find(model, data, params.lr_find.model_copy(update=settings), wd=0.01, callbacks=callbacks)


@pytest.mark.parametrize("frozen", [True, False], ids=["lr_find", "lr_find_unfrozen"])
def test_lr_find_restores_weights_and_bn_buffers_bit_for_bit(tmp_path, frozen: bool) -> None:
    torch.manual_seed(0)
    model = tiny_net()
    # as the stages: frozen, the body's BN layers still train and update their running statistics; or all of it
    (freeze if frozen else unfreeze)(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []

    class Steps(Callback):
        def after_batch(self, fit: Fit, record: dict[str, float]) -> None:
            steps.append(fit.batch)

    result = _sweep(
        model,
        start_lr=1e-5,
        end_lr=1.0,
        num_it=14,
        stop_div=False,
        channels_last=True,
        callbacks=[Steps()],
    )
    assert steps == list(range(14))
    assert result.lrs == pytest.approx([1e-5 * 1e5 ** (i / 14) for i in range(14)], rel=1e-12)
    assert len(result.losses) == 14 and all(math.isfinite(v) for v in result.losses)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # weights, running_mean/var, num_batches_tracked
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert model.body[0].weight.requires_grad is not frozen  # the freeze state is untouched
    paths = {"curve": tmp_path / "lr_find.csv", "plot": tmp_path / "lr_find.png", "report": tmp_path / "lr_find.json"}
    write_lr_find(result, plan_sweep(load_params(ROOT / "params.yaml"), "lr_find"), **paths)
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert (tmp_path / "lr_find.csv").read_text().splitlines()[0] == "lr,loss"
    assert set(json.loads(paths["report"].read_text())) == {
        "valley",
        "minimum",
        "steep",
        "slide",
        "chosen",
        "iterations",
    }
    assert phase_lr("train_frozen", None, paths["report"], "steep") == result.suggestions["steep"]


def test_a_phase_lr_is_its_param_or_its_finders_suggestion(tmp_path) -> None:
    report = tmp_path / "lr_find_unfrozen.json"
    assert phase_lr("train_unfrozen", [1e-6, 1e-4], report, "valley") == [1e-6, 1e-4]  # the report is not read
    with pytest.raises(PetbreedsError) as e:
        phase_lr("train_unfrozen", None, report, "valley")
    assert str(e.value) == (f"{report} not found and train_unfrozen.lr is null; run `dvc repro lr_find_unfrozen`")


def test_lr_find_stops_when_the_loss_diverges() -> None:
    torch.manual_seed(0)
    model = tiny_net()
    result = _sweep(model, start_lr=1e-4, end_lr=1e6, num_it=100, stop_div=True, channels_last=False)
    assert 17 <= len(result.losses) < 100  # stopped long before num_it, with points left for the suggestions
    assert result.losses[-1] > 4 * min(result.losses[:-1])  # the batch that crossed 4x the best is the last
    assert all(v <= 4 * min(result.losses[: i + 1]) for i, v in enumerate(result.losses[:-1]))


def with_params(**sets: object):
    """params.yaml's defaults with ``section.key`` values set (validated as check_params does)."""
    raw = YAML(typ="safe").load((ROOT / "params.yaml").read_text())
    for key, value in sets.items():
        section, name = key.split("__")
        raw[section][name] = value
    return parse_params(raw)


FOUND = LrFindResult(lrs=[], losses=[], suggestions={"valley": 1.2e-3, "minimum": 3e-4, "steep": 5e-4, "slide": 2e-3})


def test_a_finder_says_what_its_sweep_is_for() -> None:
    plan = plan_sweep(with_params(), "lr_find")  # the default: always, and a null train_frozen.lr
    assert plan.runs and plan.summary(FOUND) == (
        "lr_find: valley 1.20e-03, minimum 3.00e-04, steep 5.00e-04, slide 2.00e-03; "
        "train_frozen.lr is null: train_frozen trains at the valley"
    )
    plan = plan_sweep(with_params(train_frozen__lr=[2e-3], lr_find__suggestion="steep"), "lr_find")
    assert plan.runs and plan.summary(FOUND).endswith(
        "; train_frozen.lr is set (slice(2e-3)): the sweep is shown, not used"
    )
    plan = plan_sweep(with_params(), "lr_find_unfrozen")  # the default train_unfrozen.lr: [1e-5, 1e-3]
    assert plan.summary(FOUND).endswith("; train_unfrozen.lr is set (slice(1e-5, 1e-3)): the sweep is shown, not used")


@pytest.mark.parametrize(
    ("sets", "finder", "line"),
    [
        (
            {"lr_find__run": "auto"},
            "lr_find_unfrozen",
            "lr_find_unfrozen: not run: train_unfrozen.lr is set (slice(1e-5, 1e-3)) and lr_find.run is auto",
        ),
        (
            {"lr_find__run": ["lr_find_unfrozen"], "train_frozen__lr": 3e-3},
            "lr_find",
            "lr_find: not run: train_frozen.lr is set (3e-3) and lr_find.run is [lr_find_unfrozen]",
        ),
    ],
)
def test_a_finder_that_does_not_sweep_says_why(sets, finder, line) -> None:
    plan = plan_sweep(with_params(**sets), finder)
    assert not plan.runs and plan.summary(None) == line


def test_a_finder_that_does_not_sweep_writes_every_output_saying_so(tmp_path) -> None:
    plan = plan_sweep(with_params(lr_find__run="never", train_frozen__lr=[2e-3]), "lr_find")
    paths = {"curve": tmp_path / "lr_find.csv", "plot": tmp_path / "lr_find.png", "report": tmp_path / "lr_find.json"}
    write_lr_find(None, plan, **paths)
    assert paths["curve"].read_text().splitlines() == ["lr,loss"]  # no points: dvc plots draws no line for it
    with Image.open(paths["plot"]) as picture:  # a picture saying "not run", not an empty plot
        assert picture.format == "PNG" and picture.size == (600, 400)
        assert picture.convert("L").getextrema()[0] < 64  # dark text on it
    why = "train_frozen.lr is set (slice(2e-3)) and lr_find.run is never"
    assert json.loads(paths["report"].read_text()) == {"not_run": why}
    assert phase_lr("train_frozen", [2e-3], paths["report"], "valley") == [2e-3]
    with pytest.raises(PetbreedsError) as e:  # params.yaml changed by hand after the stage: no KeyError
        phase_lr("train_frozen", None, paths["report"], "valley")
    assert str(e.value) == (
        f"{paths['report']}: lr_find did not sweep ({why}) and train_frozen.lr is null; run `dvc repro lr_find`"
    )
