"""The book's chapter-5 recipe with fastai 2.8.12 and with petbreeds, side by side, on the same data, split and weights.

    make install                     # the dev extra holds fastai 2.8.12
    .venv/bin/python bench/vs_fastai.py [--repeats 2] [--quick] [--data DIR] [--fastai-reuse-freed-memory]
                                        [--arch resnet34] [--precision fp32] [--tta] [--no-lr-find]
                                        [--out FILE.json]

Recipe (docs/fastai.md §5, §6): Resize(item 460) → aug_transforms(size 224, min_scale 0.75), bs 32,
efficientnet_lite0 with ImageNet weights (offline, converted by petbreeds.learn.pretrained, so both sides start from the
same tensors), lr_find(100 iterations),
then fine_tune(2) = 1 frozen epoch at slice(2e-3) + 2 unfrozen at slice(1e-5, 1e-3), div 5, pct 0.3.
``--arch resnet34``: the book's network, for speed only. No resnet weights are reachable offline, so both sides start
from one seeded random body (the same tensors again): the steps cost what they cost with ImageNet weights, but the
error rates say nothing about the book's.

``--no-lr-find``: both sides skip lr_find (its suggestion is not used: the recipe's lrs are fixed), for a run that
measures errors, not lr_find's time. ``--tta``: after training, each side also predicts the validation set with
test-time augmentation, fastai's ``learn.tta()`` (n=4, beta=0.25) against petbreeds' (petbreeds.learn.tta, as the
evaluate stage runs it: the plain pass, then 4 passes through the training item crop and batch augmentation, seeded
with the run's seed), both scored by the same ``error_rate`` and negative log-likelihood (petbreeds.learn.tta.nll);
and the seconds TTA adds per validation image over the plain prediction (fastai: ``learn.tta()`` less
``learn.validate()``).

Both sides compute as their library does by default on a CPU: fastai in fp32 (its MixedPrecision callback autocasts
on CUDA only), petbreeds with params.yaml's ``train.precision`` (``auto``: what a calibration measured faster on this
CPU for this network; ``--precision`` sets it) in channels_last.

Each side runs in its own subprocess of .venv's python (the dev extra holds fastai) so that peak RSS is per
side; the sides alternate (A B, B A, ...) so that load from other processes hits both alike. Each side loads
with its library's default DataLoader workers (``--workers N`` gives both N). Our side also times its training step
alone on a loaded batch (model-only images/s): the pipeline's rate against what the model allows. The fastai
child checks that its RandomSplitter(0.2, seed=42) over the sorted file list gives exactly our validation set.
Both sides use the same split (seed 42) every run. Run r of petbreeds trains with seed 42 + r (head init, shuffling,
crops, augmentation draws): petbreeds is deterministic on one machine, so repeats with one seed would measure nothing
(fastai, as a user runs it, draws its own each run). Prints one table of medians with the ratios and the run-to-run
spread, and writes the medians, ratios, every run's numbers and the machine to
bench/results/<date>-vs_fastai-<arch>[-<options>]-<cpu>.json (``--out``: elsewhere), the files docs/performance.md
is generated from (bench/summary.py). ``--data``: a folder holding images/ (default
../shared/data/oxford-iiit-pet-subset; absent, it stops and says so: no other images stand in).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parent process imports neither: each side imports its library in its own child
    import torch

    from petbreeds.learn.training import TrainingData

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
SIDES = ("fastai", "petbreeds")
LABEL_REGEX = r"(.+)_\d+.jpg$"
ARCHES = ("efficientnet_lite0", "resnet34")  # lite0: ImageNet weights offline; resnet34: the book's, random weights
# fine_tune(2) with its defaults (docs/fastai.md §5).
BASE_LR = 2e-3
FROZEN_PCT = 0.99
UNFROZEN_LR_SLICE = (BASE_LR / 2 / 100, BASE_LR / 2)
UNFROZEN_PCT, UNFROZEN_DIV, DIV, DIV_FINAL, WD = 0.3, 5.0, 25.0, 1e5, 0.01
TTA_PASSES, TTA_BETA = 4, 0.25  # learn.tta()'s defaults


@dataclass(frozen=True)
class Recipe:
    item_size: int
    size: int
    min_scale: float
    batch_size: int
    num_it: int  # lr_find's steps; 0: no lr_find (--no-lr-find)
    unfrozen_epochs: int
    workers: int | None  # DataLoader workers; None: each library's default
    arch: str
    precision: str  # petbreeds' train.precision (fastai trains in fp32 on a CPU)
    tta: int  # augmented passes of test-time augmentation after training; 0: none
    seed: int = 42  # the split's (both sides)


def make_recipe(args: argparse.Namespace) -> Recipe:
    """The full recipe, or with ``--quick`` one of minutes, not an hour: small images, few lr_find steps
    (suggestions need >= 2 points after trimming)."""
    sizes = (
        {"item_size": 160, "size": 128, "batch_size": 16, "num_it": 10, "unfrozen_epochs": 1}
        if args.quick
        else {"item_size": 460, "size": 224, "batch_size": 32, "num_it": 100, "unfrozen_epochs": 2}
    )
    tta = TTA_PASSES if args.tta else 0
    if args.no_lr_find:
        sizes["num_it"] = 0
    return Recipe(min_scale=0.75, workers=args.workers, arch=args.arch, precision=args.precision, tta=tta, **sizes)


# --------------------------------------------------------------------------------------------------
# The fastai side (it uses petbreeds too, for the weights and the split file)


def run_fastai(work: Path, recipe: Recipe, reuse_freed_memory: bool) -> dict[str, float]:
    import pandas as pd
    import torch
    from fastai.vision.all import (
        Callback,
        CategoryBlock,
        DataBlock,
        ImageBlock,
        L,
        Normalize,
        RandomSplitter,
        RegexLabeller,
        Resize,
        aug_transforms,
        error_rate,
        imagenet_stats,
        params,
        using_attr,
        vision_learner,
    )

    from petbreeds.learn.device import reuse_freed_cpu_memory
    from petbreeds.learn.model import BODY_CUT, body_of, create_imagenet_net
    from petbreeds.learn.tta import nll

    if reuse_freed_memory:  # petbreeds' malloc setting, to see how much of the difference it is
        reuse_freed_cpu_memory()
    table = pd.read_csv(work / "split.csv")
    root = Path((work / "root.txt").read_text().strip())
    items = sorted(root / p for p in table["path"])

    arch = recipe.arch

    def imagenet_net(pretrained: bool = True) -> torch.nn.Module:
        net = create_imagenet_net(arch)
        if pretrained:
            body_of(arch, net).load_state_dict(torch.load(work / "weights.pt", weights_only=True))
        return net

    def splitter(model: torch.nn.Module) -> list:
        body, head, cut = model[0], model[1], BODY_CUT[arch]  # fastai's _resnet_split for the resnets
        return L(body[:cut], body[cut:], head).map(params)

    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: items,
        splitter=RandomSplitter(valid_pct=0.2, seed=recipe.seed),
        get_y=using_attr(RegexLabeller(LABEL_REGEX), "name"),
        item_tfms=Resize(recipe.item_size),
        # a callable arch has no model_meta stats, so vision_learner would not add Normalize itself
        batch_tfms=[
            *aug_transforms(size=recipe.size, min_scale=recipe.min_scale),
            Normalize.from_stats(*imagenet_stats),
        ],
    )
    workers = {} if recipe.workers is None else {"num_workers": recipe.workers}  # fastai's default: one per core
    dls = block.dataloaders(root, bs=recipe.batch_size, device=torch.device("cpu"), **workers)
    ours = {str(root / p) for p in table.loc[table["split"] == "valid", "path"]}
    if {str(p) for p in dls.valid_ds.items} != ours:
        raise SystemExit("fastai's RandomSplitter did not reproduce petbreeds' validation set")
    # a callable arch + cut: vision_learner builds body + fastai head with its init, and freezes the body
    learn = vision_learner(dls, imagenet_net, cut=lambda net: body_of(arch, net), splitter=splitter, metrics=error_rate)

    class TrainTimer(Callback):
        """Training seconds and images of each epoch (validation excluded), as petbreeds' history reports."""

        def before_fit(self) -> None:
            self.epochs: list[tuple[float, int]] = []

        def before_train(self) -> None:
            self.started, self.images = time.perf_counter(), 0

        def after_batch(self) -> None:
            if self.training:
                self.images += len(self.yb[0])

        def after_train(self) -> None:
            self.epochs.append((time.perf_counter() - self.started, self.images))

    timer = TrainTimer()
    lr_find_s: tuple[float, int] | None = None
    if recipe.num_it:
        started = time.perf_counter()
        learn.lr_find(num_it=recipe.num_it, show_plot=False)
        lr_find_s = time.perf_counter() - started, len(learn.recorder.lrs)  # stop_div may end it early
    learn.fit_one_cycle(1, slice(BASE_LR), pct_start=FROZEN_PCT, wd=WD, cbs=timer)
    epochs = list(timer.epochs)
    learn.unfreeze()
    learn.fit_one_cycle(recipe.unfrozen_epochs, slice(*UNFROZEN_LR_SLICE), pct_start=UNFROZEN_PCT, div=UNFROZEN_DIV,
                        wd=WD, cbs=timer)  # fmt: skip
    epochs += timer.epochs
    started = time.perf_counter()
    valid_loss, err = learn.validate()
    result = summary(lr_find_s, epochs, float(valid_loss), float(err))
    if recipe.tta:
        plain_s, started = time.perf_counter() - started, time.perf_counter()
        probs, targets = learn.tta(n=recipe.tta, beta=TTA_BETA)
        tta_s = time.perf_counter() - started
        result.update(tta_summary(probs, targets, tta_s - plain_s, nll))
    return result


# --------------------------------------------------------------------------------------------------
# The petbreeds side


def run_petbreeds(work: Path, recipe: Recipe, train_seed: int) -> dict[str, Any]:
    import json as _json

    import pandas as pd
    import torch

    from petbreeds.config import LrFindParams, OneCycleParams, TTAParams, load_params
    from petbreeds.data.augment import BatchAugment
    from petbreeds.data.dataloaders import make_loader
    from petbreeds.learn.callbacks import DivergenceStop, Table
    from petbreeds.learn.inference import get_preds
    from petbreeds.learn.lr_find import lr_find
    from petbreeds.learn.model import create_model, freeze, unfreeze
    from petbreeds.learn.schedule import group_lrs
    from petbreeds.learn.training import fit_one_cycle, training_data
    from petbreeds.learn.tta import nll, tta_probs
    from petbreeds.world import SINGLE_PROCESS

    table = pd.read_csv(work / "split.csv", keep_default_na=False)
    root = Path((work / "root.txt").read_text().strip())
    vocab = _json.loads((work / "vocab.json").read_text())["vocab"]
    params = load_params(ROOT / "params.yaml")  # its augment section is fastai's aug_transforms defaults
    params = params.model_copy(
        update={
            "data": params.data.model_copy(
                update={
                    "item_size": recipe.item_size,
                    "size": recipe.size,
                    "resize_method": "crop",
                    "batch_size": recipe.batch_size,
                    **({} if recipe.workers is None else {"num_workers": recipe.workers}),
                }
            ),
            "augment": params.augment.model_copy(update={"min_scale": recipe.min_scale}),
            "model": params.model.model_copy(update={"arch": recipe.arch}),  # auto's calibration times this network
            "train": params.train.model_copy(update={"precision": recipe.precision, "channels_last": True}),
        }
    )
    torch.manual_seed(train_seed)
    # on CPU, also petbreeds' malloc setting (petbreeds.learn.device.reuse_freed_cpu_memory)
    data = training_data(params, table, vocab, root, seed=train_seed, world=SINGLE_PROCESS)
    model = create_model(recipe.arch, len(vocab), work)
    freeze(model)
    lr_find_s: tuple[float, int] | None = None
    if recipe.num_it:
        started = time.perf_counter()
        sweep = LrFindParams(start_lr=1e-7, end_lr=10.0, num_it=recipe.num_it, stop_div=True, suggestion="valley")
        found = lr_find(model, data, sweep, WD)
        lr_find_s = time.perf_counter() - started, len(found.lrs)
    frozen = OneCycleParams(epochs=1, pct_start=FROZEN_PCT, div=DIV, div_final=DIV_FINAL, wd=WD)
    # fastai's slice(base_lr)
    history = fit_one_cycle(model, data, frozen, group_lrs([BASE_LR], 3), [DivergenceStop("frozen"), Table()])
    unfreeze(model)
    unfrozen = OneCycleParams(
        epochs=recipe.unfrozen_epochs, pct_start=UNFROZEN_PCT, div=UNFROZEN_DIV, div_final=DIV_FINAL, wd=WD
    )
    unfrozen_lrs = group_lrs(list(UNFROZEN_LR_SLICE), 3)
    history += fit_one_cycle(model, data, unfrozen, unfrozen_lrs, [DivergenceStop("unfrozen"), Table()])
    train = data.train_loader
    images = len(train) * recipe.batch_size  # drop_last: every epoch trains on full batches only
    epochs = [(images / row["images_per_s"], images) for row in history]  # training time, validation excluded
    result = summary(lr_find_s, epochs, history[-1]["valid_loss"], history[-1]["error_rate"])
    # the model alone at the same epoch mix (1 frozen, then unfrozen): what a perfect data pipeline would reach
    rates = model_only_images_per_s(model, data)
    seconds = sum(n / rates["frozen" if i == 0 else "unfrozen"] for i, (_, n) in enumerate(epochs))
    result["model_only_images_per_s"] = sum(n for _, n in epochs) / seconds
    result["pipeline_share"] = result["images_per_s"] / result["model_only_images_per_s"]
    if recipe.tta:  # as the evaluate stage runs it: the plain pass, then the augmented ones, seeded
        valid = table[table["split"] == "valid"].reset_index(drop=True)
        compute, device = data.compute, data.compute.device
        plain, targets = get_preds(
            model, make_loader(valid, root, vocab, params.data, train=False, seed=0), data.augment, compute
        )
        started = time.perf_counter()
        passes = make_loader(valid, root, vocab, params.data, train=False, seed=train_seed, passes=recipe.tta)
        augment = BatchAugment(params.augment, recipe.size, train_seed, device)
        tta = TTAParams(n=recipe.tta, beta=TTA_BETA, use_max=False)
        probs = tta_probs(model, plain, passes, augment, compute, tta)
        result.update(tta_summary(probs, targets, time.perf_counter() - started, nll))
    return {**result, "precision": data.compute.precision, "precision_choice": data.compute.precision_choice,
            "seed": train_seed}  # fmt: skip


def model_only_images_per_s(model: torch.nn.Module, data: TrainingData, steps: int = 5) -> dict[str, float]:
    """Images/s of the training step alone (forward, backward, AdamW) on one batch already loaded and augmented,
    frozen and unfrozen, on a copy of the trained model (the run's results stay as they are). Median of ``steps``
    after one warm-up step."""
    import copy
    import statistics

    from petbreeds.learn.feed import train_batches
    from petbreeds.learn.inference import batch_inputs
    from petbreeds.learn.model import freeze, param_groups, unfreeze
    from petbreeds.learn.schedule import make_optimizer
    from petbreeds.learn.training import train_step

    compute = data.compute
    x, y = batch_inputs(next(train_batches(data.train_loader, compute.device)), data.augment, compute, train=True)
    rates = {}
    for phase, set_phase in (("frozen", freeze), ("unfrozen", unfreeze)):
        net = copy.deepcopy(model)
        set_phase(net)
        net.train()
        opt = make_optimizer(param_groups(net), [1e-6] * 3, WD)
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            train_step(net, opt, compute.grad_scaler(), x, y, compute)
            times.append(time.perf_counter() - started)
        rates[phase] = len(y) / statistics.median(times[1:])
    return rates


def tta_summary(probs: torch.Tensor, targets: torch.Tensor, added_s: float, nll: Any) -> dict[str, float]:
    """One side's TTA numbers from its combined probabilities [N, C]; ``added_s``: the seconds over the plain pass."""
    return {
        "error_rate_tta": (probs.argmax(dim=1) != targets).double().mean().item(),
        "valid_loss_tta": nll(probs, targets),
        "tta_added_s_per_image": added_s / len(targets),
    }


def summary(
    lr_find: tuple[float, int] | None, epochs: list[tuple[float, int]], valid_loss: float, err: float
) -> dict[str, float]:
    """One side's numbers; ``lr_find``: its seconds and steps, None where it did not run (no lr_find columns)."""
    seconds = sum(s for s, _ in epochs)
    timed = {} if lr_find is None else {"lr_find_s": lr_find[0], "lr_find_s_per_step": lr_find[0] / lr_find[1]}
    return {
        "images_per_s": sum(n for _, n in epochs) / seconds,
        "s_per_epoch": seconds / len(epochs),
        **timed,
        "error_rate": err,
        "valid_loss": valid_loss,
    }


# --------------------------------------------------------------------------------------------------
# The parent: data, split and weights once; then the sides alternate, each in its own process

COLUMNS = (
    ("images_per_s", "train images/s", "{:.2f}", True),
    ("model_only_images_per_s", "model-only images/s (petbreeds' step on a loaded batch)", "{:.2f}", None),
    ("pipeline_share", "pipeline / model-only (target >= 0.90)", "{:.2f}", None),
    ("s_per_epoch", "s per epoch (train)", "{:.1f}", False),
    ("lr_find_s", "lr_find s", "{:.1f}", False),
    ("lr_find_s_per_step", "lr_find s per step", "{:.3f}", False),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}", False),
    ("error_rate", "error_rate", "{:.4f}", None),
    ("valid_loss", "valid_loss", "{:.4f}", None),
    ("error_rate_tta", "error_rate with TTA (n=4, beta=0.25)", "{:.4f}", None),
    ("valid_loss_tta", "valid_loss with TTA (NLL)", "{:.4f}", None),
    ("tta_added_s_per_image", "s TTA adds per validation image", "{:.4f}", False),
)


def prepare(work: Path, data_root: Path, quick: bool, seed: int, arch: str) -> int:
    """Index (petbreeds' labeller), split, weights into ``work``; returns the number of images."""
    import torch

    from petbreeds.atomic import atomic_write_json, atomic_write_text
    from petbreeds.config import IndexParams, ModelParams, SplitParams
    from petbreeds.data.labelling import index_images
    from petbreeds.data.splitting import split_items
    from petbreeds.learn.model import body_of, create_imagenet_net
    from petbreeds.learn.pretrained import prepare_pretrained

    table = index_images(data_root, IndexParams(label_regex=LABEL_REGEX, min_class_images=2, workers=0)).table
    if quick:  # the first 7 images of each breed (sorted): every breed keeps training images, ~a quarter of the time
        table = table.groupby("label", sort=False).head(7).reset_index(drop=True)
    table = split_items(table, SplitParams(method="random", valid_pct=0.2, seed=seed), data_root / "annotations")
    table.to_csv(work / "split.csv", index=False)
    vocab = sorted(set(table.loc[table["split"] == "train", "label"]))
    atomic_write_json(work / "vocab.json", {"vocab": vocab})
    atomic_write_text(work / "root.txt", str(data_root.resolve()))
    if arch != "efficientnet_lite0":  # no ImageNet weights offline: one seeded random body for both sides
        torch.manual_seed(seed)
        torch.save(body_of(arch, create_imagenet_net(arch)).state_dict(), work / "weights.pt")
        atomic_write_json(work / "weights.json", {"arch": arch, "weights": f"random, seed {seed}"})
        return len(table)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        prepare_pretrained(
            ModelParams(arch=arch, weights="imagenet", resnet50_weights="IMAGENET1K_V1"), Path(tmp) / "pretrained"
        )
        for name in ("weights.pt", "weights.json"):
            os.replace(Path(tmp) / "pretrained" / name, work / name)
    return len(table)


def run_side(side: str, work: Path, extra_args: list[str], workers: int | None) -> dict[str, Any]:
    """One side in its own process; adds its peak RSS (the largest of the process and its DataLoader workers)."""
    out = work / f"{side}.json"
    cmd = [str(PYTHON), __file__, "--side", side, "--work", str(work), *extra_args]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {side} side failed (exit {os.waitstatus_to_exitcode(status)}); see its output above")
    result = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def medians(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each side's median of every number its runs report (the figures the table and the results file quote)."""
    return {
        side: {key: statistics.median(r[key] for r in runs) for key, *_ in COLUMNS if key in runs[0]}
        for side, runs in results.items()
    }


def ratios(med: dict[str, dict[str, float]]) -> dict[str, float]:
    """petbreeds against fastai per timed figure, > 1 where petbreeds is better (faster, or less memory)."""
    return {
        key: med["petbreeds"][key] / med["fastai"][key] if higher else med["fastai"][key] / med["petbreeds"][key]
        for key, _, _, higher in COLUMNS
        if higher is not None and key in med["fastai"]
    }


def config_name(args: argparse.Namespace) -> str:
    """The arch, then what differs from the full default comparison: results of other settings get their own file."""
    options = [
        *([f"precision_{args.precision}"] if args.precision != "auto" else []),
        *(["fastai_reuse_freed_memory"] if args.fastai_reuse_freed_memory else []),
        *([f"workers_{args.workers}"] if args.workers is not None else []),
        *(["tta"] if args.tta else []),
        *(["no_lr_find"] if args.no_lr_find else []),
        *(["quick"] if args.quick else []),
    ]
    return "-".join([args.arch, *options])


def table_text(results: dict[str, list[dict[str, Any]]]) -> str:
    """Medians per side, petbreeds/fastai ratio (>1 = petbreeds better), and each side's run-to-run spread."""
    lines = [
        "| metric | fastai | petbreeds | ratio (>1: petbreeds better) | spread fastai / petbreeds |",
        "|---|---|---|---|---|",
    ]
    for key, name, fmt, higher_better in COLUMNS:
        if key not in results["petbreeds"][0]:  # measured by neither (--tta's without it)
            continue
        if key not in results["fastai"][0]:  # measured on petbreeds' side only
            values = [r[key] for r in results["petbreeds"]]
            cells = ["—", fmt.format(statistics.median(values)), "", f"— / {fmt.format(max(values) - min(values))}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            continue
        values = {side: [r[key] for r in runs] for side, runs in results.items()}
        med = {side: statistics.median(v) for side, v in values.items()}
        spread = {side: max(v) - min(v) for side, v in values.items()}
        if higher_better is None:
            ratio = f"Δ {med['petbreeds'] - med['fastai']:+.4f}"
        else:
            r = med["petbreeds"] / med["fastai"] if higher_better else med["fastai"] / med["petbreeds"]
            ratio = f"{r:.2f}×"
        cells = [fmt.format(med["fastai"]), fmt.format(med["petbreeds"]), ratio,
                 f"{fmt.format(spread['fastai'])} / {fmt.format(spread['petbreeds'])}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="folder holding images/ (default: "
                        "../shared/data/oxford-iiit-pet-subset)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (>= 2 to see the noise)")
    parser.add_argument(
        "--quick", action="store_true", help="7 images per breed, 160/128 px, bs 16, 10 lr_find steps, 1+1 epochs"
    )
    parser.add_argument(
        "--fastai-reuse-freed-memory",
        action="store_true",
        help="give fastai petbreeds' malloc setting too (petbreeds.learn.device.reuse_freed_cpu_memory)",
    )
    parser.add_argument("--arch", choices=ARCHES, default=ARCHES[0], help="the network (resnet34: speed only, "
                        "from random weights; see above)")  # fmt: skip
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="petbreeds' train.precision (default auto, params.yaml's: calibrated per CPU)",
    )
    parser.add_argument(
        "--tta", action="store_true", help="also test-time augmentation after training: fastai's learn.tta() and ours"
    )
    parser.add_argument(
        "--no-lr-find",
        action="store_true",
        help="skip lr_find on both sides: the recipe trains at fixed lrs, so only its timing is lost (and the random "
        "stream it would draw from)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result here, not to bench/results/ (JSON)")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--train-seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers for both sides (default: each library's own: fastai one per core, petbreeds "
        'data.num_workers -1; docs/design.md § "No DataLoader workers when training on a CPU")',
    )
    args = parser.parse_args()
    recipe = make_recipe(args)
    if args.side:  # a child: run one side, write its numbers
        if args.side == "fastai":
            result = run_fastai(args.work, recipe, args.fastai_reuse_freed_memory)
        else:
            result = run_petbreeds(args.work, recipe, args.train_seed)
        (args.work / f"{args.side}.json").write_text(json.dumps(result))
        return
    if not PYTHON.is_file():
        raise SystemExit(f"{PYTHON}: missing; run `make install` first")
    from machine import SHARED_SUBSET, header_text, machine_info, require_images, write_result  # bench/: sys.path

    data_root = require_images(args.data or SHARED_SUBSET)
    machine = machine_info()
    print(header_text(machine), flush=True)
    workers = args.workers
    flags = (("--quick", args.quick), ("--tta", args.tta), ("--no-lr-find", args.no_lr_find),
             ("--fastai-reuse-freed-memory", args.fastai_reuse_freed_memory))  # fmt: skip
    extra_args = [flag for flag, on in flags if on]
    extra_args += ["--arch", args.arch, "--precision", args.precision]
    results: dict[str, list[dict[str, Any]]] = {"fastai": [], "petbreeds": []}
    with tempfile.TemporaryDirectory(prefix="vs_fastai.") as tmp:
        work = Path(tmp)
        n = prepare(work, data_root, args.quick, recipe.seed, args.arch)
        print(f"data: {n} images from {data_root}", flush=True)
        for repeat in range(args.repeats):
            order = ("fastai", "petbreeds") if repeat % 2 == 0 else ("petbreeds", "fastai")
            for side in order:
                print(f"== repeat {repeat + 1}/{args.repeats}: {side}", flush=True)
                seed = ["--train-seed", str(recipe.seed + repeat)] if side == "petbreeds" else []
                results[side].append(run_side(side, work, extra_args + seed, workers))
                print(json.dumps(results[side][-1]), flush=True)
    fastai_malloc = "petbreeds' malloc setting" if args.fastai_reuse_freed_memory else "glibc's malloc defaults"
    ours = results["petbreeds"][0]
    compute = f"fastai in fp32 NCHW, petbreeds in {ours['precision']} channels_last ({ours['precision_choice']})"
    setting = (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, {n} images from {data_root}, {recipe}, "
               f"{args.repeats} runs per side (medians; spread = max - min), fastai with {fastai_malloc};\n"
               f"{compute}")  # fmt: skip
    print(f"\n{setting}\n")
    print(table_text(results))
    med = medians(results)
    record = {
        "data": {"path": str(data_root), "images": n},
        "setting": setting,
        "recipe": dataclasses.asdict(recipe),
        "repeats": args.repeats,
        "precision": ours["precision"],  # petbreeds' (fastai computes in fp32 on a CPU)
        "medians": med,
        "ratios": ratios(med),
        "runs": results,
        "table": table_text(results),
    }
    write_result("vs_fastai", config_name(args), record, machine, out=args.out)


if __name__ == "__main__":
    sys.exit(main())
