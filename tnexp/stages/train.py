"""The training stages: pretrain, local, global and hybrid (one Lightning fit each).

A stage builds its parts (:func:`tnexp.stages.build.build`), wraps the student in the
method's LightningModule, fits it and writes into its output directory: ``results.json``
(:class:`tnexp.results.Results`), CSV logs, Lightning checkpoints (``checkpoints/``) and
the final weights as safetensors. ``method.memory_bounded.enabled`` hands a local stage to
the block-by-block driver; ``method.slice_jobs.dir`` makes it one job of a slice sweep.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_model

from tnexp.callbacks import OptimizationTimer
from tnexp.callbacks.memory_format import memory_format_record
from tnexp.config import plain
from tnexp.data.phased import PhasedDataModule
from tnexp.errors import ConfigError
from tnexp.factory import TensorizeReport, count_parameters, save_tensorized
from tnexp.memory_bounded import run_memory_bounded_stage
from tnexp.modules import (
    DivergenceGuard,
    GlobalConfig,
    GlobalFinetune,
    Hybrid,
    LocalConfig,
    LocalDistillation,
    TensorizationModule,
)
from tnexp.results import Results, plain_config, run_name, write_failed_results
from tnexp.rundir import run_directory_lock
from tnexp.runtime import runtime_record
from tnexp.schema import GlobalSettings, LocalSettings, settings_dict
from tnexp.slice_jobs import SliceJobOutput, select_slices
from tnexp.slicing import SlicePlan, make_slice_plan
from tnexp.stages.build import TEACHER_FILE, Task, build, data_summary
from tnexp.stages.evaluate import evaluate_classification, evaluate_language_model
from tnexp.stages.feature_cache import build_feature_cache
from tnexp.stages.loggers import build_loggers, finish_loggers
from tnexp.stages.prepare import prepare_stage
from tnexp.stages.trainer import build_trainer, resolve_resume

log = logging.getLogger("tnexp")

__all__ = ["METHODS", "build_module", "run_stage"]

METHODS = ("pretrain", "local", "global", "hybrid")


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Run one method (pretrain, local, global or hybrid) and write results.json.

    The run directory is locked for the duration (one run per directory).
    """
    method = cfg.method.name
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS} or quickstart.")
    out = Path(cfg.paths.output_dir)
    with run_directory_lock(out):
        return _run_stage_locked(cfg, out)


def _global_config(method: DictConfig) -> GlobalConfig:
    return GlobalConfig(**settings_dict(method["global"], GlobalSettings, "method.global"))


def build_module(
    cfg: DictConfig,
    teacher: torch.nn.Module | None,
    student: torch.nn.Module,
    task: Task,
    plan: SlicePlan | None = None,
) -> TensorizationModule:
    """The method's LightningModule; ``plan``: the student's full slice plan (default: made)."""
    method = cfg.method
    guard = DivergenceGuard(factor=(cfg.get("guard") or {}).get("divergence_factor", 1.0e4))
    if method.name in ("pretrain", "global"):
        return GlobalFinetune(
            student,
            task,
            global_=GlobalConfig(
                **settings_dict(method["global"], GlobalSettings, "method.global")
            ),
            guard=guard,
        )
    if method.name not in ("local", "hybrid"):
        raise ConfigError(f"unknown method {method.name!r}; choose one of {METHODS}.")
    if plan is None:
        plan = make_slice_plan(student, plain(method.slicing))
    plan = select_slices(plan, method)
    local = LocalConfig(**settings_dict(method.local, LocalSettings, "method.local"))
    if method.features == "cached" and local.input_source == "student":
        raise ConfigError(
            "method.local.input_source=student needs the student's live outputs; use "
            "method.features=online."
        )
    if method.name == "local":
        return LocalDistillation(
            student, task, teacher=teacher, plan=plan, local=local, guard=guard
        )
    return Hybrid(
        student,
        task,
        teacher=teacher,
        plan=plan,
        local_epochs=int(method.local_epochs),
        local=local,
        global_=_global_config(method),
        guard=guard,
    )


def _run_stage_locked(cfg: DictConfig, out: Path) -> dict[str, Any]:
    method = cfg.method.name
    cfg = prepare_stage(cfg)  # multirun checks, thread policy, data workers
    torch.set_float32_matmul_precision("high")
    if (cfg.method.get("memory_bounded") or {}).get("enabled"):
        try:  # block by block, bounded memory (tnexp/memory_bounded/)
            return run_memory_bounded_stage(cfg)
        except Exception as err:
            write_failed_results(cfg, out, err, phase="local")
            raise

    parts = build(cfg)
    datamodule, task, teacher, student = parts.datamodule, parts.task, parts.teacher, parts.student
    module = build_module(cfg, teacher, student, task, parts.plan)

    feature_cache = None
    if method in ("local", "hybrid") and cfg.method.features == "cached":
        feature_cache = build_feature_cache(cfg, teacher, student, module.plan, datamodule)
    elif method in ("local", "hybrid") and cfg.method.features != "online":
        raise ConfigError(
            f"method.features must be 'online' or 'cached', got {cfg.method.features!r}"
        )
    # Per-slice job output (method.slice_jobs.dir): skips done slices, records the rest.
    jobs = SliceJobOutput.start(cfg, module, parts.report, datamodule, feature_cache)
    if jobs is not None:
        if jobs.done:
            return jobs.skipped_results()
        feature_cache = jobs.feature_cache
    phased = PhasedDataModule(datamodule, feature_cache)

    name = run_name(cfg, parts.report)
    ckpt_path = resolve_resume(cfg, out)
    loggers = build_loggers(cfg, out, name, resuming=ckpt_path is not None)
    timer = OptimizationTimer(monitor=task.monitor, mode=task.mode)
    trainer = build_trainer(cfg, out, loggers, timer, task, reload=method == "hybrid")
    if jobs is not None:
        trainer.callbacks.append(jobs.callback)
    before = evaluate_language_model(cfg, datamodule, student, "before_training")
    if teacher is not None and not before:
        before = evaluate_classification(cfg, datamodule, student, task)
    started = time.time()
    try:
        # weights_only: checkpoints hold tensors and plain values only, so load them safely.
        trainer.fit(module, datamodule=phased, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as err:
        if jobs is not None:
            jobs.record_failure(err, timer)
        if not isinstance(err, KeyboardInterrupt | SystemExit):
            phase = module.phase.method if module._trainer is not None else None
            write_failed_results(
                cfg, out, err, phase=phase, epochs=trainer.current_epoch, step=trainer.global_step
            )
        raise
    if jobs is not None:
        jobs.record_success(module.student, timer)
    wall = time.time() - started
    extra = {"before": before} if before else {}
    after = evaluate_language_model(cfg, datamodule, module.student, "final")
    if after:
        extra["final_eval"] = after
    if teacher is not None:
        dense = evaluate_language_model(cfg, datamodule, teacher, "teacher")
        if dense:
            extra["teacher"] = dense
    results = _write_results(cfg, out, trainer, timer, module, parts.report, wall, extra, name)
    finish_loggers(loggers, results)
    return results


def _write_results(
    cfg: DictConfig,
    out: Path,
    trainer: L.Trainer,
    timer: OptimizationTimer,
    module: TensorizationModule,
    report: TensorizeReport | None,
    wall_s: float,
    extra_metrics: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    """Save the final weights and write results.json of a finished fit."""
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.method.name == "pretrain":
        save_model(module.student, str(out / TEACHER_FILE))
        weights = {"teacher": str(out / TEACHER_FILE)}
    else:
        base_config = OmegaConf.to_container(cfg.model, resolve=True)
        save_tensorized(module.student, report, out / "student", base_config=base_config)
        weights = {"student": str(out / "student")}
    best_ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = Results(
        method=str(cfg.method.name),
        experiment=cfg.experiment_name,
        run_name=name,
        task={"monitor": timer.monitor, "mode": timer.mode},
        metrics={"final": final, "best": {timer.monitor: timer.best_value}, **extra_metrics},
        time={**timer.summary(), "run_wall_s": wall_s},
        params={
            "student": count_parameters(module.student),
            "teacher": count_parameters(module.teacher) if module.teacher is not None else None,
        },
        tensorize=report.to_dict() if report is not None else None,
        weights={**weights, "best_checkpoint": best_ckpt or None},
        data=data_summary(cfg, getattr(trainer, "datamodule", None)),
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        runtime={**runtime_record(), **memory_format_record(trainer)},
        config=plain_config(cfg),
    ).write(out)
    log.info("results written to %s", out / "results.json")
    return results
