"""Stage index: find the images, label each, check that each one decodes.

fastai's ``get_image_files`` + a labeller (docs/fastai.md §1.1-§1.3), chosen by ``index.label_from``:
``filename_regex`` (``RegexLabeller`` on the file name, the book's), ``parent_folder`` (``parent_label``: the folder
the image is in) or ``csv`` (``ColReader``: a file,label table). Three differences on purpose: the paths are sorted
(fastai keeps directory order), every file is decoded once up front (fastai finds a broken file mid-epoch), and a
file that cannot be used is excluded with a reason instead of raising.
"""

from __future__ import annotations

import mimetypes
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from petbreeds.config import IndexParams, LabelsCsvParams
from petbreeds.errors import PetbreedsError
from petbreeds.progress import progress

# fastai's image_extensions: every suffix whose MIME type is image/*. Python's built-in table, not the OS's
# /etc/mime.types (which fastai may pick up), so the same files are found on every machine.
IMAGE_EXTENSIONS = frozenset(
    ext for ext, mime in mimetypes.MimeTypes().types_map[True].items() if mime.startswith("image/")
)
EXCLUSION_REASONS = (
    "empty",
    "no_label_match",
    "unknown_class",
    "undecodable",
    "no_class_folder",
    "not_in_csv",
    "csv_file_missing",
    "csv_outside_source",
)
INDEX_COLUMNS = ["path", "label", "width", "height", "format", "bytes"]
EXCLUDED_COLUMNS = ["path", "reason", "detail"]


@dataclass(frozen=True)
class IndexResult:
    """``table``: one row per usable image (INDEX_COLUMNS), sorted by path; ``excluded``: one row per
    unusable file (EXCLUDED_COLUMNS), sorted by path; ``vocab``: the sorted labels; ``small_classes``: the labels
    with fewer than ``min_class_images`` images, when no ``annotations/list.txt`` says which classes exist."""

    table: pd.DataFrame
    excluded: pd.DataFrame
    vocab: list[str]
    small_classes: list[str]
    min_class_images: int
    label_from: str = "filename_regex"  # index.label_from: what the warning suggests

    def metrics(self) -> dict[str, Any]:
        """What ``reports/index.json`` holds: counts only, every reason present (0 when none).

        Only numbers (MLflow logs them as metrics): the small classes are counted here, named in :meth:`warning` and
        in ``per_class``.
        """
        per_reason = self.excluded["reason"].value_counts()
        per_class = self.table["label"].value_counts()
        return {
            "images": len(self.table),
            "classes": len(self.vocab),
            "excluded_total": len(self.excluded),
            "excluded": {reason: int(per_reason.get(reason, 0)) for reason in EXCLUSION_REASONS},
            "small_classes": len(self.small_classes),
            "per_class": {label: int(per_class[label]) for label in self.vocab},
        }

    def warning(self) -> str | None:
        """The line :func:`index_images` prints on stderr when a class looks like stray files, else None."""
        if not self.small_classes:
            return None
        per_class = self.table["label"].value_counts()
        named = ", ".join(
            f"{label} ({per_class[label]} image{'s' if per_class[label] > 1 else ''})" for label in self.small_classes
        )
        return (
            f"warning: index: class(es) {named} have fewer than index.min_class_images={self.min_class_images} "
            "images; if they are stray files, exclude them: move or rename them in fetch.local_path (data/raw is "
            "its copy) and re-run"
            + (
                ", or tighten index.label_regex in params.yaml so that their names do not match"
                if self.label_from == "filename_regex"
                else ""
            )
        )

    def summary(self) -> str:
        excluded = ", ".join(f"{n} {reason}" for reason, n in self.metrics()["excluded"].items() if n)
        return f"index: {len(self.table)} images, {len(self.vocab)} classes, {len(self.excluded)} excluded" + (
            f" ({excluded})" if excluded else ""
        )


def find_image_files(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively, as sorted posix paths relative to it.

    fastai's rules: the lower-cased last suffix is an image extension; hidden files and dot-folders are skipped.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(folder)
        found += [
            (base / name).as_posix()
            for name in filenames
            if not name.startswith(".") and "." + name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def label_of(pattern: re.Pattern[str], path: str) -> str | None:
    """fastai's RegexLabeller on the file name: ``re.search``, group 1; None when it does not match."""
    match = pattern.search(path.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def inspect_image(path: Path) -> tuple[int, int, str] | str:
    """(width, height, PIL format) when the whole image decodes, else Pillow's error message."""
    try:
        with Image.open(path) as img:
            img.load()  # open() reads only the header; a truncated file fails here
            return img.width, img.height, str(img.format)
    # Anything Pillow raises on a broken file (OSError, SyntaxError, ValueError, DecompressionBombError...)
    # means the same thing here: the file cannot be used.
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _inspect_all(paths: list[Path], workers: int) -> list[tuple[int, int, str] | str]:
    workers = min(workers or os.cpu_count() or 1, max(len(paths), 1))
    if workers == 1:
        return list(progress(map(inspect_image, paths), "index: decoding", "image", total=len(paths)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # map keeps the input order, so the result does not depend on which worker finished first.
        decoded = pool.map(inspect_image, paths, chunksize=max(1, len(paths) // (8 * workers)))
        return list(progress(decoded, "index: decoding", "image", total=len(paths)))


def index_images(root: Path, params: IndexParams) -> IndexResult:
    """Index ``root/images`` (fastai's ``get_image_files(path/'images')``), labelled as ``params.label_from`` says.

    Paths in the result are relative to ``root``. With ``root/annotations/list.txt``, a label that is not one of
    its classes is excluded (``unknown_class``); without it, the labels with fewer than
    ``params.min_class_images`` images are kept and named in :meth:`IndexResult.warning` (the stage prints it). Raises
    PetbreedsError when no usable image is left, or when a class listed in ``list.txt`` has none.
    """
    folder = root / "images"
    if not folder.is_dir():
        raise PetbreedsError(f"{folder}: not found; the fetch stage puts the images there (run `dvc repro fetch`)")
    pattern = re.compile(params.label_regex)
    if params.label_from == "filename_regex" and pattern.groups < 1:
        raise PetbreedsError(f"params.yaml: index.label_regex {params.label_regex!r} needs a group (...) for the label")
    list_txt = root / "annotations" / "list.txt"
    listed = _listed_classes(list_txt, pattern) if list_txt.is_file() else None

    files = [f"images/{p}" for p in find_image_files(folder)]
    if params.label_from == "filename_regex":
        labels = {rel: label_of(pattern, rel) for rel in files}
        unlabelled = f"file name does not match index.label_regex {pattern.pattern}"
        excluded: list[tuple[str, str, str]] = []
    elif params.label_from == "parent_folder":
        labels, excluded = _folder_labels(files)
        unlabelled = ""
    else:
        labels, excluded = _csv_labels(root, files, params.labels_csv)
        unlabelled = f"empty {params.labels_csv.label_column} in {params.labels_csv.path}"

    rows, to_decode = [], []
    for rel in (f for f in files if f in labels):
        size = (root / rel).stat().st_size
        label = labels[rel]
        if size == 0:
            excluded.append((rel, "empty", "0 bytes"))
        elif not label:
            excluded.append((rel, "no_label_match", unlabelled))
        elif listed is not None and label not in listed:
            excluded.append((rel, "unknown_class", f"label {label!r} is not one of the classes in {list_txt}"))
        else:
            to_decode.append((rel, label, size))
    for (rel, label, size), decoded in zip(
        to_decode, _inspect_all([root / rel for rel, _, _ in to_decode], params.workers), strict=True
    ):
        if isinstance(decoded, str):
            excluded.append((rel, "undecodable", decoded))
        else:
            rows.append((rel, label, *decoded, size))

    table = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    per_class = table["label"].value_counts()
    result = IndexResult(
        table=table,
        excluded=pd.DataFrame(sorted(excluded), columns=EXCLUDED_COLUMNS),
        vocab=sorted(set(table["label"])),
        # With list.txt every kept label is a listed class, however few its images; without it, a label with very
        # few images is most likely a stray file that matched the regex (`IMG_0001.jpg` -> "IMG").
        small_classes=[] if listed is not None else sorted(per_class.index[per_class < params.min_class_images]),
        min_class_images=params.min_class_images,
        label_from=params.label_from,
    )
    if table.empty:
        expected = {
            "filename_regex": f"images named like index.label_regex {pattern.pattern!r} expects",
            "parent_folder": "one folder of images per class (index.label_from parent_folder)",
            "csv": f"the images that {params.labels_csv.path} names (index.label_from csv)",
        }[params.label_from]
        raise PetbreedsError(f"{folder}: no usable image ({result.summary()}); check that the folder holds {expected}")
    if listed is not None:
        _check_annotated_classes(root, list_txt, listed, pattern, result)
    return result


def _listed_classes(list_txt: Path, pattern: re.Pattern[str]) -> set[str]:
    """The classes of the official list: the labels its images get from ``pattern``."""
    # list.txt names images by stem (`Abyssinian_100 1 1 1`); the archive's images are all .jpg, so the same
    # regex gives the labels the images themselves would get.
    stems = [line.split()[0] for line in list_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = (label_of(pattern, f"{stem}.jpg") for stem in stems if not stem.startswith("#"))
    return {label for label in labels if label}


def _check_annotated_classes(
    root: Path, list_txt: Path, listed: set[str], pattern: re.Pattern[str], result: IndexResult
) -> None:
    """Every class of the official list must keep at least one image: a missing breed is a broken download."""
    missing = sorted(listed - set(result.vocab))
    if missing:
        lost = result.excluded[[label_of(pattern, p) in missing for p in result.excluded["path"]]]
        details = "; ".join(f"{r.path}: {r.reason}" for r in lost.head(5).itertuples())
        raise PetbreedsError(
            f"{list_txt} lists class(es) {', '.join(missing)} but no usable image of them is under {root / 'images'}"
            + (f" (excluded: {details})" if details else "")
            + "; re-fetch the data (`dvc repro fetch`) or repair those files"
        )


def _folder_labels(files: list[str]) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """fastai's ``parent_label``: the name of the folder each image is in. An image directly in ``images/``, or in a
    folder that also holds class folders (``train/`` of a train/valid tree, a class with sub-classes), is in no
    class folder: excluded, with the reason."""
    folders = {rel.rsplit("/", 1)[0] for rel in files}
    holding_folders = {f.rsplit("/", 1)[0] for f in folders if "/" in f}  # folders that hold image folders
    labels, excluded = {}, []
    for rel in files:
        folder = rel.rsplit("/", 1)[0]
        if folder == "images":
            excluded.append((rel, "no_class_folder", "directly in images/: put each image in its class's folder"))
        elif folder in holding_folders:
            inner = sorted(f.rsplit("/", 1)[1] for f in folders if f.rsplit("/", 1)[0] == folder)
            excluded.append(
                (rel, "no_class_folder", f"{folder}/ holds class folders ({', '.join(inner[:3])}) beside this image")
            )
        else:
            labels[rel] = folder.rsplit("/", 1)[1]
    return labels, excluded


def find_labels_csv(root: Path, csv: LabelsCsvParams) -> Path:
    """``index.labels_csv.path`` in the fetched source: beside ``images/`` or inside it (a folder of your own)."""
    for candidate in (root / csv.path, root / "images" / csv.path):
        if candidate.is_file():
            return candidate
    raise PetbreedsError(
        f"index.labels_csv.path {csv.path!r}: not found in the source (looked for {root / csv.path} and "
        f"{root / 'images' / csv.path}); set it to the CSV's path inside fetch.local_path"
    )


@dataclass(frozen=True)
class LabelsCsv:
    """The labels CSV as read: where it is, its rows (every cell text), and each row's file as a path relative to
    the fetched source (``csv.prefix`` + the file, from the CSV's folder; None when it leaves ``images/``)."""

    path: Path
    table: pd.DataFrame
    files: list[str | None]


def read_labels_csv(root: Path, csv: LabelsCsvParams, columns: list[str]) -> LabelsCsv:
    """``index.labels_csv`` in the fetched source ``root``, its ``columns`` checked (an error names the missing)."""
    path = find_labels_csv(root, csv)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise PetbreedsError(
            f"{path}: not a readable CSV ({e}); fix it or point index.labels_csv.path elsewhere"
        ) from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PetbreedsError(
            f"{path}: no column {', '.join(map(repr, missing))} (it has {', '.join(map(repr, table.columns))}); set "
            "index.labels_csv.file_column / label_column (split.valid_column for split.method csv_column)"
        )
    images = (root / "images").resolve()
    base = path.parent.resolve()

    def relative(file: str) -> str | None:
        resolved = Path(os.path.normpath(base / csv.prefix / file))
        return (Path("images") / resolved.relative_to(images)).as_posix() if resolved.is_relative_to(images) else None

    return LabelsCsv(path, table, [relative(f) for f in table[csv.file_column]])


def _csv_labels(
    root: Path, files: list[str], csv: LabelsCsvParams
) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """fastai's ``ColReader``: each image's label from the CSV's row that names it. A row naming a file that is
    not there, or one outside the source, and an image no row names, are excluded with the reason."""
    read = read_labels_csv(root, csv, [csv.file_column, csv.label_column])
    path = read.path
    present = set(files)
    labels: dict[str, str] = {}
    excluded = []
    rows = zip(read.table[csv.file_column], read.files, read.table[csv.label_column], strict=True)
    for line, (file, rel, label) in enumerate(rows, 2):  # line 1 is the header
        if rel is None:
            excluded.append((file, "csv_outside_source", f"{path.name} line {line} names a file outside the source"))
        elif rel not in present:
            excluded.append((rel, "csv_file_missing", f"{path.name} line {line} names it; no such image in the source"))
        elif labels.get(rel, label) != label:
            raise PetbreedsError(
                f"{path} line {line}: {file} labelled {label!r}, an earlier line labels it {labels[rel]!r}; "
                "keep one label per image"
            )
        else:
            labels[rel] = label
    excluded += [(rel, "not_in_csv", f"{path.name} has no row for it") for rel in files if rel not in labels]
    return labels, excluded
