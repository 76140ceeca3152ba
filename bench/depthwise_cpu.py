"""What efficientnet_lite0's depthwise convolutions cost in an unfrozen CPU step, and what a fused weight gradient
would save: a lever of issue 17 measured, not used.

    .venv/bin/python bench/depthwise_cpu.py [--size 224] [--bs 32] [--repeats 5]

For each depthwise convolution of the model at ``--size`` (shapes recorded by a forward pass), on random channels_last
tensors as the pipeline trains: oneDNN's weight gradient and input gradient (``aten.convolution_backward``, one
output at a time), and the weight gradient as a sum of shifted products compiled by ``torch.compile`` (inductor
fuses the k x k reductions into one pass over the activation, where oneDNN reads it k x k times). Best of
``--repeats`` after a warm-up; each compiled shape compiles once (a fresh inductor cache, its seconds printed).
The frozen phase computes no convolution weight gradient, so only train_unfrozen would gain; the unfrozen step it
is part of is measured by bench/profile_step.py.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from data_pipeline import best_of
from machine import machine_header
from torch import nn

from petbreeds.device import pick_device
from petbreeds.model import create_model


def depthwise_convs(size: int) -> list[nn.Conv2d]:
    """The model's depthwise convolutions, each with its input shape at batch 1 in ``conv.input_hw``."""
    model = create_model("efficientnet_lite0", 37, None)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    hooks = [c.register_forward_hook(lambda m, args, _out: setattr(m, "input_hw", args[0].shape[2:])) for c in convs]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return convs


def onednn_grad(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, weight: bool) -> torch.Tensor:
    mask = [not weight, weight, False]
    grads = torch.ops.aten.convolution_backward(
        grad_out, x, conv.weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups, mask
    )
    return grads[1] if weight else grads[0]


def shifted_products(x: torch.Tensor, grad_out: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """The depthwise weight gradient [C, 1, k, k]: for each tap, the shifted input times the output gradient, summed."""
    pad = k // 2
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = grad_out.shape[2:]
    taps = [
        (padded[:, :, i : i + (h - 1) * stride + 1 : stride, j : j + (w - 1) * stride + 1 : stride] * grad_out).sum(
            (0, 2, 3)
        )
        for i in range(k)
        for j in range(k)
    ]
    return torch.stack(taps, 1).view(-1, 1, k, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_header(), flush=True)
    pick_device()  # on CPU: petbreeds.device.reuse_freed_cpu_memory, as in training
    torch._dynamo.config.recompile_limit = 64  # one graph per layer shape, more than the default 8
    fused = torch.compile(shifted_products, dynamic=False)
    no_sync: Callable[[], None] = lambda: None  # noqa: E731 (CPU kernels return when done)
    totals: dict[str, float] = {}
    print("\n| layer | k | stride | input | oneDNN weight grad ms | oneDNN input grad ms | fused weight grad ms | "
          "compile s | max rel. difference |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="inductor.") as cache, torch.no_grad():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: the compile seconds are what a first run pays
        for n, conv in enumerate(depthwise_convs(args.size)):
            k, stride = conv.kernel_size[0], conv.stride[0]
            x = torch.randn(args.bs, conv.in_channels, *conv.input_hw).contiguous(memory_format=torch.channels_last)
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
            grad_out = torch.randn_like(conv(x))
            weight_grad = best_of(lambda: onednn_grad(conv, x, grad_out, True), args.repeats, no_sync)  # noqa: B023
            input_grad = best_of(lambda: onednn_grad(conv, x, grad_out, False), args.repeats, no_sync)  # noqa: B023
            started = time.perf_counter()
            ours = fused(x, grad_out, k, stride)
            compile_s = time.perf_counter() - started
            fused_grad = best_of(lambda: fused(x, grad_out, k, stride), args.repeats, no_sync)  # noqa: B023
            reference = onednn_grad(conv, x, grad_out, True)
            difference = ((ours - reference).abs().max() / reference.abs().max()).item()
            for key, seconds in (("weight", weight_grad), ("input", input_grad), ("fused", fused_grad)):
                totals[key] = totals.get(key, 0.0) + seconds
                totals[f"{key} {k}x{k}"] = totals.get(f"{key} {k}x{k}", 0.0) + seconds
            print(f"| {n} | {k} | {stride} | {conv.in_channels}x{conv.input_hw[0]}x{conv.input_hw[1]} | "
                  f"{weight_grad * 1e3:.1f} | {input_grad * 1e3:.1f} | {fused_grad * 1e3:.1f} | {compile_s:.1f} | "
                  f"{difference:.1e} |", flush=True)  # fmt: skip
    print(f"\nefficientnet_lite0, {args.size} px, batch {args.bs}, fp32 channels_last; seconds per step, all layers:")
    for kind in ("", " 3x3", " 5x5"):
        weight, input_, fused_ = (totals[f"{key}{kind}"] for key in ("weight", "input", "fused"))
        print(f"  depthwise{kind or ' (all)'}: oneDNN weight grad {weight:.3f}, input grad {input_:.3f}; "
              f"fused weight grad {fused_:.3f} (oneDNN / fused {weight / fused_:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
