"""Does bf16 autocast (and channels_last) make CPU training faster? Decides `train.precision: auto` on CPU.

    .venv/bin/python bench/precision_cpu.py [--archs efficientnet_lite0 resnet34] [--sizes 128 224] [--steps 3]

Times forward + backward of the real model (body + fastai head, train mode, batch 32 as in the recipe) on 2 threads
with petbreeds' malloc setting as in training, for fp32 and bf16 autocast, channels_last off and on, and prints each
time relative to fp32 without channels_last (ratio < 1 = faster). Configurations are interleaved step by step so
that load from other processes hits them alike; the median step is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import machine_header

from petbreeds.device import autocast, reuse_freed_cpu_memory
from petbreeds.model import create_model

CONFIGS = [(dtype, cl) for dtype in (None, torch.bfloat16) for cl in (False, True)]


def _label(dtype: torch.dtype | None, channels_last: bool) -> str:
    return f"{'bf16' if dtype else 'fp32'}{' +channels_last' if channels_last else ''}"


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Seconds of one forward + backward, the loss in fp32 as in training."""
    start = time.perf_counter()
    with autocast(torch.device("cpu"), dtype):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench(arch: str, size: int, batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(arch, 37, None).train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 37, (batch,))
    times: dict[str, list[float]] = {_label(*c): [] for c in CONFIGS}
    for step in range(steps + 1):  # step 0 warms up every configuration
        for dtype, channels_last in CONFIGS:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=fmt)
            seconds = step_time(model, x.contiguous(memory_format=fmt), y, dtype)
            if step:
                times[_label(dtype, channels_last)].append(seconds)
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet34"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(machine_header())
    torch.set_num_threads(args.threads)
    reuse_freed_cpu_memory()  # as training on the CPU does (petbreeds.device.pick_device)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, median of {args.steps} steps")
    print(f"{'arch':<20}{'size':>6}  {'config':<22}{'s/step':>8}{'ratio':>8}")
    for arch in args.archs:
        for size in args.sizes:
            medians = bench(arch, size, args.batch, args.steps)
            base = medians[_label(None, False)]
            for label, seconds in medians.items():
                print(f"{arch:<20}{size:>6}  {label:<22}{seconds:>8.3f}{seconds / base:>8.2f}")


if __name__ == "__main__":
    main()
