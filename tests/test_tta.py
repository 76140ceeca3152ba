"""Test-time augmentation (petbreeds.learn.tta): fastai's combination, and passes that are reproducible, augmented,
and the same whether evaluate or ``petbreeds predict --tta`` runs them. tests/test_vs_fastai.py checks the
combination and the passes' draws against fastai's own ``Learner.tta`` and ``aug_transforms``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from petbreeds.config import TTAParams
from petbreeds.data.dataloaders import make_loader
from petbreeds.learn.checkpoint import load_checkpoint
from petbreeds.learn.device import Compute
from petbreeds.learn.inference import get_preds
from petbreeds.learn.tta import FASTAI_BETA, combine, nll, tta_metrics, tta_probs
from petbreeds.serve.predict import predict

CPU = torch.device("cpu")


def test_combine_is_the_augmented_mean_lerped_toward_the_plain_or_the_maximum() -> None:
    generator = torch.Generator().manual_seed(0)
    augmented = torch.rand(3, 5, 4, generator=generator).softmax(-1)
    plain = torch.rand(5, 4, generator=generator).softmax(-1)
    assert torch.equal(combine(plain, augmented, 1.0, False), plain)
    assert torch.allclose(combine(plain, augmented, 0.0, False), augmented.mean(0))
    assert torch.allclose(combine(plain, augmented, 0.25, False), 0.75 * augmented.mean(0) + 0.25 * plain)
    maximum = combine(plain, augmented, 0.25, True)  # beta unused
    assert torch.equal(maximum, torch.maximum(plain, augmented.amax(0)))


def test_nll_reads_the_probabilities_as_they_are() -> None:
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    targets = torch.tensor([0, 1])
    assert nll(probs[:1], targets[:1]) == pytest.approx(-torch.log(torch.tensor(0.5)).item())
    assert nll(probs, targets) < float("inf")  # a probability of 0 is the smallest float's log, not infinity
    metrics = tta_metrics(probs, targets)
    assert metrics["error_rate_tta"] == 0.5 and list(metrics) == ["error_rate_tta", "loss_tta"]


@pytest.fixture
def valid(tmp_path: Path, write_breed_images) -> pd.DataFrame:
    """Two unseen images per breed, as a split table (paths relative to ``tmp_path``)."""
    return write_breed_images(tmp_path / "images", 2, 900)


def _evaluate_tta(tiny_model: Path, root: Path, table: pd.DataFrame, seed: int, tta: TTAParams) -> tuple:
    """What the evaluate stage computes: plain logits, targets, and the TTA probabilities, one batch per pass."""
    model, ckpt = load_checkpoint(tiny_model, CPU)
    compute = Compute(CPU, None, channels_last=False)
    data = ckpt.data_params(batch_size=len(table))
    plain, targets = get_preds(
        model, make_loader(table, root, ckpt.vocab, data, train=False, seed=0), ckpt.valid_augment(CPU), compute
    )
    passes = make_loader(table, root, ckpt.vocab, data, train=False, seed=seed, passes=tta.n)
    return plain, targets, tta_probs(model, plain, passes, ckpt.train_augment(CPU, seed), compute, tta)


def test_tta_is_reproducible_and_differs_from_the_plain_prediction(tiny_model, valid, tmp_path) -> None:
    tta = TTAParams(n=4, beta=FASTAI_BETA, use_max=False)
    plain, targets, first = _evaluate_tta(tiny_model, tmp_path, valid, 42, tta)
    _, _, again = _evaluate_tta(tiny_model, tmp_path, valid, 42, tta)
    assert torch.equal(first, again)  # a new loader and generator with the same seed: the same numbers
    assert first.shape == plain.shape and torch.allclose(first.sum(1), torch.ones(len(valid)))
    assert not torch.allclose(first, plain.softmax(1), atol=1e-4)  # the passes are augmented
    _, _, other = _evaluate_tta(tiny_model, tmp_path, valid, 7, tta)
    assert not torch.equal(first, other)  # the seed draws them
    assert (first.argmax(1) == targets).all()  # the tiny model still names the clean breeds


def test_predict_tta_is_the_evaluate_stages_tta(tiny_model, valid, tmp_path) -> None:
    """``predict(tta=n)`` runs exactly the evaluate stage's passes (same crops, same draws: one batch per pass, seed
    petbreeds.serve.predict.TTA_SEED) and fastai's default combination; ``tta=0`` is the plain prediction."""
    _, _, expected = _evaluate_tta(tiny_model, tmp_path, valid, 0, TTAParams(n=3, beta=FASTAI_BETA, use_max=False))
    files = [tmp_path / p for p in valid["path"]]
    for _ in range(2):  # the same call, the same answer
        predictions = predict(files, tiny_model, top_k=3, device=CPU, tta=3)
        for row, p in zip(expected, predictions, strict=True):
            assert [prob for _, prob in p.top_k] == pytest.approx(row.sort(descending=True).values.tolist(), abs=1e-6)
    plain = predict(files, tiny_model, top_k=1, device=CPU)
    assert [p.probability for p in plain] != pytest.approx([p.probability for p in predictions], abs=1e-4)
