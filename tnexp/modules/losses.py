"""Feature-distillation losses between a student slice's output and the teacher's."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Paper eq. 1 up to a constant: mean squared error over samples and feature entries.

    (Eq. 1 sums over feature entries; averaging instead only rescales the loss, which Adam
    is invariant to, and keeps its value comparable across slices of different width.)
    """
    return F.mse_loss(student, teacher)


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error relative to the teacher feature's energy."""
    s, t = student.flatten(1), teacher.flatten(1)
    return ((s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(1e-12)).mean()


def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """One minus the per-sample cosine similarity of the flattened features."""
    return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()


DISTILLATION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse,
    "normalized_mse": normalized_mse,
    "cosine": cosine,
}


def get_distillation_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in DISTILLATION_LOSSES:
        raise ValueError(
            f"unknown distillation loss {name!r}; choose one of {sorted(DISTILLATION_LOSSES)}."
        )
    return DISTILLATION_LOSSES[name]
