"""Stopping diverging training: a NaN/Inf loss, or one that explodes above its best so far.

A run whose loss reached 6e15 must not end with exit status 0 and a normal results.json;
:class:`DivergenceGuard` raises :class:`TrainingDivergedError` (phase, step, value and a
fix in the message) and the training stage (``tnexp.stages.train``) then writes
results.json with ``status: failed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tnexp.errors import TnexpError

__all__ = ["DivergenceGuard", "NonFiniteLossError", "TrainingDivergedError"]

FLOOR = 1e-3  # losses are compared with factor * max(running minimum, FLOOR)


class TrainingDivergedError(TnexpError, RuntimeError):
    """The training loss exploded; training stopped instead of saving a diverged model."""


class NonFiniteLossError(TrainingDivergedError):
    """A loss became NaN or infinite; training stops instead of silently diverging."""


@dataclass
class DivergenceGuard:
    """Checks every training loss of a phase against the lowest one seen in that phase.

    ``factor``: stop when a loss exceeds ``factor`` times the phase's running minimum
    (``None``: stop on NaN/Inf only). The minimum restarts with each phase, since local
    (MSE) and global (task) losses live on different scales. ``lr_key`` names the setting
    to lower in the message.
    """

    factor: float | None = 1.0e4
    _minimum: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.factor is not None and not (float(self.factor) > 1.0):
            raise ValueError(
                f"guard.divergence_factor must be > 1 (or null to check NaN/Inf only), got "
                f"{self.factor}."
            )

    def check(
        self, loss: torch.Tensor | float, *, phase: str, what: str, step: int, epoch: int
    ) -> None:
        value = float(loss.detach().float().max()) if isinstance(loss, torch.Tensor) else loss
        where = f"{what} at step {step} (epoch {epoch}, {phase} phase)"
        lr = f"method.{phase}.optimizer.lr"
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"{where} is {value}. Training stopped; lower the learning rate ({lr}), check "
                "the inputs for NaN, or resume from the last checkpoint with other settings."
            )
        best = self._minimum.get(phase)
        # The floor keeps a loss that touched ~0 (an exact slice) from flagging tiny noise.
        if best is not None and self.factor is not None and value > self.factor * max(best, FLOOR):
            raise TrainingDivergedError(
                f"{where} is {value:.4g}, more than guard.divergence_factor="
                f"{self.factor:g} times the lowest loss of this phase ({best:.4g}): training "
                f"diverged and was stopped. Lower the learning rate ({lr}) or add gradient "
                "clipping (trainer.gradient_clip_val=1.0); if such jumps are expected, raise "
                "guard.divergence_factor (null: stop on NaN/Inf only)."
            )
        if best is None or value < best:
            self._minimum[phase] = value
