"""The ``method=assemble`` stage: the full student from the per-slice jobs' weights.

Builds the student exactly as the jobs did (:func:`tnexp.stages.build.build`), refuses
any slice that is missing, failed or trained against another teacher / spec / features
(:func:`tnexp.slice_jobs.check_slice_outputs`), loads every slice, evaluates, saves.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn

from tnexp.callbacks import OptimizationTimer
from tnexp.errors import ConfigError
from tnexp.factory import count_parameters, save_tensorized
from tnexp.features import FeatureCacheError, open_feature_cache, teacher_fingerprint
from tnexp.modules import GlobalFinetune
from tnexp.results import Results, plain_config, run_name
from tnexp.rundir import run_directory_lock
from tnexp.runtime import runtime_record
from tnexp.slice_jobs.store import (
    WEIGHTS_FILE,
    SliceJobsError,
    check_slice_outputs,
    features_identity,
    run_file_content,
    slice_dir,
    slice_job_times,
    slice_jobs_cfg,
    slice_state,
)
from tnexp.slicing import SlicePlan
from tnexp.stages.build import build, data_summary
from tnexp.stages.evaluate import evaluate_language_model
from tnexp.stages.feature_cache import feature_cache_dir
from tnexp.stages.loggers import build_loggers, finish_loggers
from tnexp.stages.prepare import prepare_stage
from tnexp.stages.trainer import build_trainer

log = logging.getLogger("tnexp")

__all__ = ["run_assemble"]


def run_assemble(cfg: DictConfig) -> dict[str, Any]:
    """Build the full student, load every slice job's weights, evaluate, save, report."""
    with run_directory_lock(cfg.paths.output_dir):
        return _assemble(cfg)


def _assemble(cfg: DictConfig) -> dict[str, Any]:
    jobs = slice_jobs_cfg(cfg)
    if jobs is None or not jobs.get("dir"):
        raise ConfigError(
            "method=assemble needs method.slice_jobs.dir: the directory the per-slice jobs "
            "wrote into."
        )
    cfg = prepare_stage(cfg)
    directory = Path(str(jobs.dir))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    started = time.time()
    parts = build(cfg)
    datamodule, task, teacher, student, report = (
        parts.datamodule,
        parts.task,
        parts.teacher,
        parts.student,
        parts.report,
    )
    plan = parts.plan
    assert plan is not None and teacher is not None and student is not None  # method.slicing
    fingerprint = teacher_fingerprint(teacher)
    features = _current_features(cfg, plan, datamodule, fingerprint)
    current = run_file_content(cfg, plan, report, fingerprint, features)
    records = check_slice_outputs(directory, plan, current)
    _load_slices(student, plan, directory)
    log.info("assembled %d slices from %s", len(plan), directory)

    module = GlobalFinetune(student, task)
    name = run_name(cfg, report)
    loggers = build_loggers(cfg, out, name)
    timer = OptimizationTimer(monitor=task.monitor, mode=task.mode)
    trainer = build_trainer(cfg, out, loggers, timer, task, reload=False)
    validated = trainer.validate(module, datamodule=datamodule, verbose=False)
    final = {k: float(v) for k, v in (validated[0] if validated else {}).items()}
    extra: dict[str, Any] = {}
    lm = evaluate_language_model(cfg, datamodule, student, "final")
    if lm:
        extra["final_eval"] = lm
    save_tensorized(
        student,
        report,
        out / "student",
        base_config=OmegaConf.to_container(cfg.model, resolve=True),
    )
    times = slice_job_times(records)
    results = Results(
        method="assemble",
        experiment=cfg.experiment_name,
        run_name=name,
        task={"monitor": task.monitor, "mode": task.mode},
        metrics={"final": final, "best": {task.monitor: final.get(task.monitor)}, **extra},
        time={
            # Serial equivalent, so tables compare it with one all-slices local run.
            "optimization_s": times["sum_optimization_s"],
            "slice_jobs": times,
            "run_wall_s": time.time() - started,
        },
        params={"student": count_parameters(student), "teacher": count_parameters(teacher)},
        tensorize=report.to_dict() if report is not None else None,
        weights={"student": str(out / "student")},
        data=data_summary(cfg, datamodule),
        slice_jobs={
            "dir": str(directory),
            "slices": plan.names(),
            "features": features,
            "spec_hash": current["identity"]["spec_hash"],
        },
        runtime=runtime_record(),
        config=plain_config(cfg),
    ).write(out)
    log.info(
        "assembled student: %s; slice jobs: %.1f s serial, %.1f s ideal parallel",
        ", ".join(f"{k}={v:.4g}" for k, v in final.items()),
        times["sum_optimization_s"],
        times["max_optimization_s"],
    )
    finish_loggers(loggers, results)
    return results


def _load_slices(student: nn.Module, plan: SlicePlan, directory: Path) -> None:
    """Load every slice's stored state into ``student`` (keys must match exactly)."""
    for s in plan:
        state = load_file(str(slice_dir(directory, s.name) / WEIGHTS_FILE))
        want = slice_state(student, s.paths)
        if set(state) != set(want):
            raise SliceJobsError(
                f"slice {s.name!r}: stored keys {sorted(set(state) ^ set(want))[:6]} differ "
                "from the student's; was it trained with another model?"
            )
        for path in s.paths:
            prefix = f"{path}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                student.get_submodule(path).load_state_dict(sub, strict=True)
            except RuntimeError as err:
                raise SliceJobsError(f"slice {s.name!r} does not fit the student: {err}") from None


def _current_features(
    cfg: DictConfig, plan: SlicePlan, datamodule: Any, fingerprint: str
) -> dict[str, Any]:
    """Features identity of the current config, reading (never writing) the cache."""
    if cfg.method.features != "cached":
        return features_identity(cfg, datamodule, None)
    directory = feature_cache_dir(cfg, fingerprint)
    try:
        cache = open_feature_cache(
            directory,
            teacher_fingerprint=fingerprint,
            dataset_identity=datamodule.identity(),
            plan=plan,
            dtype=cfg.method.cache.dtype,
        )
    except FeatureCacheError as err:
        raise SliceJobsError(
            f"method.features=cached, but the feature cache of this configuration cannot be "
            f"opened, so the slices cannot be checked against it: {err} Assemble with the "
            "cache the jobs used (same method.cache.* and paths.cache_dir), or recapture it "
            "with `tnexp method=capture` and retrain the slices."
        ) from None
    return features_identity(cfg, datamodule, cache)
