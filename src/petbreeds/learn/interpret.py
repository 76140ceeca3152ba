"""Model interpretation, as fastai's ``ClassificationInterpretation`` (docs/fastai.md §7), on plain tensors.

The maths are pure functions over ``logits [N, C]`` (fp32), ``targets [N]`` (int64) and the vocab;
the writers turn their results into the files the evaluate stage declares (CSV, JSON, PNG).
Predictions are ``argmax`` of the logits, which is the argmax of the softmax fastai takes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from petbreeds.atomic import atomic_output, atomic_write_json


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts of (actual, predicted) pairs.

    preds, targets: int64 [N] class indices. Returns int64 [C, C]; ``cm[i, j]`` = items of actual
    class i (row) predicted as j (column), in vocab order.
    """
    return torch.bincount(targets * n_classes + preds, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _errors_only(cm: torch.Tensor) -> torch.Tensor:
    """A copy of the confusion matrix with the diagonal (the correct predictions) zeroed."""
    return cm.clone().fill_diagonal_(0)


def most_confused(cm: torch.Tensor, vocab: Sequence[str], min_val: int = 1) -> list[tuple[str, str, int]]:
    """The off-diagonal cells with at least ``min_val`` items, as (actual, predicted, count), most first.

    Exactly fastai's order: a row-major scan, then a *stable* sort by count descending, so ties keep
    (actual index, predicted index) order.
    """
    off_diagonal = _errors_only(cm)
    cells = [(vocab[i], vocab[j], int(off_diagonal[i, j])) for i, j in (off_diagonal >= min_val).nonzero().tolist()]
    return sorted(cells, key=lambda cell: cell[2], reverse=True)  # reverse=True keeps sort stability


def item_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-item cross-entropy on the raw logits (fastai's loss with reduction 'none'). fp32 [N]."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def top_losses(losses: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest losses (all of them when k is None) and their item indices, largest first."""
    return torch.topk(losses, len(losses) if k is None else min(k, len(losses)), largest=True)


def precision_recall(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class precision and recall from a confusion matrix, fp64 [C] each.

    An undefined ratio (a class never predicted, or absent from the targets) is 0.0, as scikit-learn's
    ``zero_division=0``.
    """
    correct = cm.diagonal().double()
    return correct / cm.sum(dim=0).clamp(min=1), correct / cm.sum(dim=1).clamp(min=1)


def per_class_table(cm: torch.Tensor, vocab: Sequence[str]) -> pd.DataFrame:
    """One row per class: support, predicted, correct, precision, recall, most common wrong prediction.

    Precision and recall as :func:`precision_recall`; the support and predicted columns show when one
    is undefined.
    """
    precision, recall = precision_recall(cm)
    wrong_count, wrong_index = _errors_only(cm).max(dim=1)  # ties: the first class in vocab order
    return pd.DataFrame(
        {
            "breed": list(vocab),
            "support": cm.sum(dim=1).tolist(),
            "predicted": cm.sum(dim=0).tolist(),
            "correct": cm.diagonal().tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "most_common_wrong": [
                vocab[j] if n > 0 else "" for j, n in zip(wrong_index.tolist(), wrong_count.tolist(), strict=True)
            ],
            "most_common_wrong_count": wrong_count.tolist(),
        }
    )


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | int]:
    """One split's numbers (the evaluate stage shares them between ``metrics/evaluate.json`` and
    ``reports/evaluate.json``).

    logits: fp32 [N, C]; targets: int64 [N]. ``loss`` is the mean cross-entropy (fastai's valid loss);
    the macro averages run over the classes present in the targets or the predictions (scikit-learn's
    default labels), with an undefined ratio counted as 0.
    """
    n_items, n_classes = logits.shape
    preds = logits.argmax(dim=1)
    top5 = logits.topk(min(5, n_classes), dim=1).indices
    cm = confusion_matrix(preds, targets, n_classes)
    precision, recall = precision_recall(cm)
    seen = (cm.sum(dim=1) > 0) | (cm.sum(dim=0) > 0)
    accuracy = (preds == targets).double().mean().item()
    return {
        "error_rate": 1.0 - accuracy,
        "accuracy": accuracy,
        "top5_accuracy": (top5 == targets[:, None]).any(dim=1).double().mean().item(),
        "loss": item_losses(logits, targets).double().mean().item(),
        "macro_precision": precision[seen].mean().item(),
        "macro_recall": recall[seen].mean().item(),
        "n_items": int(n_items),
    }


@dataclass(frozen=True)
class TopLoss:
    """One row of ``reports/top_losses.csv``."""

    index: int  # position in the split table (the loader order)
    path: str
    actual: str
    predicted: str
    loss: float
    prob_actual: float
    prob_predicted: float


def top_loss_rows(
    logits: torch.Tensor, targets: torch.Tensor, paths: Sequence[str], vocab: Sequence[str], k: int
) -> list[TopLoss]:
    """The k highest-loss items with what fastai's ``plot_top_losses`` shows for each."""
    probs = logits.float().softmax(dim=1)
    losses, indices = top_losses(item_losses(logits, targets), k)
    rows = []
    for loss, i in zip(losses.tolist(), indices.tolist(), strict=True):
        actual, predicted = int(targets[i]), int(probs[i].argmax())
        rows.append(
            TopLoss(
                i, paths[i], vocab[actual], vocab[predicted], loss, float(probs[i, actual]), float(probs[i, predicted])
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Writers. Each one writes a single file atomically.


def confusion_records(preds: torch.Tensor, targets: torch.Tensor, vocab: Sequence[str]) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` record per item: what DVC's ``template: confusion`` aggregates."""
    return [{"actual": vocab[t], "predicted": vocab[p]} for t, p in zip(targets.tolist(), preds.tolist(), strict=True)]


def write_confusion_json(path: Path, preds: torch.Tensor, targets: torch.Tensor, vocab: Sequence[str]) -> None:
    atomic_write_json(path, confusion_records(preds, targets, vocab))


def write_csv(path: Path, table: pd.DataFrame) -> None:
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def most_confused_table(cells: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(cells, columns=["actual", "predicted", "count"])


def top_losses_table(rows: list[TopLoss]) -> pd.DataFrame:
    return pd.DataFrame([dataclasses.asdict(r) for r in rows], columns=[f.name for f in dataclasses.fields(TopLoss)])


def save_confusion_png(path: Path, cm: torch.Tensor, vocab: Sequence[str], title: str) -> None:
    """Heat map like fastai's ``plot_confusion_matrix``: rows actual, columns predicted, vocab order.

    Only non-zero counts are written in the cells: with 37 classes, 1,369 zeros would hide the errors.
    """
    n = len(vocab)
    side = max(5.0, 0.32 * n + 2.5)  # ~14.3 inches for 37 classes: labels at 7pt do not overlap
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    counts = cm.numpy()
    ax.imshow(counts, cmap="Blues", interpolation="nearest")
    ax.set_xticks(range(n), list(vocab), rotation=90, fontsize=7)
    ax.set_yticks(range(n), list(vocab), fontsize=7)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(title)
    threshold = counts.max() / 2.0
    for i, j in zip(*counts.nonzero(), strict=True):
        color = "white" if counts[i, j] > threshold else "black"
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)


def top_loss_title(row: TopLoss) -> str:
    """fastai's ``prediction/actual / loss / probability``, the probability being the model's confidence in its
    prediction; the loss goes to a second line, or long breed names would overlap the next image's title."""
    return f"{row.predicted}/{row.actual}\n{row.loss:.2f} / {row.prob_predicted:.2f}"


def save_top_losses_png(path: Path, rows: list[TopLoss], images: Sequence[torch.Tensor]) -> None:
    """A grid of the top-loss images, each titled as fastai's ``plot_top_losses`` (:func:`top_loss_title`).

    images: uint8 [3, H, W] each, one per row.
    """
    cols = max(1, math.ceil(math.sqrt(len(rows))))
    nrows = max(1, math.ceil(len(rows) / cols))
    fig = Figure(figsize=(3.2 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    fig.suptitle("Prediction/Actual/Loss/Probability")
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, image in zip(axes.ravel()[: len(rows)], rows, images, strict=True):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(top_loss_title(row), fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
