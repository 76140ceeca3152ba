"""Benchmark of the data path, side by side with fastai's way; prints images/s and the ratios. Not a test.

    .venv/bin/python bench/data_pipeline.py [--data DIR] [--n 256] [--batch 64] [--item 460] [--size 224] [--out FILE]

Item stage (CPU): bare Pillow decode + resize, against ``PresizedImages`` in one process and through
``make_loader`` with N workers. Batch stage (CPU, and CUDA when present): ``BatchAugment`` (one grid_sample per
image at ``size``) against fastai's two resamples, re-implemented here with torch: the fused affine + warp
resampled at item size, then one random resized crop per batch resampled again to ``size`` (docs/fastai.md §2.3–§2.4).
Targets: batch stage >= 3x faster than fastai's way at 460 -> 224 on CPU; item stage within 1.5x of bare Pillow.
``--data``: a folder holding images/ (default ../shared/data/oxford-iiit-pet-subset; absent, it stops and says so).
Writes the rates and the machine to bench/results/<date>-data_pipeline-<cpu>.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from machine import SHARED_SUBSET, header_text, machine_info, require_images, write_result
from PIL import Image

from petbreeds.config import AugmentParams, DataParams, load_params
from petbreeds.data.augment import BatchAugment, affine_matrices, lighting_, warp_matrices
from petbreeds.data.dataloaders import default_num_workers, make_loader
from petbreeds.data.presizing import PresizedImages

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (256, 460, 224, 64)  # images for the item stage, item size, model input size, batch


def best_of(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """The fastest of ``repeats`` timed calls, in seconds, after one warm-up (the machine is shared: noisy)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def fastai_two_resamples(x: torch.Tensor, aug: BatchAugment) -> torch.Tensor:
    """fastai's train batch: /255, affine + warp resampled at item size, one crop per batch resized to ``size``
    (area prefilter when the crop is more than twice ``size``, then a second grid_sample), lighting, normalise."""
    b, _, h, w = x.shape
    d = dataclasses.replace(aug.draw(b), crop_side=torch.ones(b, device=x.device))  # the crop comes later
    img = x.float() / 255
    grid = F.affine_grid(affine_matrices(d)[:, :2], [b, 3, h, w], align_corners=True)
    homography = warp_matrices(d)
    points = torch.cat([grid, torch.ones_like(grid[..., :1])], -1) @ homography.transpose(1, 2)[:, None]
    img = F.grid_sample(img, points[..., :2] / points[..., 2:], padding_mode="reflection", align_corners=True)
    side = round(math.sqrt(random.uniform(aug.aug.min_scale, 1.0) * h * w))
    top, left = random.randint(0, h - side), random.randint(0, w - side)
    img = img[..., top : top + side, left : left + side]
    if side > 2 * aug.size:
        img = F.interpolate(img, scale_factor=2 * aug.size / side, mode="area", recompute_scale_factor=True)
    identity = F.affine_grid(
        torch.eye(3, device=x.device)[None, :2].expand(b, 2, 3), [b, 3, aug.size, aug.size], align_corners=True
    )
    img = F.grid_sample(img, identity, padding_mode="reflection", align_corners=True)
    return aug.normalize_(lighting_(img, d.brightness, d.contrast))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=SHARED_SUBSET, help="folder holding images/ (default: %(default)s)"
    )
    parser.add_argument("--n", type=int, default=DEFAULT_SIZES[0], help="images for the item stage")
    parser.add_argument("--batch", type=int, default=DEFAULT_SIZES[3])
    parser.add_argument("--item", type=int, default=DEFAULT_SIZES[1])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZES[2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=-1, help="-1: one per core")
    parser.add_argument("--out", type=Path, help="write the result here, not to bench/results/ (JSON)")
    args = parser.parse_args()
    images = require_images(args.data) / "images"
    machine = machine_info()
    print(header_text(machine))

    paths = sorted(p for p in images.iterdir() if p.suffix == ".jpg")[: args.n]
    workers = default_num_workers(args.workers, cuda=True)  # -1: one per core, as a GPU's training would load
    data = DataParams(
        item_size=args.item,
        size=args.size,
        resize_method="crop",
        pad_mode="reflection",
        batch_size=args.batch,
        num_workers=workers,
    )
    aug_params: AugmentParams = load_params(ROOT / "params.yaml").augment
    cpu = torch.device("cpu")
    print(f"data: {len(paths)} images from {images}; {args.item} -> {args.size}, batch {args.batch}")
    print(f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {workers} workers; shared machine: noisy")

    def bare_pillow() -> None:
        for p in paths:
            with Image.open(p) as img:
                img.convert("RGB").resize((args.item, args.item), Image.Resampling.BILINEAR)

    dataset = PresizedImages(paths, [0] * len(paths), data, train=True, seed=0)
    table = pd.DataFrame({"path": [p.name for p in paths], "label": "x"})
    loader = make_loader(table, images, ["x"], data, train=False, seed=0)
    no_sync: Callable[[], None] = lambda: None  # noqa: E731
    n = len(paths)
    t_bare = best_of(bare_pillow, args.repeats, no_sync)
    t_item = best_of(lambda: [dataset[i] for i in range(n)], args.repeats, no_sync)
    t_loader = best_of(lambda: list(loader), args.repeats, no_sync)
    print("\nitem stage (CPU)                       images/s   vs bare Pillow")
    print(f"  bare Pillow decode+convert+resize    {n / t_bare:8.1f}   1.00x")
    print(f"  PresizedImages, 1 process            {n / t_item:8.1f}   {t_bare / t_item:.2f}x")
    print(f"  {f'make_loader, {workers} workers':<37}{n / t_loader:8.1f}   {t_bare / t_loader:.2f}x")
    item_stage = {"bare_pillow": n / t_bare, "presized": n / t_item, "loader": n / t_loader, "workers": workers}

    x_cpu = torch.stack([dataset[i][0] for i in range(min(args.batch, n))])
    b = x_cpu.shape[0]
    devices = [cpu] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print("\nbatch stage, train (one batch)         images/s   speed-up")
    batch_stage = []
    for device in devices:
        sync = torch.cuda.synchronize if device.type == "cuda" else no_sync
        x = x_cpu.to(device)
        ours = BatchAugment(aug_params, args.size, seed=0, device=device)
        reference = BatchAugment(aug_params, args.size, seed=0, device=device)
        with torch.no_grad():
            t_ref = best_of(lambda: fastai_two_resamples(x, reference), args.repeats, sync)  # noqa: B023
            t_ours = best_of(lambda: ours(x, train=True), args.repeats, sync)  # noqa: B023
            t_valid = best_of(lambda: ours(x, train=False), args.repeats, sync)  # noqa: B023
        print(f"  {device.type:4} fastai way (2 resamples)      {b / t_ref:8.1f}   1.00x")
        print(f"  {device.type:4} BatchAugment (1 grid_sample)  {b / t_ours:8.1f}   {t_ref / t_ours:.2f}x")
        print(f"  {device.type:4} BatchAugment valid            {b / t_valid:8.1f}")
        batch_stage.append({"device": device.type, "fastai_way": b / t_ref, "ours": b / t_ours, "valid": b / t_valid})
    record = {
        "data": {"path": str(args.data), "images": n},
        "setting": {"item_size": args.item, "size": args.size, "batch_size": args.batch, "repeats": args.repeats},
        "item_stage": item_stage,
        "batch_stage": batch_stage,
    }
    sizes = (args.n, args.item, args.size, args.batch)
    config = None if sizes == DEFAULT_SIZES else "n{}-{}to{}-bs{}".format(*sizes)  # the file names other sizes
    write_result("data_pipeline", config, record, machine, out=args.out)


if __name__ == "__main__":
    main()
