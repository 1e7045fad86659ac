"""LightningModules of tnexp (pretrain, local, global, hybrid: one class), the local objective."""

from tnexp.modules.guard import DivergenceGuard, TrainingDivergedError
from tnexp.modules.losses import DISTILLATION_LOSSES, get_distillation_loss
from tnexp.modules.objective import LocalObjective
from tnexp.modules.optim import OptimizerConfig, build_optimizer
from tnexp.modules.tensorization import (
    GlobalConfig,
    GlobalFinetune,
    Hybrid,
    LocalConfig,
    LocalDistillation,
    NonFiniteLossError,
    Phase,
    TensorizationModule,
)

__all__ = [
    "DISTILLATION_LOSSES",
    "DivergenceGuard",
    "GlobalConfig",
    "GlobalFinetune",
    "Hybrid",
    "LocalConfig",
    "LocalDistillation",
    "LocalObjective",
    "NonFiniteLossError",
    "OptimizerConfig",
    "Phase",
    "TensorizationModule",
    "TrainingDivergedError",
    "build_optimizer",
    "get_distillation_loss",
]
