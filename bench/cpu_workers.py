"""Where should a CPU-trained batch be decoded: in DataLoader worker processes, or in the training process between
two steps? Decides what ``data.num_workers: -1`` means when training on the CPU.

    .venv/bin/python bench/cpu_workers.py [--data DIR] [--rounds 2] [--item-size 460] [--size 224] [--bs 32]

Three configurations: one worker per core (fastai's default), none, and one worker with a core of its own (the
step's threads on the other cores). Each trains one real unfrozen epoch of efficientnet_lite0 (``fit_one_cycle``,
fp32 channels_last as the pipeline trains) on the real images, in its own process; the configurations alternate
round by round, so that load from other processes hits them alike. Prints each one's training images/s (median over
rounds) and its ratio to the worker processes' rate. ``--data``: a folder holding images/ (default
../shared/data/oxford-iiit-pet-subset; absent, it stops and says so). Writes the rates and the machine to
bench/results/<date>-cpu_workers[-<sizes>]-<cpu>.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from machine import SHARED_SUBSET, header_text, machine_info, require_images, write_result

from petbreeds.machine import usable_cores

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (460, 224, 32)  # item size, model input size, batch: the book's
# name -> (data.num_workers, the step's threads; None: torch's default, one per core)
CONFIGS = {
    "workers (one per core, fastai's default)": (-2, None),  # -2: one per core, whatever -1 means here
    "no workers (petbreeds' default on a CPU)": (0, None),
    # a core of its own for one worker: no preemption, one core fewer for the step (the rule a many-core CPU may want)
    "one worker, the step on the other cores": (1, max(1, usable_cores() - 1)),
}


def one_epoch(data_root: Path, workers: int, threads: int | None, args: argparse.Namespace) -> float:
    """Training images/s of one unfrozen epoch (validation excluded)."""
    import torch

    from petbreeds.config import IndexParams, OneCycleParams, SplitParams, load_params
    from petbreeds.data.dataloaders import default_num_workers
    from petbreeds.data.labelling import index_images
    from petbreeds.data.splitting import split_items
    from petbreeds.learn.model import create_model, unfreeze
    from petbreeds.learn.schedule import group_lrs
    from petbreeds.learn.training import fit_one_cycle, training_data
    from petbreeds.world import SINGLE_PROCESS

    table = index_images(data_root, IndexParams(label_regex=r"(.+)_\d+.jpg$", min_class_images=2, workers=0)).table
    table = split_items(table, SplitParams(method="random", valid_pct=0.2, seed=42), data_root / "annotations")
    vocab = sorted(set(table["label"]))
    params = load_params(ROOT / "params.yaml")
    n_workers = default_num_workers(-1, cuda=True) if workers == -2 else workers
    data_params = {"item_size": args.item_size, "size": args.size, "batch_size": args.bs, "num_workers": n_workers}
    train = params.train.model_copy(update={"precision": "fp32", "channels_last": True})  # no calibration here
    params = params.model_copy(update={"data": params.data.model_copy(update=data_params), "train": train})
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(42)
    data = training_data(params, table, vocab, data_root, seed=42, world=SINGLE_PROCESS)
    model = create_model("efficientnet_lite0", len(vocab), None)
    unfreeze(model)
    phase = OneCycleParams(epochs=1, pct_start=0.3, div=5.0, div_final=1e5, wd=0.01)
    history = fit_one_cycle(model, data, phase, group_lrs([1e-5, 1e-3], 3))
    return history[0]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=SHARED_SUBSET, help="folder holding images/ (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--item-size", type=int, default=DEFAULT_SIZES[0])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZES[1])
    parser.add_argument("--bs", type=int, default=DEFAULT_SIZES[2])
    parser.add_argument("--out", type=Path, help="write the result here, not to bench/results/ (JSON)")
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # a child: one epoch
    args = parser.parse_args()
    require_images(args.data)
    if args.config:
        print(json.dumps({"images_per_s": one_epoch(args.data, *CONFIGS[args.config], args)}))
        return
    machine = machine_info()
    print(header_text(machine), flush=True)
    images = sum(1 for p in (args.data / "images").iterdir() if p.suffix == ".jpg")
    print(f"data: {images} images in {args.data / 'images'}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            cmd = [sys.executable, __file__, "--config", name, "--data", str(args.data), "--item-size",
                   str(args.item_size), "--size", str(args.size), "--bs", str(args.bs)]  # fmt: skip
            out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            rates[name].append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
            print(f"round {round_ + 1}: {name}: {rates[name][-1]:.2f} images/s", flush=True)
    base = statistics.median(rates[next(iter(CONFIGS))])
    print(f"\n{args.item_size} -> {args.size} px, batch {args.bs}, {args.rounds} rounds (median; spread max - min)\n")
    rows = [
        {"decode": name, "images_per_s": statistics.median(v), "ratio": statistics.median(v) / base,
         "spread": max(v) - min(v), "runs": v}
        for name, v in rates.items()
    ]  # fmt: skip
    print("| decode | train images/s | ratio to workers | spread |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['decode']} | {row['images_per_s']:.2f} | {row['ratio']:.2f}× | {row['spread']:.2f} |")
    sizes = (args.item_size, args.size, args.bs)
    record = {
        "data": {"path": str(args.data), "images": images},
        "setting": {"item_size": args.item_size, "size": args.size, "batch_size": args.bs, "rounds": args.rounds},
        "rows": rows,
    }
    config = None if sizes == DEFAULT_SIZES else "{}to{}-bs{}".format(*sizes)  # the file names other sizes
    write_result("cpu_workers", config, record, machine, out=args.out)


if __name__ == "__main__":
    main()
