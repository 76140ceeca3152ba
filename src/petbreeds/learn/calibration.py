"""What ``train.precision: auto`` becomes on a CPU: fp32 or bf16 autocast, whichever a short calibration measured
faster on this CPU model, cached per CPU model (docs/training.md § "Precision").

    calibration = cpu_autocast_dtype("efficientnet_lite0", 128, 32, True, root / ".cache" / "cpu_precision.json")
    calibration.dtype             # None (fp32) or torch.bfloat16
    calibration.describe()        # "calibrated on AMD EPYC: fp32 0.41 s/step, bf16 0.66 s/step (cached)"

No one rule fits every CPU (docs/design.md § "Precision per CPU model"): where the CPU computes bf16 natively,
resnet34 trains faster in bf16 while efficientnet_lite0's depthwise convolutions stay faster in fp32. So the model
itself is timed, forward + backward as training runs it, on the CPU that will train it. The result is cached per CPU
model, core count, torch build and model shape: every later stage and run on such a machine reads the same choice, and
the same machine and torch build keep giving the same metrics.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock

from petbreeds.atomic import atomic_write_json
from petbreeds.learn.device import autocast, reuse_freed_cpu_memory
from petbreeds.learn.model import create_model
from petbreeds.machine import CPUINFO, cpu_flags, cpu_model, usable_cores

CACHE_NAME = "cpu_precision.json"  # in the project's .cache/ (petbreeds.runtime.CACHE_DIR)
CACHE_FORMAT = "petbreeds-cpu-precision/1"
# cpuinfo flags of native bf16 arithmetic: AVX512-BF16 and AMX on x86, the bf16 extension on Arm ("Features").
# Without one torch emulates bf16 through fp32, which is only slower: such a CPU gets fp32 untimed.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# bf16 must be this much faster to be chosen. Two machines of one CPU model time within a few percent of each
# other; the margin keeps such noise from choosing differently on them (another precision = other metrics).
MIN_SPEEDUP = 1.25
WARMUP_STEPS, TIMED_STEPS = 1, 3
N_CLASSES = 37  # the pets' breeds: the head's size as trained


@dataclass(frozen=True)
class Calibration:
    """What ``auto`` became on this CPU and why: ``dtype`` (None = fp32), the median seconds per forward + backward
    step of each precision (None when not timed), and whether the choice came from the cache."""

    dtype: torch.dtype | None
    cpu: str
    fp32_s: float | None = None
    bf16_s: float | None = None
    from_cache: bool = False

    @property
    def precision(self) -> str:
        return "fp32" if self.dtype is None else "bf16"

    def describe(self) -> str:
        """One short line for the stages' facts (MLflow tag ``stage.<stage>.precision_choice``)."""
        cached = " (cached)" if self.from_cache else ""
        if self.fp32_s is not None and self.bf16_s is not None:
            return f"calibrated on {self.cpu}: fp32 {self.fp32_s:.3g} s/step, bf16 {self.bf16_s:.3g} s/step{cached}"
        if self.from_cache:  # an entry without its timings (written by hand)
            return f"calibrated on {self.cpu}: {self.precision}{cached}"
        return f"fp32: {self.cpu} has no native bf16"

    def announcement(self, cache_file: Path) -> str:
        """The line printed when a calibration has just run (not when the cache answered)."""
        assert self.fp32_s is not None and self.bf16_s is not None, "announcement of an untimed calibration"
        speedup = self.fp32_s / self.bf16_s
        if self.dtype is not None:
            why = f"{speedup:.1f}x faster than fp32"
        elif speedup >= 1:
            why = f"bf16 only {speedup:.2f}x faster, under the {MIN_SPEEDUP}x needed"
        else:
            why = f"bf16 {1 / speedup:.1f}x slower"
        steps = f"{WARMUP_STEPS + TIMED_STEPS}-step calibration"
        return f"train.precision auto on {self.cpu}: {self.precision} ({why} in a {steps}; cached in {cache_file})"


def has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU computes bf16 natively (:data:`NATIVE_BF16_FLAGS`); False where cpuinfo does not say."""
    return not NATIVE_BF16_FLAGS.isdisjoint(cpu_flags(cpuinfo) or ())


def cache_key(arch: str, size: int, batch: int, channels_last: bool, *, cpu: str | None = None) -> str:
    """The cache entry of a model shape on a CPU model (this one unless ``cpu``), core count and torch build with
    the kernels it dispatches to (``ATEN_CPU_CAPABILITY`` can lower them, as `make test-avx2` does): what the timing
    depends on."""
    layout = "channels_last" if channels_last else "contiguous"
    kernels = torch.backends.cpu.get_cpu_capability()
    machine = f"{cpu or cpu_model()} | {usable_cores()} cores | torch {torch.__version__} {kernels}"
    return f"{machine} | {arch} {size}px batch {batch} {layout}"


def _step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> float:
    """One forward + backward as training runs it: autocast, then the loss in fp32
    (petbreeds.learn.training.train_step)."""
    start = time.perf_counter()
    with autocast(x.device, dtype):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_precisions(arch: str, size: int, batch: int, channels_last: bool) -> tuple[float, float]:
    """Median seconds per training step of ``arch`` in fp32 and in bf16 autocast, on random inputs.

    The two alternate step by step, so that load from other processes slows both alike. torch's global RNG is
    left as it was: a stage that calibrates must train exactly as one that read the cache.
    """
    reuse_freed_cpu_memory()  # the allocator setting training runs with (pick_device); it halves a CPU step
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(arch, N_CLASSES, None).train().to(memory_format=fmt)  # unfrozen: the slower phase
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, N_CLASSES, (batch,))
        times: dict[torch.dtype | None, list[float]] = {None: [], torch.bfloat16: []}
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            for dtype, seconds in times.items():
                elapsed = _step_seconds(model, x, y, dtype)
                if step >= WARMUP_STEPS:  # the first steps allocate and pick kernels
                    seconds.append(elapsed)
    return statistics.median(times[None]), statistics.median(times[torch.bfloat16])


def _read_cache(cache_file: Path) -> dict[str, Any]:
    """The cache's entries; empty when the file is absent or not ours (it is a cache: it is rebuilt, never fatal)."""
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def cpu_autocast_dtype(arch: str, size: int, batch: int, channels_last: bool, cache_file: Path) -> Calibration:
    """fp32 or bf16 autocast for training ``arch`` at ``size`` px, ``batch`` images per step on this CPU.

    From ``cache_file`` when it has this machine's entry; else fp32 untimed on a CPU without native bf16; else
    timed (:func:`time_precisions`, a few seconds), bf16 only when at least :data:`MIN_SPEEDUP` times faster, and
    written to the cache with both timings and the date.
    """
    cpu = cpu_model()
    if not has_native_bf16():
        return Calibration(None, cpu)
    key = cache_key(arch, size, batch, channels_last)
    # Stages started together (`dvc queue start -j 2`) calibrate one after the other: the second reads the first's
    # choice instead of timing a machine the first is loading.
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_file.with_name(cache_file.name + ".lock")):
        entries = _read_cache(cache_file)
        entry = entries.get(key)
        if isinstance(entry, dict) and entry.get("choice") in ("fp32", "bf16"):
            dtype = torch.bfloat16 if entry["choice"] == "bf16" else None
            return Calibration(dtype, cpu, entry.get("fp32_s"), entry.get("bf16_s"), from_cache=True)
        fp32_s, bf16_s = time_precisions(arch, size, batch, channels_last)
        dtype = torch.bfloat16 if fp32_s >= MIN_SPEEDUP * bf16_s else None
        entries[key] = {
            "choice": "bf16" if dtype is not None else "fp32",
            "fp32_s": round(fp32_s, 4),
            "bf16_s": round(bf16_s, 4),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
        atomic_write_json(cache_file, {"format": CACHE_FORMAT, "entries": entries})
    return Calibration(dtype, cpu, fp32_s, bf16_s)
