"""The ``method=capture`` stage: the teacher-feature cache of the full slice plan, once.

Run before a sweep of per-slice jobs that use ``method.features=cached``; prints the slice
plan and the sweep that trains every slice (``plan_only=true``: only that). Writes
``capture.json`` (the plan, the sweep, the cache) into the output directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tnexp.config import plain
from tnexp.factory import tensorize
from tnexp.integrity import atomic_write_json
from tnexp.rundir import run_directory_lock
from tnexp.runtime import runtime_record
from tnexp.slice_jobs.store import job_count, sweep_hint
from tnexp.slicing import make_slice_plan
from tnexp.stages.build import build
from tnexp.stages.feature_cache import build_feature_cache, feature_cache_dir
from tnexp.stages.prepare import prepare_stage
from tnexp.stages.student import tensorize_spec

__all__ = ["CAPTURE_FILE", "run_capture"]

CAPTURE_FILE = "capture.json"


def run_capture(cfg: DictConfig) -> dict[str, Any]:
    """Write the feature cache for the full slice plan once; print the sweep to run."""
    with run_directory_lock(cfg.paths.output_dir):
        return _capture(cfg)


def _capture(cfg: DictConfig) -> dict[str, Any]:
    cfg = prepare_stage(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = build(cfg, student=False)
    teacher = parts.teacher
    assert teacher is not None
    # The plan needs only which layers are tensorized: skip SVD / data-aware inits and
    # layout choices (no calibration), keep the RNG intact.
    spec = tensorize_spec(cfg)
    spec = dataclasses.replace(
        spec,
        rules=[dataclasses.replace(r, init="random", layout="balanced") for r in spec.rules],
        allocation="uniform",
    )
    with torch.random.fork_rng(devices=[]):
        student, _ = tensorize(teacher, spec)
    plan = make_slice_plan(student, plain(cfg.method.slicing))
    group = int(OmegaConf.select(cfg, "method.slice_jobs.group", default=1) or 1)
    summary: dict[str, Any] = {
        "method": "capture",
        "slices": [{"index": i, **s.to_dict()} for i, s in enumerate(plan)],
        "sweep": sweep_hint(len(plan), group),
        "jobs": job_count(len(plan), group),
        "runtime": runtime_record(),
    }
    if not cfg.method.get("plan_only", False):
        cache = build_feature_cache(cfg, teacher, student, plan, parts.datamodule)
        summary["cache"] = {
            "dir": str(feature_cache_dir(cfg, cache.manifest.teacher_fingerprint)),
            "manifest_hash": cache.manifest.hash(),
            "dtype": cache.manifest.dtype,
            "num_samples": cache.manifest.num_samples,
        }
    atomic_write_json(out / CAPTURE_FILE, summary)
    lines = [f"{len(plan)} slices ({plan.granularity}):"]
    lines += [f"  [{i}] {s.name}" for i, s in enumerate(plan)]
    lines.append(
        f"per-slice jobs: tnexp -m method=local method.features={cfg.method.features} "
        f"method.slice_jobs.dir=<dir> {summary['sweep']} hydra/launcher=tnexp_joblib ..."
    )
    if "cache" in summary:
        lines.append(f"feature cache: {summary['cache']['dir']}")
    print("\n".join(lines))
    return summary
