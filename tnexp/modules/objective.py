"""The local objective: per-slice distillation losses from (student input, teacher output) pairs.

One definition used by every local trainer (:class:`~tnexp.modules.TensorizationModule`'s
local step and the memory-bounded driver, ``tnexp.memory_bounded.train``): which features
feed each slice, the dtype cast, the loss per slice, the NaN check naming the slice, the
summed loss, the logged values and the parameters the local phase trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tnexp.callbacks.memory_format import module_layout, to_layout
from tnexp.features import SliceFeatures
from tnexp.modules.guard import DivergenceGuard, NonFiniteLossError
from tnexp.modules.losses import get_distillation_loss
from tnexp.slicing import Slice, SlicePlan

__all__ = [
    "TRAINABLE",
    "FeaturePair",
    "LocalLosses",
    "LocalObjective",
    "cached_pairs",
    "feature_pairs",
]

TRAINABLE = ("slice", "tensorized")  # every parameter of a slice | its tensor-network cores


@dataclass
class FeaturePair:
    """What one slice trains on: the input it gets, the teacher output it must reproduce."""

    input: torch.Tensor
    target: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)  # attention masks, positions, ...


def feature_pairs(
    teacher: Mapping[str, SliceFeatures], student: Mapping[str, SliceFeatures] | None = None
) -> dict[str, FeaturePair]:
    """Pairs from a teacher capture; with ``student`` (``input_source=student``) each slice
    gets the student's own input (sequential), the target staying the teacher's output."""
    source = student if student is not None else teacher
    return {
        name: FeaturePair(source[name].input, f.output, source[name].kwargs)
        for name, f in teacher.items()
    }


def cached_pairs(
    features: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, FeaturePair]:
    """Pairs from a feature-cache batch ``{slice: (input, output)}`` (no extra inputs)."""
    return {name: FeaturePair(inp, out) for name, (inp, out) in features.items()}


@dataclass
class LocalLosses:
    """The losses of one local step: one per slice (plan order) and their sum."""

    per_slice: dict[str, torch.Tensor]
    total: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """What a local step logs: ``train/slice/<name>`` and ``train/loss`` (graph-attached)."""
        return {
            **{f"train/slice/{n}": v for n, v in self.per_slice.items()},
            "train/loss": self.total,
        }

    def values(self) -> dict[str, float]:
        """The per-slice losses as floats (for running means and progress bars)."""
        return {n: float(v.detach()) for n, v in self.per_slice.items()}


class LocalObjective:
    """Slice-wise feature distillation (paper eq. 1) over the slices of ``plan``.

    ``loss``: a name of :data:`tnexp.modules.losses.DISTILLATION_LOSSES` or a callable
    ``loss(prediction, target)``; ``trainable``: ``slice`` (every parameter in a slice) or
    ``tensorized`` (the tensor-network cores only). ``guard`` checks the summed loss for
    divergence (one guard per run keeps the phase's running minimum); ``resume_hint`` ends
    the message of a NaN/Inf loss with how this trainer resumes.
    """

    def __init__(
        self,
        plan: SlicePlan | Sequence[Slice],
        loss: str | Callable[..., torch.Tensor] = "mse",
        *,
        trainable: str = "slice",
        guard: DivergenceGuard | None = None,
        resume_hint: str = "resume from the last checkpoint with other settings",
    ) -> None:
        if trainable not in TRAINABLE:
            raise ValueError(f"local.trainable must be one of {TRAINABLE}, got {trainable!r}.")
        self.plan = plan
        self.slices = list(plan)
        self.loss = get_distillation_loss(loss) if isinstance(loss, str) else loss
        self.trainable = trainable
        self.guard = guard or DivergenceGuard()
        self.resume_hint = resume_hint

    # ------------------------------------------------------------------ parameters
    def parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """The parameters the local phase trains: those of the slices (deduplicated)."""
        seen: dict[int, nn.Parameter] = {}
        for s in self.slices:
            group = (
                s.tensorized_parameters(student)
                if self.trainable == "tensorized"
                else s.parameters(student)
            )
            seen.update({id(p): p for p in group})
        return list(seen.values())

    def freeze_others(self, student: nn.Module) -> list[nn.Parameter]:
        """Let only :meth:`parameters` require gradients; returns them."""
        params = self.parameters(student)
        trainable = {id(p) for p in params}
        for p in student.parameters():
            p.requires_grad_(id(p) in trainable)
        return params

    # ------------------------------------------------------------------ loss
    def __call__(
        self,
        student: nn.Module,
        pairs: Mapping[str, FeaturePair],
        *,
        step: int,
        epoch: int,
        where: str = "",
        mask: torch.Tensor | None = None,
    ) -> LocalLosses:
        """The losses of one step; raises if a slice's loss is NaN/Inf or the sum diverged.

        ``where`` ends the messages (e.g. ``" of stage 'layer1.0'"``). ``mask`` (a
        per-position weight of the targets, e.g. an attention mask) is handed to the loss
        as ``mask=``; only mask-aware losses accept it.
        """
        dtype = next(student.parameters()).dtype
        layout = module_layout(student)
        extra = {} if mask is None else {"mask": mask}
        per_slice: dict[str, torch.Tensor] = {}
        for s in self.slices:
            pair = pairs[s.name]
            prediction = s.forward(student, to_layout(pair.input, dtype, layout), **pair.kwargs)
            # Each slice's graph is disjoint from the others', so the summed loss gives each
            # slice exactly the gradient it would get if it were trained alone.
            per_slice[s.name] = self.loss(
                prediction, to_layout(pair.target, prediction.dtype, layout), **extra
            )
        total = torch.stack(list(per_slice.values())).sum()
        # One host sync per step (this read of the sum) instead of one per slice: a NaN/Inf
        # slice makes the sum non-finite, and only then are the slices looked at one by one
        # to name the bad one.
        value = float(total.detach())
        if not math.isfinite(value):
            self._raise_non_finite(per_slice, step=step, epoch=epoch, where=where)
        self.guard.check(
            value,
            phase="local",
            what=f"local loss (sum over slices){where}",
            step=step,
            epoch=epoch,
        )
        return LocalLosses(per_slice, total)

    def _raise_non_finite(
        self, per_slice: Mapping[str, torch.Tensor], *, step: int, epoch: int, where: str
    ) -> None:
        """Raise naming the first slice (plan order) whose loss is NaN/Inf."""
        for name, loss in per_slice.items():
            if not bool(torch.isfinite(loss).all()):
                raise NonFiniteLossError(
                    f"slice {name!r} is {float(loss.detach().float().max())} at step {step} "
                    f"(epoch {epoch}, local phase){where}. Training stopped; lower the learning "
                    f"rate (method.local.optimizer.lr), check the inputs for NaN, or "
                    f"{self.resume_hint}."
                )
