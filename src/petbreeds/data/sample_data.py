"""The generated offline dataset: 37 "breeds" of drawn animals, in the real archive's layout.

Each breed has a fixed look — an outline (shape and aspect), cat or dog ears, two colours and a coat
pattern — drawn under the nuisance a photo has: position, scale, rotation, a cluttered background,
lighting, white balance, noise and blur. Four pairs copy the confusions the book's real model makes
(pit bull / Staffordshire, Ragdoll / Birman, Bengal / Egyptian Mau, British Shorthair / Russian Blue):
same outline, slightly different colour, pattern or aspect. Image sizes and aspect ratios vary, so
presizing matters as it does on the photos.

Every image comes from its own generator seeded by (seed, class id, n): the bytes depend only on the
params, never on the order or the number of processes that wrote them.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from petbreeds.atomic import atomic_directory
from petbreeds.config import SampleParams

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Look:
    """A breed's visual signature.

    outline: ellipse | polygon | star | flower, with ``lobes`` corners / points / petals.
    aspect: body height / width. pattern: how ``mark`` is laid over ``body`` (see ``_pattern``);
    ``scale`` is its frequency in periods per body radius (for points: where the dark tips begin).
    """

    outline: str
    lobes: int
    aspect: float
    body: RGB
    mark: RGB
    pattern: str
    scale: float


WHITE: RGB = (240, 236, 228)

# Cats (capitalised, pointed ears) then dogs (lower case, drooping ears), as in the real dataset.
CATS: dict[str, Look] = {
    "Abyssinian": Look("ellipse", 0, 1.25, (196, 120, 60), (120, 70, 35), "stripes", 5.0),
    "Bengal": Look("flower", 5, 1.0, (214, 160, 72), (70, 45, 20), "rosettes", 2.5),
    "Birman": Look("polygon", 6, 1.1, (236, 226, 205), (100, 80, 62), "points", 0.7),
    "Bombay": Look("ellipse", 0, 0.9, (28, 28, 32), (60, 60, 66), "solid", 0.0),
    "British_Shorthair": Look("ellipse", 0, 0.8, (125, 135, 150), (95, 105, 120), "solid", 0.0),
    "Egyptian_Mau": Look("flower", 5, 1.0, (196, 170, 125), (60, 50, 40), "dots", 2.5),
    "Maine_Coon": Look("star", 8, 1.2, (150, 105, 60), (60, 40, 25), "waves", 3.0),
    "Persian": Look("flower", 9, 0.95, (242, 238, 230), (205, 195, 180), "solid", 0.0),
    "Ragdoll": Look("polygon", 6, 1.1, (236, 226, 205), (92, 90, 112), "points", 0.6),
    "Russian_Blue": Look("ellipse", 0, 1.3, (118, 132, 155), (95, 108, 130), "solid", 0.0),
    "Siamese": Look("polygon", 4, 1.3, (232, 218, 190), (58, 40, 30), "points", 0.65),
    "Sphynx": Look("polygon", 5, 1.15, (222, 170, 160), (185, 125, 120), "waves", 4.0),
}
DOGS: dict[str, Look] = {
    "american_bulldog": Look("polygon", 4, 0.9, WHITE, (165, 110, 70), "patches", 0.8),
    "american_pit_bull_terrier": Look("polygon", 7, 1.0, (160, 112, 78), WHITE, "bicolour", 0.0),
    "basset_hound": Look("ellipse", 0, 0.55, (140, 80, 40), WHITE, "bicolour", 0.0),
    "beagle": Look("ellipse", 0, 0.75, (200, 140, 80), (30, 25, 22), "stripes", 1.5),
    "boxer": Look("polygon", 4, 1.2, (190, 120, 60), (245, 240, 235), "blaze", 0.0),
    "chihuahua": Look("polygon", 3, 1.0, (220, 180, 130), (170, 130, 90), "solid", 0.0),
    "english_cocker_spaniel": Look("flower", 6, 1.1, (170, 95, 45), (115, 58, 28), "waves", 3.0),
    "english_setter": Look("ellipse", 0, 0.7, (245, 242, 235), (70, 60, 55), "dots", 5.0),
    "german_shorthaired": Look("polygon", 5, 0.8, (100, 65, 45), (230, 225, 215), "dots", 4.0),
    "great_pyrenees": Look("flower", 8, 1.0, (246, 244, 238), (220, 210, 190), "solid", 0.0),
    "havanese": Look("flower", 10, 1.0, (225, 205, 170), (150, 120, 90), "patches", 1.0),
    "japanese_chin": Look("ellipse", 0, 1.0, (245, 242, 238), (30, 25, 25), "rings", 1.5),
    "keeshond": Look("star", 10, 1.0, (150, 150, 145), (40, 40, 40), "points", 0.6),
    "leonberger": Look("star", 7, 1.1, (180, 130, 70), (60, 40, 25), "points", 0.55),
    "miniature_pinscher": Look("polygon", 3, 1.3, (40, 30, 28), (180, 110, 60), "bicolour", 0.0),
    "newfoundland": Look("flower", 7, 0.9, (30, 28, 28), (55, 50, 50), "solid", 0.0),
    "pomeranian": Look("star", 12, 1.0, (235, 150, 60), (250, 200, 140), "solid", 0.0),
    "pug": Look("ellipse", 0, 1.0, (210, 185, 140), (40, 35, 30), "points", 0.6),
    "saint_bernard": Look("polygon", 6, 0.9, (245, 242, 235), (150, 70, 30), "patches", 0.8),
    "samoyed": Look("star", 9, 0.95, (250, 250, 248), (228, 226, 220), "solid", 0.0),
    "scottish_terrier": Look("polygon", 4, 0.8, (35, 35, 38), (75, 75, 80), "stripes", 5.0),
    "shiba_inu": Look("polygon", 3, 1.0, (215, 130, 60), (245, 235, 220), "bicolour", 0.0),
    "staffordshire_bull_terrier": Look("polygon", 7, 1.0, (130, 92, 70), WHITE, "bicolour", 0.0),
    "wheaten_terrier": Look("flower", 12, 1.0, (225, 200, 150), (195, 170, 125), "waves", 5.0),
    "yorkshire_terrier": Look("flower", 6, 1.2, (110, 100, 95), (200, 160, 100), "points", 0.6),
}
# The official class ids (list.txt's CLASS-ID) number the breeds in case-insensitive alphabetical order.
BREEDS: list[str] = sorted([*CATS, *DOGS], key=str.lower)

LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-25:Cat 1:12:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)


def _outline(look: Look, points: int = 96) -> np.ndarray:
    """Body outline in body units (radius ~1, y down), float64 [points, 2]."""
    t = np.linspace(0.0, 2.0 * math.pi, points, endpoint=False)
    if look.outline == "ellipse":
        r = np.ones_like(t)
    elif look.outline == "polygon":  # a regular polygon, one corner pointing up
        sector = 2.0 * math.pi / look.lobes
        r = math.cos(sector / 2) / np.cos((t + math.pi / 2) % sector - sector / 2)
    elif look.outline == "star":  # fur-like zigzag
        r = 1.0 - 0.18 * np.abs(np.sin(look.lobes * t / 2))
    elif look.outline == "flower":  # smooth lobes
        r = 1.0 + 0.12 * np.cos(look.lobes * t)
    else:
        raise ValueError(f"unknown outline {look.outline!r}")
    return np.stack([r * np.cos(t), r * np.sin(t) * look.aspect], axis=1) / math.sqrt(look.aspect)


def _ears(cat: bool, aspect: float) -> list[np.ndarray]:
    """Two ears in body units: pointed triangles on top for cats, drooping ovals at the sides for dogs."""
    half_width, top = 1 / math.sqrt(aspect), -math.sqrt(aspect)  # the body's extent
    if cat:
        left = np.array([[-0.7 * half_width, 0.6 * top], [-0.55 * half_width, 1.4 * top], [-0.1, 0.85 * top]])
    else:
        t = np.linspace(0.0, 2.0 * math.pi, 24, endpoint=False)
        left = np.stack([-0.95 * half_width + 0.25 * np.cos(t), 0.35 * top + 0.55 * np.sin(t)], axis=1)
    return [left, left * np.array([-1.0, 1.0])]


def _pattern(look: Look, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How much of ``mark`` covers ``body`` at body coordinates (u, v): float32 in [0, 1], u's shape.

    Phases are drawn per image so the coat pattern moves while its kind and scale stay the breed's.
    """
    s, kind = look.scale, look.pattern
    phase = rng.uniform(0.0, 2.0 * math.pi, size=3).astype(np.float32)
    r = np.sqrt(u * u + v * v)

    def soft(x: np.ndarray, width: float = 0.15) -> np.ndarray:
        return np.clip(0.5 + x / (2 * width), 0.0, 1.0)

    if kind == "solid":  # only a gentle shading towards mark at the bottom
        return 0.3 * np.clip((v + 1.0) / 2.0, 0.0, 1.0)
    if kind == "stripes":
        return soft(np.sin(2 * math.pi * s * v / 2 + phase[0]), 0.3)
    if kind == "waves":
        return soft(np.sin(2 * math.pi * s * (v + 0.12 * np.sin(math.pi * s * u + phase[1])) / 2 + phase[0]), 0.3)
    if kind in ("dots", "rosettes"):
        cells = np.sin(2 * math.pi * s * u / 2 + phase[0]) * np.sin(2 * math.pi * s * v / 2 + phase[1])
        if kind == "dots":
            return soft(cells - 0.55, 0.1)
        return soft(0.15 - np.abs(cells - 0.45), 0.08)  # a dark ring around a body-coloured centre
    if kind == "rings":
        return soft(np.sin(2 * math.pi * s * r + phase[0]), 0.3)
    if kind == "points":  # colourpoint: dark extremities (and ears)
        return soft(r - s, 0.12)
    if kind == "bicolour":  # the belly and chest in mark
        return soft(v - 0.1, 0.1)
    if kind == "blaze":  # a central stripe down the face
        return soft(0.22 - np.abs(u), 0.06)
    if kind == "patches":  # irregular blotches: three random plane waves
        angles = rng.uniform(0.0, math.pi, size=3)
        waves = sum(
            np.sin(2 * math.pi * s * (math.cos(a) * u + math.sin(a) * v) + p)
            for a, p in zip(angles, phase, strict=True)
        )
        return soft(waves - 0.6, 0.15)
    raise ValueError(f"unknown pattern {kind!r}")


def _image_size(rng: np.random.Generator, p: SampleParams) -> tuple[int, int]:
    """(width, height): the long side uniform in [min_side, max_side], aspect ratio 1 to 1.6, mostly landscape."""
    long = int(rng.integers(p.min_side, p.max_side + 1))
    short = max(p.min_side, round(long / rng.uniform(1.0, 1.6)))
    return (long, short) if rng.random() < 0.7 else (short, long)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted colour gradient with out-of-focus clutter (random shapes): float32 [height, width, 3].

    Drawn at a quarter of the size and enlarged, which blurs it like a shallow depth of field, cheaply.
    """
    small_w, small_h = max(width // 4, 8), max(height // 4, 8)
    ends = rng.uniform(20, 235, size=(2, 3))
    ends = (ends + ends.mean(axis=1, keepdims=True)) / 2  # halfway to grey: photo-like, not neon
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    ramp = np.clip((xs / small_w - 0.5) * math.cos(angle) + (ys / small_h - 0.5) * math.sin(angle) + 0.5, 0, 1)
    image = Image.fromarray((ends[0] + ramp[..., None] * (ends[1] - ends[0])).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 10))):
        x, y = rng.uniform(0, small_w), rng.uniform(0, small_h)
        w, h = rng.uniform(0.05, 0.3, size=2) * min(small_w, small_h)
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = [x - w, y - h, x + w, y + h]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def render(name: str, n: int, params: SampleParams) -> Image.Image:
    """Image ``n`` of breed ``name``: an RGB PIL image, the same pixels for the same arguments."""
    class_id = BREEDS.index(name) + 1
    rng = np.random.default_rng([params.seed, class_id, n])
    look = CATS.get(name) or DOGS[name]
    width, height = _image_size(rng, params)
    pixels = _background(rng, width, height)

    # Place the animal: radius, centre (ears may leave the frame a little), tilt; draw its silhouette.
    radius = rng.uniform(0.25, 0.4) * min(width, height)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(1.3 * radius, height - radius)
    tilt = math.radians(rng.uniform(-30.0, 30.0))
    cos, sin = math.cos(tilt), math.sin(tilt)
    parts = [
        (p @ np.array([[cos, sin], [-sin, cos]])) * radius + (cx, cy)
        for p in [_outline(look), *_ears(name in CATS, look.aspect)]
    ]
    corners = np.concatenate(parts)
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 3, (width, height))
    silhouette = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    draw = ImageDraw.Draw(silhouette)
    for part in parts:
        draw.polygon([(x - x0, y - y0) for x, y in part], fill=255)
    mask = np.asarray(silhouette.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)[..., None] / 255.0

    # Body coordinates of the pixels in the animal's box, so the pattern turns and scales with the body.
    dy, dx = np.ogrid[y0 - cy : y1 - cy, x0 - cx : x1 - cx]
    u = (cos * dx + sin * dy).astype(np.float32) / radius
    v = (cos * dy - sin * dx).astype(np.float32) / radius
    body = np.array(look.body, dtype=np.float32) + rng.normal(0.0, 8.0, size=3).astype(np.float32)
    mark = np.array(look.mark, dtype=np.float32) + rng.normal(0.0, 8.0, size=3).astype(np.float32)
    cover = _pattern(look, u, v, rng)[..., None]
    shade = (1.08 - 0.2 * np.clip(u * u + v * v, 0.0, 1.5))[..., None]  # rounder: darker towards the rim
    animal = (body + (mark - body) * cover) * shade
    box = pixels[y0:y1, x0:x1]
    box += (animal - box) * mask

    # The photo: contrast, exposure, a light gradient, white balance, sensor noise, sometimes blur.
    contrast, exposure = rng.uniform(0.75, 1.25), rng.uniform(0.7, 1.3)
    light_angle, light = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.35)
    balance = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    across = (np.arange(width, dtype=np.float32) / width - 0.5) * math.cos(light_angle)
    down = (np.arange(height, dtype=np.float32) / height - 0.5) * math.sin(light_angle)
    light_map = 1 + light * (across[None, :] + down[:, None])
    pixels += 128 * (1 - contrast) / contrast  # (p - 128) * contrast + 128, with the contrast folded into the gain
    pixels *= light_map[..., None] * (balance * (contrast * exposure))
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(0.0, 6.0)
    image = Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image


def _write_image(images_dir: Path, params: SampleParams, item: tuple[str, int]) -> None:
    name, n = item
    render(name, n, params).save(images_dir / f"{name}_{n}.jpg", quality=90)


def _annotation_line(name: str, n: int) -> str:
    """``Image CLASS-ID SPECIES BREED-ID`` as in the official lists (species 1 cat, 2 dog)."""
    cat = name in CATS
    breed_id = list(CATS if cat else DOGS).index(name) + 1
    return f"{name}_{n} {BREEDS.index(name) + 1} {1 if cat else 2} {breed_id}\n"


def generate_sample(out_dir: str | os.PathLike[str], params: SampleParams) -> None:
    """Write ``images/<Breed>_<n>.jpg`` (n = 1..per_breed) and ``annotations/{list,trainval,test}.txt``.

    ``out_dir`` is replaced as a whole, atomically. Odd n go to trainval, even n to test (about half
    each, like the official split). Images are drawn in parallel over the cores.
    """
    items = [(name, n) for name in BREEDS for n in range(1, params.per_breed + 1)]
    with atomic_directory(out_dir) as tmp:
        images_dir = tmp / "images"
        images_dir.mkdir()
        workers = min(os.cpu_count() or 1, len(items))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # list() re-raises a worker's exception here
            list(pool.map(partial(_write_image, images_dir, params), items, chunksize=8))
        annotations = tmp / "annotations"
        annotations.mkdir()
        (annotations / "list.txt").write_text(LIST_HEADER + "".join(_annotation_line(*item) for item in items))
        for split, parity in (("trainval", 1), ("test", 0)):
            lines = [_annotation_line(name, n) for name, n in items if n % 2 == parity]
            (annotations / f"{split}.txt").write_text("".join(lines))
