"""The Hydra stage of the memory-bounded mode (method=local, memory_bounded.enabled=true)."""

from __future__ import annotations

import gc
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from tnexp.calibration import InputStats
from tnexp.config import plain as _plain
from tnexp.factory import count_parameters, needs_input_stats, save_tensorized
from tnexp.features import to_device
from tnexp.memory_bounded.config import HOST, BlockwiseConfig, BlockwiseError
from tnexp.memory_bounded.driver import distill_blockwise
from tnexp.memory_bounded.replay import batches_per_epoch
from tnexp.memory_bounded.teacher import TeacherBlocks
from tnexp.memory_bounded.weights import build_skeleton, export_teacher_weights
from tnexp.modules.tensorization import LocalConfig
from tnexp.results import Results, plain_config, run_name
from tnexp.runtime import runtime_record
from tnexp.schema import LocalSettings, settings_dict
from tnexp.stages.build import (
    build,
    data_summary,
    is_language_model,
    load_teacher,
    resolve_teacher_path,
)
from tnexp.stages.evaluate import evaluate_language_model
from tnexp.stages.loggers import build_loggers, finish_loggers
from tnexp.stages.student import calibration_settings, calibration_stats, tensorize_spec

log = logging.getLogger("tnexp")

__all__ = ["run_memory_bounded_stage", "validate"]


def run_memory_bounded_stage(cfg: Any) -> dict[str, Any]:
    """``method=local`` with ``method.memory_bounded.enabled=true``: the block-by-block run
    behind :func:`tnexp.stages.train.run_stage`, writing the same results schema (tnexp.results)."""
    method = cfg.method
    mb = method.memory_bounded
    if method.name != "local":
        raise BlockwiseError(
            f"method.memory_bounded covers method=local only, not {method.name!r}; set "
            "method.memory_bounded.enabled=false."
        )
    if method.features != "online":
        raise BlockwiseError(
            "method.memory_bounded keeps its own per-block activations; set "
            "method.features=online (the feature cache holds every slice at once)."
        )
    trainer = cfg.trainer
    if trainer.get("fast_dev_run"):
        raise BlockwiseError(
            "trainer.fast_dev_run is not supported by the memory-bounded mode; use "
            "trainer.max_epochs=1 trainer.limit_train_batches=1."
        )
    if int(trainer.get("accumulate_grad_batches") or 1) != 1:
        raise BlockwiseError(
            "trainer.accumulate_grad_batches must be 1 in the memory-bounded mode."
        )
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(mb.work_dir) if mb.work_dir else out / "memory_bounded"
    device = mb.device
    if device in (None, "auto") and trainer.accelerator == "cpu":
        device = "cpu"
    config = BlockwiseConfig(
        offload=str(mb.offload),
        work_dir=work_dir,
        device=str(device or "auto"),
        epochs=trainer.max_epochs,
        limit_batches=trainer.get("limit_train_batches"),
        max_steps=trainer.get("max_steps"),
        gradient_clip_val=trainer.get("gradient_clip_val"),
        gradient_clip_algorithm=str(trainer.get("gradient_clip_algorithm") or "norm"),
        precision=str(trainer.precision),
        verify=bool(mb.get("verify", True)),
        resume=cfg.resume == "auto",
        progress=cfg.callbacks.progress_bar != "none",
        log_every_n_steps=int(trainer.log_every_n_steps or 10),
        divergence_factor=(cfg.get("guard") or {}).get("divergence_factor", 1.0e4),
    )
    if cfg.resume not in (None, False, "auto"):
        raise BlockwiseError(
            "the memory-bounded mode resumes from its work_dir: use resume=auto (Lightning "
            ".ckpt files do not apply)."
        )
    local = LocalConfig(**settings_dict(method.local, LocalSettings, "method.local"))
    spec = tensorize_spec(cfg)
    skipped: list[str] = []
    # The one set-up step of every stage, so random init draws the same numbers as there.
    parts = build(cfg, teacher=config.offload == "cpu")
    datamodule, task = parts.datamodule, parts.task
    if config.offload == "cpu":
        teacher, student, report = parts.teacher, parts.student, parts.report
        teacher_weights = None
    else:
        cal = calibration_settings(cfg)
        if needs_input_stats(spec) and cal is not None and cal.compensate:
            raise BlockwiseError(
                "tensorize.calibration.compensate refits layers from the whole student's "
                "activations, which offload=disk never holds; set "
                "tensorize.calibration.compensate=false or method.memory_bounded.offload=cpu."
            )
        student = report = None
        teacher_weights = mb.get("teacher_weights") or (
            resolve_teacher_path(cfg.teacher.path) if cfg.teacher.path else None
        )
        if teacher_weights is None:
            if not is_language_model(cfg):
                resolve_teacher_path(None)  # raises the usual "run method=pretrain" error
            teacher_weights = work_dir / "teacher.safetensors"
            if not teacher_weights.is_file():
                log.warning(
                    "offload=disk: exporting the teacher once to %s; this process holds the "
                    "whole teacher while it does. For bounded peak memory export it beforehand "
                    "and set method.memory_bounded.teacher_weights.",
                    teacher_weights,
                )
                dense = load_teacher(cfg)
                export_teacher_weights(dense, teacher_weights)
                del dense
                gc.collect()
        teacher = build_skeleton(cfg.model)
        skipped = ["before", "teacher"]  # neither whole model is ever in memory
    datamodule.setup("fit")
    data_batch_size = datamodule.batch_size
    if local.batch_size:
        datamodule.batch_size = int(local.batch_size)
    loader = datamodule.train_dataloader()
    # Validation uses the data's batch size, as in the normal mode (only limit_val_batches
    # makes it matter).
    datamodule.batch_size = data_batch_size
    name = run_name(cfg, report)
    loggers = build_loggers(cfg, out, name)
    extra: dict[str, Any] = {}
    if student is not None:
        before = evaluate_language_model(cfg, datamodule, student, "before_training")
        if before:
            extra["before"] = before

    def input_stats(paged: TeacherBlocks, blocks: list[str]) -> InputStats | None:
        """offload=disk: the Grams of a calibration forward that reads one block at a time."""
        return calibration_stats(
            cfg,
            paged.model,
            spec,
            datamodule,
            task,
            fingerprint=paged.weights.fingerprint(),
            paged=paged.paged(blocks),
        )

    started = time.time()
    result = distill_blockwise(
        teacher,
        spec,
        loader,
        task,
        granularity=_plain(method.slicing),
        slices=list(method.slices) if method.slices is not None else None,
        local=local,
        config=config,
        teacher_weights=teacher_weights,
        student=(student, report) if student is not None else None,
        loggers=loggers,
        identity={
            "data": datamodule.identity() if hasattr(datamodule, "identity") else None,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "seed": int(cfg.seed),
            "teacher": str(teacher_weights or cfg.teacher.path),
        },
        input_stats=input_stats if config.offload == "disk" else None,
    )
    wall = time.time() - started
    student_model = result.student
    final = validate(
        student_model, datamodule, task, result.device, trainer.get("limit_val_batches")
    )
    timer = result.timer
    timer.monitor, timer.mode = task.monitor, task.mode
    value = final.get(task.monitor)
    timer.history.append(
        {
            "step": result.steps_per_stage,
            "epoch": config.epochs - 1,
            "optimization_s": timer.optimization_s,
            "wall_s": timer.wall_s,
            "value": value,
            "metrics": final,
        }
    )
    if value is not None and not math.isnan(value):
        timer.best_value = value
        timer.time_to_best_s = timer.optimization_s
        timer.wall_to_best_s = timer.wall_s
        timer.step_at_best = result.steps_per_stage
        timer.epoch_at_best = config.epochs - 1
    after = evaluate_language_model(cfg, datamodule, student_model, "final")
    if after:
        extra["final_eval"] = after
    if config.offload == "cpu":
        dense = evaluate_language_model(cfg, datamodule, teacher, "teacher")
        if dense:
            extra["teacher"] = dense
    base_config = OmegaConf.to_container(cfg.model, resolve=True)
    save_tensorized(student_model, result.report, out / "student", base_config=base_config)
    results = Results(
        method=method.name,
        experiment=cfg.experiment_name,
        run_name=name,
        task={"monitor": task.monitor, "mode": task.mode},
        metrics={"final": final, "best": {task.monitor: timer.best_value}, **extra},
        time={**timer.summary(), "run_wall_s": wall},
        params={"student": count_parameters(student_model), "teacher": result.teacher_params},
        tensorize=result.report.to_dict(),
        weights={"student": str(out / "student"), "best_checkpoint": None},
        data=data_summary(cfg, datamodule),
        epochs=config.epochs,
        global_step=result.steps_per_stage,
        memory_bounded={
            **result.summary(),
            "skipped_evaluations": skipped if is_language_model(cfg) else [],
        },
        runtime=runtime_record(),
        config=plain_config(cfg),
    ).write(out)
    log.info("results written to %s", out / "results.json")
    for logger in loggers:
        logger.log_metrics(final, step=result.steps_per_stage)
        logger.save()
    finish_loggers(loggers, results)
    return results


@torch.no_grad()
def validate(
    model: nn.Module,
    datamodule: Any,
    task: Any,
    device: torch.device,
    limit_batches: int | float | None = None,
) -> dict[str, float]:
    """The validation metrics of ``model`` (``val/...``), as the normal mode's validation
    epoch computes them (``limit_batches`` as ``trainer.limit_val_batches``)."""
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    count = len(loader) if limit_batches is None else batches_per_epoch(len(loader), limit_batches)
    was_training = model.training
    model.eval().to(device)
    metrics = task.make_metrics().to(device)
    for batch in itertools.islice(loader, count):
        batch = to_device(batch, device)
        outputs = task.forward(model, batch)
        task.update_metrics(metrics, outputs, batch, task.loss(outputs, batch))
    values = task.finalize(metrics.compute())
    model.train(was_training).to(HOST)
    return {f"val/{k}": float(v) for k, v in values.items()}
