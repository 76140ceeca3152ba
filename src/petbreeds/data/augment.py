"""The device batch stage (docs/fastai.md §2): fastai's ``aug_transforms`` in ONE resample per image, then normalise.

fastai resamples a training image twice when ``min_scale < 1`` (the affine pass at item size, then the random
resized crop to ``size``; docs/fastai.md §2.4) and draws one crop per batch. Here flip, rotate, zoom, warp and a
per-image random resized crop are composed into one projective map per image, so one ``F.grid_sample`` call
produces the ``size`` output directly.

Geometry is fastai's: each output pixel reads the point of the item that fastai's ``align_corners=True`` grids
name, reflected as its ``reflection`` padding reflects (about the edge pixels' centres). That point is then
expressed in torch's ``align_corners=False`` frame, where (-1, -1) and (1, 1) are the image's outer edges whatever
its resolution, so the same grid reads the same content from the item or from a reduced copy of it: the
anti-alias prefilter (see :meth:`BatchAugment.train`) is a filter, not a second geometric resample.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from petbreeds.config import AugmentParams
from petbreeds.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class Draws:
    """One batch's random parameters, each a float tensor ``[B]`` (``flip`` is bool).

    angle: rotation in degrees; zoom: fastai's zoom factor z >= 1 zooms in; zoom_x/zoom_y, crop_x/crop_y: centre
    fractions in [0, 1]; warp_x/warp_y: corner offsets (docs/fastai.md §2.3); crop_side: side of the random resized
    crop as a fraction of the image's (sqrt of the area fraction), measured as fastai does, between the edge pixels'
    centres; brightness in (0, 1), 0.5 = unchanged; contrast > 0, 1 = unchanged.
    """

    flip: torch.Tensor
    angle: torch.Tensor
    zoom: torch.Tensor
    zoom_x: torch.Tensor
    zoom_y: torch.Tensor
    warp_x: torch.Tensor
    warp_y: torch.Tensor
    crop_side: torch.Tensor
    crop_x: torch.Tensor
    crop_y: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor

    def rows(self, start: int, n: int) -> Draws:
        """The draws of images ``start .. start + n - 1``."""
        return Draws(**{f.name: getattr(self, f.name)[start : start + n] for f in dataclasses.fields(self)})

    def finest(self) -> float:
        """The smallest region any image samples, as a fraction of the side (what the prefilter must keep)."""
        return (self.crop_side / self.zoom).min().item()

    @staticmethod
    def identity(n: int, device: torch.device | str = "cpu") -> Draws:
        """Draws that change nothing: the train path becomes a plain resize to ``size``."""

        def full(value: float) -> torch.Tensor:
            return torch.full((n,), value, device=device)

        return Draws(
            flip=torch.zeros(n, dtype=torch.bool, device=device),
            angle=full(0.0),
            zoom=full(1.0),
            zoom_x=full(0.5),
            zoom_y=full(0.5),
            warp_x=full(0.0),
            warp_y=full(0.0),
            crop_side=full(1.0),
            crop_x=full(0.5),
            crop_y=full(0.5),
            brightness=full(0.5),
            contrast=full(1.0),
        )


def _matrices(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """A batch of 3x3 matrices ``[B, 3, 3]`` from 3 rows of 3 entries, each a ``[B]`` tensor or a number (filled
    where ``like`` is: a number is never a tensor made on the host and copied over)."""
    entries = [[v if isinstance(v, torch.Tensor) else torch.full_like(like, v) for v in row] for row in rows]
    return torch.stack([torch.stack(row, -1) for row in entries], -2)


def affine_matrices(d: Draws) -> torch.Tensor:
    """``M = F · R · Z · C`` ``[B, 3, 3]``: output coordinates → input coordinates (docs/fastai.md §2.3, §2.4).

    F flips x, R rotates, Z zooms in around a random centre (fastai's zoom_mat), C maps the output onto the
    random resized crop. fastai applies C to the affine pass's output, so it acts first on output coordinates.
    """
    one = torch.ones_like(d.angle)
    sx = torch.where(d.flip, -one, one)
    theta = torch.deg2rad(d.angle)
    cos, sin = theta.cos(), theta.sin()
    s = 1.0 / d.zoom
    f = d.crop_side
    flip = _matrices([[sx, 0, 0], [0, 1, 0], [0, 0, 1]], one)
    rotate = _matrices([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1]], one)
    zoom = _matrices([[s, 0, (1 - s) * (2 * d.zoom_x - 1)], [0, s, (1 - s) * (2 * d.zoom_y - 1)], [0, 0, 1]], one)
    crop = _matrices([[f, 0, (1 - f) * (2 * d.crop_x - 1)], [0, f, (1 - f) * (2 * d.crop_y - 1)], [0, 0, 1]], one)
    return flip @ rotate @ zoom @ crop


def warp_matrices(d: Draws) -> torch.Tensor:
    """fastai's perspective warp (docs/fastai.md §2.3) as homographies ``[B, 3, 3]``, output → input coordinates.

    Each maps the perturbed points fastai pairs with the corners (-1,-1), (-1,1), (1,-1), (1,1) onto those
    corners, as fastai's image warp does (``_WarpCoord`` without ``invert``): the output pixel at a perturbed
    point reads the input's corner. The 8 unknowns come from ``torch.linalg.solve`` (identity when warp_x =
    warp_y = 0), where the draws are: on the host (:meth:`BatchAugment.draw`), whose result nothing waits for.
    """
    xt, yt = d.warp_x, d.warp_y
    corners = [(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)]
    perturbed = [(-1 - yt, -1 - xt), (-1 + yt, 1 + xt), (1 + yt, -1 + xt), (1 - yt, 1 - xt)]
    zero, one = torch.zeros_like(xt), torch.ones_like(xt)
    rows, rhs = [], []
    for (x, y), (u, v) in zip(perturbed, corners, strict=True):  # (x, y) -> (u, v)
        rows.append(torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1))
        rows.append(torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1))
        rhs += [u * one, v * one]
    h = torch.linalg.solve(torch.stack(rows, -2), torch.stack(rhs, -1))
    return torch.cat([h, one[:, None]], -1).view(-1, 3, 3)


def _to_device(d: Draws, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's projective maps ``[B, 3, 3]``, brightness and contrast ``[B]``, computed where ``d`` is (the
    host) and sent to ``device`` as one tensor, from pinned memory without waiting when ``device`` is a GPU."""
    transform = warp_matrices(d) @ affine_matrices(d)
    plan = torch.cat([transform.flatten(1), d.brightness[:, None], d.contrast[:, None]], 1)
    if plan.device != device:
        plan = plan.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else plan.to(device)
    # contiguous: a strided column would take another (scalar) kernel path in lighting_, other last bits on a CPU
    return plan[:, :9].reshape(-1, 3, 3).contiguous(), plan[:, 9].contiguous(), plan[:, 10].contiguous()


def reflect(u: torch.Tensor) -> torch.Tensor:
    """Coordinates folded into [-1, 1] by mirroring at ±1, as ``grid_sample``'s reflection padding does with
    ``align_corners=True`` (fastai's): the mirror passes through the edge pixels' centres."""
    return 1 - ((u + 1).remainder(4) - 2).abs()


def sampling_grid(transform: torch.Tensor, size: int, item: int) -> torch.Tensor:
    """Where each output pixel reads ``[B, size, size, 2]`` (x, y) under projective ``[B, 3, 3]``, for
    ``F.grid_sample(..., align_corners=False)`` on an item of side ``item`` or any antialiased reduced copy of it.

    fastai (docs/fastai.md §2.3, §2.4): output pixel i sits at -1 + 2i/(size - 1) and the map's result u is in the
    item's ``align_corners=True`` frame (±1 = the edge pixels' centres), reflected there. The same point of the
    item's content is ``u · (item - 1) / item`` in the ``align_corners=False`` frame.
    """
    steps = torch.linspace(-1, 1, size, device=transform.device, dtype=transform.dtype)
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    points = torch.stack([x, y, torch.ones_like(x)], -1).view(-1, 3)  # [size*size, 3]
    mapped = torch.einsum("nk,bjk->bnj", points, transform)  # [B, size*size, 3]; 2x faster than a broadcast @
    read = reflect(mapped[..., :2] / mapped[..., 2:])
    return read.mul_((item - 1) / item).view(-1, size, size, 2)


def antialiased_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, 3, H, W]`` → ``[B, 3, size, size]`` by a bilinear resize, antialiased when it shrinks (Pillow's filter).

    On CPU a uint8 batch stays uint8 (torch's vectorised path, 5x faster than float, rounding like Pillow); CUDA
    has no uint8 antialiased kernel, so there it runs on float.
    """
    if x.device.type != "cpu":
        x = x.float()
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def lighting_(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """fastai's fused Brightness + Contrast (docs/fastai.md §2.5), in place on float ``[B, C, H, W]`` in [0, 1].

    ``sigmoid(contrast · (logit(x) + logit(brightness)))`` with per-image ``brightness`` and ``contrast`` ``[B]``.
    In place because each out-of-place step would allocate and stream a whole batch again (3x slower on CPU).
    """
    shift = torch.logit(brightness)[:, None, None, None]
    return x.logit_(eps=1e-7).add_(shift).mul_(contrast[:, None, None, None]).sigmoid_()


class ValidAugment:
    """The batch stage's valid path: uint8 ``[B, 3, H, W]`` on ``device`` → normalised float32 ``[B, 3, size, size]``,
    an antialiased resize of the centre square. It draws nothing and reads no augmentation params: what a trained
    model's predictions need (``Checkpoint.valid_augment``). :class:`BatchAugment` adds the training path.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.device = torch.device(device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor, *, train: bool) -> torch.Tensor:
        if train:
            raise ValueError("ValidAugment has no training path: a training batch needs BatchAugment")
        return self.valid(x)

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` → centre square, one antialiased bilinear resize to ``size``, normalised.

        See :func:`antialiased_resize` for its dtype on CPU and CUDA.
        """
        img = TF.center_crop(x, [min(x.shape[-2:])])
        if img.shape[-1] != self.size:
            img = antialiased_resize(img, self.size)
        return self.normalize_(img.float() / 255)  # a new tensor: never write into the caller's batch

    def normalize_(self, x: torch.Tensor) -> torch.Tensor:
        """float ``[B, 3, H, W]`` in [0, 1] → ImageNet-normalised, in place."""
        return x.sub_(self.mean).div_(self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float ``[B, 3, H, W]`` → float in [0, 1] for display."""
        return (x * self.std + self.mean).clamp(0, 1)


class BatchAugment(ValidAugment):
    """uint8 ``[B, 3, H, W]`` batches on ``device`` → normalised float32 ``[B, 3, size, size]``.

    Train: random flip, rotate, zoom, warp, random resized crop (one resample) and lighting, per image. Valid:
    :class:`ValidAugment`'s path. Random draws come from an own generator seeded with
    ``seed``, on the host: the same seed gives the same sequence of batches on every device, and the batch's plan
    (its projective maps and lighting, 11 numbers per image) is computed there and reaches the device as one
    non-blocking copy, so that augmenting never makes the host wait for the device.

    ``shard`` = (rank, world_size) when each of several processes augments its share of a global batch: every
    rank draws for the whole global batch and keeps its own rows, so an image gets the same augmentation
    whichever rank loads it, and N ranks together produce exactly the batch one process would.
    """

    def __init__(
        self, aug: AugmentParams, size: int, seed: int, device: torch.device, shard: tuple[int, int] = (0, 1)
    ) -> None:
        super().__init__(size, device)
        self.aug = aug
        self.rank, self.world_size = shard
        self.generator = torch.Generator().manual_seed(seed)  # on the host: see the class's docstring

    def __call__(self, x: torch.Tensor, *, train: bool) -> torch.Tensor:
        if not train:
            return self.valid(x)
        n = x.shape[0]
        draws = self.draw(n * self.world_size)  # the global batch's
        return self.train(x, draws.rows(self.rank * n, n), finest=draws.finest())

    def draw(self, n: int) -> Draws:
        """Random parameters for ``n`` images with fastai's distributions (docs/fastai.md §2.3–§2.5), crop per image,
        on the host.

        Always the same number of draws per batch, so one setting never shifts the random stream of another.
        """
        a = self.aug
        u = torch.rand((12, n), generator=self.generator)
        # rotate, zoom, warp_x, warp_y: fastai keeps each with probability p_affine on its own
        keep_affine = torch.rand((4, n), generator=self.generator) < a.p_affine
        keep_lighting = torch.rand((2, n), generator=self.generator) < a.p_lighting

        def uniform(i: int, lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * u[i]

        def kept(keep: torch.Tensor, value: torch.Tensor, neutral: float) -> torch.Tensor:
            return torch.where(keep, value, torch.full_like(value, neutral))

        max_rotate, max_warp, max_light = a.max_rotate * a.mult, a.max_warp * a.mult, a.max_lighting * a.mult
        log_contrast = -math.log(1 - max_light)
        return Draws(
            flip=(u[0] < 0.5) & a.do_flip,
            angle=kept(keep_affine[0], uniform(1, -max_rotate, max_rotate), 0.0),
            zoom=kept(keep_affine[1], uniform(2, a.min_zoom, a.max_zoom), 1.0),
            zoom_x=u[3],
            zoom_y=u[4],
            warp_x=kept(keep_affine[2], uniform(5, -max_warp, max_warp), 0.0),
            warp_y=kept(keep_affine[3], uniform(6, -max_warp, max_warp), 0.0),
            crop_side=uniform(7, a.min_scale, 1.0).sqrt(),
            crop_x=u[8],
            crop_y=u[9],
            brightness=kept(keep_lighting[0], uniform(10, 0.5 * (1 - max_light), 0.5 * (1 + max_light)), 0.5),
            contrast=kept(keep_lighting[1], uniform(11, -log_contrast, log_contrast).exp(), 1.0),
        )

    def train(self, x: torch.Tensor, d: Draws, finest: float | None = None) -> torch.Tensor:
        """Apply draws ``d`` to uint8 ``[B, 3, H, H]``: exactly one ``F.grid_sample`` per batch.

        Anti-aliasing: an output pixel covers about ``H · crop_side / (zoom · size)`` input pixels; bilinear
        sampling reads 2 x 2 of them, so whenever that exceeds 1 the output would alias (keep frequencies it
        cannot hold, as sharp, shimmering edges). So the un-augmented input is first reduced by
        :func:`antialiased_resize` (a low-pass filter) to the resolution where the batch's most zoomed-in image
        reads one input pixel per output pixel.
        This happens before any geometry, in the content frame of :func:`sampling_grid`, so it removes
        frequencies without moving anything: the geometric resample is still the single grid_sample. fastai gets
        a similar softening from its two bilinear passes; measured against it and against no prefilter in
        docs/fastai.md §2.7. ``finest``: that image's region when ``d`` is a share of a global batch
        (:meth:`Draws.finest` of the whole batch).
        """
        h, w = x.shape[-2:]
        if h != w:
            raise ValueError(f"BatchAugment.train needs square items (the item stage makes them), got {h}x{w}")
        needed = math.ceil(self.size / (d.finest() if finest is None else finest))
        img = antialiased_resize(x, needed).float() if h > needed else x.float()
        transform, brightness, contrast = _to_device(d, x.device)
        grid = sampling_grid(transform, self.size, h)
        # the grid is reflected already and stays within the edge pixels' centres of the item: "border" only
        # clamps the last half pixel of a reduced copy
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False).div_(255)
        if self.aug.max_lighting * self.aug.mult > 0 and self.aug.p_lighting > 0:
            out = lighting_(out, brightness, contrast)
        return self.normalize_(out)
