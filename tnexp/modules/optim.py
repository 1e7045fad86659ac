"""Optimizers and learning-rate schedules from plain config values."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | cosine
    warmup_steps: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> OptimizerConfig:
        if isinstance(cfg, cls):
            return cfg
        data = dict(cfg or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown optimizer keys {sorted(unknown)}; known: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        cfg = cls(**data)
        if cfg.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {cfg.name!r}")
        if cfg.scheduler not in ("none", "cosine"):
            raise ValueError(f"scheduler must be 'none' or 'cosine', got {cfg.scheduler!r}")
        return cfg


def build_optimizer(params: Iterable[Any], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=True)
    return OPTIMIZERS[cfg.name](params, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.scheduler == "none" and cfg.warmup_steps == 0:
        return None

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1.0 + torch.cos(torch.tensor(min(progress, 1.0) * torch.pi)).item())
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
