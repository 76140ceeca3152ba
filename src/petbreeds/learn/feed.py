"""How batches reach the device: the next one copied while this one computes, the validation set kept after its
first pass.

    for x, y in train_batches(train_loader, device): ...     # training: one stream per fit, epoch after epoch
    valid = KeptBatches(valid_loader, device, local_processes)    # validation, every epoch
    for x, y in valid: ...
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from petbreeds.data.dataloaders import EpochShuffle

Tensors = tuple[torch.Tensor, ...]
# The share of the device's memory (the GPU's, or the machine's RAM for a CPU, split among the training processes
# on it) that the kept validation batches may take. The full Pet validation set presized at 460 px is 0.94 GB of
# uint8: 1.2 % of an 80 GB GPU.
KEEP_SHARE = 1 / 8


def ahead_to_device(batches: Iterable[Tensors], device: torch.device) -> Iterator[Tensors]:
    """Each batch's tensors on ``device``. On a GPU the next batch is already on its way while this one computes:
    its copy from (pinned) host memory runs on a stream of its own, so the compute stream never waits behind a copy
    and a copy never waits behind compute. On a CPU the batches pass as they come (nothing is read ahead).
    """
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)

    def send(batch: Tensors) -> Tensors:
        with torch.cuda.stream(side):
            return tuple(t.to(device, non_blocking=True) for t in batch)

    coming = None
    for batch in batches:
        sent = send(batch)
        if coming is not None:
            yield coming
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(side)  # the compute stream uses a batch only once its copy is done
        for t in sent:
            t.record_stream(compute)  # and its memory is not reused while the compute stream still reads it
        coming = sent
    if coming is not None:
        yield coming


def train_batches(loader: DataLoader, device: torch.device) -> Iterator[Tensors]:
    """A training loader's batches on ``device`` (:func:`ahead_to_device`), epoch after epoch, from one iterator:
    ``itertools.islice(stream, len(loader))`` is an epoch, and the loader's workers go on decoding across epoch ends
    and validation (its :class:`EpochShuffle` is endless; any other loader is iterated again).

    The epoch count lives in the loader's :class:`EpochShuffle` (where its next pass starts), and only this stream
    moves it: each epoch counts as taken when its first batch is handed out (one begun counts whole), so a later
    stream in this process (the fit after ``lr_find``, as with fastai's DataLoader) draws new orders and crops.
    """
    sampler = loader.sampler
    counted = isinstance(sampler, EpochShuffle)
    endless = loader if counted else itertools.chain.from_iterable(itertools.repeat(loader))
    for i, batch in enumerate(ahead_to_device(endless, device)):
        if counted and i % len(loader) == 0:  # after the copy read ahead: counts what the consumer took
            sampler.epoch += 1
        yield batch


def memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class KeptBatches:
    """A validation loader's batches, on ``device``: read from the loader (decoded and presized by its workers) in
    the first pass and kept there for every later one, when they fit in :data:`KEEP_SHARE` of the device's memory
    (shared among ``processes`` on a CPU); else read again every pass. Validation batches are the same every pass
    (no random crop), so keeping them changes no number, only the time: a pass then waits for no decoding.
    """

    def __init__(self, loader: DataLoader, device: torch.device, processes: int = 1) -> None:
        self.loader = loader
        self.device = device
        self.budget = memory_bytes(device) * KEEP_SHARE / (1 if device.type == "cuda" else processes)
        self._kept: list[Tensors] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tensors]:
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[Tensors] | None = []
        size = 0
        for batch in ahead_to_device(self.loader, self.device):
            size += sum(t.nbytes for t in batch)
            kept = kept if kept is not None and size <= self.budget else None
            if kept is not None:
                kept.append(batch)
            yield batch
        self._kept = kept  # only a whole pass is kept
