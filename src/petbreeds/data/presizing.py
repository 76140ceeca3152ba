"""The CPU item stage (docs/fastai.md §1.5–§1.6): decode → RGB → ``Resize(item_size)`` → uint8 CHW tensor.

This is fastai's "presizing" half: every image is resized once, in DataLoader workers, to a generous
square (``data.item_size``) so that batches can be collated and augmented on the device in one go.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from petbreeds.config import DataParams
from petbreeds.errors import PetbreedsError

# fastai's PadMode names → torchvision's pad modes (docs/fastai.md §1.6).
_PAD_MODES = {"zeros": "constant", "border": "edge", "reflection": "reflect"}

# Pillow cannot reduce 16/32-bit integer images to 8 bits: convert("RGB") clips everything above 255 to white.
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")

# An image to decode: a file, or an image file's bytes in memory (as a request to the served MLflow model holds).
ImageSource = Path | bytes


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB (palette, RGBA, LA, CMYK, L, 1 via Pillow; 16-bit by dropping the low byte)."""
    if img.mode in _WIDE_INT_MODES:
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(source: ImageSource, min_side: int | None = None) -> Image.Image:
    """Decode ``source`` (a file, or a file's bytes) as an RGB image; JPEGs are decoded at a reduced scale when that
    keeps ``min_side``.

    Pillow's draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale (a DCT-domain reduction, much faster than a
    full decode and a resize). It picks the largest reduction that leaves both sides >= ``min_side``, so a later
    resize to ``min_side`` never upsamples. The format comes from the file's bytes, not its name: a GIF or PNG
    named ``.jpg`` loads too.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if min_side is not None:
                img.draft("RGB", (min_side, min_side))  # no-op for formats other than JPEG
            img.load()
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(source, bytes):
            raise PetbreedsError(f"{len(source)} bytes: cannot decode them as an image ({e})") from None
        raise PetbreedsError(
            f"{source}: cannot decode image ({e}); changed since indexing? re-run dvc repro to re-index the data"
        ) from None


def presize(
    img: Image.Image, size: int, method: str, pad_mode: str, pos: tuple[float, float] = (0.5, 0.5)
) -> torch.Tensor:
    """fastai's ``Resize(size, method, pad_mode)`` on a PIL image → uint8 ``[3, size, size]`` (docs/fastai.md §1.6).

    ``pos`` = (px, py) in [0, 1]: where the square window sits along the long side (crop) or where the image
    sits in the padded square (pad); (0.5, 0.5) is centred. Squish ignores it. The resize is fastai's (Pillow's
    bilinear, antialiased when it shrinks) done by torch's uint8 kernel: within one grey level of Pillow's, at
    2.7x its speed (1.9 of the 3.2 ms an Oxford pet took to decode and presize; AMD EPYC, 2026-11-30).
    """
    w, h = img.size
    px, py = pos
    if method == "squish":
        window = img
    elif method in ("crop", "pad"):
        # crop: the window is the short side (the smaller ratio); pad: the long side, so the window overhangs.
        m = min(w / size, h / size) if method == "crop" else max(w / size, h / size)
        cw = ch = int(m * size)
        left, top = int(px * (w - cw)), int(py * (h - ch))
        if method == "crop":
            window = img.crop((left, top, left + cw, top + ch))
        else:
            padding = [-left, -top, cw - w + left, ch - h + top]
            window = TF.pad(img, padding, fill=0, padding_mode=_PAD_MODES[pad_mode])
    else:
        raise PetbreedsError(f"params.yaml: data.resize_method must be crop, pad or squish, got {method!r}")
    pixels = TF.pil_to_tensor(window)[None]  # uint8 [1, 3, h, w], channels last in memory: the fast kernel's
    out = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].contiguous()


def crop_position(seed: int, epoch: int, index: int) -> tuple[float, float]:
    """The train crop position of item ``index`` in ``epoch``: a pure function of its arguments.

    Seeding per (seed, epoch, index) rather than per worker makes the crops independent of how many workers
    there are and which one loads which item.
    """
    px, py = np.random.default_rng((seed, epoch, index)).random(2)
    return float(px), float(py)


class PresizedImages(Dataset):
    """Images and class indices: ``dataset[i]`` → (uint8 ``[3, item_size, item_size]``, int).

    On train the crop position is random (:func:`crop_position`); on valid it is centred. An index may also be
    an ``(index, epoch)`` pair, which is what :func:`petbreeds.data.dataloaders.make_loader`'s train sampler yields
    so that every epoch gets fresh crop positions even in persistent workers. ``paths`` are files, or image files'
    bytes (:data:`ImageSource`).
    """

    def __init__(
        self, paths: Sequence[ImageSource], targets: list[int], data: DataParams, *, train: bool, seed: int
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = list(targets)
        self.data = data
        self.train = train
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        pos = crop_position(self.seed, epoch, index) if self.train else (0.5, 0.5)
        size = self.data.item_size
        img = load_rgb(self.paths[index], min_side=size)
        return presize(img, size, self.data.resize_method, self.data.pad_mode, pos), self.targets[index]
