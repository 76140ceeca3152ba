"""Looking at the data, as the chapter insists: ``show_batch`` PNG grids and a ``DataBlock.summary`` equivalent.

petbreeds show-batch [--params params.yaml] [--data data] [--out reports]
petbreeds summary    [--params params.yaml] [--data data]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import default_collate

from petbreeds.atomic import atomic_output
from petbreeds.config import Params, load_params
from petbreeds.data.augment import BatchAugment
from petbreeds.data.dataloaders import make_loader
from petbreeds.data.presizing import PresizedImages, load_rgb, presize
from petbreeds.data.splitting import read_split_table, read_vocab
from petbreeds.errors import PetbreedsError

_CELL_INCHES = 2.0
_DPI = 100


def save_show_batch(
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    vocab: list[str],
    augment: BatchAugment,
    path: Path,
    *,
    train: bool,
    max_n: int = 16,
) -> None:
    """Write a PNG grid of the first ``max_n`` images of a loader batch as the model sees them, with labels.

    ``x_uint8``: ``[B, 3, H, W]`` from the loader; it goes through ``augment`` (train or valid) and is shown
    denormalised.
    """
    n = min(max_n, x_uint8.shape[0])
    with torch.no_grad():
        shown = augment.denormalize(augment(x_uint8[:n].to(augment.device), train=train))
    pixels = shown.permute(0, 2, 3, 1).cpu().numpy()
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * _CELL_INCHES, rows * _CELL_INCHES), dpi=_DPI)  # no pyplot: Agg, no global state
    for i, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(pixels[i])
            ax.set_title(vocab[int(y[i])], fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def _read_inputs(params_path: str, data_dir: Path) -> tuple[Params, pd.DataFrame, list[str]]:
    """params, ``split.csv`` and the vocab, or a PetbreedsError saying which stage to run."""
    return load_params(params_path), read_split_table(data_dir / "split.csv"), read_vocab(data_dir / "vocab.json")


def _split_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    return table[table["split"] == split].reset_index(drop=True)


def _arguments(prog: str, argv: list[str], out: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"petbreeds {prog}")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--data", default="data", type=Path, help="folder with split.csv, vocab.json, raw/")
    if out:
        parser.add_argument("--out", default="reports", type=Path, help="folder for the PNGs (default: reports)")
    return parser.parse_args(argv)


def show_batch_cli(argv: list[str]) -> int:
    """``petbreeds show-batch``: ``show_batch_train.png`` (augmented) and ``show_batch_valid.png`` in ``--out``."""
    args = _arguments("show-batch", argv, out=True)
    params, table, vocab = _read_inputs(args.params, args.data)
    data = params.data.model_copy(update={"num_workers": 0})  # one batch: starting workers would cost more
    for split in ("train", "valid"):
        loader = make_loader(
            _split_rows(table, split), args.data / "raw", vocab, data, train=split == "train", seed=params.seed
        )
        x, y = next(iter(loader))
        augment = BatchAugment(params.augment, data.size, params.seed, torch.device("cpu"))
        path = args.out / f"show_batch_{split}.png"
        save_show_batch(x, y, vocab, augment, path, train=split == "train")
        print(f"wrote {path}")
    return 0


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)} range [{t.min().item():.3g}, {t.max().item():.3g}]"


def collate_items(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``default_collate`` with a message that says why it failed (items of different sizes, the usual case)."""
    shapes = sorted({tuple(x.shape) for x, _ in items})
    if len(shapes) > 1:
        raise PetbreedsError(
            f"cannot collate {len(items)} items of different sizes {shapes}: every item must be resized to one "
            "size first (data.item_size) before it can be stacked into a batch"
        )
    return default_collate(items)


def summary_cli(argv: list[str]) -> int:
    """``petbreeds summary``: one training sample, then one batch, through every data step (fastai's
    ``DataBlock.summary``). Prints what each step produces and stops at the first step that fails."""
    args = _arguments("summary", argv, out=False)
    state: dict[str, Any] = {}

    def setup() -> str:
        state["params"], state["table"], state["vocab"] = _read_inputs(args.params, args.data)
        counts = state["table"]["split"].value_counts().to_dict()
        return f"{len(state['table'])} items {counts}, {len(state['vocab'])} classes"

    def item() -> str:
        train = _split_rows(state["table"], "train")
        if train.empty:
            raise PetbreedsError("no training items in split.csv; check split.valid_pct")
        row = train.iloc[0]
        state["path"], state["label"] = args.data / "raw" / row["path"], row["label"]
        if row["label"] not in state["vocab"]:
            raise PetbreedsError(f"label {row['label']!r} is not in vocab.json; re-run dvc repro index split")
        state["target"] = state["vocab"].index(row["label"])
        return f"{state['path']} → label {state['label']!r} → class index {state['target']}"

    def decode() -> str:
        with Image.open(state["path"]) as raw:
            stored = f"{raw.format} {raw.mode} {raw.size[0]}x{raw.size[1]}"
        state["img"] = load_rgb(state["path"], min_side=state["params"].data.item_size)
        return f"file {stored} → decoded RGB {state['img'].size[0]}x{state['img'].size[1]}"

    def resize() -> str:
        data = state["params"].data
        x = presize(state["img"], data.item_size, data.resize_method, data.pad_mode)
        return f"Resize({data.item_size}, {data.resize_method}) → {_describe(x)}"

    def collate() -> str:
        p, train = state["params"], _split_rows(state["table"], "train")
        class_index = {label: i for i, label in enumerate(state["vocab"])}
        n = min(p.data.batch_size, len(train))
        dataset = PresizedImages(
            [args.data / "raw" / path for path in train["path"][:n]],
            [class_index[label] for label in train["label"][:n]],
            p.data,
            train=True,
            seed=p.seed,
        )
        state["x"], state["y"] = collate_items([dataset[i] for i in range(n)])
        return f"x {_describe(state['x'])}, y {_describe(state['y'])}"

    def augment() -> str:
        p = state["params"]
        aug = BatchAugment(p.augment, p.data.size, p.seed, torch.device("cpu"))
        train, valid = aug(state["x"], train=True), aug(state["x"], train=False)
        return f"train {_describe(train)}; valid {_describe(valid)} (ImageNet-normalised)"

    steps: list[tuple[str, Callable[[], str]]] = [
        ("params and split table", setup),
        ("sample: path, label, class index", item),
        ("sample: decode", decode),
        ("sample: item transform", resize),
        ("batch: collate", collate),
        ("batch: augment and normalise", augment),
    ]
    for i, (name, step) in enumerate(steps, 1):
        try:
            print(f"{i}. {name}: {step()}")
        except Exception as e:  # report any failure as the step it happened in, which is this command's job
            print(f"{i}. {name}: FAILED: {e}")
            return 1
    return 0
