"""A trained model on disk, with all that predicting needs: its architecture, vocab and input transforms.

    save_checkpoint(path, model, arch=..., vocab=..., data=params.data, augment=params.augment)
    model, ckpt = load_checkpoint(path, device)
    loader = make_loader(rows, raw, ckpt.vocab, ckpt.data_params(batch_size=64), train=False, seed=0)
    logits, _ = get_preds(model, loader, ckpt.valid_augment(device), compute)

Format ``petbreeds-model/1`` (docs/architecture.md): ``torch.save`` of a dict, read back with
``torch.load(weights_only=True)``. Its ``augment`` entry (the training augmentation, which test-time augmentation
draws from) came later: a checkpoint without it still predicts, only not with TTA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from petbreeds.atomic import atomic_output
from petbreeds.config import AugmentParams, DataParams
from petbreeds.data.augment import BatchAugment, ValidAugment
from petbreeds.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from petbreeds.errors import PetbreedsError
from petbreeds.learn.model import PetModel, create_model

CHECKPOINT_FORMAT = "petbreeds-model/1"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's metadata: all that predicting needs besides the weights."""

    arch: str
    vocab: list[str]
    item_size: int
    size: int
    resize_method: str
    pad_mode: str
    mean: list[float]
    std: list[float]
    augment: AugmentParams | None = None  # None: saved before checkpoints recorded it

    def data_params(self, batch_size: int, num_workers: int = 0) -> DataParams:
        """The item and batch transforms the model was trained with, batched as asked."""
        return DataParams(
            item_size=self.item_size,
            size=self.size,
            resize_method=self.resize_method,  # type: ignore[arg-type]  # validated when the model was trained
            pad_mode=self.pad_mode,  # type: ignore[arg-type]
            batch_size=batch_size,
            num_workers=num_workers,
        )

    def valid_augment(self, device: torch.device) -> ValidAugment:
        """The batch stage's valid path for the model's input size (no params.yaml is needed to predict)."""
        return ValidAugment(self.size, device)

    def train_augment(self, device: torch.device, seed: int) -> BatchAugment:
        """The batch stage with the training path the model was trained with, its draws seeded with ``seed``:
        what test-time augmentation predicts through (petbreeds.learn.tta)."""
        if self.augment is None:
            raise PetbreedsError(
                "this checkpoint records no training augmentation (it predates test-time augmentation): re-run "
                "`dvc repro train_unfrozen` to write one that does, or predict without TTA"
            )
        return BatchAugment(self.augment, self.size, seed, device)


def save_checkpoint(
    path: Path, model: PetModel, *, arch: str, vocab: list[str], data: DataParams, augment: AugmentParams
) -> None:
    """Write the model and what predicting needs, atomically, in the ``petbreeds-model/1`` format."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "vocab": list(vocab),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "item_size": data.item_size,
        "size": data.size,
        "resize_method": data.resize_method,
        "pad_mode": data.pad_mode,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "augment": augment.model_dump(),
    }
    # To an open file, not a path: torch.save names its zip records after a path's file name (here atomic_output's
    # random one), so the same weights would get another md5 for DVC on every save.
    with atomic_output(path) as tmp, tmp.open("wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, device: torch.device) -> tuple[PetModel, Checkpoint]:
    """Read a checkpoint written by :func:`save_checkpoint`; the model comes back on ``device`` in eval mode."""
    path = Path(path)
    redo = "re-run `dvc repro train_unfrozen` (or pass the models/model.pt the pipeline wrote)"
    if not path.is_file():
        raise PetbreedsError(f"{path}: checkpoint not found; {redo}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a file that is not its format
        raise PetbreedsError(f"{path}: not a petbreeds checkpoint ({type(e).__name__}); {redo}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise PetbreedsError(f"{path}: not a petbreeds checkpoint (no 'format' entry); {redo}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise PetbreedsError(
            f"{path}: checkpoint format {state['format']!r}, this version reads {CHECKPOINT_FORMAT!r}; {redo}"
        )
    try:
        augment = state.get("augment")
        required = {name: state[name] for name in Checkpoint.__dataclass_fields__ if name != "augment"}
        meta = Checkpoint(**required, augment=None if augment is None else AugmentParams(**augment))
        model = create_model(meta.arch, len(meta.vocab), None)
        model.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError, ValueError, PetbreedsError) as e:
        raise PetbreedsError(f"{path}: damaged petbreeds checkpoint ({e}); {redo}") from None
    return model.to(device).eval(), meta
