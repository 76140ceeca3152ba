"""Test-time augmentation: fastai's ``learn.tta`` (fastai 2.8.12, learner.py), apart from the stage that uses it.

fastai predicts the items ``n`` times through the *training* transforms (the item stage's random crop and the batch
augmentation; the model stays in eval mode), takes the mean of those probabilities (the maximum with ``use_max``),
predicts once more plainly, and returns ``torch.lerp(augmented, plain, beta)``; with ``use_max``, the maximum of
the two instead. :func:`combine` is those lines. The augmented passes here draw from their own seeded generators
(the crop positions from the seed, pass and item; the batch augmentation from a ``BatchAugment`` seeded alike), so
the same seed gives the same numbers on one machine.

    plain, targets = get_preds(model, loader, ckpt.valid_augment(device), compute)
    passes = make_loader(rows, raw, ckpt.vocab, data, train=False, seed=seed, passes=tta.n)
    probs = tta_probs(model, plain, passes, ckpt.train_augment(device, seed), compute, tta)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from petbreeds.config import TTAParams
from petbreeds.data.augment import BatchAugment
from petbreeds.learn.device import Compute
from petbreeds.learn.inference import Batch, get_preds

# ``learn.tta``'s defaults, for ``petbreeds predict --tta N`` and the served model (evaluate reads params.yaml).
FASTAI_BETA = 0.25
FASTAI_USE_MAX = False


def combine(plain: torch.Tensor, augmented: torch.Tensor, beta: float, use_max: bool) -> torch.Tensor:
    """fastai's combination: ``plain`` probabilities [N, C] and ``augmented`` [n, N, C] (n >= 1) -> [N, C]."""
    aug = augmented.max(0)[0] if use_max else augmented.mean(0)
    if use_max:
        return torch.stack([plain, aug], 0).max(0)[0]
    return torch.lerp(aug, plain, beta)


def augmented_probs(
    model: nn.Module, batches: Iterable[Batch], augment: BatchAugment, compute: Compute, passes: int
) -> torch.Tensor:
    """Probabilities [passes, N, C] over ``batches``: the N items ``passes`` times over, pass after pass (as
    ``make_loader(..., passes=passes)`` loads them), each batch through ``augment``'s training path."""
    logits, _ = get_preds(model, batches, augment, compute, augmented=True)
    return logits.softmax(dim=1).view(passes, -1, logits.shape[1])


def tta_probs(
    model: nn.Module,
    plain_logits: torch.Tensor,
    batches: Iterable[Batch],
    augment: BatchAugment,
    compute: Compute,
    tta: TTAParams,
) -> torch.Tensor:
    """``learn.tta``'s probabilities [N, C]: ``plain_logits`` [N, C] (the plain pass, already computed) combined with
    the ``tta.n`` augmented passes of ``batches`` (:func:`augmented_probs`)."""
    augmented = augmented_probs(model, batches, augment, compute, tta.n)
    return combine(plain_logits.softmax(dim=1), augmented, tta.beta, tta.use_max)


def nll(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``targets`` [N] under ``probs`` [N, C] as they are (``use_max``'s do not sum
    to 1, so no renormalising softmax); a probability of 0 counts as the smallest float, not as infinity."""
    return F.nll_loss(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), targets).item()


def tta_metrics(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``error_rate_tta`` and ``loss_tta`` (:func:`nll`) of the combined probabilities [N, C]."""
    accuracy = (probs.argmax(dim=1) == targets).double().mean().item()
    return {"error_rate_tta": 1.0 - accuracy, "loss_tta": nll(probs, targets)}
