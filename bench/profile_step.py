"""Where a petbreeds training step spends its time on the CPU: load (decode + presize) vs augment vs forward vs
backward vs optimizer.

    .venv/bin/python bench/profile_step.py [--data DIR] [--steps 4] [--item-size 460] [--size 224] [--bs 32]

Loads in the main process (num_workers 0), so the load term is the full decode + resize cost that DataLoader
workers have to hide behind compute; prints each term's median seconds per batch and share of the step.
The model is efficientnet_lite0 unfrozen (the expensive phase), fp32, channels_last, as the pipeline trains it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from petbreeds.augment import BatchAugment
from petbreeds.config import AugmentParams, DataParams, IndexParams
from petbreeds.dataloaders import make_loader
from petbreeds.labelling import index_images
from petbreeds.model import create_model, param_groups, unfreeze
from petbreeds.schedule import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
SHARED_SUBSET = ROOT.parent / "shared" / "data" / "oxford-iiit-pet-subset"
AUG = AugmentParams(1.0, True, 10.0, 1.0, 1.1, 0.2, 0.2, 0.75, 0.75, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_SUBSET if SHARED_SUBSET.is_dir() else ROOT / "data/raw")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one warm-up step is not counted)")
    parser.add_argument("--item-size", type=int, default=460)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=32)
    args = parser.parse_args()

    index = index_images(args.data, IndexParams(r"(.+)_\d+.jpg$", 0))
    data = DataParams(args.item_size, args.size, "crop", "reflection", args.bs, 0)
    loader = make_loader(index.table, args.data, index.vocab, data, train=True, seed=42)
    augment = BatchAugment(AUG, args.size, 42, torch.device("cpu"))
    torch.manual_seed(42)
    model = create_model("efficientnet_lite0", len(index.vocab), None).to(memory_format=torch.channels_last)
    unfreeze(model)
    model.train()
    opt = make_optimizer(param_groups(model), [1e-4] * 3, 0.01)

    times: dict[str, list[float]] = {"load": [], "augment": [], "forward": [], "backward": [], "optimizer": []}
    batches = iter(loader)
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        x = augment(x, train=True).contiguous(memory_format=torch.channels_last)
        t2 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if step > 0:  # the first step pays one-off allocations
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                times[name].append(dt)

    medians = {name: statistics.median(v) for name, v in times.items()}
    total = sum(medians.values())
    print(
        f"batch {args.bs}, item {args.item_size} -> {args.size}, {torch.get_num_threads()} threads, {args.steps} steps"
    )
    print("| term | s / batch | share |\n|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {seconds / total:.0%} |")
    print(f"| step | {total:.3f} | {args.bs / total:.1f} images/s |")


if __name__ == "__main__":
    main()
