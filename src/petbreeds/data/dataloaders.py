"""DataLoaders over the split table (docs/fastai.md §10.1): uint8 batches, seeded shuffling and workers.

Train: shuffled, ``drop_last`` (fastai's default when shuffling), fresh crop positions every epoch.
Valid: table order, every item. Batches stay uint8 until the device (a quarter of float32's bytes to copy).
"""

from __future__ import annotations

import itertools
import math
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from petbreeds.config import DataParams
from petbreeds.data.presizing import PresizedImages
from petbreeds.errors import PetbreedsError
from petbreeds.machine import usable_cores
from petbreeds.world import SINGLE_PROCESS, World

# fastai's num_workers = min(16, cpu_count)
_MAX_DEFAULT_WORKERS = 16
# Cores a GPU training process keeps for itself: its main thread (launching the GPU's work, augmenting) and the
# thread that copies the workers' batches into pinned memory.
_MAIN_AND_PIN_CORES = 2


def default_num_workers(requested: int, processes: int = 1, cuda: bool | None = None) -> int:
    """``data.num_workers``; -1: none when training on the CPU, else the cores this process may use (those usable on
    the machine shared among the ``processes`` that train on it) less two for its main thread and its pin-memory
    thread, at least one and at most 16 (fastai's cap): 14 for one process on 16 cores.

    On a CPU every core already runs the training step's threads. A worker decoding at the same time preempts one of
    them, and the whole step waits for it at its next parallel region; decoding in the training process between two
    steps costs only the decoding (bench/cpu_workers.py: 1.05-1.14x the images/s of one worker per core on 2 cores).
    ``cuda``: whether training runs on a GPU (default: whether one is available, as petbreeds.learn.device.pick_device
    decides).
    """
    if requested >= 0:
        return requested
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return 0
    return min(_MAX_DEFAULT_WORKERS, max(1, usable_cores() // processes - _MAIN_AND_PIN_CORES))


# Where DataLoader workers hand their batches over (Linux); a container gets 64 MB unless `--shm-size` says more.
SHARED_MEMORY = Path("/dev/shm")
# torch's DataLoader default: batches each worker keeps in flight
PREFETCH_FACTOR = 2


def check_shared_memory(workers: int, batch_bytes: int, loaders: int = 2, shm: Path = SHARED_MEMORY) -> None:
    """Refuse to start ``loaders`` loaders of ``workers`` workers each whose batches in flight (``PREFETCH_FACTOR``
    each, ``batch_bytes`` apiece) do not fit in ``shm``: a worker would die mid-epoch with a "Bus error"."""
    if workers == 0 or not shm.is_dir():
        return
    needed = loaders * workers * PREFETCH_FACTOR * batch_bytes
    total = shutil.disk_usage(shm).total
    if total < needed:
        raise PetbreedsError(
            f"{shm} holds {total / 2**20:.0f} MiB, but {loaders} loaders of {workers} workers need about "
            f"{needed / 2**20:.0f} MiB there for the batches they prefetch: give the container more (docker run "
            f"--shm-size={math.ceil(2 * needed / 2**30)}g) or set data.num_workers lower"
        )


class EpochShuffle(Sampler[tuple[int, int]]):
    """Seeded random permutations, one per epoch, in global batches of ``batch_size``, yielding ``(index, epoch)``
    endlessly from epoch :attr:`epoch` on; ``len()`` is one epoch's share.

    Every rank draws the same permutation and takes its own contiguous share of each global batch, so N ranks
    together see exactly the batches one process would (the incomplete last batch is dropped, as fastai does).
    The epoch travels with each index so that :class:`PresizedImages` can draw that epoch's crop position even
    inside persistent workers, which hold their own copy of the dataset and never see an epoch counter.

    Endless, so that one iterator over the loader (``petbreeds.learn.feed.train_batches``) serves a whole fit: its
    workers go on decoding the next epoch's first batches while the last ones train and the model validates, instead
    of starting cold at every epoch. Epoch e's permutation is the e-th drawn from ``seed``, whatever was iterated
    before, so that :attr:`epoch` alone says where a resumed fit goes on. An iteration reads it once, when it starts;
    ``train_batches`` advances it as it hands out epochs.
    """

    def __init__(self, n: int, seed: int, batch_size: int, world: World) -> None:
        self.n = n
        self.seed = seed
        self.batch_size = batch_size
        self.share = batch_size // world.world_size
        self.offset = world.rank * self.share
        self.epoch = 0  # where the next iteration starts

    def __len__(self) -> int:
        return self.n // self.batch_size * self.share

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed)
        first = self.epoch
        for epoch in itertools.count():
            order = torch.randperm(self.n, generator=generator).tolist()
            if epoch < first:
                continue  # drawn only to reach this epoch's permutation
            for start in range(0, len(self) // self.share * self.batch_size, self.batch_size):
                for index in order[start + self.offset : start + self.offset + self.share]:
                    yield index, epoch


class PassesInOrder(Sampler[tuple[int, int]]):
    """Every one of ``n`` items in table order, ``passes`` times over: ``(index, pass)``, the pass standing for the
    epoch of :class:`PresizedImages`' random crop, so that each pass draws its own crop positions (test-time
    augmentation, petbreeds.learn.tta)."""

    def __init__(self, n: int, passes: int) -> None:
        self.n = n
        self.passes = passes

    def __len__(self) -> int:
        return self.n * self.passes

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for p in range(self.passes):
            for index in range(self.n):
                yield index, p


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a worker from torch's per-worker seed (itself from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    table: pd.DataFrame,
    root: Path,
    vocab: list[str],
    data: DataParams,
    *,
    train: bool,
    seed: int,
    world: World = SINGLE_PROCESS,
    passes: int = 0,
) -> DataLoader:
    """A DataLoader of ``(x uint8 [B, 3, item_size, item_size], y int64 [B])`` over ``table`` (columns path, label).

    ``path`` is relative to ``root``. A label outside ``vocab`` is an error, never a silently dropped item.
    ``data.batch_size`` is the global batch: each of ``world``'s ranks loads its share of every training batch
    (``batch_size / world_size`` items). Validation loads the whole ``table`` in table order; the caller hands
    each rank its own rows (:meth:`World.shard`). ``passes`` > 0 with ``train=False``: the training item stage's
    random crops over every item in table order, ``passes`` times over (:class:`PassesInOrder`), for test-time
    augmentation.
    """
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise PetbreedsError(f"the split table lacks column(s) {sorted(missing)}; re-run dvc repro split")
    split = "train" if train else "valid"
    if len(table) == 0:
        raise PetbreedsError(f"no {split} items in the split table; check split.valid_pct and the data in data/raw")
    class_index = {label: i for i, label in enumerate(vocab)}
    unknown = sorted(set(table["label"]) - class_index.keys())
    if unknown:
        raise PetbreedsError(
            f"label(s) {unknown[:5]} of the split table are not in data/vocab.json; re-run dvc repro index split"
        )
    if train and len(table) < data.batch_size:
        raise PetbreedsError(
            f"only {len(table)} training items, fewer than data.batch_size={data.batch_size}: with drop_last no "
            "batch would be left; lower data.batch_size"
        )
    workers = default_num_workers(data.num_workers, world.local_world_size)
    check_shared_memory(workers, (data.batch_size // world.world_size) * 3 * data.item_size**2)
    dataset = PresizedImages(
        [root / p for p in table["path"]],
        [class_index[label] for label in table["label"]],
        data,
        train=train or passes > 0,
        seed=seed,
    )
    if train:
        sampler: Sampler | None = EpochShuffle(len(dataset), seed, data.batch_size, world)
    else:
        sampler = PassesInOrder(len(dataset), passes) if passes > 0 else None
    return DataLoader(
        dataset,
        batch_size=data.batch_size // world.world_size,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
