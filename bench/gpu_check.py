"""A prepared check for a lent CUDA machine (written for one H200, 16 cores, 15 minutes of device time).

    make gpu-wheels     # here, once: pydantic, ruamel.yaml & co. as wheels in .whl/ (the device has no network)
    # on the device, from the repository root, with .whl carried (docs/development.md § "GPU check"):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src && PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT
    # dry run on CPU (tests/test_gpu_check.py):
    .venv/bin/python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check

Sections, each in its own try/except (a failure is a "FAILED: ..." row; the others still run), skipped once
``--budget-s`` (360) is spent; at ``--budget-s`` + ``--grace-s`` (420 s in all) whatever still runs (a hung loader or
collective) is stopped, the table printed and the process ends with exit code 3:

1. tests: pytest (``-q -p no:cacheprovider``, every file: a failure does not stop the rest) on the test files that
   need neither mlflow nor dvc, on CUDA.
2. sample: a full-scale generated sample (37 x 200 = 7,400 images; the real archive has 7,390) at the real photos'
   size and entropy (sides 300-650 px, noise added until a file is ~100 KiB as the real ones), indexed and split like
   the pipeline (random 0.2, seed 42: 5,920 train / 1,480 valid).
3. the library as the stages run it, per arch (resnet34, efficientnet_lite0; random init, bf16, channels_last,
   item 460 -> size 224, batch 64, the loaders' workers and every GPU setting as ``training_data`` makes them):
   ``lr_find`` (100 steps), then ``fit_one_cycle`` for one frozen epoch at its suggestion, ``unfreeze``, one
   unfrozen epoch (each with its validation). Each call is watched by a :class:`Probe`: ``torch.profiler`` over a
   window of steps inside the epoch gives the GPU-busy share (kernel time over wall time) and the data-wait share
   (the DataLoader's ``__next__`` over wall time); ``torch.cuda.set_sync_debug_mode("warn")`` counts the
   synchronising calls per step (and names where they come from); peak allocated and reserved memory.
4. the data and the model alone: the library's training loader by itself (CPU workers decoding); the same JPEGs
   decoded on the device (``torchvision.io.decode_jpeg(device="cuda")``, nvJPEG) and presized there; resnet34 on
   batches held on the device. Decoding on the GPU is worth making the default only where the CPU loader is
   slower than the model.
5. DDP proxy: what one rank of 8 on this machine gets: resnet34 fit for one unfrozen epoch on an eighth of the
   training set with a per-rank batch of 8 and the loader workers the library gives each of 8 processes.
6. fastai: a "not run" row. fastai cannot travel in .whl: ``fastai.vision.all`` imports scipy, scikit-learn,
   fasthtml, requests, rich, ... (with fastai ~55 MB of wheels, compiled ones among them, on top of the ~20 MB the
   library needs), so the lent machine never has it and this check has no fastai run (bench/vs_fastai.py, CPU).

Prints the machine (bench/machine.py, plus the GPU) and ONE Markdown table at the end; with ``--out DIR`` also
writes ``gpu_check.md`` (rewritten after every section, so a killed run keeps what it measured),
``gpu_check.json`` and ``pytest.log``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ARCHS = ("resnet34", "efficientnet_lite0")
N_CLASSES = 37

# The test files that pass without mlflow, dvc (package and CLI), fastai and an installed petbreeds, as on the lent
# machine (PYTHONPATH=src). Checked by running the suite with mlflow* and dvc* imports blocked as
# tests/test_gpu_check.py does and .venv/bin off PATH: these files passed (the stage runs of test_training.py and
# test_evaluate.py too: PETBREEDS_MLFLOW_LIVE=0); test_vs_fastai.py skips itself without fastai. Left out:
# test_tracking.py, test_mlflow_ui.py, test_pipeline_e2e.py (import mlflow), test_check_params.py (runs the dvc CLI),
# test_dvc_yaml.py (reads dvc's plot templates from dvc_render),
# test_cli.py (reads the installed petbreeds distribution's version), test_gpu_check.py (this script's CPU dry run).
# A new test file runs here once it is added. Order: what CUDA changes first, test_distributed.py last (2 ranks under
# torchrun, the slowest): with -x the first failure stops the rest.
DEVICE_TESTS = (
    "tests/test_device.py",
    "tests/test_augment.py",
    "tests/test_model.py",
    "tests/test_training.py",
    "tests/test_lr_find.py",
    "tests/test_predict.py",
    "tests/test_evaluate.py",
    "tests/test_presizing.py",
    "tests/test_show.py",
    "tests/test_interpret.py",
    "tests/test_schedule.py",
    "tests/test_pretrained.py",
    "tests/test_atomic.py",
    "tests/test_bench_machine.py",
    "tests/test_config.py",
    "tests/test_download.py",
    "tests/test_fetch.py",
    "tests/test_imports.py",
    "tests/test_labelling.py",
    "tests/test_sample_data.py",
    "tests/test_splitting.py",
    "tests/test_vs_fastai.py",
    "tests/test_distributed.py",
)
# The CPU dry run (--tiny) proves that section 1 runs pytest and reads its summary, with one quick test: the suite
# runs the device tests anyway, so the dry run does not run a whole file again.
TINY_TESTS = ("tests/test_device.py::test_resolve_precision_on_cpu",)

PHASES = ("lr_find", "frozen epoch", "unfrozen epoch")
# Section names: the first column of the table (tests/test_gpu_check.py expects every one).
SECTIONS = (
    "1 tests (pytest)",
    "2 sample (generate, index, split)",
    *(f"3 {arch}, {phase}" for arch in ARCHS for phase in PHASES),
    "4 data alone, CPU workers (library loader)",
    "4 data alone, device decode (nvJPEG)",
    "4 resnet34 model alone",
    "5 DDP proxy: 1 of 8 ranks, resnet34",
    "6 fastai 2.8.12",
)
COLUMNS = (
    "section",
    "images/s",
    "s / epoch (train)",
    "data wait",
    "GPU busy",
    "syncs / step",
    "peak GPU mem",
    "result",
)


@dataclass(frozen=True)
class Scale:
    """Sizes of one run: the full check, or the tiny CPU dry run."""

    per_breed: int
    # Sample sides: the long side is uniform in [min_side, max_side], the short side long / U(1, 1.6) (at least
    # min_side). 300-650 gives 189k pixels per image on average, what the real archive's typical 500x375 has. The
    # drawn images compress to ~28 KiB (quality 90); Gaussian noise of ``noise`` levels brings them to the ~100 KiB
    # of the real photos (~790 MB / 7,390), so the JPEG decoders have as much entropy to decode.
    min_side: int
    max_side: int
    noise: float
    item_size: int
    size: int
    batch_size: int
    lr_find_steps: int
    bytes_workers: int  # the device-decode path reads bytes only and needs few workers
    model_batches: int  # section 4: pre-augmented batches held on the device, cycled
    model_warmup: int
    model_steps: int


FULL = Scale(
    per_breed=200, min_side=300, max_side=650, noise=18.0, item_size=460, size=224, batch_size=64,
    lr_find_steps=100, bytes_workers=4, model_batches=8, model_warmup=5, model_steps=40,
)  # fmt: skip
TINY = Scale(
    per_breed=3, min_side=48, max_side=96, noise=18.0, item_size=48, size=32, batch_size=16,
    lr_find_steps=8, bytes_workers=1, model_batches=2, model_warmup=1, model_steps=4,
)  # fmt: skip


# The DDP proxy: 8 ranks share the machine's cores and split every global batch of 64 eight ways.
PROXY_RANKS = 8


@dataclass
class Row:
    section: str
    images_per_s: float | None = None
    s_per_epoch: float | None = None
    wait_share: float | None = None
    busy_share: float | None = None
    syncs_per_step: float | None = None
    peak_mem_mib: float | None = None
    reserved_mib: float | None = None
    result: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        def share(value: float | None) -> str:
            return "—" if value is None else f"{value:.0%}"

        memory = "—"
        if self.peak_mem_mib is not None:
            memory = f"{self.peak_mem_mib / 1024:.1f} GiB"
            if self.reserved_mib is not None:
                memory += f" ({self.reserved_mib / 1024:.1f} reserved)"
        return [
            self.section,
            "—" if self.images_per_s is None else f"{self.images_per_s:,.0f}",
            "—" if self.s_per_epoch is None else f"{self.s_per_epoch:.2f}",
            share(self.wait_share),
            share(self.busy_share),
            "—" if self.syncs_per_step is None else f"{self.syncs_per_step:.2f}",
            memory,
            self.result.replace("|", "/").replace("\n", " "),
        ]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The machine


def gpu_header() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["# GPU:     none (CUDA not available to torch)"]
    props = torch.cuda.get_device_properties(0)
    driver = "unknown"
    try:  # the kernel module's version line: "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
        found = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        driver = found.group(1) if found else driver
    except OSError:
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or driver
        except (OSError, subprocess.SubprocessError):
            pass
    api = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()  # e.g. 12080: the CUDA the driver supports
    api_text = f", driver supports CUDA {api // 1000}.{api % 1000 // 10}" if api else ""
    return [
        f"# GPU:     {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, "
        f"{props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}, "
        f"bf16 {'native' if torch.cuda.is_bf16_supported(including_emulation=False) else 'no (emulated at most)'}",
        f"# CUDA:    torch built with CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
        f"driver {driver}{api_text}",
    ]


def host_memory() -> str:
    """RAM, and /dev/shm, where DataLoader workers hand batches over (a container's default 64 MB is too small)."""
    import shutil

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    shm = f"{shutil.disk_usage('/dev/shm').total / 2**30:.1f} GiB" if Path("/dev/shm").is_dir() else "none"
    return f"RAM {ram:.0f} GiB, /dev/shm {shm}"


def header(args: argparse.Namespace, scale: Scale) -> str:
    import torch
    import torchvision

    if str(Path(__file__).resolve().parent) not in sys.path:  # run through runpy (tests/test_gpu_check.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine_header  # bench/machine.py

    from petbreeds.data.dataloaders import default_num_workers

    return "\n".join(
        [
            machine_header(),
            *gpu_header(),
            f"# python:  {sys.version.split()[0]}, torchvision {torchvision.__version__}; {host_memory()}",
            f"# run:     bench/gpu_check.py --device {args.device}{' --tiny' if args.tiny else ''} "
            f"--budget-s {args.budget_s:g}; sample {N_CLASSES} x {scale.per_breed} images, sides "
            f"{scale.min_side}-{scale.max_side} px, noise {scale.noise:g}; item {scale.item_size} -> size "
            f"{scale.size}, batch {scale.batch_size}, bf16 autocast + channels_last, random init (weights none), "
            f"{default_num_workers(-1)} loader workers (the library's rule), {torch.get_num_threads()} CPU threads",
        ]
    )


# --------------------------------------------------------------------------------------------------
# Timing


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(row: Row, device: Any) -> None:
    import torch

    if device.type == "cuda":
        row.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20
        row.reserved_mib = torch.cuda.max_memory_reserved(device) / 2**20


def union_us(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """The time covered by ``intervals`` (µs) within [start, end], overlaps counted once."""
    covered, reach = 0.0, start
    for lo, hi in sorted(intervals):
        lo, hi = max(lo, reach), min(hi, end)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return covered


class Probe:
    """Watches one library call (``lr_find``, ``fit_one_cycle``) through the callbacks it already takes.

    ``callback()`` steps it after every batch. ``torch.profiler`` records a window of ``active`` steps after
    ``wait`` + 1 (cuDNN's autotuning, the workers' first batches and the allocator's growth stay outside); from it
    come the GPU-busy share (the union of the kernels' intervals over the window's wall time) and the data-wait share
    (the DataLoader's ``__next__`` calls over the same). On CUDA every synchronising call the whole call makes is
    counted through ``torch.cuda.set_sync_debug_mode("warn")``, with the line it comes from.
    """

    def __init__(self, device: Any, steps: int) -> None:
        import torch

        self.device = device
        self.wait = min(10, max(1, steps // 4))
        self.active = max(1, min(40, steps - self.wait - 3))
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=self.wait, warmup=1, active=self.active, repeat=1)
        self.profiler = torch.profiler.profile(activities=activities, schedule=schedule)
        self.steps = 0
        self.caught: list[warnings.WarningMessage] = []
        self._warnings = warnings.catch_warnings(record=True)

    def __enter__(self) -> Probe:
        import torch

        reset_peak(self.device)
        self.caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        self.profiler.__enter__()
        self.started = time.perf_counter()
        return self

    def step(self, *_: Any) -> None:
        self.steps += 1
        self.profiler.step()

    def callback(self) -> Any:
        """A ``petbreeds.learn.callbacks.Callback`` that calls :meth:`step` after every batch."""
        from petbreeds.learn.callbacks import Callback

        class Step(Callback):
            def after_batch(_, fit: Any, record: Any) -> None:
                self.step()

        return Step()

    def __exit__(self, *exc: object) -> None:
        import torch

        sync(self.device)
        self.seconds = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(None, None, None)

    def fill(self, row: Row) -> None:
        """The window's shares, the syncs per step and the peak memory into ``row``; where the syncs come from into
        ``row.numbers``."""
        from torch.autograd import DeviceType

        events = self.profiler.events() or []
        marks = [e.time_range for e in events if e.name.startswith("ProfilerStep")]  # "#3", or "*" (torch 2.15)
        if marks:
            start, end = min(r.start for r in marks), max(r.end for r in marks)
            kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
            loads = [(e.time_range.start, e.time_range.end) for e in events if "DataLoader" in e.name]
            wall = max(end - start, 1e-9)
            row.wait_share = union_us(loads, start, end) / wall
            row.busy_share = union_us(kernels, start, end) / wall if self.device.type == "cuda" else None
            row.numbers["profiled_steps"] = self.active
        syncs = [w for w in self.caught if "synchroniz" in str(w.message)]
        if self.device.type == "cuda":
            row.syncs_per_step = len(syncs) / max(1, self.steps)
            sites: dict[str, int] = {}
            for w in syncs:
                site = f"{Path(w.filename).name}:{w.lineno}"
                sites[site] = sites.get(site, 0) + 1
            row.numbers["sync_sites"] = sites
        row.numbers.update(steps=self.steps, call_s=self.seconds)
        peak_memory(row, self.device)


def timed(batches: Iterable[Any], step: Callable[[Any], int], device: Any, warmup: int) -> tuple[int, float]:
    """(images, seconds) of ``step`` over ``batches`` after ``warmup`` untimed ones; the device synchronised at both
    ends only."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(next(iterator))
    sync(device)
    started, images = time.perf_counter(), 0
    for batch in iterator:
        images += step(batch)
    sync(device)
    return images, time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# Path (b): JPEG bytes from the workers, decoded on the device


def add_noise(path: Path, sigma: float) -> None:
    """Gaussian noise of ``sigma`` levels on a drawn JPEG, saved again at quality 90: a real photo's entropy."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    noisy = np.clip(pixels + rng.normal(0.0, sigma, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)


class JpegBytes:
    """A map-style dataset: (the file's bytes as a uint8 tensor, class index). Cheap: a read, no decode."""

    def __init__(self, paths: list[Path], targets: list[int]) -> None:
        self.paths, self.targets = paths, targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from torchvision.io import read_file

        return read_file(str(self.paths[index])), self.targets[index]


def collate_bytes(items: list[tuple[Any, int]]) -> tuple[Any, Any, Any]:
    """(all the files' bytes in one flat uint8 tensor, their lengths, targets): one shared-memory block per batch.

    A list of per-file tensors would cross from the worker as one file descriptor each, and read_file's tensors
    cannot be shared that way at all ("Bad file descriptor" in the worker's feeder thread, and the loader hangs).
    """
    import torch

    datas = [data for data, _ in items]
    lengths = torch.tensor([len(data) for data in datas])
    return torch.cat(datas), lengths, torch.tensor([target for _, target in items])


def split_bytes(flat: Any, lengths: Any) -> list[Any]:
    """The list of per-file byte tensors ``decode_jpeg`` takes, each its own copy (no view into the batch's block)."""
    import torch

    return [part.clone() for part in torch.split(flat, lengths.tolist())]


def bytes_loader(table: Any, raw: Path, vocab: list[str], scale: Scale, seed: int, timeout_s: float) -> Any:
    import torch
    from torch.utils.data import DataLoader

    train = table[table["split"] == "train"]
    index = {label: i for i, label in enumerate(vocab)}
    dataset = JpegBytes([raw / p for p in train["path"]], [index[label] for label in train["label"]])
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=scale.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=scale.bytes_workers,
        persistent_workers=scale.bytes_workers > 0,
        collate_fn=collate_bytes,
        generator=torch.Generator().manual_seed(seed),
        timeout=timeout_s if scale.bytes_workers > 0 else 0,  # a stuck worker is an error, not a hang
    )


def device_presize(datas: list[Any], item_size: int, device: Any, rng: random.Random) -> Any:
    """JPEG bytes -> uint8 [B, 3, item, item] on ``device``: decode (nvJPEG on CUDA, batched), the full short side
    at a random position (the library's train crop), one antialiased bilinear resize (as Pillow's), per image."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    out = torch.empty(len(images), 3, item_size, item_size, dtype=torch.uint8, device=device)
    for k, img in enumerate(images):
        h, w = img.shape[-2:]
        side = min(h, w)
        top, left = int(rng.random() * (h - side)), int(rng.random() * (w - side))
        crop = img[None, :, top : top + side, left : left + side].float()
        resized = F.interpolate(crop, size=(item_size, item_size), mode="bilinear", antialias=True, align_corners=False)
        out[k] = resized[0].round_().clamp_(0, 255)
    return out


# --------------------------------------------------------------------------------------------------
# The check


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = TINY if args.tiny else FULL
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.rows: list[Row] = []
        self.header = ""
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check."))
        self.sample: dict[str, Any] | None = None  # table, vocab, raw, params
        self.data: Any = None  # petbreeds.learn.training.TrainingData, shared by sections 3 and 4
        self.models: dict[str, Any] = {}  # section 3: each arch's model, passed from one phase to the next
        self.suggested: dict[str, float] = {}  # section 3: lr_find's suggestion, the frozen epoch's lr
        self.current = ""  # the section running now
        self.child: subprocess.Popen[str] | None = None  # pytest, while it runs

    # -- plumbing ----------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def section(self, name: str, run: Callable[[Row], None], needs_sample: bool = False) -> None:
        row = Row(name)
        if time.monotonic() > self.deadline:
            row.result = f"skipped: the budget (--budget-s {self.args.budget_s:g}) was spent at {self.elapsed():.0f} s"
        elif needs_sample and self.sample is None:
            row.result = "skipped: no sample (section 2 did not finish)"
        else:
            print(f"== {name} (at {self.elapsed():.0f} s)", flush=True)
            self.current = name
            started = time.perf_counter()
            try:
                run(row)
            except Exception as e:
                traceback.print_exc()
                message = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
                row.result = f"FAILED: {message}"
            print(f"   {name}: {row.result} ({time.perf_counter() - started:.1f} s)", flush=True)
            gc.collect()
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        if self.args.out is None:
            return
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "gpu_check.md").write_text(f"{self.header}\n\n{markdown_table(self.rows)}\n")
        rows = [{**{k: v for k, v in vars(r).items() if k != "numbers"}, **r.numbers} for r in self.rows]
        (self.args.out / "gpu_check.json").write_text(json.dumps({"elapsed_s": self.elapsed(), "rows": rows}, indent=1))

    def params(self, arch: str = "resnet34") -> Any:
        """params.yaml as the check runs it: its sizes, bf16, random init, one epoch per phase; the rest (workers,
        channels_last, deterministic, augmentation) as a user gets it."""
        from petbreeds.config import load_params

        s, base = self.scale, load_params(ROOT / "params.yaml")
        data = dict(item_size=s.item_size, size=s.size, batch_size=s.batch_size)
        one_epoch = {"epochs": 1}
        return base.model_copy(
            update={
                "data": base.data.model_copy(update=data),
                "model": base.model.model_copy(update={"arch": arch, "weights": "none"}),
                "train": base.train.model_copy(update={"precision": "bf16"}),
                "lr_find": base.lr_find.model_copy(update={"num_it": s.lr_find_steps}),
                "train_frozen": base.train_frozen.model_copy(update=one_epoch),
                "train_unfrozen": base.train_unfrozen.model_copy(update=one_epoch),
            }
        )

    # -- 1 tests -----------------------------------------------------------------------------------

    def tests(self, row: Row) -> None:
        files = [f for f in (TINY_TESTS if self.args.tiny else DEVICE_TESTS) if (ROOT / f.split("::")[0]).is_file()]
        # what is left of the budget, less what the measurements need (about 3 minutes on the H200)
        timeout = max(30.0, min(self.args.tests_timeout_s, self.deadline - time.monotonic() - 180))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
        started = time.perf_counter()
        proc = self.child = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and whatever it started (torchrun, stage scripts)
            try:
                output, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:  # a grandchild in a session of its own still holds the pipe
                output = "(pytest killed at the timeout; its output could not be read)"
            timed_out = True
        seconds = time.perf_counter() - started
        if self.args.out is not None:
            self.args.out.mkdir(parents=True, exist_ok=True)
            (self.args.out / "pytest.log").write_text(f"$ {' '.join(cmd)}\n{output}")
        counts = pytest_counts(output)
        row.numbers = {"pytest": counts, "pytest_rc": proc.returncode, "test_files": files}
        summary = ", ".join(f"{n} {word}" for word, n in counts.items()) or "no summary line"
        first_failure = next((line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))), "")
        where = f"{len(files)} files, {seconds:.0f} s"
        if timed_out:
            row.result = f"FAILED: timed out after {timeout:.0f} s ({summary}; {where}); see pytest.log"
        elif proc.returncode != 0 or counts.get("failed") or counts.get("error") or counts.get("errors"):
            first = first_failure or "see pytest.log"
            row.result = f"FAILED: {summary} ({where}, exit {proc.returncode}); first: {first}"
        else:
            row.result = f"ok: {summary} ({where})"

    # -- 2 sample ----------------------------------------------------------------------------------

    def make_sample(self, row: Row) -> None:
        from petbreeds.config import IndexParams, SampleParams, SplitParams
        from petbreeds.data.labelling import index_images
        from petbreeds.data.sample_data import generate_sample
        from petbreeds.data.splitting import split_items

        s = self.scale
        raw = self.work / "raw"
        started = time.perf_counter()
        # a process pool over all cores (sample_data.generate_sample), then again for the noise
        generate_sample(raw, SampleParams(per_breed=s.per_breed, seed=0, min_side=s.min_side, max_side=s.max_side))
        with ProcessPoolExecutor() as pool:
            list(pool.map(add_noise, sorted((raw / "images").glob("*.jpg")), itertools.repeat(s.noise), chunksize=64))
        generated = time.perf_counter()
        regex = self.params().index.label_regex
        index = index_images(raw, IndexParams(label_regex=regex, min_class_images=2, workers=0))  # 0: all cores
        indexed = time.perf_counter()
        table = split_items(index.table, SplitParams(method="random", valid_pct=0.2, seed=42), raw / "annotations")
        counts = table["split"].value_counts()
        short = table[["width", "height"]].min(axis=1)
        self.sample = {"table": table, "vocab": index.vocab, "raw": raw}
        row.numbers = {
            "images": len(table), "train": int(counts.get("train", 0)), "valid": int(counts.get("valid", 0)),
            "generate_s": generated - started, "index_s": indexed - generated,
            "short_side_median": float(short.median()), "bytes_mean": float(table["bytes"].mean()),
        }  # fmt: skip
        row.result = (
            f"ok: {len(table):,} images ({N_CLASSES} classes), {row.numbers['train']:,} train / "
            f"{row.numbers['valid']:,} valid; generated in {generated - started:.0f} s, indexed in "
            f"{indexed - generated:.0f} s; short side {short.min()}-{short.max()} px (median {short.median():.0f}), "
            f"{table['bytes'].mean() / 1024:.0f} KiB per file"
        )

    def training_data(self) -> Any:
        """The library's loaders and augmentation, as the training stages build them; built once and shared: the
        data do not depend on the arch."""
        if self.data is None:
            from petbreeds.learn.training import training_data
            from petbreeds.world import SINGLE_PROCESS

            assert self.sample is not None
            params = self.params()
            self.data = training_data(
                params, self.sample["table"], self.sample["vocab"], self.sample["raw"], seed=params.seed,
                world=SINGLE_PROCESS,
            )  # fmt: skip
        return self.data

    # -- 3 the library, as the stages run it -------------------------------------------------------

    def new_model(self, arch: str) -> Any:
        import torch

        from petbreeds.learn.model import create_model, freeze

        torch.manual_seed(42)
        model = create_model(arch, N_CLASSES, None)
        freeze(model)
        return model

    def lr_find(self, row: Row, arch: str) -> None:
        from petbreeds.learn.lr_find import lr_find

        data, params = self.training_data(), self.params(arch)
        model = self.models[arch] = self.new_model(arch)
        with Probe(data.compute.device, params.lr_find.num_it) as probe:
            result = lr_find(model, data, params.lr_find, params.train_frozen.wd, [probe.callback()])
        probe.fill(row)
        steps = len(result.lrs)
        row.images_per_s = steps * self.scale.batch_size / probe.seconds
        suggestion = result.suggestions[params.lr_find.suggestion]
        if math.isfinite(suggestion):
            self.suggested[arch] = suggestion
        row.numbers.update(lr_find_steps=steps, suggestions=result.suggestions)
        row.result = f"ok: {steps} steps in {probe.seconds:.1f} s; {params.lr_find.suggestion} {suggestion:.2e}"

    def fit(self, row: Row, arch: str, phase_name: str) -> None:
        from petbreeds.learn.callbacks import DivergenceStop
        from petbreeds.learn.model import param_groups, unfreeze
        from petbreeds.learn.schedule import group_lrs
        from petbreeds.learn.training import fit_one_cycle

        data, params = self.training_data(), self.params(arch)
        model = self.models[arch] if arch in self.models else self.new_model(arch)  # lr_find's, if it ran
        if phase_name == "frozen epoch":
            phase, lr = params.train_frozen, self.suggested.get(arch, 1e-3)
        else:
            unfreeze(model)
            phase, lr = params.train_unfrozen, params.train_unfrozen.lr or [1e-5, 1e-3]
        with Probe(data.compute.device, len(data.train_loader)) as probe:
            history = fit_one_cycle(
                model, data, phase, group_lrs(lr, len(param_groups(model))),
                [DivergenceStop(f"gpu_check {arch}"), probe.callback()],
            )  # fmt: skip
        self.models[arch] = model
        probe.fill(row)
        epoch = history[0]
        images = len(data.train_loader) * self.scale.batch_size
        row.images_per_s = epoch["images_per_s"]
        row.s_per_epoch = images / epoch["images_per_s"]
        row.numbers.update(epoch)
        if not math.isfinite(epoch["valid_loss"]):
            raise RuntimeError(f"valid_loss is {epoch['valid_loss']}")
        row.result = (
            f"ok: {len(data.train_loader)} steps + validation {epoch['seconds']:.1f} s; valid_loss "
            f"{epoch['valid_loss']:.3f}, error_rate {epoch['error_rate']:.3f} (random init)"
        )

    # -- 4 the data and the model alone ------------------------------------------------------------

    def data_cpu(self, row: Row) -> None:
        """The library's training loader by itself, one epoch: how fast the CPU workers decode and presize."""
        import torch

        loader = self.training_data().train_loader
        stream = iter(loader)  # endless (EpochShuffle): epoch after epoch
        images, seconds = timed(itertools.islice(stream, len(loader) + 2), lambda b: len(b[1]), torch.device("cpu"), 2)
        row.images_per_s, row.s_per_epoch = images / seconds, seconds
        row.result = f"ok: {loader.num_workers} workers, {images} images in {seconds:.1f} s"

    def data_device(self, row: Row) -> None:
        """The same JPEGs read as bytes by a few workers and decoded and presized on the device, one epoch."""
        assert self.sample is not None
        device = self.training_data().compute.device
        s, sample = self.scale, self.sample
        loader = bytes_loader(sample["table"], sample["raw"], sample["vocab"], s, seed=42, timeout_s=120)
        crops = random.Random(42)

        def step(batch: Any) -> int:
            flat, lengths, y = batch
            device_presize(split_bytes(flat, lengths), s.item_size, device, crops)
            return len(y)

        reset_peak(device)
        images, seconds = timed(loader, step, device, 2)
        row.images_per_s, row.s_per_epoch = images / seconds, seconds
        peak_memory(row, device)
        row.result = f"ok: {s.bytes_workers} workers reading bytes, {images} images in {seconds:.1f} s"
        del loader

    def model_alone(self, row: Row) -> None:
        """resnet34 alone on pre-augmented batches held on the device: the model's own speed, no data path."""
        from petbreeds.learn.feed import train_batches
        from petbreeds.learn.inference import batch_inputs
        from petbreeds.learn.model import param_groups, unfreeze
        from petbreeds.learn.schedule import make_optimizer
        from petbreeds.learn.training import train_step

        data, s = self.training_data(), self.scale
        compute = data.compute
        stream = train_batches(data.train_loader, compute.device)
        batches = [batch_inputs(next(stream), data.augment, compute, train=True) for _ in range(s.model_batches)]
        model = self.new_model("resnet34")
        unfreeze(model)
        compute.place(model)
        model.train()
        opt = make_optimizer(param_groups(model), [1e-4] * 3, 0.01)
        scaler = compute.grad_scaler()

        def step(batch: Any) -> int:
            x, y = batch
            train_step(model, opt, scaler, x, y, compute)
            return len(y)

        reset_peak(compute.device)
        cycled = (batches[i % len(batches)] for i in range(s.model_warmup + s.model_steps))
        images, seconds = timed(cycled, step, compute.device, s.model_warmup)
        row.images_per_s = images / seconds
        peak_memory(row, compute.device)
        row.result = f"ok: {s.model_steps} unfrozen steps of {s.batch_size}, {len(batches)} batches held, cycled"

    # -- 5 DDP proxy -------------------------------------------------------------------------------

    def ddp_proxy(self, row: Row) -> None:
        """One rank of 8 on this machine: an eighth of the images, a per-rank batch of 8, the loader workers the
        library gives each of 8 processes; resnet34, one unfrozen epoch with validation. The gradients' all-reduce
        is left out (one process): this is the rank's own step and data path."""
        from petbreeds.data.dataloaders import default_num_workers
        from petbreeds.learn.callbacks import DivergenceStop
        from petbreeds.learn.model import param_groups, unfreeze
        from petbreeds.learn.schedule import group_lrs
        from petbreeds.learn.training import fit_one_cycle, training_data
        from petbreeds.world import SINGLE_PROCESS

        assert self.sample is not None
        base = self.params()
        workers = default_num_workers(-1, processes=PROXY_RANKS)
        data_params = base.data.model_copy(
            update={"batch_size": base.data.batch_size // PROXY_RANKS, "num_workers": workers}
        )
        params = base.model_copy(update={"data": data_params})
        table = self.sample["table"]
        share = table.iloc[::PROXY_RANKS].reset_index(drop=True)  # an eighth of the train and the valid rows alike
        data = training_data(params, share, self.sample["vocab"], self.sample["raw"], seed=1, world=SINGLE_PROCESS)
        model = self.new_model("resnet34")
        unfreeze(model)
        phase = params.train_unfrozen
        with Probe(data.compute.device, len(data.train_loader)) as probe:
            history = fit_one_cycle(
                model, data, phase, group_lrs(phase.lr or [1e-5, 1e-3], len(param_groups(model))),
                [DivergenceStop("gpu_check ddp proxy"), probe.callback()],
            )  # fmt: skip
        probe.fill(row)
        epoch = history[0]
        images = len(data.train_loader) * data_params.batch_size
        row.images_per_s = epoch["images_per_s"]
        row.s_per_epoch = images / epoch["images_per_s"]
        row.numbers.update(epoch, workers=workers, per_rank_batch=data_params.batch_size)
        row.result = (
            f"ok: {len(data.train_loader)} steps of {data_params.batch_size}, {workers} workers; all ranks together "
            f"would train {PROXY_RANKS * epoch['images_per_s']:,.0f} images/s before the all-reduce's cost"
        )

    # -- 6 fastai ----------------------------------------------------------------------------------

    def fastai(self, row: Row) -> None:
        import importlib.util

        if importlib.util.find_spec("fastai") is None:
            row.result = "not run: fastai not installed (with scipy, scikit-learn, fasthtml, ... it does not fit .whl)"
            return
        import fastai

        # In .venv (the dev extra), never on the lent machine: no fastai run to keep up that could never run there.
        row.result = (
            f"not run: fastai {fastai.__version__} is importable, but its wheels do not travel to the device "
            "(scipy, scikit-learn, fasthtml, ...: over the .whl budget), so this check has no fastai run; "
            "bench/vs_fastai.py compares on CPU"
        )

    # -- all ---------------------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, Callable[[Row], None], bool]]:
        """(section, what runs it, whether it needs the sample), in :data:`SECTIONS` order."""
        steps: list[tuple[str, Callable[[Row], None], bool]] = [(SECTIONS[0], self.tests, False)]
        steps.append((SECTIONS[1], self.make_sample, False))
        for arch in ARCHS:
            steps.append((f"3 {arch}, lr_find", lambda row, arch=arch: self.lr_find(row, arch), True))
            for phase in PHASES[1:]:
                steps.append((f"3 {arch}, {phase}", lambda row, a=arch, p=phase: self.fit(row, a, p), True))
        steps.append((SECTIONS[-5], self.data_cpu, True))
        steps.append((SECTIONS[-4], self.data_device, True))
        steps.append((SECTIONS[-3], self.model_alone, True))
        steps.append((SECTIONS[-2], self.ddp_proxy, True))
        steps.append((SECTIONS[-1], self.fastai, False))
        assert [name for name, _, _ in steps] == list(SECTIONS)
        return steps

    def run(self) -> None:
        import torch

        if self.args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu for a dry run")
        if self.args.tiny:
            # The dry run measures nothing: one thread keeps it at ~40 s on 2 busy cores, where 2 OpenMP threads
            # that spin-wait for each other took ~2 min.
            torch.set_num_threads(1)
        try:
            self.header = header(self.args, self.scale)
        except Exception as e:  # the numbers matter more than the header
            traceback.print_exc()
            self.header = f"# machine: FAILED to describe it: {type(e).__name__}: {e}"
        print(self.header, flush=True)
        watchdog = threading.Timer(max(0.0, self.deadline + self.args.grace_s - time.monotonic()), self.hard_stop)
        watchdog.daemon = True
        watchdog.start()
        for name, run, needs_sample in self.plan():
            if name == SECTIONS[-2]:
                self.data = None  # the shared loaders' persistent workers end here
                self.models.clear()
            self.section(name, run, needs_sample)
        watchdog.cancel()
        self.write()
        print(f"\n{self.header}\n\n{markdown_table(self.rows)}\n\ntotal {self.elapsed():.0f} s", flush=True)

    def hard_stop(self) -> None:
        """Still running at --budget-s + --grace-s (a hung loader, a stuck collective): report what there is, end."""
        limit = self.args.budget_s + self.args.grace_s
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGKILL)
        rows, done = list(self.rows), {row.section for row in self.rows}
        for name in SECTIONS:
            if name == self.current and name not in done:
                rows.append(Row(name, result=f"FAILED: still running at the hard limit ({limit:g} s); stopped"))
            elif name not in done:
                rows.append(Row(name, result=f"skipped: the hard limit ({limit:g} s) was reached"))
        self.rows = rows
        self.write()
        print(f"\n{self.header}\n\n{markdown_table(self.rows)}\n\nstopped at {self.elapsed():.0f} s", flush=True)
        os._exit(3)


def pytest_counts(output: str) -> dict[str, int]:
    """``{"passed": 12, "skipped": 2, ...}`` from pytest's last summary line (``12 passed, 2 skipped in 3.1s``);
    without one (killed at the timeout), the so-far counts from ``-q``'s progress characters (``..s.F [ 40%]``)."""
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line):
            found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line)
            if found:
                return {word: int(n) for n, word in found}
    progress = "".join(m.group(1) for m in re.finditer(r"^([.sFExX]+)\s*(?:\[\s*\d+%\])?$", output, re.MULTILINE))
    names = {".": "passed so far", "s": "skipped so far", "F": "failed so far", "E": "errors so far"}
    return {name: progress.count(char) for char, name in names.items() if progress.count(char)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu hides the GPUs")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, one quick test: the CPU dry run")
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.md, gpu_check.json, pytest.log here")
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip the sections left after this (360)")
    parser.add_argument(
        "--grace-s", type=float, default=60.0, help="past --budget-s + this, report and exit 3 whatever runs (60)"
    )
    parser.add_argument("--tests-timeout-s", type=float, default=200.0, help="pytest's own limit (200)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the library's pick_device sees no GPU
    check = Check(args)
    try:
        check.run()
    finally:
        import shutil

        shutil.rmtree(check.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
