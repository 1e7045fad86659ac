"""Settings and records of a memory-bounded run: config, stages, per-stage stats, result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnexp.factory import TensorizeReport
from tnexp.schema import MemoryBoundedSettings
from tnexp.slicing import Slice, SlicePlan

__all__ = [
    "HOST",
    "MANIFEST",
    "OFFLOADS",
    "PRECISIONS",
    "BlockwiseConfig",
    "BlockwiseError",
    "BlockwiseResult",
    "Stage",
    "StageStats",
]


OFFLOADS = ("cpu", "disk")
PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}
MANIFEST = "blockwise.json"
HOST = torch.device("cpu")


class BlockwiseError(ValueError):
    """Input the memory-bounded mode cannot work with (the message names the fix)."""


@dataclass
class BlockwiseConfig:
    """How the block-by-block run is carried out (the training itself is a LocalConfig).

    ``epochs``, ``limit_batches`` (an int: batches per epoch; a float: fraction of the
    loader) and ``max_steps`` mean what ``trainer.max_epochs``, ``limit_train_batches`` and
    ``max_steps`` mean in the normal mode; every stage runs that whole schedule.
    """

    # offload, device, verify: the defaults of method.memory_bounded (tnexp/schema.py)
    offload: str = MemoryBoundedSettings.offload  # cpu: host memory | disk: both on disk
    work_dir: str | Path | None = None  # None: a temporary directory, removed at the end
    device: str = MemoryBoundedSettings.device  # auto (cuda if available) | cpu | cuda | cuda:N
    epochs: int = 1
    limit_batches: int | float | None = None
    max_steps: int | None = None
    gradient_clip_val: float | None = None  # per stage: the normal mode clips all slices
    gradient_clip_algorithm: str = "norm"
    precision: str = "32-true"  # 32-true | bf16-mixed
    verify: bool = (
        MemoryBoundedSettings.verify
    )  # check on one sample that the blocks form a chain (one extra pass)
    resume: bool = False  # reuse trained stages in work_dir written by the same setup
    assemble: bool = True  # put the trained student together at the end
    progress: bool = True
    log_every_n_steps: int = 10
    # Stop a stage whose loss exceeds this factor times its lowest loss (guard.*; None:
    # NaN/Inf only), as in the normal mode (tnexp/modules/guard.py).
    divergence_factor: float | None = 1.0e4

    def __post_init__(self) -> None:
        if self.offload not in OFFLOADS:
            raise BlockwiseError(
                f"memory_bounded.offload must be one of {OFFLOADS}, got {self.offload!r} "
                "(cpu: teacher and activations in host memory; disk: read the teacher per "
                "block from safetensors and spill activations to work_dir)."
            )
        if self.epochs is None or int(self.epochs) < 1:
            raise BlockwiseError(
                f"epochs must be >= 1, got {self.epochs!r}: set trainer.max_epochs to a number."
            )
        self.epochs = int(self.epochs)
        if self.max_steps is not None and int(self.max_steps) in (-1,):
            self.max_steps = None
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise BlockwiseError(f"max_steps must be >= 1 or -1 (no limit), got {self.max_steps}.")
        if self.limit_batches is not None and not (
            isinstance(self.limit_batches, int | float) and self.limit_batches > 0
        ):
            raise BlockwiseError(
                f"limit_batches must be a positive int or fraction, got {self.limit_batches!r}."
            )
        if self.precision not in PRECISIONS:
            raise BlockwiseError(
                f"precision {self.precision!r} is not supported by the memory-bounded mode; use "
                f"one of {sorted(PRECISIONS)} (trainer.precision)."
            )
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise BlockwiseError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got "
                f"{self.gradient_clip_algorithm!r}."
            )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the stages compute in under autocast (None: full precision)."""
        return PRECISIONS[self.precision]


@dataclass(frozen=True)
class Stage:
    """Consecutive blocks trained together: one block, or the blocks of one group slice."""

    index: int
    blocks: tuple[str, ...]
    slices: tuple[Slice, ...]

    @property
    def name(self) -> str:
        return "+".join(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "blocks": list(self.blocks),
            "slices": [s.name for s in self.slices],
        }


@dataclass
class StageStats:
    """What happened in one stage (for results.json and logs)."""

    stage: Stage
    steps: int = 0
    seconds: float = 0.0
    resumed: bool = False
    losses: dict[str, float] = field(default_factory=dict)  # mean over the last epoch
    file: str | None = None
    peak_device_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.stage.to_dict(),
            "steps": self.steps,
            "seconds": self.seconds,
            "resumed": self.resumed,
            "losses": self.losses,
            "file": self.file,
            "peak_device_bytes": self.peak_device_bytes,
        }


@dataclass
class BlockwiseResult:
    """A finished block-by-block run; ``student`` is set once assembled."""

    report: TensorizeReport
    plan: SlicePlan
    stages: list[StageStats]
    timer: Any  # tnexp.callbacks.OptimizationTimer with the accumulated times
    work_dir: Path
    offload: str
    device: torch.device
    steps_per_stage: int
    teacher_params: int
    peak_device_bytes: int | None = None
    student: nn.Module | None = None
    _assembler: Any = field(default=None, repr=False)

    def assemble(self) -> nn.Module:
        """The tensorized student with every trained block (loaded to host memory)."""
        if self.student is None:
            self.student = self._assembler()
            self._assembler = None
        return self.student

    def summary(self) -> dict[str, Any]:
        return {
            "offload": self.offload,
            "device": str(self.device),
            "work_dir": str(self.work_dir),
            "steps_per_stage": self.steps_per_stage,
            "peak_device_bytes": self.peak_device_bytes,
            "stages": [s.to_dict() for s in self.stages],
        }
