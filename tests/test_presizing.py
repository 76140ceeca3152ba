"""The CPU item stage and the DataLoaders: real image files written with Pillow, real workers."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from petbreeds.config import DataParams
from petbreeds.data.dataloaders import default_num_workers, make_loader
from petbreeds.data.presizing import PresizedImages, load_rgb, presize
from petbreeds.errors import PetbreedsError
from petbreeds.learn.feed import train_batches

DATA = DataParams(item_size=32, size=24, resize_method="crop", pad_mode="reflection", batch_size=4, num_workers=0)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(w: int, h: int, split: int) -> Image.Image:
    """Red left of column ``split``, blue from it on."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :split] = RED
    a[:, split:] = BLUE
    return Image.fromarray(a)


def is_red(px: torch.Tensor) -> bool:
    return bool(px[0] > 200 and px[2] < 55)


def is_blue(px: torch.Tensor) -> bool:
    return bool(px[2] > 200 and px[0] < 55)


# --- decoding ---------------------------------------------------------------------------------------


def odd_files(tmp_path: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """Files in the modes Pets and the wild throw at a loader, with the RGB value each should decode to."""
    base = Image.new("RGB", (20, 10), (200, 100, 50))
    files: dict[str, tuple[Path, tuple[int, int, int]]] = {}

    def save(name: str, img: Image.Image, expected: tuple[int, int, int], fmt: str | None = None) -> None:
        path = tmp_path / name
        img.save(path, format=fmt)
        files[name] = (path, expected)

    save("palette.png", base.convert("P", palette=Image.Palette.ADAPTIVE), (200, 100, 50))
    save("rgba.png", base.convert("RGBA"), (200, 100, 50))
    save("la.png", Image.new("LA", (20, 10), (90, 255)), (90, 90, 90))
    save("cmyk.jpg", Image.new("CMYK", (20, 10), (0, 255, 255, 0)), (255, 0, 0))
    sixteen = Image.fromarray(np.full((10, 20), 0x8000, np.uint16))
    assert sixteen.mode == "I;16"
    save("sixteen.png", sixteen, (128, 128, 128))
    save("gif_in_disguise.jpg", base.convert("P"), (200, 100, 50), fmt="GIF")
    save("png_in_disguise.jpg", base.convert("RGBA"), (200, 100, 50), fmt="PNG")
    return files


def test_odd_file_modes_decode_to_rgb(tmp_path: Path) -> None:
    for name, (path, expected) in odd_files(tmp_path).items():
        img = load_rgb(path)
        assert img.mode == "RGB", name
        assert img.size == (20, 10), name
        got = np.asarray(img)[5, 10]
        assert np.abs(got.astype(int) - expected).max() <= 6, (name, got, expected)


def test_real_archive_quirks_decode(pet_subset: Path) -> None:
    for name in ("Abyssinian_34.jpg", "Abyssinian_5.jpg"):  # a GIF and an RGBA PNG named .jpg
        x = presize(load_rgb(pet_subset / "images" / name, 64), 64, "crop", "reflection")
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8


def test_jpeg_draft_decodes_smaller_but_never_below_min_side(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.effect_noise((800, 600), 40).convert("RGB").save(path, quality=90)
    assert load_rgb(path).size == (800, 600)
    reduced = load_rgb(path, min_side=140)
    assert reduced.size == (200, 150)  # 1/4 scale: 1/8 would give 100x75 < 140
    assert load_rgb(path, min_side=600).size == (800, 600)


def test_decode_failure_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "Bengal_1.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(PetbreedsError, match=r"Bengal_1\.jpg.*dvc repro"):
        load_rgb(broken)
    with pytest.raises(PetbreedsError, match=r"gone\.jpg"):
        load_rgb(tmp_path / "gone.jpg")


# --- Resize(item_size): crop, pad, squish -------------------------------------------------------------


def test_crop_keeps_the_short_side_at_the_drawn_position() -> None:
    img = halves(300, 200, 150)  # window = 200x200; red columns 0..149
    left = presize(img, 100, "crop", "zeros", pos=(0.0, 0.5))  # window 0..200: 3/4 red
    right = presize(img, 100, "crop", "zeros", pos=(1.0, 0.5))  # window 100..300: 1/4 red
    centre = presize(img, 100, "crop", "zeros")  # window 50..250: half red
    assert is_red(left[:, 50, 70]) and is_blue(left[:, 50, 80])
    assert is_red(right[:, 50, 20]) and is_blue(right[:, 50, 30])
    assert is_red(centre[:, 50, 45]) and is_blue(centre[:, 50, 55])
    assert centre.shape == (3, 100, 100) and centre.dtype == torch.uint8


def test_pad_fits_the_long_side_and_pads_the_rest() -> None:
    img = Image.new("RGB", (200, 100), RED)
    zeros = presize(img, 100, "pad", "zeros")  # image occupies rows 25..74
    assert zeros[:, :20].max() == 0 and zeros[:, 80:].max() == 0
    assert is_red(zeros[:, 50, 50])
    assert is_red(presize(img, 100, "pad", "reflection")[:, 5, 50])
    assert is_red(presize(img, 100, "pad", "border")[:, 95, 50])
    top = presize(img, 100, "pad", "zeros", pos=(0.5, 0.0))  # the padding all goes below
    assert is_red(top[:, 2, 50]) and top[:, 60:].max() == 0


def test_squish_keeps_everything_and_ignores_the_aspect_ratio() -> None:
    x = presize(halves(300, 100, 100), 90, "squish", "zeros")  # red third stays a third
    assert is_red(x[:, 45, 25]) and is_blue(x[:, 45, 35]) and is_blue(x[:, 0, 89])


# --- the Dataset ------------------------------------------------------------------------------------


def write_items(root: Path, n: int, labels: list[str]) -> pd.DataFrame:
    """``n`` real JPEGs of varied sizes under root/images and their table (path relative to root, label)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        w, h = 40 + 7 * (i % 5), 30 + 5 * (i % 3)
        img = halves(w, h, w // 3 + i % 7)
        rel = f"images/{label}_{i}.jpg"
        img.save(root / rel, quality=95)
        rows.append({"path": rel, "label": label})
    return pd.DataFrame(rows)


def test_dataset_crops_randomly_on_train_per_epoch_and_centred_on_valid(tmp_path: Path) -> None:
    table = write_items(tmp_path, 6, ["cat"])
    paths = [tmp_path / p for p in table["path"]]
    train = PresizedImages(paths, [0] * 6, DATA, train=True, seed=1)
    x, y = train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == 0
    assert torch.equal(train[(3, 5)][0], PresizedImages(paths, [0] * 6, DATA, train=True, seed=1)[(3, 5)][0])
    epochs = [train[(3, e)][0] for e in range(6)]
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    valid = PresizedImages(paths, [0] * 6, DATA, train=False, seed=1)
    centred = presize(load_rgb(paths[3], 32), 32, "crop", "reflection")
    assert all(torch.equal(valid[(3, e)][0], centred) for e in range(3))


# --- DataLoaders ------------------------------------------------------------------------------------


def batches(loader: torch.utils.data.DataLoader, epochs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(train_batches(loader, torch.device("cpu")), epochs * len(loader)))


def test_train_loader_shuffles_drops_last_and_is_seeded(tmp_path: Path) -> None:
    table = write_items(tmp_path, 10, ["a", "b", "c"])
    loader = make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=True, seed=3)
    got = batches(loader, 2)
    assert len(got) == 4  # 10 // 4 per epoch, the 2 leftovers dropped
    x, y = got[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    again = batches(make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=True, seed=3), 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, again, strict=True))
    other = batches(make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=True, seed=4), 2)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(got, other, strict=True))
    epoch_labels = [torch.cat([y for _, y in got[:2]]), torch.cat([y for _, y in got[2:]])]
    assert not torch.equal(*epoch_labels)  # a new order every epoch


def test_valid_loader_keeps_table_order_and_every_item(tmp_path: Path) -> None:
    table = write_items(tmp_path, 10, ["a", "b", "c"])
    got = batches(make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=False, seed=3), 1)
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert torch.cat([y for _, y in got]).tolist() == [i % 3 for i in range(10)]


def test_two_workers_give_the_same_batches_as_none(tmp_path: Path) -> None:
    table = write_items(tmp_path, 12, ["a", "b"])
    serial = batches(make_loader(table, tmp_path, ["a", "b"], DATA, train=True, seed=5), 2)
    two = DATA.model_copy(update={"num_workers": 2})
    parallel = batches(make_loader(table, tmp_path, ["a", "b"], two, train=True, seed=5), 2)
    assert len(serial) == len(parallel) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, parallel, strict=True))


def test_one_stream_crosses_epochs_and_a_later_start_draws_that_epochs_order(tmp_path: Path) -> None:
    table = write_items(tmp_path, 10, ["a", "b", "c"])
    stream = batches(make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=True, seed=3), 3)
    later = make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=True, seed=3)
    later.sampler.epoch = 1  # as a resumed fit, or a second fit on the same loader, sets it
    resumed = batches(later, 2)
    assert len(stream) == 6 and len(resumed) == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(stream[2:], resumed, strict=True))


def test_a_pass_after_some_batches_starts_past_every_epoch_they_reached(tmp_path: Path) -> None:
    table = write_items(tmp_path, 10, ["a", "b", "c"])
    loader = make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=True, seed=3)  # 2 batches per epoch
    stream = train_batches(loader, torch.device("cpu"))
    list(itertools.islice(stream, 3))  # an lr_find of 3 steps: epoch 0 and half of epoch 1
    assert loader.sampler.epoch == 2  # as fastai's DataLoader, a fit after it draws a new order
    fresh = batches(make_loader(table, tmp_path, ["a", "b", "c"], DATA, train=True, seed=3), 3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(fresh[4:], batches(loader, 1), strict=True))


def test_minus_one_workers_means_none_on_a_cpu_and_the_spare_cores_on_a_gpu(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_num_workers(-1, cuda=False) == 0
    assert default_num_workers(-1, cuda=True) == min(16, max(1, cores - 2))  # main thread and pin thread
    assert default_num_workers(-1, processes=cores, cuda=True) == 1  # the cores shared among the processes
    assert default_num_workers(3, cuda=False) == default_num_workers(3, cuda=True) == 3  # a number is a number
    table = write_items(tmp_path, 8, ["a", "b"])
    loader = make_loader(table, tmp_path, ["a", "b"], DATA.model_copy(update={"num_workers": -1}), train=True, seed=0)
    assert loader.num_workers == (min(16, max(1, cores - 2)) if torch.cuda.is_available() else 0)


def test_loader_refuses_unknown_labels_and_too_few_items(tmp_path: Path) -> None:
    table = write_items(tmp_path, 6, ["a", "b"])
    with pytest.raises(PetbreedsError, match=r"'b'.*vocab"):
        make_loader(table, tmp_path, ["a"], DATA, train=False, seed=0)
    with pytest.raises(PetbreedsError, match="data.batch_size"):
        make_loader(table[:3], tmp_path, ["a", "b"], DATA, train=True, seed=0)


def test_a_file_broken_after_indexing_fails_naming_it(tmp_path: Path) -> None:
    table = write_items(tmp_path, 4, ["a"])
    (tmp_path / table["path"][2]).write_bytes(b"truncated")
    with pytest.raises(PetbreedsError, match=r"a_2\.jpg"):
        batches(make_loader(table, tmp_path, ["a"], DATA, train=False, seed=0), 1)
