"""Optimizers and learning-rate schedules from plain config values."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from tnexp.schema import OptimizerSettings

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class OptimizerConfig(OptimizerSettings):
    """An optimizer and its schedule; the fields and defaults are ``OptimizerSettings``."""

    @classmethod
    def from_config(cls, cfg: Any) -> OptimizerConfig:
        if isinstance(cfg, cls):
            return cfg
        data = dataclasses.asdict(cfg) if isinstance(cfg, OptimizerSettings) else dict(cfg or {})
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


# Devices on which torch's fused (one kernel over all parameters) Adam/AdamW runs.
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(params: Iterable[Any], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``params`` (tensors or parameter-group dicts).

    Adam/AdamW use torch's fused implementation where every parameter is a floating-point
    tensor on the CPU or a CUDA device: one kernel for all parameters instead of about ten
    small ops per parameter (on the CPU 1.8 ms instead of 8.7 ms per step for the 94
    tensors of the Fashion-MNIST ResNet-18; docs/benchmarks.md). The update is the same
    Adam update up to float rounding.
    """
    groups = list(params)
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=True)
    elif _fusable(groups):
        kwargs["fused"] = True
    return OPTIMIZERS[cfg.name](groups, **kwargs)


def _fusable(groups: list[Any]) -> bool:
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(
        isinstance(p, torch.Tensor)
        and p.is_floating_point()
        and p.device.type in FUSED_DEVICES
        and p.device == tensors[0].device
        for p in tensors
    )


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
