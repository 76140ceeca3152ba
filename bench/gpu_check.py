"""A prepared check for a lent CUDA machine (written for one H200, 16 cores, 15 minutes of device time).

    make gpu-wheels     # here, once: pydantic, ruamel.yaml & co. as wheels in .whl/ (the device has no network)
    # on the device, from the repository root, with .whl carried (README § Development, "GPU check"):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src && PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT
    # dry run on CPU (tests/test_gpu_check.py):
    .venv/bin/python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check

Sections, each in its own try/except (a failure is a "FAILED: ..." row; the others still run), skipped once
``--budget-s`` (420) is spent; at ``--budget-s`` + ``--grace-s`` (480 s in all) whatever still runs (a hung loader or
collective) is stopped, the table printed and the process ends with exit code 3:

1. tests: pytest (``-x -q -p no:cacheprovider``) on the test files that need neither mlflow nor dvc, on CUDA.
2. sample: a full-scale generated sample (37 x 200 = 7,400 images; the real archive has 7,390), indexed and split
   like the pipeline (random 0.2, seed 42: 5,920 train / 1,480 valid).
3. one unfrozen training epoch (``create_model(arch, 37, None)`` + ``unfreeze``: the heavier phase, every layer's
   backward) of resnet34 and efficientnet_lite0, item 460 -> size 224, batch 64, bf16 autocast + channels_last,
   over two data paths:
   (a) decode + presize on the DataLoader workers (the library's ``training_data`` loaders);
   (b) the raw JPEG bytes from the workers, decoded on the device by ``torchvision.io.decode_jpeg`` (nvJPEG),
       square-cropped and resized to 460 with torch ops, then the library's ``BatchAugment``.
   The epochs are timed by a small loop that mirrors ``fit_one_cycle``'s steps (``batch_inputs``, ``train_step``,
   ``.item()``, the one-cycle schedule), not by ``fit_one_cycle`` itself, to see how long each step waits for the loader
   (``cuda.synchronize()`` at every step boundary; ``fit_one_cycle``'s ``.item()`` syncs there too). A few batches
   of a discarded partial epoch warm up first (workers, cudnn autotune, the allocator). Then ``fit_one_cycle``
   itself, one epoch with validation, on path (a): the library's own numbers.
4. DDP: a process group of one (NCCL on CUDA, gloo on CPU) and the model under ``DistributedDataParallel``
   directly (``petbreeds.learn.distributed.wrap`` returns the bare model for one process), on pre-augmented batches
   held on the device, against the bare model on the same batches: the model-only speed and DDP's overhead. Then
   the bare model as ``train.compile: true`` trains it (torch.compile, cold cache): the compile time of the first
   forward + backward and the steady speed against the bare model's.
5. fastai: a "not run" row. fastai cannot travel in .whl: ``fastai.vision.all`` imports scipy, scikit-learn,
   fasthtml, requests, rich, ... (with fastai ~55 MB of wheels, compiled ones among them, on top of the ~20 MB the
   library needs), so the lent machine never has it and this check has no fastai run (bench/vs_fastai.py, CPU).

Prints the machine (bench/machine.py, plus the GPU) and ONE Markdown table at the end; with ``--out DIR`` also
writes ``gpu_check.md`` (rewritten after every section, so a killed run keeps what it measured),
``gpu_check.json`` and ``pytest.log``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
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
TINY_TESTS = ("tests/test_device.py",)

# Section names: the first column of the table (tests/test_gpu_check.py expects every one).
SECTIONS = (
    "1 tests (pytest)",
    "2 sample (generate, index, split)",
    *(f"3{p} {arch}, {path}" for arch in ARCHS for p, path in (("a", "CPU decode"), ("b", "device decode"))),
    *(f"3c {arch}, fit_one_cycle (library)" for arch in ARCHS),
    "4 resnet34 model only, bare",
    "4 resnet34 model only, DDP (1 process)",
    "4 resnet34 model only, train.compile",
    "5 fastai 2.8.12",
)
COLUMNS = ("section", "images/s", "s / epoch (train)", "data wait", "peak GPU mem", "result")


@dataclass(frozen=True)
class Scale:
    """Sizes of one run: the full check, or the tiny CPU dry run."""

    per_breed: int
    # Sample sides: the long side is uniform in [min_side, max_side], the short side long / U(1, 1.6) (at least
    # min_side). 300-650 gives 189k pixels per image on average, what the real archive's typical 500x375 has, and
    # short sides of 300-544 px for 90% of the images (median 366), as the real ones are mostly 300-500 px. The real
    # archive also has a few percent of larger photos, up to ~2,500 px; a uniform long side reaching that far would
    # make most images huge, so that tail is left out. Path (a) decodes such photos in JPEG draft mode at 1/2-1/4
    # scale (a few times a typical image's cost); nvJPEG in path (b) decodes them whole. And the drawn images compress
    # to ~28 KiB (quality 90) against ~105 KiB for the real photos (~790 MB / 7,390): less entropy decoding per image.
    # So both data paths may read fast; section 2's row gives the sample's file size.
    min_side: int
    max_side: int
    item_size: int
    size: int
    batch_size: int
    workers: int  # DataLoader workers of path (a); path (b) reads bytes only and needs fewer
    bytes_workers: int
    warmup_steps: int
    model_batches: int  # section 4: pre-augmented batches held on the device, cycled
    model_warmup: int
    model_steps: int


FULL = Scale(
    per_breed=200, min_side=300, max_side=650, item_size=460, size=224, batch_size=64,
    workers=12, bytes_workers=4, warmup_steps=6, model_batches=8, model_warmup=5, model_steps=40,
)  # fmt: skip
TINY = Scale(
    per_breed=4, min_side=64, max_side=120, item_size=64, size=48, batch_size=16,
    workers=1, bytes_workers=1, warmup_steps=1, model_batches=2, model_warmup=1, model_steps=4,
)  # fmt: skip


@dataclass
class Row:
    section: str
    images_per_s: float | None = None
    s_per_epoch: float | None = None
    wait_share: float | None = None
    peak_mem_mib: float | None = None
    result: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        return [
            self.section,
            "—" if self.images_per_s is None else f"{self.images_per_s:,.0f}",
            "—" if self.s_per_epoch is None else f"{self.s_per_epoch:.2f}",
            "—" if self.wait_share is None else f"{self.wait_share:.0%}",
            "—" if self.peak_mem_mib is None else f"{self.peak_mem_mib / 1024:.1f} GiB",
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

    return "\n".join(
        [
            machine_header(),
            *gpu_header(),
            f"# python:  {sys.version.split()[0]}, torchvision {torchvision.__version__}; {host_memory()}",
            f"# run:     bench/gpu_check.py --device {args.device}{' --tiny' if args.tiny else ''} "
            f"--budget-s {args.budget_s:g}; sample {N_CLASSES} x {scale.per_breed} images, sides "
            f"{scale.min_side}-{scale.max_side} px; item {scale.item_size} -> size {scale.size}, batch "
            f"{scale.batch_size}, bf16 autocast + channels_last, unfrozen, random init (weights none), "
            f"{scale.workers} loader workers (path b: {scale.bytes_workers}), {torch.get_num_threads()} CPU threads",
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


def peak_mib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@dataclass
class Timing:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    wait: float = 0.0  # waiting for the loader's next batch
    partial: bool = False  # stopped at the deadline before the epoch ended


def timed_steps(
    batches: Iterable[Any], step: Callable[[Any], int], device: Any, deadline: float, limit: int | None = None
) -> Timing:
    """Run ``step`` on each batch (at most ``limit``); wall time, and the time spent waiting for the next batch
    (from the end of one step, the device synchronised, to the batch's arrival)."""
    timing = Timing()
    sync(device)
    started = ended = time.perf_counter()
    iterator = iter(batches)
    while limit is None or timing.steps < limit:
        if time.monotonic() > deadline:
            timing.partial = True
            break
        try:
            batch = next(iterator)
        except StopIteration:
            break
        timing.wait += time.perf_counter() - ended
        timing.images += step(batch)
        sync(device)
        ended = time.perf_counter()
        timing.steps += 1
    timing.seconds = ended - started
    return timing


# --------------------------------------------------------------------------------------------------
# Path (b): JPEG bytes from the workers, decoded on the device


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
        self.data_a: Any = None  # petbreeds.learn.training.TrainingData of path (a), shared by the sections
        self.held: tuple[Any, list[Any]] | None = None  # section 4: the model and the batches on the device
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
        rows = [{"section": r.section, "images_per_s": r.images_per_s, "s_per_epoch": r.s_per_epoch,
                 "wait_share": r.wait_share, "peak_mem_mib": r.peak_mem_mib, "result": r.result, **r.numbers}
                for r in self.rows]  # fmt: skip
        (self.args.out / "gpu_check.json").write_text(json.dumps({"elapsed_s": self.elapsed(), "rows": rows}, indent=1))

    def params(self, arch: str = "resnet34") -> Any:
        from petbreeds.config import load_params

        s, base = self.scale, load_params(ROOT / "params.yaml")
        data = dict(item_size=s.item_size, size=s.size, batch_size=s.batch_size, num_workers=s.workers)
        return base.model_copy(
            update={
                "data": base.data.model_copy(update=data),
                "model": base.model.model_copy(update={"arch": arch, "weights": "none"}),
                "train": base.train.model_copy(update={"precision": "bf16", "channels_last": True}),
                "train_unfrozen": base.train_unfrozen.model_copy(update={"epochs": 1}),
            }
        )

    # -- 1 tests -----------------------------------------------------------------------------------

    def tests(self, row: Row) -> None:
        files = [f for f in (TINY_TESTS if self.args.tiny else DEVICE_TESTS) if (ROOT / f).is_file()]
        # what is left of the budget, less what the measurements need (about 3 minutes on the H200)
        timeout = max(30.0, min(self.args.tests_timeout_s, self.deadline - time.monotonic() - 180))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files]
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
        # a process pool over all cores (sample_data.generate_sample)
        generate_sample(raw, SampleParams(per_breed=s.per_breed, seed=0, min_side=s.min_side, max_side=s.max_side))
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

    def training_data_a(self) -> Any:
        """The library's loaders and augmentation (path a), built once: the data do not depend on the arch."""
        if self.data_a is None:
            from petbreeds.learn.training import training_data
            from petbreeds.world import SINGLE_PROCESS

            assert self.sample is not None
            params = self.params()
            self.data_a = training_data(
                params, self.sample["table"], self.sample["vocab"], self.sample["raw"], seed=params.seed,
                world=SINGLE_PROCESS,
            )  # fmt: skip
        return self.data_a

    # -- 3 one epoch -------------------------------------------------------------------------------

    def new_model(self, arch: str) -> Any:
        import torch

        from petbreeds.learn.model import create_model, unfreeze

        torch.manual_seed(42)
        model = create_model(arch, N_CLASSES, None)
        unfreeze(model)
        return model

    def epoch(self, row: Row, arch: str, path: str) -> None:
        from petbreeds.learn.model import param_groups
        from petbreeds.learn.schedule import group_lrs, make_one_cycle, make_optimizer
        from petbreeds.learn.training import batch_inputs, train_step

        data = self.training_data_a()
        compute, s = data.compute, self.scale
        phase = self.params(arch).train_unfrozen
        reset_peak(compute.device)
        model = self.new_model(arch)
        compute.place(model)
        model.train()
        if path == "a":
            loader = data.train_loader
        else:
            assert self.sample is not None
            sample = self.sample
            loader = bytes_loader(sample["table"], sample["raw"], sample["vocab"], s, seed=42, timeout_s=120)
        n_batches = len(loader)
        opt = make_optimizer(param_groups(model), group_lrs(phase.lr, 3), phase.wd)
        sched = make_one_cycle(opt, s.warmup_steps + n_batches, phase.pct_start, phase.div, phase.div_final)
        scaler = compute.grad_scaler()
        crops = random.Random(42)
        decode_s = 0.0

        def step(batch: Any) -> int:
            nonlocal decode_s
            if path == "b":
                started = time.perf_counter()
                flat, lengths, y = batch
                batch = (device_presize(split_bytes(flat, lengths), s.item_size, compute.device, crops), y)
                sync(compute.device)
                decode_s += time.perf_counter() - started
            x, y = batch_inputs(batch, data.augment, compute, train=True)
            loss = train_step(model, opt, scaler, x, y, compute).item()
            sched.step()
            if not math.isfinite(loss):
                raise RuntimeError(f"the training loss is {loss}")
            return len(y)

        timed_steps(loader, step, compute.device, self.deadline, limit=s.warmup_steps)  # a discarded partial epoch
        decode_s = 0.0
        t = timed_steps(loader, step, compute.device, self.deadline)  # one full epoch
        row.images_per_s = t.images / t.seconds
        row.s_per_epoch = t.seconds
        row.wait_share = t.wait / t.seconds
        row.peak_mem_mib = peak_mib(compute.device)
        row.numbers = {"steps": t.steps, "images": t.images, "seconds": t.seconds, "wait_s": t.wait}
        notes = [f"{t.steps} steps of {s.batch_size} in {t.seconds:.1f} s"]
        if path == "b":
            row.numbers["decode_s"] = decode_s
            notes.append(f"decode + crop + resize {decode_s / t.seconds:.0%} of the epoch")
        if t.partial:
            notes.append(f"PARTIAL: the budget ran out after {t.steps} of {n_batches} steps")
        row.result = "ok: " + "; ".join(notes)
        del loader

    def fit(self, row: Row, arch: str) -> None:
        from petbreeds.learn.schedule import group_lrs
        from petbreeds.learn.training import fit_one_cycle

        data = self.training_data_a()
        phase = self.params(arch).train_unfrozen
        reset_peak(data.compute.device)
        model = self.new_model(arch)
        history = fit_one_cycle(model, data, phase, group_lrs(phase.lr, 3), stage=f"gpu_check {arch}")
        epoch = history[0]
        images = len(data.train_loader) * self.scale.batch_size
        row.images_per_s = epoch["images_per_s"]
        row.s_per_epoch = images / epoch["images_per_s"]
        row.peak_mem_mib = peak_mib(data.compute.device)
        row.numbers = dict(epoch)
        if not math.isfinite(epoch["valid_loss"]):
            raise RuntimeError(f"valid_loss is {epoch['valid_loss']}")
        row.result = (
            f"ok: training + validation {epoch['seconds']:.1f} s; valid_loss {epoch['valid_loss']:.3f}, error_rate "
            f"{epoch['error_rate']:.3f} (random init, 1 epoch); data wait not measured here (section 3a)"
        )

    # -- 4 DDP -------------------------------------------------------------------------------------

    def model_bare(self, row: Row) -> None:
        """resnet34 alone on pre-augmented batches held on the device: the model's own speed, no data path."""
        from petbreeds.learn.training import batch_inputs

        data = self.training_data_a()
        compute = data.compute
        batches = []
        for batch in data.train_loader:
            batches.append(batch_inputs(batch, data.augment, compute, train=True))
            if len(batches) == self.scale.model_batches:
                break
        reset_peak(compute.device)
        model = self.new_model("resnet34")
        compute.place(model)
        model.train()
        self.model_steps(row, model, model, batches)
        self.held = (model, batches)

    def model_ddp(self, row: Row) -> None:
        """The same under DistributedDataParallel in a process group of one (what distributed.wrap does for several)."""
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        model, batches = self.held
        device = self.training_data_a().compute.device
        backend = "nccl" if device.type == "cuda" else "gloo"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=0, world_size=1)
        try:
            reset_peak(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                net = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
                self.model_steps(row, net, model, batches)
        finally:
            dist.destroy_process_group()
        bare = self.rows[-1].images_per_s
        ratio = row.images_per_s / bare if bare and row.images_per_s else math.nan
        said = sorted({str(w.message).splitlines()[0][:160] for w in caught})
        row.numbers.update(backend=backend, ratio_to_bare=ratio, warnings=said)
        row.result += f"; {backend}, {ratio:.2f}x the bare model" + (f"; warned: {' / '.join(said)}" if said else "")

    def model_compiled(self, row: Row) -> None:
        """The same bare model as ``train.compile: true`` trains it (``Compute.for_training``: torch.compile, cold
        cache): how long the first forward + backward takes to compile, then the steady speed against the bare
        model's. The numbers that decide whether compile should be on by default on CUDA (issue 17)."""
        from dataclasses import replace

        model, batches = self.held
        compute = replace(self.training_data_a().compute, compile=True)
        net = compute.for_training(model)
        x, _ = batches[0]
        reset_peak(compute.device)
        started = time.perf_counter()
        with compute.autocast():
            net(x).float().sum().backward()
        model.zero_grad(set_to_none=True)
        sync(compute.device)
        compile_s = time.perf_counter() - started
        self.model_steps(row, net, model, batches)
        bare = next(r.images_per_s for r in self.rows if r.section == SECTIONS[-4])
        ratio = row.images_per_s / bare if bare and row.images_per_s else math.nan
        row.numbers.update(compile_s=compile_s, ratio_to_bare=ratio)
        row.result += (
            f"; first forward + backward (compiling, or reading a warm cache) {compile_s:.1f} s; "
            f"{ratio:.2f}x the bare model"
        )

    def model_steps(self, row: Row, net: Any, model: Any, batches: list[Any]) -> None:
        from petbreeds.learn.model import param_groups
        from petbreeds.learn.schedule import make_optimizer
        from petbreeds.learn.training import train_step

        compute, s = self.training_data_a().compute, self.scale
        opt = make_optimizer(param_groups(model), [1e-4] * 3, 0.01)
        scaler = compute.grad_scaler()

        def step(batch: Any) -> int:
            x, y = batch
            train_step(net, opt, scaler, x, y, compute).item()
            return len(y)

        cycled = (batches[i % len(batches)] for i in range(s.model_warmup + s.model_steps))
        timed_steps(cycled, step, compute.device, self.deadline, limit=s.model_warmup)
        t = timed_steps(cycled, step, compute.device, self.deadline)
        row.images_per_s = t.images / t.seconds
        row.peak_mem_mib = peak_mib(compute.device)
        row.numbers = {"steps": t.steps, "images": t.images, "seconds": t.seconds}
        row.result = f"ok: {t.steps} steps of {s.batch_size}, {len(batches)} batches held on the device, cycled"

    # -- 5 fastai ----------------------------------------------------------------------------------

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
            steps.append((f"3a {arch}, CPU decode", lambda row, arch=arch: self.epoch(row, arch, "a"), True))
            steps.append((f"3b {arch}, device decode", lambda row, arch=arch: self.epoch(row, arch, "b"), True))
        for arch in ARCHS:
            steps.append((f"3c {arch}, fit_one_cycle (library)", lambda row, arch=arch: self.fit(row, arch), True))
        steps.append((SECTIONS[-4], self.model_bare, True))
        steps.append((SECTIONS[-3], self.model_ddp, True))
        steps.append((SECTIONS[-2], self.model_compiled, True))
        steps.append((SECTIONS[-1], self.fastai, False))
        assert [name for name, _, _ in steps] == list(SECTIONS)
        return steps

    def run(self) -> None:
        import torch

        if self.args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu for a dry run")
        torch.backends.cudnn.benchmark = True
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
            if name in SECTIONS[-3:-1] and self.held is None:
                self.rows.append(Row(name, result="skipped: the bare run of section 4 did not finish"))
                continue
            if name == SECTIONS[-1]:
                self.held = self.data_a = None  # the loaders' persistent workers end here
                reset_peak(torch.device("cpu"))
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
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, one test file: the CPU dry run")
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.md, gpu_check.json, pytest.log here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the sections left after this (420)")
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
