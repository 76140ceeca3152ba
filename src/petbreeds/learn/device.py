"""Where and in which precision the model runs (docs/fastai.md §8, fastai's to_fp16 / to_bf16).

    device = pick_device()                                      # on CPU also keeps freed memory for reuse
    compute = Compute(device, resolve_precision(params.train.precision, device), channels_last=True)
    compute.place(model)
    scaler = compute.grad_scaler()
    with compute.autocast():
        logits = model(x)
    loss = loss_fn(logits.float(), y)                            # the loss always in fp32

Weights stay fp32 in every mode; only autocast regions compute in the lower precision. The training stages
build their Compute with ``petbreeds.learn.training.training_compute``, where ``auto`` on a CPU is timed per CPU
model (``petbreeds.learn.calibration``), and evaluate computes in the precision they recorded
(``petbreeds.learn.inference.compute_as_trained``); here ``auto`` on a CPU is fp32, what serving uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from petbreeds.errors import PetbreedsError

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Free memory at the top of the heap beyond this is given back to the OS; below it, kept for the next step.
_TRIM_THRESHOLD_BYTES = 1 << 30


def pick_device(local_rank: int = 0) -> torch.device:
    """CUDA when available (GPU ``local_rank``: one per process on the machine), else the CPU (after
    :func:`reuse_freed_cpu_memory`: training runs there)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    reuse_freed_cpu_memory()
    return torch.device("cpu")


@functools.cache
def reuse_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of unmapping them; False where there is no glibc.

    By default glibc serves every block over 32 MiB with its own mmap and unmaps it on free. A CPU training step
    allocates activations that large dozens of times (efficientnet_lite0, batch 32 at 224 px: 51 MiB for the stem's
    output alone), so every step page-faults and zeroes gigabytes afresh: half of the step's time on our 2-core
    machines (docs/design.md § "CPU memory"). Serving them from the heap, and trimming it only past 1 GiB free, lets
    each step reuse the previous step's pages. What jemalloc or tcmalloc would give, without an LD_PRELOAD.

    The kept pages must not be there when a DataLoader forks its workers: the child would share them copy-on-write,
    and the next training step would copy every page it touches (6 s for the first unfrozen step after the
    validation workers started). So the free pages go back to the OS before each fork (``malloc_trim``).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return False
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)):
        return False
    os.register_at_fork(before=lambda: libc.malloc_trim(0))
    return True


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` -> the autocast dtype, or None for fp32.

    auto: the fastest, not the book's (fp32; run (h) fp16): bf16 on a CUDA device that supports it, else fp16 on
    CUDA (with a grad scaler), and fp32 on CPU. That CPU answer is serving's (petbreeds.serve.predict); training on
    a CPU asks :func:`petbreeds.learn.calibration.cpu_autocast_dtype` instead (via
    ``petbreeds.learn.training.training_compute``), which times fp32 against bf16 on the CPU model at hand: no one
    rule fits every CPU (docs/design.md § "Precision per CPU model").
    The stages record what it became (``Compute.precision``) and why (``Compute.precision_choice``).
    """
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise PetbreedsError(
                "params.yaml: train.precision fp16 needs a CUDA GPU; use fp32, bf16 or auto on CPU "
                "(with a recipe: dvc exp run ... -S train.precision=fp32)"
            )
        return torch.float16
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16_on_gpu() else torch.float16
        return None
    raise PetbreedsError(f"params.yaml: train.precision must be one of auto, fp32, bf16, fp16, got {name!r}")


def native_bf16_on_gpu() -> bool:
    """Whether this GPU computes bf16 in hardware (Ampere and later); torch's default check also counts the
    emulation older GPUs offer, which is slower than fp16 there."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def configure_gpu(deterministic: bool) -> None:
    """cuDNN times its kernels for each input shape once and keeps the fastest (``benchmark``: the shapes of a
    training run never change), unless ``train.deterministic`` asks for kernels that give the same bits every run:
    cuDNN's deterministic ones, torch's deterministic algorithms (an op without one raises) and cuBLAS's fixed
    workspace."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)


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


class HostCopy:
    """A 0-d tensor's value on its way to the host: on a GPU, copied into pinned memory right behind the work that
    computes it, so that :meth:`value` waits for that copy alone, not for what the device was given since (a training
    loop reads a step's loss after queuing the next step, and the GPU never runs dry). On a CPU, the tensor itself."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._done: torch.cuda.Event | None = None
        self._host = tensor
        if tensor.device.type == "cuda":
            self._host = torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()

    def value(self) -> float:
        if self._done is not None:
            self._done.synchronize()
        return self._host.item()


@dataclass(frozen=True)
class Compute:
    """Where and how the model computes: the device, the autocast dtype (None = fp32) and the memory layout.

    ``precision_choice``: how the dtype was chosen, in a few words, for the stages' facts (what ``auto`` became is
    worth nothing without why: a calibration's timings on which CPU, or params.yaml).
    """

    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    compile: bool = False
    precision_choice: str = "set in params.yaml"

    def place(self, model: nn.Module) -> None:
        """Move ``model`` here, in channels_last layout when asked (in place: the Parameters stay the same)."""
        model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)

    def for_training(self, net: nn.Module) -> nn.Module:
        """``net`` (the model, or its DDP wrapper) as the training loop calls it: ``torch.compile``'d when asked.

        The compiled graphs land in ``TORCHINDUCTOR_CACHE_DIR`` (the project's ``.cache/``, set by
        :func:`petbreeds.runtime.use_project_cache`), so only the first run on a machine and torch build compiles.
        Random ops (the head's dropout) draw from torch's own generator as in eager mode (inductor's
        ``fallback_random``): compiling changes the speed and the last bits of the floats, not the experiment.
        """
        return torch.compile(net, options={"fallback_random": True}) if self.compile else net

    def facts(self) -> dict[str, str]:
        """What a stage records of it (``StageContext.record``): the precision used and how it was chosen."""
        return {"precision": self.precision, "precision_choice": self.precision_choice}

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.device, self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return make_grad_scaler(self.device, self.dtype)

    @property
    def precision(self) -> str:
        """The precision actually used, in ``train.precision``'s words (what ``auto`` became): fp32, bf16 or fp16."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
