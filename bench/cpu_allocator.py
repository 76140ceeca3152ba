"""What glibc's default malloc costs a CPU training step, and what ``petbreeds.device.reuse_freed_cpu_memory`` wins.

    .venv/bin/python bench/cpu_allocator.py [--arch efficientnet_lite0] [--size 224] [--bs 32] [--steps 5] [--rounds 2]

Times the real training step (body + fastai head, unfrozen, train mode, fp32, channels_last: forward, backward,
AdamW) in a child process per measurement, glibc's defaults and petbreeds' setting alternating, ``rounds`` times
each, and prints the median seconds and page faults per step and the ratio. Children, because the setting is
process-wide and cannot be taken back. Peak RSS is the larger of the two processes per mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from machine import machine_header

from petbreeds.device import reuse_freed_cpu_memory
from petbreeds.model import create_model, param_groups, unfreeze
from petbreeds.schedule import make_optimizer

MODES = ("glibc default", "petbreeds (reuse)")


def measure(arch: str, size: int, bs: int, steps: int) -> dict[str, float]:
    """Median seconds and mean minor page faults per step (after one warm-up step), and the peak RSS in MiB."""
    torch.manual_seed(0)
    model = create_model(arch, 37, None).to(memory_format=torch.channels_last).train()
    unfreeze(model)
    opt = make_optimizer(param_groups(model), [1e-4] * 3, 0.01)
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 37, (bs,))
    seconds, faults = [], []
    for step in range(steps + 1):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            seconds.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"s_per_step": statistics.median(seconds), "faults_per_step": statistics.mean(faults), "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="child processes per mode, alternating")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == MODES[1] and not reuse_freed_cpu_memory():
            raise SystemExit("reuse_freed_cpu_memory() does not apply here (no glibc)")
        print(json.dumps(measure(args.arch, args.size, args.bs, args.steps)))
        return
    print(machine_header())
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
            results[mode].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(f"{args.arch}, batch {args.bs} at {args.size} px, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps x {args.rounds} processes per mode\n")  # fmt: skip
    print("| malloc | s / step | page faults / step | images/s | peak RSS MiB |\n|---|---|---|---|---|")
    medians = {}
    for mode, runs in results.items():
        medians[mode] = statistics.median(r["s_per_step"] for r in runs)
        faults = statistics.median(r["faults_per_step"] for r in runs)
        peak = max(r["peak_mib"] for r in runs)
        print(f"| {mode} | {medians[mode]:.3f} | {faults:,.0f} | {args.bs / medians[mode]:.1f} | {peak:,.0f} |")
    print(f"\nspeed-up: {medians[MODES[0]] / medians[MODES[1]]:.2f}x")


if __name__ == "__main__":
    main()
