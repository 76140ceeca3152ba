"""Stage split: which images train, which validate (and, with the official lists, which test).

``random`` is fastai's ``RandomSplitter`` (docs/fastai.md §1.4) over the paths sorted, so the split is the same on every
machine; fastai's own follows directory order and differs between filesystems. ``folder`` is fastai's
``GrandparentSplitter`` (the top folder under ``images/`` names the split), ``csv_column`` its ``ColSplitter`` (a
boolean column of the labels CSV).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from petbreeds.config import SplitParams
from petbreeds.errors import PetbreedsError

if TYPE_CHECKING:  # the split stage reads the CSV; the training stages, which read splits, never need labelling
    from petbreeds.data.labelling import LabelsCsv

SPLITS = ("train", "valid", "test")
# official: in neither trainval.txt nor test.txt; folder: in neither split folder; kept in the table, never trained on
UNLISTED = "unlisted"
# csv_column: the cells that mean "validates" and "trains" (fastai's ColSplitter reads a bool column)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def random_permutation(n: int, seed: int) -> list[int]:
    """``torch.manual_seed(seed); torch.randperm(n)``, fastai's permutation, on a local generator so the
    global RNG (model init) is left alone; both give the same numbers (tests/test_splitting.py checks)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def random_split(n: int, valid_pct: float, seed: int) -> list[str]:
    """fastai's RandomSplitter: the first ``int(valid_pct * n)`` items of the permutation validate."""
    split = ["train"] * n
    for i in random_permutation(n, seed)[: int(valid_pct * n)]:
        split[i] = "valid"
    return split


def stratified_split(labels: list[str], valid_pct: float, seed: int) -> list[str]:
    """Per class, ``round(valid_pct * n_c)`` items validate (Python's round: halves go to the even number),
    at most ``n_c - 1`` so every class keeps a training item. One generator seeded once, classes drawn in
    sorted order, so the split depends only on the items and the seed."""
    generator = torch.Generator().manual_seed(seed)
    split = ["train"] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, lab in enumerate(labels) if lab == label]
        n_valid = min(round(valid_pct * len(members)), len(members) - 1)
        for j in torch.randperm(len(members), generator=generator)[:n_valid].tolist():
            split[members[j]] = "valid"
    return split


def read_stems(path: Path) -> set[str]:
    """Image stems of an official list (``Abyssinian_100 1 1 1`` lines; ``#`` lines are comments)."""
    if not path.is_file():
        raise PetbreedsError(
            f"{path}: not found, but split.method is official; fetch a source that has the official lists "
            "(fetch.source: oxford-iiit-pet) or set split.method: random"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def official_split(paths: list[str], valid_pct: float, seed: int, annotations_dir: Path) -> list[str]:
    """test.txt → test; trainval.txt → RandomSplitter over those items (in path order) → train/valid;
    in neither → unlisted."""
    test, trainval = read_stems(annotations_dir / "test.txt"), read_stems(annotations_dir / "trainval.txt")
    stems = [PurePosixPath(p).stem for p in paths]
    split = ["test" if s in test else UNLISTED for s in stems]
    in_trainval = [i for i, s in enumerate(stems) if s in trainval and s not in test]
    for i, part in zip(in_trainval, random_split(len(in_trainval), valid_pct, seed), strict=True):
        split[i] = part
    return split


def folder_split(paths: list[str], params: SplitParams) -> list[str]:
    """The top folder under ``images/``: ``params.train_folder`` trains, ``params.valid_folder`` validates, any
    other is unlisted."""
    top = [p.split("/")[1] if p.count("/") > 1 else "" for p in paths]
    named = {params.train_folder: "train", params.valid_folder: "valid"}
    split = [named.get(t, UNLISTED) for t in top]
    if "train" not in split or "valid" not in split:
        found = ", ".join(sorted({t for t in top if t})) or "none"
        raise PetbreedsError(
            f"split.method folder: images/ needs a {params.train_folder}/ and a {params.valid_folder}/ folder of "
            f"images (top folders found: {found}); set split.train_folder / split.valid_folder (e.g. val)"
        )
    return split


def csv_column_split(paths: list[str], params: SplitParams, csv: LabelsCsv) -> list[str]:
    """fastai's ColSplitter: ``params.valid_column`` of the labels CSV (true/1/yes validates, false/0/no trains);
    an image the CSV does not name is unlisted."""
    if params.valid_column not in csv.table.columns:
        raise PetbreedsError(
            f"{csv.path}: no column {params.valid_column!r} (it has {', '.join(map(repr, csv.table.columns))}); set "
            "split.valid_column to the CSV's boolean column"
        )
    valid: dict[str, bool] = {}
    for line, (rel, cell) in enumerate(zip(csv.files, csv.table[params.valid_column], strict=True), 2):
        value = cell.strip().lower()
        if value not in _TRUE + _FALSE:
            raise PetbreedsError(
                f"{csv.path} line {line}: {params.valid_column} is {cell!r}; write true or false (or 1/0, yes/no)"
            )
        if rel is not None:
            valid[rel] = value in _TRUE
    return [UNLISTED if p not in valid else "valid" if valid[p] else "train" for p in paths]


def split_items(
    table: pd.DataFrame, params: SplitParams, raw: Path, labels_csv: LabelsCsv | None = None
) -> pd.DataFrame:
    """The index table (any row order) sorted by path, plus a ``split`` column: train, valid, test or unlisted.

    ``raw``: the fetched source (its ``annotations/`` for official); ``labels_csv``: for csv_column, the labels CSV
    as :func:`petbreeds.data.labelling.read_labels_csv` reads it. Raises PetbreedsError when a class has no training
    item: the model could never learn it.
    """
    table = table.sort_values("path", ignore_index=True)
    paths = table["path"].tolist()
    if params.method == "random":
        split = random_split(len(table), params.valid_pct, params.seed)
    elif params.method == "stratified":
        split = stratified_split(table["label"].tolist(), params.valid_pct, params.seed)
    elif params.method == "folder":
        split = folder_split(paths, params)
    elif params.method == "csv_column":
        if labels_csv is None:
            raise ValueError("split.method csv_column needs index.labels_csv")
        split = csv_column_split(paths, params, labels_csv)
    else:
        split = official_split(paths, params.valid_pct, params.seed, raw / "annotations")
    table = table.assign(split=split)

    untrained = sorted(set(table["label"]) - set(table.loc[table["split"] == "train", "label"]))
    if untrained:
        raise PetbreedsError(
            f"split.method {params.method}: no training image left for class(es) {', '.join(untrained)}; "
            "lower split.valid_pct, use split.method: stratified, or add images of those classes"
        )
    return table


def split_metrics(table: pd.DataFrame, vocab: list[str]) -> dict[str, Any]:
    """What ``reports/split.json`` holds: counts per split, and per class in vocab order."""
    counts = table.groupby(["label", "split"]).size()
    per_split = table["split"].value_counts()
    return {
        **{name: int(per_split.get(name, 0)) for name in (*SPLITS, UNLISTED)},
        "per_class": {label: {name: int(counts.get((label, name), 0)) for name in SPLITS} for label in vocab},
    }


def read_vocab(path: Path) -> list[str]:
    """The index stage's ``vocab.json``: the sorted labels, class i = vocab[i]."""
    if not path.is_file():
        raise PetbreedsError(f"{path} not found; run `dvc repro index` first")
    return json.loads(path.read_text(encoding="utf-8"))["vocab"]


def read_split_table(path: Path) -> pd.DataFrame:
    """The split stage's table (the index plus ``split``), exactly as written: a label such as "NA" stays text."""
    if not path.is_file():
        raise PetbreedsError(f"{path} not found; run `dvc repro split` first")
    table = pd.read_csv(path, keep_default_na=False)
    missing = {"path", "label", "split"} - set(table.columns)
    if missing:
        raise PetbreedsError(f"{path} lacks column(s) {', '.join(sorted(missing))}; re-run `dvc repro split`")
    return table
