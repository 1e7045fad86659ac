"""Feature-distillation losses between a student's features and the teacher's.

Every loss takes an optional ``mask``: for text models the batch's ``attention_mask``
``(B, T)``. Positions where it is 0 (padding) are excluded, so what the model computes at
padded tokens never enters the loss. Without a mask (or for features that are not laid out
``(B, T, ...)``, e.g. CNN feature maps) every entry counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from tnexp.features.tensors import attention_mask

__all__ = [
    "DISTILLATION_LOSSES",
    "DistillationLoss",
    "attention_mask",
    "cosine",
    "feature_mask",
    "get_distillation_loss",
    "mse",
    "normalized_mse",
    "squared_error_sums",
]


class DistillationLoss(Protocol):
    def __call__(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...


def feature_mask(mask: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as float weights broadcastable to ``features`` ``(B, T, ...)``, or ``None``.

    ``None`` when there is no mask or the features are not token-major (their first two
    dimensions are not the mask's ``(B, T)``): then every entry counts.
    """
    if mask is None or features.dim() < 2 or tuple(features.shape[:2]) != tuple(mask.shape):
        return None
    weights = (mask != 0).to(features.dtype)
    return weights.reshape(*weights.shape, *([1] * (features.dim() - 2)))


def mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Paper eq. 1 up to a constant: mean squared error over samples and feature entries.

    (Eq. 1 sums over feature entries; averaging instead only rescales the loss, which Adam
    is invariant to, and keeps its value comparable across slices of different width.)
    With a mask, the mean runs over the unpadded positions only.
    """
    weights = feature_mask(mask, teacher)
    if weights is None:
        if student.dim() == 4 and not student.is_contiguous():
            # channels_last features: F.mse_loss's backward returns a contiguous gradient
            # whatever the input's layout, and every later backward op of the slice would then
            # mix layouts (4.5x slower ReLU backward measured, docs/benchmarks.md "Memory
            # format"). On the NHWC views (contiguous for channels_last) the fused loss's
            # gradient, permuted back, is channels_last again.
            return F.mse_loss(student.permute(0, 2, 3, 1), teacher.permute(0, 2, 3, 1))
        return F.mse_loss(student, teacher)
    squared = (student - teacher).pow(2) * weights
    entries = weights.sum() * (teacher[0, 0].numel() if teacher.dim() > 2 else 1)
    return squared.sum() / entries.clamp_min(1.0)


def normalized_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample squared error relative to the teacher feature's energy."""
    weights = feature_mask(mask, teacher)
    diff, ref = (student - teacher).pow(2), teacher.pow(2)
    if weights is not None:
        diff, ref = diff * weights, ref * weights
    return (diff.flatten(1).sum(1) / ref.flatten(1).sum(1).clamp_min(1e-12)).mean()


def cosine(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One minus the per-sample cosine similarity of the flattened features."""
    weights = feature_mask(mask, teacher)
    if weights is None:
        return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    s, t = (student * weights).flatten(1), (teacher * weights).flatten(1)
    return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()


@torch.no_grad()
def squared_error_sums(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[float, float]:
    """``(sum ||S - T||^2, sum ||T||^2)`` over the unpadded positions (float64 sums).

    Accumulated over validation batches they give a relative error ``sqrt(err / ref)``
    that, like the losses, ignores what is computed at padded tokens.
    """
    weights = feature_mask(mask, teacher)
    diff, ref = (student - teacher).double().pow(2), teacher.double().pow(2)
    if weights is not None:
        weights = weights.double()
        diff, ref = diff * weights, ref * weights
    return float(diff.sum()), float(ref.sum())


DISTILLATION_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": mse,
    "normalized_mse": normalized_mse,
    "cosine": cosine,
}


def get_distillation_loss(name: str) -> Callable[..., torch.Tensor]:
    if name not in DISTILLATION_LOSSES:
        raise ValueError(
            f"unknown distillation loss {name!r}; choose one of {sorted(DISTILLATION_LOSSES)}."
        )
    return DISTILLATION_LOSSES[name]
