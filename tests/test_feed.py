"""How batches reach the device (petbreeds.learn.feed): the validation set kept after its first pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from petbreeds.learn.feed import KeptBatches, ahead_to_device

CPU = torch.device("cpu")


class CountingImages(Dataset):
    """uint8 images whose every read is counted: a kept pass reads none."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return torch.full((3, 4, 4), i, dtype=torch.uint8), i % 3


def test_validation_batches_are_read_once_and_kept() -> None:
    images = CountingImages(10)
    kept = KeptBatches(DataLoader(images, batch_size=4), CPU)
    first = list(kept)
    second = list(kept)
    assert images.reads == 10 and len(kept) == 3
    assert [len(y) for _, y in second] == [4, 4, 2]
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(first, second, strict=True))


def test_validation_batches_over_the_budget_are_read_every_pass() -> None:
    images = CountingImages(10)
    kept = KeptBatches(DataLoader(images, batch_size=4), CPU)
    kept.budget = 2 * (4 * 3 * 4 * 4 + 4 * 8)  # two batches of images and labels: the third does not fit
    first, second = list(kept), list(kept)
    assert images.reads == 20
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


def test_an_interrupted_pass_keeps_nothing() -> None:
    images = CountingImages(10)
    kept = KeptBatches(DataLoader(images, batch_size=4), CPU)
    next(iter(kept))
    list(kept)
    assert images.reads == 4 + 10


def test_on_a_cpu_batches_pass_as_they_come() -> None:
    batch = (torch.zeros(2, 3), torch.ones(2))
    (got,) = list(ahead_to_device([batch], CPU))
    assert got is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_each_batch_arrives_whole_on_the_device_and_is_kept_there() -> None:
    cuda = torch.device("cuda")
    host = [(torch.full((64, 3, 460, 460), i, dtype=torch.uint8).pin_memory(), torch.arange(64)) for i in range(5)]
    got = [(x.sum().item(), x.device.type, y.device.type) for x, y in ahead_to_device(host, cuda)]
    assert got == [(i * 64 * 3 * 460 * 460, "cuda", "cuda") for i in range(5)]
    kept = KeptBatches(DataLoader(CountingImages(10), batch_size=4, pin_memory=True), cuda)
    first = list(kept)
    assert all(x.device.type == "cuda" for x, _ in first)
    assert all(a[0] is b[0] for a, b in zip(first, kept, strict=True))
