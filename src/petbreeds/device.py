"""Where and in which precision the model runs (spec §8, fastai's to_fp16 / to_bf16).

    device = pick_device()
    dtype = resolve_precision(params.train.precision, device)   # None = plain fp32
    scaler = make_grad_scaler(device, dtype)
    with autocast(device, dtype):
        logits = model(x)
    loss = loss_fn(logits.float(), y)                            # the loss always in fp32

Weights stay fp32 in every mode; only autocast regions compute in the lower precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from petbreeds.errors import PetbreedsError

# What `train.precision: auto` means on CPU, from bench/precision_cpu.py (README § Model): fp32 trains faster than
# bf16 autocast on these CPUs for efficientnet_lite0 and resnet34 at 128 and 224 px.
CPU_AUTO_DTYPE: torch.dtype | None = None


def pick_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` -> the autocast dtype, or None for fp32.

    auto: bf16 on a CUDA device that supports it, else fp16 on CUDA (with a grad scaler), and on CPU what
    bench/precision_cpu.py measured faster (``CPU_AUTO_DTYPE``).
    """
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise PetbreedsError("params.yaml: train.precision fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
        return torch.float16
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return CPU_AUTO_DTYPE
    raise PetbreedsError(f"params.yaml: train.precision must be one of auto, fp32, bf16, fp16, got {name!r}")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``dtype`` on ``device``; a no-op for None (fp32)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fastai's fp16 loss scaling (torch defaults); disabled (a pass-through) unless fp16 on CUDA."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)
