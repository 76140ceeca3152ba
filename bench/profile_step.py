"""Where a petbreeds training step spends its time on the CPU: load (decode + presize) vs augment vs forward vs
backward vs optimizer.

    .venv/bin/python bench/profile_step.py [--data DIR] [--steps 4] [--item-size 460] [--size 224] [--bs 32]
                                            [--phase unfrozen|frozen]

Loads in the main process (num_workers 0), so the load term is the full decode + resize cost that DataLoader
workers have to hide behind compute; prints each term's median seconds per batch, share of the step and page
faults (memory the OS had to map and zero: what gave away glibc's malloc, docs/design.md § "CPU memory").
The model is efficientnet_lite0, fp32, channels_last, as the pipeline trains it: unfrozen (the expensive phase) or
``--phase frozen`` (lr_find's and train_frozen's step: the body's BatchNorm layers still train, so the backward still
runs through the whole body, without the convolutions' weight gradients). The CPU is set up as training sets it
(``--glibc-malloc`` leaves glibc's defaults, to see the difference).
``--data``: a folder holding images/ (default ../shared/data/oxford-iiit-pet-subset; absent, it stops and says so).
Writes the terms and the machine to bench/results/<date>-profile_step-<phase>-<cpu>.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import SHARED_SUBSET, header_text, machine_info, require_images, write_result

from petbreeds.config import DataParams, IndexParams, load_params
from petbreeds.data.augment import BatchAugment
from petbreeds.data.dataloaders import make_loader
from petbreeds.data.labelling import index_images
from petbreeds.learn.device import pick_device
from petbreeds.learn.model import create_model, freeze, param_groups, unfreeze
from petbreeds.learn.schedule import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=SHARED_SUBSET, help="folder holding images/ (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one warm-up step is not counted)")
    parser.add_argument("--item-size", type=int, default=460)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--phase", choices=("unfrozen", "frozen"), default="unfrozen")
    parser.add_argument("--glibc-malloc", action="store_true", help="skip petbreeds' malloc setting")
    parser.add_argument("--out", type=Path, help="write the result here, not to bench/results/ (JSON)")
    args = parser.parse_args()
    require_images(args.data)
    machine = machine_info()
    print(header_text(machine))
    if not args.glibc_malloc:
        pick_device()  # on CPU: petbreeds.learn.device.reuse_freed_cpu_memory, as in training

    index = index_images(args.data, IndexParams(label_regex=r"(.+)_\d+.jpg$", min_class_images=2, workers=0))
    print(f"data: {len(index.table)} images from {args.data}", flush=True)
    data = DataParams(
        item_size=args.item_size,
        size=args.size,
        resize_method="crop",
        pad_mode="reflection",
        batch_size=args.bs,
        num_workers=0,
    )
    loader = make_loader(index.table, args.data, index.vocab, data, train=True, seed=42)
    augment = BatchAugment(load_params(ROOT / "params.yaml").augment, args.size, 42, torch.device("cpu"))
    torch.manual_seed(42)
    model = create_model("efficientnet_lite0", len(index.vocab), None).to(memory_format=torch.channels_last)
    (unfreeze if args.phase == "unfrozen" else freeze)(model)
    model.train()
    opt = make_optimizer(param_groups(model), [1e-4] * 3, 0.01)

    terms = ("load", "augment", "forward", "backward", "optimizer")
    times: dict[str, list[float]] = {name: [] for name in terms}
    faults: dict[str, list[int]] = {name: [] for name in terms}
    batches = iter(loader)

    def mark() -> tuple[float, int]:
        return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for step in range(args.steps + 1):
        marks = [mark()]
        x, y = next(batches)
        marks.append(mark())
        x = augment(x, train=True).contiguous(memory_format=torch.channels_last)
        marks.append(mark())
        loss = F.cross_entropy(model(x), y)
        marks.append(mark())
        loss.backward()
        marks.append(mark())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(mark())
        if step > 0:  # the first step pays one-off allocations
            for name, (t0, f0), (t1, f1) in zip(terms, marks, marks[1:], strict=False):
                times[name].append(t1 - t0)
                faults[name].append(f1 - f0)

    medians = {name: statistics.median(v) for name, v in times.items()}
    total = sum(medians.values())
    setup = "glibc malloc defaults" if args.glibc_malloc else "as training sets up the CPU"
    print(
        f"{args.phase}, batch {args.bs}, item {args.item_size} -> {args.size}, {torch.get_num_threads()} threads, "
        f"{setup}"
    )
    print("| term | s / batch | share | page faults / batch |\n|---|---|---|---|")
    rows = [
        {"term": name, "s_per_batch": s, "share": s / total, "page_faults": statistics.median(faults[name])}
        for name, s in medians.items()
    ]
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {seconds / total:.0%} | {statistics.median(faults[name]):,.0f} |")
    print(f"| step | {total:.3f} | {args.bs / total:.1f} images/s | |")
    record = {
        "data": {"path": str(args.data), "images": len(index.table)},
        "setting": {
            "phase": args.phase,
            "batch_size": args.bs,
            "item_size": args.item_size,
            "size": args.size,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
            "malloc": setup,
        },
        "rows": rows,
        "step_s": total,
        "images_per_s": args.bs / total,
    }
    config = args.phase + ("-glibc-malloc" if args.glibc_malloc else "")
    write_result("profile_step", config, record, machine, out=args.out)


if __name__ == "__main__":
    main()
