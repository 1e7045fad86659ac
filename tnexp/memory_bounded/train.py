"""Training one stage's slices over the replayed schedule (the online local step, per block)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tnexp.callbacks import OptimizationTimer
from tnexp.features import FeatureCapture, to_device
from tnexp.memory_bounded.config import BlockwiseConfig, Stage, StageStats
from tnexp.modules.guard import DivergenceGuard
from tnexp.modules.objective import LocalObjective, feature_pairs
from tnexp.modules.optim import build_optimizer, build_scheduler
from tnexp.modules.tensorization import LocalConfig
from tnexp.slicing import SlicePlan

__all__ = ["RunLog", "StageData", "train_stage"]


@dataclass
class RunLog:
    """What outlives one stage: the run's timer, its loggers and the logged-step count."""

    timer: OptimizationTimer
    loggers: Sequence[Any] = ()
    steps: int = 0  # over all stages: the x axis of the logged losses


@dataclass
class StageData:
    """Where a stage's training batches come from: stored block inputs, replayed kwargs
    and attention masks."""

    streams: dict[str, Any]  # "teacher" (and "student") spill stores of this stage
    row_of: torch.Tensor  # dataset index -> row in the stores
    schedule: list[list[torch.Tensor]]  # per epoch, the sample indices of every batch
    kwargs_for: Callable[[Any], dict[str, Any]]  # extra block arguments of a raw batch
    # None: the same extra arguments always, and no attention mask
    raw_batch: Callable[[torch.Tensor], Any] | None
    # the (B, T) attention mask of a raw batch (padded tokens left out of the slice losses)
    mask_for: Callable[[Any], torch.Tensor | None] | None = None


def train_stage(
    stage: Stage,
    t_shell: nn.Module,
    s_shell: nn.Module,
    data: StageData,
    local: LocalConfig,
    device: torch.device,
    config: BlockwiseConfig,
    stat: StageStats,
    run_log: RunLog,
) -> None:
    """Train the slices of one stage over the replayed schedule (fills ``stat``)."""
    from tqdm.auto import tqdm

    autocast_dtype = config.autocast_dtype
    sub_plan = SlicePlan(list(stage.slices))
    t_capture = FeatureCapture(t_shell, sub_plan, stop_after_last=True)
    s_capture = (
        FeatureCapture(s_shell, sub_plan, capture_outputs=False, stop_after_last=True)
        if local.input_source == "student"
        else None
    )
    objective = LocalObjective(
        sub_plan,
        local.loss,
        trainable=local.trainable,
        guard=DivergenceGuard(factor=config.divergence_factor),
        resume_hint="resume with resume=auto (the trained earlier stages are kept in the work_dir)",
    )
    params = objective.freeze_others(s_shell)
    total_steps = sum(len(e) for e in data.schedule)
    optimizer = build_optimizer([{"params": params}], local.optimizer)
    scheduler = build_scheduler(optimizer, local.optimizer, total_steps)
    bar = tqdm(
        total=total_steps,
        desc=f"stage {stage.index} {stage.name}",
        unit="step",
        disable=not config.progress,
        leave=False,
    )
    timer, loggers = run_log.timer, run_log.loggers
    step = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    try:
        for epoch, batches in enumerate(data.schedule):
            sums: dict[str, float] = {s.name: 0.0 for s in stage.slices}
            for indices in batches:
                sync()
                start = time.perf_counter()
                raw = data.raw_batch(indices) if data.raw_batch else None
                kwargs = to_device(data.kwargs_for(raw), device)
                mask = data.mask_for(raw) if data.mask_for is not None and raw is not None else None
                mask = mask.to(device) if mask is not None else None
                rows = data.row_of[indices]
                x = data.streams["teacher"].gather(rows).to(device)
                teacher = t_capture({"hidden_states": x, **kwargs})
                student = None
                if s_capture is not None:
                    xs = data.streams["student"].gather(rows).to(device)
                    student = s_capture({"hidden_states": xs, **kwargs})
                pairs = feature_pairs(teacher, student)
                sync()
                captured = time.perf_counter() - start
                with (
                    torch.autocast(device.type, dtype=autocast_dtype)
                    if autocast_dtype is not None
                    else contextlib.nullcontext()
                ):
                    losses = objective(
                        s_shell,
                        pairs,
                        step=step,
                        epoch=epoch,
                        where=f" of stage {stage.name!r}",
                        mask=mask,
                    )
                losses.total.backward()
                if config.gradient_clip_val is not None:
                    if config.gradient_clip_algorithm == "norm":
                        nn.utils.clip_grad_norm_(params, config.gradient_clip_val)
                    else:
                        nn.utils.clip_grad_value_(params, config.gradient_clip_val)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                sync()
                elapsed = time.perf_counter() - start
                timer.optimization_s += max(elapsed - captured, 0.0)
                timer.feature_capture_s += captured
                timer.num_steps_timed += 1
                for n, v in losses.values().items():
                    sums[n] += v
                step += 1
                run_log.steps += 1
                total = float(losses.total.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4g}")
                if loggers and (run_log.steps % max(1, config.log_every_n_steps) == 0):
                    metrics = {k: float(v.detach()) for k, v in losses.metrics().items()}
                    metrics["train/stage"] = stage.index
                    for logger in loggers:
                        logger.log_metrics(metrics, step=run_log.steps)
            if batches:
                stat.losses = {n: v / len(batches) for n, v in sums.items()}
    finally:
        bar.close()
        t_capture.close()
        if s_capture is not None:
            s_capture.close()
        for p in s_shell.parameters():
            p.requires_grad_(False)
    stat.steps = step
