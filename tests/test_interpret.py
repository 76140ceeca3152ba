"""interpret: the maths on hand-built predictions, and the files its writers produce."""

from __future__ import annotations

import json
from operator import itemgetter

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from petbreeds.learn.interpret import (
    TopLoss,
    classification_metrics,
    confusion_matrix,
    most_confused,
    per_class_table,
    save_confusion_png,
    save_top_losses_png,
    top_loss_rows,
    top_loss_title,
    top_losses,
    top_losses_table,
    write_confusion_json,
    write_csv,
)

VOCAB = ["a", "b", "c", "d"]
# Rows actual, columns predicted. Off-diagonal ties on purpose: three 2s, two 3s, two 1s.
CM = torch.tensor([[5, 2, 3, 0], [2, 5, 0, 1], [3, 0, 5, 2], [1, 0, 1, 5]])


def _items_of(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(preds, targets) with exactly the counts of ``cm``, shuffled so order cannot matter."""
    pairs = [(i, j) for i in range(len(cm)) for j in range(len(cm)) for _ in range(int(cm[i, j]))]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    pairs_t = torch.tensor(pairs)[order]
    return pairs_t[:, 1], pairs_t[:, 0]


def _fastai_most_confused(cm: np.ndarray, vocab: list[str], min_val: int) -> list[tuple[str, str, int]]:
    """fastai's ClassificationInterpretation.most_confused, verbatim but for the matrix argument."""
    cm = cm.copy()
    np.fill_diagonal(cm, 0)
    res = [(vocab[i], vocab[j], cm[i, j]) for i, j in zip(*np.where(cm >= min_val), strict=True)]
    return sorted(res, key=itemgetter(2), reverse=True)


def test_confusion_matrix_rows_actual_columns_predicted():
    targets = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 2, 2, 0])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 2], [1, 0, 0]]
    assert cm.dtype == torch.int64


def test_confusion_matrix_recovers_counts_of_shuffled_items():
    preds, targets = _items_of(CM)
    assert torch.equal(confusion_matrix(preds, targets, 4), CM)


def test_most_confused_stable_order_with_ties():
    assert most_confused(CM, VOCAB, min_val=1) == [
        ("a", "c", 3),
        ("c", "a", 3),
        ("a", "b", 2),
        ("b", "a", 2),
        ("c", "d", 2),
        ("b", "d", 1),
        ("d", "a", 1),
        ("d", "c", 1),
    ]
    assert most_confused(CM, VOCAB, min_val=2) == [
        ("a", "c", 3),
        ("c", "a", 3),
        ("a", "b", 2),
        ("b", "a", 2),
        ("c", "d", 2),
    ]
    assert most_confused(CM, VOCAB, min_val=4) == []  # the diagonal (5s) never counts
    assert CM[0, 0] == 5  # the input is not modified


def test_most_confused_matches_fastai_on_random_matrices():
    gen = torch.Generator().manual_seed(1)
    vocab = [f"breed{i:02d}" for i in range(12)]
    for _ in range(20):
        cm = torch.randint(0, 4, (12, 12), generator=gen)  # small counts: many ties
        for min_val in (1, 2, 3):
            expected = [(a, p, int(n)) for a, p, n in _fastai_most_confused(cm.numpy(), vocab, min_val)]
            assert most_confused(cm, vocab, min_val) == expected


def test_top_losses_picks_the_largest_losses_in_order():
    # Items 0..4; the actual class gets logit 0 against a rival logit 0, 3, -2, 5, 1.
    logits = torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, -2.0], [0.0, 5.0], [0.0, 1.0]])
    targets = torch.zeros(5, dtype=torch.int64)
    losses = F.cross_entropy(logits, targets, reduction="none")
    values, idx = top_losses(losses, 3)
    assert idx.tolist() == [3, 1, 4]
    assert torch.allclose(values, losses[[3, 1, 4]])
    assert top_losses(losses, None)[1].tolist() == [3, 1, 4, 0, 2]
    assert top_losses(losses, 50)[1].tolist() == [3, 1, 4, 0, 2]


def test_top_loss_rows_report_prediction_and_probabilities():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([0, 0, 2])
    rows = top_loss_rows(logits, targets, ["x/0.jpg", "x/1.jpg", "x/2.jpg"], ["a", "b", "c"], k=2)
    probs = logits.softmax(dim=1)
    assert [r.index for r in rows] == [1, 2]
    first = rows[0]
    assert (first.path, first.actual, first.predicted) == ("x/1.jpg", "a", "b")
    assert first.prob_actual == pytest.approx(float(probs[1, 0]))
    assert first.prob_predicted == pytest.approx(float(probs[1, 1]))
    assert first.loss == pytest.approx(-float(probs[1, 0].log()), rel=1e-5)
    assert rows[1].predicted == rows[1].actual == "c"


def test_top_loss_title_shows_the_predicted_class_probability():
    # fastai's plot_top_losses: prediction/actual / loss / the largest probability (the model's confidence)
    row = TopLoss(3, "images/x_3.jpg", "Ragdoll", "Birman", 2.345, prob_actual=0.096, prob_predicted=0.871)
    assert top_loss_title(row) == "Birman/Ragdoll\n2.35 / 0.87"


def test_per_class_table():
    table = per_class_table(CM, VOCAB)
    assert table["breed"].tolist() == VOCAB
    assert table["support"].tolist() == [10, 8, 10, 7]
    assert table["predicted"].tolist() == [11, 7, 9, 8]
    assert table["correct"].tolist() == [5, 5, 5, 5]
    assert table["precision"].tolist() == pytest.approx([5 / 11, 5 / 7, 5 / 9, 5 / 8])
    assert table["recall"].tolist() == pytest.approx([5 / 10, 5 / 8, 5 / 10, 5 / 7])
    # row d has a tie (a: 1, c: 1): the first in vocab order wins
    assert table["most_common_wrong"].tolist() == ["c", "a", "a", "a"]
    assert table["most_common_wrong_count"].tolist() == [3, 2, 3, 1]


def test_per_class_table_class_never_predicted_and_perfect_class():
    cm = torch.tensor([[3, 0, 0], [0, 0, 2], [0, 0, 4]])
    table = per_class_table(cm, ["a", "b", "c"])
    assert table["precision"].tolist() == pytest.approx([1.0, 0.0, 4 / 6])
    assert table["recall"].tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert table["most_common_wrong"].tolist() == ["", "c", ""]


def test_classification_metrics_on_hand_built_logits():
    # 6 classes; item 2 has its target 2nd-best (top-5 hit, top-1 miss); item 3's target is the worst of 6.
    logits = torch.tensor(
        [
            [5.0, 0, 0, 0, 0, 0],
            [0, 5.0, 0, 0, 0, 0],
            [4.0, 0, 3.0, 0, 0, 0],
            [0, 1.0, 2.0, 3.0, 4.0, -1.0],
        ]
    )
    targets = torch.tensor([0, 1, 2, 5])
    m = classification_metrics(logits, targets)
    assert m["n_items"] == 4
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["error_rate"] == pytest.approx(0.5)
    assert m["top5_accuracy"] == pytest.approx(0.75)
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    # classes seen in targets or predictions: 0, 1, 2, 4, 5 (3 never appears)
    # precision: 0 -> 1/2, 1 -> 1, 2 -> 0 (never predicted), 4 -> 0, 5 -> 0
    assert m["macro_precision"] == pytest.approx((0.5 + 1.0) / 5)
    # recall: 0 -> 1, 1 -> 1, 2 -> 0, 4 -> 0 (no support), 5 -> 0
    assert m["macro_recall"] == pytest.approx(2.0 / 5)
    assert all(isinstance(v, (int, float)) for v in m.values())
    json.dumps(m)  # numbers only


def test_top5_with_fewer_than_five_classes_is_always_a_hit():
    logits = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    assert classification_metrics(logits, torch.randint(0, 3, (7,)))["top5_accuracy"] == 1.0


def test_confusion_json_one_record_per_item(tmp_path):
    preds, targets = _items_of(CM)
    path = tmp_path / "plots" / "confusion.json"
    write_confusion_json(path, preds, targets, VOCAB)
    records = json.loads(path.read_text())
    assert len(records) == int(CM.sum())
    assert all(set(r) == {"actual", "predicted"} for r in records)
    counts = pd.DataFrame(records).value_counts()
    assert counts[("a", "c")] == 3 and counts[("d", "d")] == 5
    assert ("b", "c") not in counts.index


def test_csv_writers(tmp_path):
    rows = [TopLoss(7, "images/beagle_1.jpg", "beagle", "pug", 2.5, 0.08, 0.9)]
    write_csv(tmp_path / "top_losses.csv", top_losses_table(rows))
    back = pd.read_csv(tmp_path / "top_losses.csv")
    assert back.columns.tolist() == ["index", "path", "actual", "predicted", "loss", "prob_actual", "prob_predicted"]
    assert back.loc[0, "path"] == "images/beagle_1.jpg"
    assert back.loc[0, "loss"] == 2.5


def test_confusion_png_readable_for_37_classes(tmp_path):
    vocab = [f"breed_name_{i:02d}" for i in range(37)]
    cm = torch.randint(0, 3, (37, 37), generator=torch.Generator().manual_seed(0)) + 20 * torch.eye(
        37, dtype=torch.int64
    )
    path = tmp_path / "reports" / "confusion_matrix.png"
    save_confusion_png(path, cm, vocab, "Confusion matrix (validation)")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= 1200  # ~14 inches at 100 dpi: 37 labels at 7pt fit
    assert [p.name for p in path.parent.iterdir()] == ["confusion_matrix.png"]  # no temp file left


def test_top_losses_png_grid(tmp_path):
    rows = [TopLoss(i, f"images/x_{i}.jpg", "a", "b", 3.0 - i, 0.05, 0.9) for i in range(5)]
    images = [torch.full((3, 40, 40), 40 * i, dtype=torch.uint8) for i in range(5)]
    path = tmp_path / "top_losses.png"
    save_top_losses_png(path, rows, images)
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
    assert width > height  # 3 columns, 2 rows
