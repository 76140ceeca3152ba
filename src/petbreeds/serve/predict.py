"""Breeds for new images: fastai's ``learn.predict``, from Python and from the command line.

    import petbreeds
    for p in petbreeds.predict(Path("my_pets"), top_k=3):   # petbreeds.serve.predict.predict
        print(p.path, p.top_k)            # [("beagle", 0.93), ("basset_hound", 0.04), ("harrier", 0.01)]

    petbreeds predict photo.jpg                      # one image: the top-k breeds, one per line
    petbreeds predict my_pets/ --out preds.csv       # a folder: CSV rows path, pred_1, prob_1, ...
    petbreeds predict photo.jpg --tta 4              # fastai's learn.tta: 4 more passes, training transforms

The model is ``models/model.pt`` of the current folder, else of the project (the nearest folder up that holds
dvc.yaml), unless one is named (``--model``, ``model_path``).

Images go through exactly the evaluate stage's validation transforms: the valid item stage
(:class:`~petbreeds.data.presizing.PresizedImages`, centred, with the checkpoint's item_size and resize method),
then the batch stage's valid path (``BatchAugment(train=False)``: resize to the checkpoint's size, normalise).
:class:`Predictor` is that one path, from files or in-memory image bytes to breeds; ``predict`` and the MLflow
model (:mod:`petbreeds.serve.mlflow_model`) both go through it. With ``tta`` > 0 it is fastai's ``learn.tta`` with
its defaults (petbreeds.learn.tta): ``tta`` more passes through the training transforms the checkpoint records,
seeded by :data:`TTA_SEED` and each image's place in the call, so the same call gives the same breeds.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from petbreeds.atomic import atomic_write_text
from petbreeds.data.presizing import ImageSource, PresizedImages
from petbreeds.errors import PetbreedsError
from petbreeds.learn.checkpoint import load_checkpoint
from petbreeds.learn.device import Compute, pick_device, resolve_precision
from petbreeds.learn.inference import get_preds
from petbreeds.learn.tta import FASTAI_BETA, FASTAI_USE_MAX, combine
from petbreeds.progress import progress
from petbreeds.runtime import default_model
from petbreeds.serve.prediction import Prediction

log = logging.getLogger(__name__)

BATCH_SIZE = 64  # images decoded and predicted at a time: bounds memory for large folders
TTA_SEED = 0  # the augmented passes' crops and draws (any fixed number: the same call, the same answer)


def image_files(folder: Path) -> list[Path]:
    """Every file below ``folder``, sorted, except hidden ones (fastai's get_image_files rule).

    Which of them are images is decided by decoding them, not by their names, so that nothing is dropped
    without a reason.
    """
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


class Predictor:
    """A checkpoint loaded once, on ``device`` (CUDA when present), and the one path from images to its breeds."""

    def __init__(self, model_path: Path, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.model, self.checkpoint = load_checkpoint(model_path, self.device)
        self._augment = self.checkpoint.valid_augment(self.device)
        self._compute = Compute(self.device, resolve_precision("auto", self.device), channels_last=False)

    def __call__(
        self,
        images: Sequence[ImageSource],
        top_k: int = 3,
        names: Sequence[str] | None = None,
        skippable: Collection[int] = (),
        show_progress: bool = False,
        tta: int = 0,
    ) -> list[Prediction]:
        """The ``top_k`` breeds of each image (a file, or an image file's bytes), in input order; with ``tta`` > 0
        from fastai's ``learn.tta(n=tta)`` probabilities.

        An image that does not decode is a :class:`PetbreedsError` naming it (``names[i]``; by default its path, or
        ``image i``), unless its index is in ``skippable``: then it is skipped with a logged reason. ``show_progress``:
        a bar over the images on stderr (``petbreeds.progress``).
        """
        if top_k < 1:
            raise PetbreedsError(f"top_k must be >= 1, got {top_k}")
        if tta < 0:
            raise PetbreedsError(f"tta must be >= 0 (augmented passes; 0 = none), got {tta}")
        # one generator per call, so that a call's answer does not depend on the calls before it
        augment = self.checkpoint.train_augment(self.device, TTA_SEED) if tta > 0 else None
        names = names or [str(s) if isinstance(s, Path) else f"image {i}" for i, s in enumerate(images)]
        data = self.checkpoint.data_params(BATCH_SIZE)
        items = PresizedImages(images, [0] * len(images), data, train=False, seed=0)
        cropped = PresizedImages(images, [0] * len(images), data, train=True, seed=TTA_SEED)  # the passes' items
        vocab = self.checkpoint.vocab
        predictions = []
        for indices, x in _batches(items, names, skippable, show_progress):
            # get_preds takes any iterable of (x, y) batches; the targets are placeholders for unlabelled images.
            batch = [(x, torch.zeros(len(x), dtype=torch.int64))]
            logits, _ = get_preds(self.model, batch, self._augment, self._compute)
            probs = logits.softmax(dim=1)
            if augment is not None:
                # pass p crops image i where the training item stage would in epoch p; one pass is one batch
                passes = ((torch.stack([cropped[i, p][0] for i in indices]), batch[0][1]) for p in range(tta))
                aug_logits, _ = get_preds(self.model, passes, augment, self._compute, augmented=True)
                augmented = aug_logits.softmax(dim=1).view(tta, len(indices), -1)
                probs = combine(probs, augmented, FASTAI_BETA, FASTAI_USE_MAX)
            probs, classes = probs.topk(min(top_k, len(vocab)), dim=1)
            for i, p, c in zip(indices, probs.tolist(), classes.tolist(), strict=True):
                path = images[i] if isinstance(images[i], Path) else None
                predictions.append(Prediction(path, [(vocab[k], q) for k, q in zip(c, p, strict=True)]))
        return predictions


def _batches(
    items: PresizedImages, names: Sequence[str], skippable: Collection[int], show_progress: bool
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, uint8 [B, 3, item_size, item_size]) chunks of the decodable items (see :class:`Predictor`)."""
    indices: list[int] = []
    images: list[torch.Tensor] = []
    for i in progress(range(len(items)), "predict", "image", enabled=show_progress):
        try:
            images.append(items[i][0])
        except PetbreedsError as e:
            reason = e.__context__ or e  # Pillow's own words, without the pipeline's advice to re-index
            if isinstance(reason, UnidentifiedImageError):  # its words name the path again, or a BytesIO object
                reason = "no image format recognised"
            if i not in skippable:
                raise PetbreedsError(
                    f"{names[i]}: not an image Pillow can read ({reason}); pass a JPEG, PNG, ..."
                ) from None
            log.warning("skipped %s: not an image (%s)", names[i], reason)
            continue
        indices.append(i)
        if len(indices) == BATCH_SIZE:
            yield indices, torch.stack(images)
            indices, images = [], []
    if indices:
        yield indices, torch.stack(images)


def predict(
    paths: Path | str | Sequence[Path | str],
    model_path: Path | str | None = None,
    top_k: int = 3,
    device: torch.device | None = None,
    show_progress: bool = False,
    tta: int = 0,
) -> list[Prediction]:
    """The ``top_k`` breeds of each image, in input order (a folder's files sorted); CUDA when present; ``tta`` > 0:
    fastai's ``learn.tta(n=tta)`` (:class:`Predictor`).

    ``paths``: image files and/or folders; ``model_path``: a checkpoint, by default :func:`default_model`. Files
    in a folder that are not images are skipped and logged (logger ``petbreeds.serve.predict``); an explicitly named
    file that is not an image is a :class:`PetbreedsError`, as are a missing model and one from another checkpoint
    format. ``show_progress``: a bar over the images on stderr (``petbreeds predict`` on a folder).
    """
    files: list[Path] = []
    skippable: set[int] = set()
    for path in [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]:
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise PetbreedsError(f"{path}: the folder holds no files; pass an image or a folder of images")
            skippable.update(range(len(files), len(files) + len(found)))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PetbreedsError(f"{path}: no such file or folder; pass an image or a folder of images")
    predictor = Predictor(default_model() if model_path is None else Path(model_path), device)
    return predictor(files, top_k, skippable=skippable, show_progress=show_progress, tta=tta)


def predictions_csv(predictions: Sequence[Prediction], top_k: int) -> str:
    """CSV text: ``path, pred_1, prob_1, ..., pred_k, prob_k``, one row per image."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path"] + [f"{col}_{i}" for i in range(1, top_k + 1) for col in ("pred", "prob")])
    for p in predictions:
        writer.writerow([p.path.as_posix()] + [v for breed, prob in p.top_k for v in (breed, f"{prob:.6f}")])
    return out.getvalue()


def cli(argv: list[str]) -> int:
    """``petbreeds predict IMAGE_OR_FOLDER [--model models/model.pt] [--top-k 3] [--tta N] [--out preds.csv]``."""
    parser = argparse.ArgumentParser(
        prog="petbreeds predict",
        description="Breed and probability for one image (readable lines) or a folder of images (CSV).",
    )
    parser.add_argument("image_or_folder", type=Path)
    parser.add_argument(
        "--model", type=Path, help="checkpoint (default: models/model.pt here, else in the project root)"
    )
    parser.add_argument("--top-k", type=int, default=3, help="how many breeds per image (3)")
    parser.add_argument(
        "--tta",
        type=int,
        default=0,
        metavar="N",
        help="fastai's learn.tta: N more passes through the training transforms, combined as fastai does (0: none)",
    )
    parser.add_argument("--out", type=Path, help="write the folder's CSV here instead of to stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")  # the skipped files, on stderr
    folder = args.image_or_folder.is_dir()  # a folder's images may take a while: a bar on stderr, beside the CSV
    predictions = predict(args.image_or_folder, args.model, args.top_k, show_progress=folder, tta=args.tta)
    if folder:
        text = predictions_csv(predictions, min(args.top_k, len(predictions[0].top_k)) if predictions else args.top_k)
        if args.out is None:
            sys.stdout.write(text)
        else:
            atomic_write_text(args.out, text)
            print(f"{len(predictions)} predictions written to {args.out}", file=sys.stderr)
    else:
        for breed, prob in predictions[0].top_k:
            print(f"{breed} {prob:.3f}")
    return 0
