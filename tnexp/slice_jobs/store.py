"""Slice-job bookkeeping: selection, identities, the shared run file, slice records, checks.

Slices distilled from the *teacher's* inputs need no synchronisation, so the local phase
can be spread over many processes, GPUs or machines. tnexp does not schedule anything
itself: a Hydra multirun (joblib launcher locally, submitit on SLURM) runs one ordinary
``tnexp method=local`` stage per slice or per group of slices, and they meet in a shared
directory (``method.slice_jobs.dir``)::

    <dir>/run.json                         the full slice plan, spec, teacher, features
    <dir>/slices/<slice name>/weights.safetensors   that slice's state (student keys)
    <dir>/slices/<slice name>/record.json           status, loss curve, times, identity

``tnexp method=assemble`` (tnexp/stages/assemble.py) then rebuilds the full student,
loads every slice and refuses anything missing, failed or trained against another
teacher / spec / feature cache; ``tnexp method=capture`` (tnexp/stages/capture.py)
writes the shared feature cache once, before the jobs start.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tnexp.config import plain as _plain
from tnexp.errors import TnexpError
from tnexp.integrity import checksum_matches, fsync_dir
from tnexp.slicing import SlicePlan, SlicePlanError

log = logging.getLogger("tnexp")

__all__ = [
    "RECORD_FILE",
    "RUN_FILE",
    "SLICES_DIR",
    "WEIGHTS_FILE",
    "SliceJobsError",
    "canonical_json",
    "check_slice_outputs",
    "features_identity",
    "job_count",
    "job_slice_indices",
    "now_iso",
    "read_run_file",
    "read_slice_records",
    "record_problems",
    "run_file_content",
    "select_slices",
    "slice_dir",
    "slice_job_times",
    "slice_jobs_cfg",
    "slice_state",
    "spec_hash",
    "sweep_hint",
    "training_identity",
    "write_run_file",
]

FORMAT_VERSION = 1
RUN_FILE = "run.json"
SLICES_DIR = "slices"
RECORD_FILE = "record.json"
WEIGHTS_FILE = "weights.safetensors"
# Run-file keys that describe *who* wrote it, not *what* was run: never compared.
_RUN_FILE_VOLATILE = ("created",)
# Trainer settings that change what a local job computes (accelerator, devices, logging,
# progress bars do not): jobs writing into one directory must agree on these.
_TRAINING_TRAINER_KEYS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "limit_train_batches",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "precision",
)


class SliceJobsError(TnexpError, RuntimeError):
    """Per-slice job outputs that are missing, failed, or do not match the configuration."""


# =========================================================================== small helpers
def canonical_json(data: Any) -> str:
    """Sorted, compact JSON: equal data, equal text (for hashes and comparisons)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def now_iso() -> str:
    """The current UTC time, ISO format, to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def slice_jobs_cfg(cfg: DictConfig) -> DictConfig | None:
    """``method.slice_jobs`` of ``cfg`` (None when the method has none)."""
    return OmegaConf.select(cfg, "method.slice_jobs", default=None)


# =========================================================================== selection
def job_count(num_slices: int, group: int = 1) -> int:
    """How many jobs of ``group`` slices cover ``num_slices`` slices."""
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}.")
    return math.ceil(num_slices / group)


def job_slice_indices(num_slices: int, job: int, group: int = 1) -> list[int]:
    """Slice indices trained by job ``job``: ``[job*group, (job+1)*group)`` within the plan."""
    jobs = job_count(num_slices, group)
    if not 0 <= job < jobs:
        raise SlicePlanError(
            f"method.slice_jobs.job={job} is out of range: {num_slices} slices in groups of "
            f"{group} make {jobs} jobs (sweep method.slice_jobs.job=range(0,{jobs}))."
        )
    return list(range(job * group, min((job + 1) * group, num_slices)))


def sweep_hint(num_slices: int, group: int = 1) -> str:
    """The multirun override that runs every slice once."""
    jobs = job_count(num_slices, group)
    return f"method.slice_jobs.group={group} method.slice_jobs.job=range(0,{jobs})"


def select_slices(plan: SlicePlan, method_cfg: DictConfig) -> SlicePlan:
    """The slices this stage trains: ``method.slices``, or job ``j`` of ``slice_jobs.group``."""
    jobs = method_cfg.get("slice_jobs")
    if jobs is not None and jobs.get("job") is not None:
        group = int(jobs.get("group") or 1)
        return plan.select(job_slice_indices(len(plan), int(jobs.job), group))
    if method_cfg.get("slices") is not None:
        return plan.select(list(method_cfg.slices))
    return plan


# =========================================================================== identities
def spec_hash(report: Any) -> str:
    """Hash of the resolved tensorization (every layer's shape and init), not the rules.

    Two configs that tensorize to the same layers with the same init hash the same.
    """
    payload = {
        "resolved_spec": report.resolved_spec().to_dict(),
        "init": {layer.name: layer.init for layer in report.layers},
    }
    return _sha256_text(canonical_json(payload))


def features_identity(cfg: DictConfig, datamodule: Any, feature_cache: Any | None) -> dict:
    """What the slices are distilled against: a cache manifest hash, or online + data."""
    if feature_cache is not None:
        return {
            "mode": "cached",
            "manifest_hash": feature_cache.manifest.hash(),
            "dtype": feature_cache.manifest.dtype,
        }
    identity = json.loads(canonical_json(datamodule.identity()))
    return {"mode": "online", "dataset_identity": identity}


def training_identity(cfg: DictConfig) -> dict[str, Any]:
    """The settings that determine a local job's result besides teacher, spec and data."""
    trainer = {k: _plain(cfg.trainer.get(k)) for k in _TRAINING_TRAINER_KEYS if k in cfg.trainer}
    return {"seed": int(cfg.seed), "local": _plain(cfg.method.local), "trainer": trainer}


# =========================================================================== run file
def run_file_content(
    cfg: DictConfig, full_plan: SlicePlan, report: Any, teacher_fp: str, features: dict
) -> dict[str, Any]:
    training = training_identity(cfg)
    return {
        "format_version": FORMAT_VERSION,
        "plan": full_plan.to_dict(),
        "slicing": _plain(cfg.method.slicing),
        "identity": {
            "teacher_fingerprint": teacher_fp,
            "spec_hash": spec_hash(report),
            "features": features,
        },
        "resolved_spec": report.resolved_spec().to_dict(),
        "training": training,
        "training_hash": _sha256_text(canonical_json(training)),
        "created": {"time": now_iso(), "hostname": socket.gethostname(), "pid": os.getpid()},
    }


def _comparable(run: Mapping[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in run.items() if k not in _RUN_FILE_VOLATILE}
    return json.loads(canonical_json(kept))


def _differences(have: Mapping[str, Any], want: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (recursing into dicts), for readable errors."""
    keys = sorted(set(have) | set(want))
    out: list[str] = []
    for key in keys:
        a, b = have.get(key), want.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def read_run_file(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SliceJobsError(f"{path} is corrupt ({err}); delete it and rerun the jobs.") from None


def write_run_file(directory: str | Path, content: dict[str, Any]) -> dict[str, Any]:
    """Create ``<directory>/run.json`` once; later jobs compare and refuse a different one.

    Creation is atomic and exclusive (a hard link of a complete temp file fails if another
    job created the file first), so concurrent jobs never corrupt it and never silently
    replace each other's.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RUN_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{RUN_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write((json.dumps(content, indent=2, default=str) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
                fsync_dir(directory)
                return content
            except FileExistsError:
                pass  # another job won the race: compare with theirs below
            except OSError:  # no hard links on this filesystem
                if not path.exists():
                    os.replace(tmp, path)
                    return content
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    existing = read_run_file(directory)
    assert existing is not None
    diff = _differences(_comparable(existing), _comparable(content))
    if diff:
        raise SliceJobsError(
            f"{path} describes another slice-job run (differs in: {', '.join(diff)}). Every job "
            "writing into one method.slice_jobs.dir must use the same teacher, tensorization, "
            "slicing, features and training settings. Use a new method.slice_jobs.dir for the "
            "new settings (or delete that directory to start over)."
        )
    return existing


# =========================================================================== records
def slice_dir(directory: str | Path, name: str) -> Path:
    if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
        raise SliceJobsError(f"slice name {name!r} cannot be used as a directory name.")
    return Path(directory) / SLICES_DIR / name


def read_slice_records(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Every ``slices/<name>/record.json`` under ``directory``, by slice name."""
    records: dict[str, dict[str, Any]] = {}
    root = Path(directory) / SLICES_DIR
    if not root.is_dir():
        return records
    for path in sorted(root.glob(f"*/{RECORD_FILE}")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            record = {"status": "corrupt", "error": f"{path} is unreadable ({err})"}
        records[path.parent.name] = record
    return records


def slice_state(model: nn.Module, paths: Sequence[str]) -> dict[str, torch.Tensor]:
    """State-dict entries (parameters and buffers) of the modules at ``paths``, full keys."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        for key, value in model.get_submodule(path).state_dict().items():
            # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
            state[f"{path}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return state


# =========================================================================== checks
def record_problems(
    directory: Path,
    name: str,
    paths: Sequence[str],
    record: Mapping[str, Any] | None,
    run: Mapping[str, Any],
    *,
    verify_weights: bool = False,
) -> list[str]:
    """Why the record of slice ``name`` cannot be used with ``run``'s identity (empty: ok)."""
    if record is None:
        return ["missing (no record)"]
    status = record.get("status")
    if status != "ok":
        return [f"{status}: {record.get('error') or 'no error message'}"]
    problems = []
    identity = run["identity"]
    if record.get("teacher_fingerprint") != identity["teacher_fingerprint"]:
        problems.append(
            f"trained against another teacher (fingerprint "
            f"{str(record.get('teacher_fingerprint'))[:12]}..., current "
            f"{identity['teacher_fingerprint'][:12]}...)"
        )
    if record.get("spec_hash") != identity["spec_hash"]:
        problems.append(
            "trained with another tensorization spec (layer shapes / ranks / init differ)"
        )
    if record.get("features") != identity["features"]:
        problems.append(
            f"trained against other features ({_describe_features(record.get('features'))}, "
            f"current {_describe_features(identity['features'])})"
        )
    if record.get("training_hash") != run.get("training_hash"):
        problems.append("trained with other training settings (seed, local.*, epochs, ...)")
    if list(record.get("slice", {}).get("paths", [])) != list(paths):
        problems.append(
            f"covers modules {record.get('slice', {}).get('paths')}, the plan has {list(paths)}"
        )
    weights = slice_dir(directory, name) / WEIGHTS_FILE
    if not weights.is_file():
        problems.append(f"weights file {weights} is missing")
    elif verify_weights:
        recorded = record.get("weights") or {}
        # "sha256": records written before checksums moved to tnexp.integrity.
        if not checksum_matches(weights, recorded.get("checksum") or recorded.get("sha256")):
            problems.append(
                f"{weights} fails its checksum (corrupt or overwritten since it was recorded)"
            )
    return problems


def _describe_features(features: Any) -> str:
    if not isinstance(features, Mapping):
        return repr(features)
    if features.get("mode") == "cached":
        return f"cache {str(features.get('manifest_hash'))[:12]}... ({features.get('dtype')})"
    return f"online on {(features.get('dataset_identity') or {}).get('name', '?')}"


def check_slice_outputs(
    directory: str | Path, plan: SlicePlan, current: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Records of every slice of ``plan``; raises listing *all* unusable ones.

    ``current`` is the run-file content for the current configuration (teacher, spec,
    features); the stored ``run.json`` must match it too (training settings excepted:
    assemble trains nothing).
    """
    directory = Path(directory)
    problems: list[str] = []
    stored = read_run_file(directory)
    if stored is None and not (directory / SLICES_DIR).is_dir():
        raise SliceJobsError(
            f"{directory} holds no slice-job outputs (no {RUN_FILE}, no {SLICES_DIR}/). Train "
            f"the slices first: tnexp -m method=local method.slice_jobs.dir={directory} "
            f"{sweep_hint(len(plan))} <same model/tensorize/data/teacher overrides>."
        )
    reference = dict(current)
    if stored is not None:
        diff = _differences(
            _comparable({k: stored.get(k) for k in ("plan", "identity")}),
            _comparable({k: current.get(k) for k in ("plan", "identity")}),
        )
        if diff:
            problems.append(
                f"{RUN_FILE}: the jobs ran with another configuration (differs in: "
                f"{', '.join(diff)})"
            )
        reference["training_hash"] = stored.get("training_hash")
    records = read_slice_records(directory)
    if stored is None:  # no run file: the records must at least agree with each other
        hashes = {r.get("training_hash") for r in records.values() if r.get("status") == "ok"}
        reference["training_hash"] = hashes.pop() if len(hashes) == 1 else None
    for index, s in enumerate(plan):
        for problem in record_problems(
            directory, s.name, s.paths, records.get(s.name), reference, verify_weights=True
        ):
            problems.append(f"slice {index} {s.name!r}: {problem}")
    extra = sorted(set(records) - set(plan.names()))
    if extra:
        problems.append(f"records of slices not in the current plan: {extra}")
    if problems:
        missing = [
            i
            for i, s in enumerate(plan)
            if record_problems(
                directory, s.name, s.paths, records.get(s.name), reference, verify_weights=True
            )
        ]
        hint = (
            f" Retrain the listed slices (e.g. tnexp -m method=local method.slice_jobs.dir="
            f"{directory} method.slices={','.join(f'[{i}]' for i in missing)} ...; jobs skip "
            "slices that are already done), or assemble with the configuration the jobs used."
            if missing
            else ""
        )
        raise SliceJobsError(
            f"cannot assemble {directory}: {len(problems)} problem(s):\n  - "
            + "\n  - ".join(problems)
            + f"\n{hint}"
        )
    return {s.name: records[s.name] for s in plan}


def slice_job_times(records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Serial-equivalent and ideal-parallel optimisation time over the jobs that ran."""
    jobs: dict[str, float] = {}
    per_slice: dict[str, Any] = {}
    for name, record in records.items():
        seconds = float(record.get("time", {}).get("optimization_s") or 0.0)
        job = record.get("job", {})
        jobs[str(job.get("uid", name))] = seconds
        per_slice[name] = {
            "optimization_s": seconds,
            "wall_s": record.get("time", {}).get("wall_s"),
            "job": job.get("uid"),
            "job_slices": job.get("slices"),
            "hostname": record.get("hostname"),
            "final_loss": (record.get("loss") or {}).get("final_step"),
        }
    values = list(jobs.values())
    return {
        "count": len(records),
        "jobs": len(jobs),
        "sum_optimization_s": float(sum(values)),  # one process, one slice job after another
        "max_optimization_s": float(max(values, default=0.0)),  # every job in parallel
        "per_slice": per_slice,
    }
