"""The tensorized student of a stage: the spec from the config, calibration, the factory.

Every stage that tensorizes (local, global, hybrid, slice jobs, memory-bounded, assemble)
builds its student with :func:`build_student`, so they all reach the same initialisation.
Data-aware inits (``tensorize.init=whiten|als``, ``layout=auto``) need the teacher's input
statistics: they are collected once from ``tensorize.calibration.num_batches`` training
batches, saved under ``tensorize.calibration.dir`` (default ``<paths.cache_dir>/
calibration``) keyed by teacher, data and layers, and loaded by every later run or job.
With ``tensorize.calibration.compensate`` the later layers of each slice are then refitted
from the student's own inputs (:mod:`tnexp.compensation`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from tnexp.calibration import (
    CalibrationError,
    CalibrationFormatError,
    InputStats,
    collect_input_stats,
    feature_cache_feeds,
    input_stats_from_feature_cache,
    stats_key,
)
from tnexp.compensation import (
    CompensationResult,
    compensate_slices,
    load_compensation,
    save_compensation,
)
from tnexp.errors import ConfigError
from tnexp.factory import (
    SPEC_FILE,
    TensorizeReport,
    TensorizeSpec,
    load_tensorized,
    needs_input_stats,
    plan_layers,
    tensorize,
)
from tnexp.features import teacher_fingerprint
from tnexp.fisher import collect_output_fisher
from tnexp.integrity import canonical_json, tensor_checksum
from tnexp.schema import CalibrationSettings, settings_dict
from tnexp.slicing import make_slice_plan

log = logging.getLogger("tnexp")
SPEC_KEYS = (
    "rules",
    "exclude",
    "overall_cr",
    "contraction",
    "tucker_order",
    "order_timing",
    "allocation",
    "weighting",
    "damping",
    "als_sweeps",
    "als_tol",
)


def tensorize_spec(cfg: DictConfig) -> TensorizeSpec:
    """The factory's spec from ``cfg.tensorize`` (calibration settings stay in the config)."""
    t = OmegaConf.to_container(cfg.tensorize, resolve=True)
    return TensorizeSpec.from_config({k: t[k] for k in SPEC_KEYS if k in t})


def calibration_settings(cfg: DictConfig) -> CalibrationSettings | None:
    """``tensorize.calibration`` (None for a tensorize config without one, e.g. ``none``)."""
    node = cfg.tensorize.get("calibration")
    if node is None:
        return None
    data = settings_dict(node, CalibrationSettings, "tensorize.calibration")
    return CalibrationSettings(**data)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave python / numpy / torch RNG states as they were (calibration shuffles data).

    A run that computes the statistics and one that loads them from disk must then draw
    the same random numbers afterwards (random inits, data order): slice jobs rely on it.
    """
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _device(cfg: DictConfig) -> torch.device | None:
    if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu":
        return torch.device("cuda")
    return None


def calibration_stats(
    cfg: DictConfig,
    teacher: torch.nn.Module,
    spec: TensorizeSpec,
    datamodule: Any,
    task: Any,
    *,
    force: bool = False,
    fingerprint: str | None = None,
    paged: contextlib.AbstractContextManager | None = None,
) -> InputStats | None:
    """The teacher's input statistics for the spec's layers, loaded or collected once.

    ``None`` when the spec needs none, unless ``force`` (analyses that want them anyway).
    Memory-bounded ``offload=disk`` passes the teacher's skeleton, a ``fingerprint`` of
    its weights file and ``paged`` (:meth:`tnexp.memory_bounded.teacher.TeacherBlocks.paged`):
    the calibration forward then reads each block from disk just while it runs, so the
    Grams are accumulated block by block and equal the online ones.
    """
    if not (force or needs_input_stats(spec)):
        return None
    cal = calibration_settings(cfg)
    num_batches = cal.num_batches if cal is not None else 0
    if num_batches <= 0:
        raise CalibrationError(
            "input statistics are needed (init whiten/als, layout auto, adaptive low-rank "
            "ranks or a data-aware analysis) but tensorize.calibration.num_batches is "
            f"{num_batches}; set it to a positive number (e.g. 64) or use tensorize.init=svd."
        )
    names = [item.name for item in plan_layers(teacher, spec)]
    fingerprint = fingerprint or teacher_fingerprint(teacher)
    datamodule.setup("fit")
    identity = {
        "teacher": fingerprint,
        "data": datamodule.identity() if hasattr(datamodule, "identity") else None,
        "batch_size": OmegaConf.select(cfg, "data.batch_size"),
        "seed": int(cfg.seed),
        "num_batches": num_batches,
        "layers": names,
    }
    fisher_batches = _fisher_batches(spec, cal, paged)
    if fisher_batches:  # only then: files without the Fisher keep their key
        identity["fisher_batches"] = fisher_batches
    directory = Path(cal.dir or Path(cfg.paths.cache_dir) / "calibration")

    def file_for(identity: dict[str, Any]) -> tuple[str, Path]:
        key = stats_key(identity)
        return key, directory / f"{fingerprint[:12]}-{key}.safetensors"

    key, path = file_for(identity)
    # Statistics collected online are preferred; only when there are none does a feature
    # cache that holds every layer's input replace the teacher pass (its own file, so all
    # jobs that see the same files reach the same init).
    cache = None
    if not path.is_file() and paged is None:
        cache = _covering_cache(cfg, teacher, names, fingerprint, identity["data"])
    if cache is not None:
        key, path = file_for({**identity, "source": str(cache.directory)})
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # concurrent slice jobs: one collects, all load
        if path.is_file():
            try:
                stats = InputStats.load(path, expect={"key": key})
                log.info("calibration statistics loaded from %s", path)
                return stats
            except CalibrationFormatError as err:  # an older tnexp's file: recollect it
                log.warning("%s; recollecting", str(err).split(";")[0])
        meta = {"key": key, "layers": len(names)}
        with preserved_rng(), paged or contextlib.nullcontext():
            if cache is not None:
                stats = input_stats_from_feature_cache(
                    teacher,
                    names,
                    cache,
                    num_batches=num_batches,
                    batch_size=int(datamodule.batch_size),
                    meta=meta,
                )
                log.info("calibration statistics read from the feature cache %s", cache.directory)
            else:
                stats = collect_input_stats(
                    teacher,
                    names,
                    datamodule.train_dataloader(),
                    model_inputs=task.model_inputs,
                    num_batches=num_batches,
                    device=_device(cfg) if paged is None else None,
                    progress=cfg.callbacks.get("progress_bar", "none") != "none",
                    meta=meta,
                )
            if fisher_batches:
                stats.fisher = collect_output_fisher(
                    teacher,
                    names,
                    datamodule.train_dataloader(),
                    loss_fn=lambda model, batch: task.loss(task.forward(model, batch), batch),
                    num_batches=fisher_batches,
                    device=_device(cfg),
                    progress=cfg.callbacks.get("progress_bar", "none") != "none",
                )
                stats.meta["fisher_batches"] = fisher_batches
        stats.save(path)
        log.info("calibration statistics (%d batches) saved to %s", stats.meta["batches"], path)
    return stats


def _fisher_batches(spec: TensorizeSpec, cal: CalibrationSettings | None, paged: Any) -> int:
    """Batches of the output-Fisher pass (0: the spec does not weight by it)."""
    if spec.weighting != "fisher":
        return 0
    batches = cal.fisher_batches if cal is not None else 0
    if batches <= 0:
        raise CalibrationError(
            f"tensorize.weighting=fisher needs the teacher's output Fisher, but "
            f"tensorize.calibration.fisher_batches is {batches}; set it to a positive number "
            "(e.g. 8) or use tensorize.weighting=none."
        )
    if paged is not None:
        raise CalibrationError(
            "tensorize.weighting=fisher needs a forward and backward pass of the whole "
            "teacher, which memory-bounded offload=disk does not hold at once; use "
            "method.memory_bounded.offload=cpu or tensorize.weighting=none."
        )
    return batches


def _covering_cache(
    cfg: DictConfig, teacher: torch.nn.Module, names: list[str], fingerprint: str, data: Any
) -> Any:
    """The teacher-feature cache of this configuration (``method.features=cached``) when
    it exists, matches the teacher and holds every layer's input; else ``None``."""
    from tnexp.features import FeatureCacheError, open_feature_cache
    from tnexp.stages.feature_cache import feature_cache_dir

    method = cfg.get("method") or {}
    if method.get("features") != "cached":
        return None
    directory = feature_cache_dir(cfg, fingerprint)
    try:
        cache = open_feature_cache(
            directory, teacher_fingerprint=fingerprint, dataset_identity=data
        )
    except (FeatureCacheError, OSError):
        return None  # no cache (yet), or another teacher's: collect online
    fed = feature_cache_feeds(teacher, names, cache)
    if len(fed) < len(names):
        log.info(
            "the feature cache %s holds the inputs of %d of %d layers; collecting the "
            "statistics with a teacher pass",
            directory,
            len(fed),
            len(names),
        )
        return None
    return cache


def build_student(
    cfg: DictConfig,
    teacher: torch.nn.Module,
    datamodule: Any,
    task: Any,
    *,
    spec: TensorizeSpec | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, TensorizeReport]:
    """Tensorize ``teacher`` as ``cfg.tensorize`` says, with calibration when it needs it.

    With ``student.path`` set, the saved student there is loaded instead (its own recorded
    shapes and weights; ``tensorize.*`` and calibration are not applied).
    """
    if hasattr(task, "bind_teacher"):  # task=features: the student is measured against it
        task.bind_teacher(teacher)
    saved = (cfg.get("student") or {}).get("path")
    if saved:
        student, report = load_student(saved, base=copy.deepcopy(teacher))
        log.info(
            "student loaded from %s (%d tensorized layers, model CR %.3f); tensorize.* is "
            "not applied",
            saved,
            len(report.layers),
            report.model_cr,
        )
        return student, report
    spec = spec or tensorize_spec(cfg)
    stats = calibration_stats(cfg, teacher, spec, datamodule, task)
    student, report = tensorize(teacher, spec, stats=stats, progress=progress)
    cal = calibration_settings(cfg)
    if stats is not None and cal is not None and cal.compensate:
        compensate(cfg, teacher, student, datamodule, task, stats=stats, spec=spec)
    errors = [layer.output_error for layer in report.layers if layer.output_error is not None]
    if errors:
        log.info(
            "tensorized %d layers, model CR %.3f; relative output error on the calibration "
            "inputs: mean %.3f, max %.3f",
            len(report.layers),
            report.model_cr,
            sum(errors) / len(errors),
            max(errors),
        )
    else:
        log.info("tensorized %d layers, model CR %.3f", len(report.layers), report.model_cr)
    return student, report


def load_student(
    path: str | Path, base: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, TensorizeReport]:
    """A saved tensorized student: a ``student/`` folder, or the run folder holding one.

    ``base`` is the dense architecture (e.g. a copy of the teacher); without it the folder's
    recorded ``base_config`` builds it.
    """
    return load_tensorized(student_dir(path), base=base)


def student_dir(path: str | Path) -> Path:
    """The saved student folder of ``path``: a ``student/`` folder or a run folder holding one."""
    directory = Path(path)
    if (directory / "student" / SPEC_FILE).is_file():  # a run folder: its student/ inside
        directory = directory / "student"
    if not (directory / SPEC_FILE).is_file():
        raise ConfigError(
            f"{path} holds no saved student ({SPEC_FILE} missing): give a run folder with a "
            "student/ inside or the student/ folder itself (written by local, global, hybrid "
            "and assemble runs)."
        )
    return directory


def compensate(
    cfg: DictConfig,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    datamodule: Any,
    task: Any,
    *,
    stats: InputStats | None = None,
    spec: TensorizeSpec | None = None,
) -> CompensationResult:
    """Refit later layers of each slice from the student's own inputs (tnexp.compensation).

    Uses the calibration batches (the same ones as the statistics: same RNG state, then
    restored), so every run and slice job reaches the same student. With the ``stats``
    the student was initialised from, the refitted layers are saved beside them, keyed by
    the statistics' key, the spec, the student before the refit and the compensation
    settings (file-locked like the statistics): a rerun or another slice job loads them
    and reaches the bit-identical student without a teacher pass.
    """
    cal = calibration_settings(cfg) or CalibrationSettings()
    plan = make_slice_plan(student, cal.compensate_slicing)
    t = cfg.tensorize
    settings = {
        "num_batches": int(cal.num_batches),
        "damping": float(t.get("damping", 0.01)),
        "als_sweeps": int(t.get("als_sweeps", 4)),
        "als_tol": float(t.get("als_tol", 1e-4)),
        "chain": bool(cal.compensate_chain),
    }

    def run() -> CompensationResult:
        with preserved_rng():
            return compensate_slices(
                teacher,
                student,
                plan,
                datamodule.train_dataloader(),
                model_inputs=task.model_inputs,
                device=_device(cfg),
                progress=cfg.callbacks.get("progress_bar", "none") != "none",
                **settings,
            )

    if stats is None or "key" not in stats.meta:
        return run()
    identity = {
        "statistics": stats.meta["key"],
        "spec": spec.to_dict() if spec is not None else None,
        "student": canonical_json({k: tensor_checksum(v) for k, v in student.state_dict().items()}),
        "slicing": cal.compensate_slicing,
        **settings,
    }
    key = stats_key(identity)
    directory = Path(cal.dir or Path(cfg.paths.cache_dir) / "calibration") / "compensation"
    path = directory / f"{stats.meta['key']}-{key}.safetensors"
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # concurrent slice jobs: one refits, all load
        if path.is_file():
            try:
                result = load_compensation(path, student, expect={"key": key})
                log.info("compensated layers loaded from %s", path)
                return result
            except CalibrationFormatError as err:  # an older tnexp's file: recompute it
                log.warning("%s; recomputing", str(err).split(";")[0])
        result = run()
        save_compensation(path, student, result, {"key": key})
        log.info("compensated layers (%d) saved to %s", len(result.layers), path)
    return result


__all__ = [
    "build_student",
    "calibration_settings",
    "calibration_stats",
    "compensate",
    "load_student",
    "preserved_rng",
    "student_dir",
    "tensorize_spec",
]
