"""What DDP costs per training step on this machine, and what it projects for N GPUs.

    .venv/bin/python bench/ddp_overhead.py [--arch efficientnet_lite0] [--size 224] [--bs 32] [--steps 5]

Side by side in one run: one process training on the global batch, then 2 gloo ranks (launched the way the
training stages launch themselves, ``petbreeds.distributed.launch``) each on half of it with
DistributedDataParallel, and on those ranks the all-reduce of a buffer the size of the model's gradients. Inputs
are random uint8 batches through the library's BatchAugment, so the numbers are the model's step plus DDP, with
no image decoding. All ranks share this machine's cores, so 2 ranks are not expected to be faster on a CPU: the
point is the overhead per step and the gradient all-reduce, from which the projection below is computed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_header

from petbreeds.augment import BatchAugment
from petbreeds.config import DistributedParams, load_params
from petbreeds.device import Compute, pick_device
from petbreeds.distributed import join, launch, leave, mean, wrap
from petbreeds.model import create_model, param_groups, unfreeze
from petbreeds.schedule import make_optimizer
from petbreeds.training import batch_inputs, train_step
from petbreeds.world import World, under_torchrun

ROOT = Path(__file__).resolve().parents[1]
RESULT_ENV = "PETBREEDS_BENCH_RESULT"
NVLINK_BUS_BYTES_PER_S = 300e9  # NCCL's all-reduce bus bandwidth on 8 NVLink-connected H100/H200, roughly
TWO_GLOO_RANKS = DistributedParams(
    nproc_per_node=2, nnodes=1, rdzv_endpoint="", backend="gloo", sync_bn=False, timeout_s=600.0
)


def step_seconds(args: argparse.Namespace, world: World) -> float:
    """Median seconds of one training step on this rank's share of the global batch (after one warm-up step)."""
    params = load_params(ROOT / "params.yaml")
    cpu = pick_device()  # the CPU, with petbreeds' malloc setting, as training runs
    compute = Compute(cpu, None, channels_last=True)
    torch.manual_seed(0)
    model = create_model(args.arch, 37, None)
    unfreeze(model)
    compute.place(model)
    net = wrap(world, model, cpu)
    opt = make_optimizer(param_groups(model), [1e-4] * 3, wd=0.01)
    augment = BatchAugment(params.augment, args.size, seed=0, device=cpu, shard=(world.rank, world.world_size))
    share = args.bs // world.world_size
    x = torch.randint(0, 256, (share, 3, args.item_size, args.item_size), dtype=torch.uint8)
    y = torch.randint(0, 37, (share,))
    times = []
    net.train()
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        xb, yb = batch_inputs((x, y), augment, compute, train=True)
        mean(world, train_step(net, opt, compute.grad_scaler(), xb, yb, compute)).item()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def allreduce_seconds(n_floats: int, repeats: int = 5) -> float:
    buffer = torch.ones(n_floats)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        torch.distributed.all_reduce(buffer)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def rank_main(args: argparse.Namespace) -> None:
    world = join(TWO_GLOO_RANKS)
    seconds = step_seconds(args, world)
    n_grads = sum(p.numel() for p in create_model(args.arch, 37, None).parameters())
    reduce = allreduce_seconds(n_grads)
    if world.is_main:
        Path(os.environ[RESULT_ENV]).write_text(json.dumps({"step": seconds, "allreduce": reduce, "grads": n_grads}))
    leave()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--item-size", type=int, default=460)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=32, help="the global batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (one warm-up step not counted)")
    args = parser.parse_args()
    if under_torchrun():
        rank_main(args)
        return
    print(machine_header())
    one = step_seconds(args, World())
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        os.environ[RESULT_ENV] = result.name
        launch(Path(__file__).resolve(), TWO_GLOO_RANKS, "bench", sys.argv[1:])
        two = json.loads(Path(result.name).read_text())
    grad_mb = two["grads"] * 4 / 2**20
    print(f"\n{args.arch}, {args.item_size} -> {args.size}, global batch {args.bs}, fp32 + channels_last, unfrozen\n")
    print("| | s / step | images/s |")
    print("|---|---|---|")
    print(f"| 1 process, batch {args.bs} | {one:.3f} | {args.bs / one:.1f} |")
    print(f"| 2 gloo ranks, {args.bs // 2} each (DDP) | {two['step']:.3f} | {args.bs / two['step']:.1f} |")
    print(f"\nDDP on 2 ranks vs 1 process: {two['step'] - one:+.3f} s per step ({two['step'] / one:.2f}x)")
    print(
        f"gradients: {two['grads']:,} floats = {grad_mb:.1f} MiB; gloo all-reduce of that size on 2 ranks: "
        f"{two['allreduce'] * 1000:.1f} ms ({grad_mb / two['allreduce']:.0f} MiB/s)"
    )
    allreduce_ms = 2 * 7 / 8 * grad_mb * 2**20 / NVLINK_BUS_BYTES_PER_S * 1000
    print(
        "\nProjection for N GPUs (ring all-reduce, as NCCL does): a step takes about\n"
        "  T(N) = T_compute(batch / N) + 2 (N - 1) / N x gradient bytes / bus bandwidth,\n"
        "and DDP overlaps most of the second term with the backward pass. With the gradients above "
        f"({grad_mb:.1f} MiB) and NVLink's\n~300 GB/s of bus bandwidth per H100/H200 GPU, the all-reduce takes "
        f"{allreduce_ms:.2f} ms at N = 8: scaling is bound by the compute per GPU and by data loading, not by DDP."
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
