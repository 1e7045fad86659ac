"""Slice-parallel local tensorization: per-slice jobs on Hydra launchers, then assemble.

Slices distilled from the *teacher's* inputs need no synchronisation, so the local phase
can be spread over many processes, GPUs or machines. tnexp does not schedule anything
itself: a Hydra multirun (joblib launcher locally, submitit on SLURM) runs one ordinary
``tnexp method=local`` stage per slice or per group of slices, and they meet in a shared
directory (``method.slice_jobs.dir``)::

    <dir>/run.json                         the full slice plan, spec, teacher, features
    <dir>/slices/<slice name>/weights.safetensors   that slice's state (student keys)
    <dir>/slices/<slice name>/record.json           status, loss curve, times, identity

``tnexp method=assemble`` then rebuilds the full student through the one factory, loads
every slice, refuses anything missing, failed or trained against another teacher / spec /
feature cache, evaluates it and saves it. ``tnexp method=capture`` writes the shared
feature cache once, before the jobs start, and prints the sweep to run.

Everything here is called from :mod:`tnexp.run` (stage preparation, job output, dispatch
of ``assemble`` / ``capture``); the logic lives in this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tnexp.config import plain as _plain
from tnexp.errors import TnexpError
from tnexp.integrity import (
    atomic_write_bytes,
    atomic_write_json,
    checksum_matches,
    file_checksum,
    fsync_dir,
)
from tnexp.runtime import apply_thread_policy, runtime_record, usable_cores
from tnexp.slicing import SlicePlan, SlicePlanError

log = logging.getLogger("tnexp")

__all__ = [
    "RECORD_FILE",
    "RUN_FILE",
    "SLICES_DIR",
    "WEIGHTS_FILE",
    "SliceJobOutput",
    "SliceJobsError",
    "SliceLossRecorder",
    "atomic_write_bytes",
    "atomic_write_json",
    "cache_lock",
    "check_slice_outputs",
    "job_count",
    "job_slice_indices",
    "prepare_stage",
    "read_slice_records",
    "run_assemble",
    "run_capture",
    "select_slices",
    "spec_hash",
    "sweep_hint",
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
_DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed")


class SliceJobsError(TnexpError, RuntimeError):
    """Per-slice job outputs that are missing, failed, or do not match the configuration."""


# =========================================================================== small helpers
def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _slice_jobs_cfg(cfg: DictConfig) -> DictConfig | None:
    return OmegaConf.select(cfg, "method.slice_jobs", default=None)


def _atomic_save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


# =========================================================================== launch checks
def _hydra_config() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def hydra_run_mode() -> str | None:
    """``"MULTIRUN"`` / ``"RUN"`` under ``@hydra.main``, ``None`` outside Hydra (tests, API)."""
    hydra_cfg = _hydra_config()
    mode = None if hydra_cfg is None else hydra_cfg.get("mode")
    return None if mode is None else str(getattr(mode, "name", mode))


def launcher_kind() -> str | None:
    """``"joblib"``, ``"submitit"`` or ``"basic"`` for the running Hydra job; else ``None``."""
    hydra_cfg = _hydra_config()
    target = "" if hydra_cfg is None else str(OmegaConf.select(hydra_cfg, "launcher._target_"))
    for kind in ("joblib", "submitit", "basic"):
        if kind in target.lower():
            return kind
    return None


def _joblib_n_jobs() -> int:
    """Concurrent jobs of the running joblib multirun (``hydra.launcher.n_jobs``)."""
    hydra_cfg = _hydra_config()
    n = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=-1) or -1)
    # joblib's convention: -1 = every core, -2 = all but one, ...
    return n if n > 0 else max(1, usable_cores() + 1 + n)


def _cpu_ranks(trainer_cfg: DictConfig) -> int:
    """Training processes a CPU run starts on this machine (DDP ranks share its cores)."""
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    devices = trainer_cfg.get("devices")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return devices if on_cpu and isinstance(devices, int) and devices > 1 else 1


def _is_distributed(trainer_cfg: DictConfig) -> str | None:
    strategy = str(trainer_cfg.get("strategy") or "auto").lower()
    if strategy.startswith(_DISTRIBUTED_STRATEGIES):
        return f"trainer.strategy={strategy}"
    if int(trainer_cfg.get("num_nodes") or 1) > 1:
        return f"trainer.num_nodes={trainer_cfg.num_nodes}"
    devices = trainer_cfg.get("devices")
    if isinstance(devices, int) and devices > 1:
        return f"trainer.devices={devices}"
    if OmegaConf.is_list(devices) and len(devices) > 1:
        return f"trainer.devices={list(devices)}"
    return None


def prepare_stage(
    cfg: DictConfig, *, run_mode: str | None = None, launcher: str | None = None
) -> DictConfig:
    """Checks and per-job settings applied at the start of every training stage.

    * a Hydra multirun must not use a distributed strategy (DDP/FSDP re-launch the script
      per rank, each re-running the whole sweep): refused with the alternatives;
    * the thread policy (``runtime.threads``, :mod:`tnexp.runtime`) sets torch's threads
      so that concurrent jobs and other processes do not oversubscribe the cores, and
      resolves ``data.num_workers`` (0 inside joblib's loky workers, which cannot start
      DataLoader worker processes);
    * slice-job settings are validated (local method, teacher inputs, one way to select).

    ``run_mode`` / ``launcher`` default to what the running Hydra job says (tests pass them).
    Returns ``cfg`` or a modified copy.
    """
    run_mode = run_mode if run_mode is not None else hydra_run_mode()
    launcher = launcher if launcher is not None else launcher_kind()
    if run_mode == "MULTIRUN":
        distributed = _is_distributed(cfg.trainer)
        if distributed:
            raise ValueError(
                f"{distributed} inside a Hydra multirun: DDP/FSDP start one process per "
                "device by re-running the command, and inside a sweep every rank would re-run "
                "the sweep. Run distributed global fine-tuning as a single run (`tnexp "
                "trainer=ddp ...` without -m; on SLURM `srun tnexp trainer=ddp_multinode ...`), "
                "and spread local slices over devices with per-slice jobs instead "
                "(method.slice_jobs.*, one device per job)."
            )
    # One thread policy for every stage (tnexp/runtime.py): torch threads from the usable
    # cores, concurrent joblib jobs and the load; data.num_workers (0 inside joblib jobs).
    jobs = _joblib_n_jobs() if launcher == "joblib" else 1
    cfg, _ = apply_thread_policy(cfg, launcher=launcher, jobs=jobs * _cpu_ranks(cfg.trainer))
    jobs = _slice_jobs_cfg(cfg)
    if jobs is not None:
        _validate_slice_jobs(cfg, jobs)
    return cfg


def _validate_slice_jobs(cfg: DictConfig, jobs: DictConfig) -> None:
    method = cfg.method
    selecting = jobs.get("job") is not None
    if selecting and method.get("slices") is not None:
        raise ValueError(
            "set either method.slices (explicit slices) or method.slice_jobs.job (a job index "
            "with method.slice_jobs.group slices per job), not both."
        )
    if int(jobs.get("group") or 1) < 1:
        raise ValueError(f"method.slice_jobs.group must be >= 1, got {jobs.group}.")
    if selecting and int(jobs.job) < 0:
        raise ValueError(f"method.slice_jobs.job must be >= 0, got {jobs.job}.")
    if not jobs.get("dir") or method.name in ("assemble", "capture"):
        return
    if method.name != "local":
        raise ValueError(
            f"method.slice_jobs.dir is for method=local (per-slice jobs); method={method.name} "
            "trains the whole network, so its slices are not independent. Unset "
            "method.slice_jobs.dir, or run the local phase as slice jobs and fine-tune the "
            "assembled student afterwards."
        )
    if method.local.input_source != "teacher":
        raise ValueError(
            "per-slice jobs need method.local.input_source=teacher: with student inputs each "
            "slice depends on the slices before it, so they cannot be trained apart."
        )
    if cfg.trainer.get("gradient_clip_val") and str(
        cfg.trainer.get("gradient_clip_algorithm") or "norm"
    ).startswith("norm"):
        log.warning(
            "trainer.gradient_clip_val clips by the norm over *all* trained slices, so per-slice "
            "jobs will not reproduce an all-slices run exactly; use "
            "trainer.gradient_clip_algorithm=value for slice-independent clipping."
        )


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
    return _sha256_text(_canonical_json(payload))


def features_identity(cfg: DictConfig, datamodule: Any, feature_cache: Any | None) -> dict:
    """What the slices are distilled against: a cache manifest hash, or online + data."""
    if feature_cache is not None:
        return {
            "mode": "cached",
            "manifest_hash": feature_cache.manifest.hash(),
            "dtype": feature_cache.manifest.dtype,
        }
    identity = json.loads(_canonical_json(datamodule.identity()))
    return {"mode": "online", "dataset_identity": identity}


def training_identity(cfg: DictConfig) -> dict[str, Any]:
    """The settings that determine a local job's result besides teacher, spec and data."""
    trainer = {k: _plain(cfg.trainer.get(k)) for k in _TRAINING_TRAINER_KEYS if k in cfg.trainer}
    return {"seed": int(cfg.seed), "local": _plain(cfg.method.local), "trainer": trainer}


# =========================================================================== cache lock
@contextlib.contextmanager
def cache_lock(cache_dir: str | Path) -> Iterator[None]:
    """Hold ``<cache_dir>.lock`` so concurrent jobs capture a feature cache only once.

    The waiting job then finds the finished cache and opens it read-only. (The capture
    itself publishes atomically, so even without the lock a cache is never corrupt; the lock
    only saves the duplicate work.) On filesystems without working ``flock`` run
    ``tnexp method=capture`` before the sweep instead.
    """
    from filelock import FileLock, Timeout

    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache_dir.parent / f"{cache_dir.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another job is capturing the feature cache %s; waiting for it", cache_dir)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# =========================================================================== run file
def _run_file_content(
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
        "training_hash": _sha256_text(_canonical_json(training)),
        "created": {"time": _now(), "hostname": socket.gethostname(), "pid": os.getpid()},
    }


def _comparable(run: Mapping[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in run.items() if k not in _RUN_FILE_VOLATILE}
    return json.loads(_canonical_json(kept))


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


class SliceLossRecorder(L.Callback):
    """Each trained slice's loss: epoch means and a log-spaced sample of steps.

    Reads what :class:`~tnexp.modules.TensorizationModule` logs as ``train/slice/<name>``.
    Steps kept: the first five, then powers of two, then the last one.
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.epochs: dict[str, list[dict[str, float]]] = {n: [] for n in self.names}
        self.steps: dict[str, list[list[float]]] = {n: [] for n in self.names}
        self.last: dict[str, list[float]] = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        step = int(trainer.global_step)
        metrics = trainer.callback_metrics
        keep = step <= 5 or (step & (step - 1)) == 0
        for name in self.names:
            value = metrics.get(f"train/slice/{name}_step")
            if value is None:
                continue
            point = [step, float(value)]
            self.last[name] = point
            if keep:
                self.steps[name].append(point)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        for name in self.names:
            value = metrics.get(f"train/slice/{name}_epoch")
            if value is not None:
                self.epochs[name].append(
                    {"epoch": int(trainer.current_epoch), "loss": float(value)}
                )

    def curve(self, name: str) -> dict[str, Any]:
        steps = list(self.steps.get(name, []))
        last = self.last.get(name)
        if last is not None and (not steps or steps[-1][0] != last[0]):
            steps.append(last)
        final = steps[-1][1] if steps else None
        return {"epochs": list(self.epochs.get(name, [])), "steps": steps, "final_step": final}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs.update(state_dict.get("epochs", {}))
        self.steps.update(state_dict.get("steps", {}))
        self.last.update(state_dict.get("last", {}))


class SliceJobOutput:
    """One local stage's share of a slice-job run: run file, skip check, records, weights.

    Made by :meth:`start` (``None`` when ``method.slice_jobs.dir`` is unset). After it,
    :attr:`pending` lists the slices to train (empty: everything is done, skip the stage),
    :attr:`feature_cache` is the cache dataset narrowed to them and :attr:`callback` must be
    added to the trainer; then :meth:`record_success` or :meth:`record_failure`.
    """

    def __init__(
        self,
        cfg: DictConfig,
        directory: Path,
        full_plan: SlicePlan,
        run: dict[str, Any],
        selected: SlicePlan,
        pending: SlicePlan,
        feature_cache: Any | None,
    ) -> None:
        self.cfg = cfg
        self.directory = directory
        self.full_plan = full_plan
        self.run = run
        self.selected = selected
        self.pending = pending
        self.feature_cache = feature_cache
        self.uid = uuid.uuid4().hex
        self.callback = SliceLossRecorder(pending.names())
        self.started = time.time()

    # ------------------------------------------------------------------ start
    @classmethod
    def start(
        cls,
        cfg: DictConfig,
        module: Any,
        report: Any,
        datamodule: Any,
        feature_cache: Any | None,
    ) -> SliceJobOutput | None:
        """Write/compare ``run.json``; find which of this job's slices still need training.

        Narrows ``module.plan`` (and the feature cache) to those slices.
        """
        jobs = _slice_jobs_cfg(cfg)
        if jobs is None or not jobs.get("dir"):
            return None
        from tnexp.features import teacher_fingerprint
        from tnexp.slicing import make_slice_plan

        directory = Path(str(jobs.dir))
        full_plan = make_slice_plan(module.student, _plain(cfg.method.slicing))
        features = features_identity(cfg, datamodule, feature_cache)
        content = _run_file_content(
            cfg, full_plan, report, teacher_fingerprint(module.teacher), features
        )
        run = write_run_file(directory, content)
        selected: SlicePlan = module.plan
        if jobs.get("skip_done", True):
            records = read_slice_records(directory)
            # Weights are verified against their checksums: a damaged file is retrained,
            # never skipped as "already trained".
            done = [
                s.name
                for s in selected
                if not _record_problems(
                    directory, s.name, s.paths, records.get(s.name), run, verify_weights=True
                )
            ]
        else:
            done = []
        names = [s.name for s in selected if s.name not in done]
        if done:
            log.info(
                "slice jobs: %s already trained in %s (ok records for this cache/spec); %s",
                done,
                directory,
                f"training only {names}" if names else "nothing left to train: skipping",
            )
        pending = selected.select(names) if names else SlicePlan([], selected.granularity)
        if names and len(names) < len(selected):
            module.plan = pending  # slices are independent: training fewer changes none
            if feature_cache is not None:
                from tnexp.features import FeatureCacheDataset

                feature_cache = FeatureCacheDataset(
                    feature_cache.directory, feature_cache.manifest, slices=names
                )
        return cls(cfg, directory, full_plan, run, selected, pending, feature_cache)

    @property
    def done(self) -> bool:
        return len(self.pending) == 0

    def skipped_results(self) -> dict[str, Any]:
        return {
            "method": self.cfg.method.name,
            "skipped": True,
            "slice_jobs": {"dir": str(self.directory), "slices": self.selected.names()},
        }

    # ------------------------------------------------------------------ records
    def _base_record(self, index: int, name: str, status: str, timer: Any) -> dict[str, Any]:
        identity = self.run["identity"]
        summary = timer.summary() if timer is not None else {}
        return {
            "format_version": FORMAT_VERSION,
            "slice": {"name": name, "index": index, "paths": list(self.full_plan[name].paths)},
            "status": status,
            "error": None,
            "loss": self.callback.curve(name),
            "time": {
                # The job's optimisation time; a job with several slices shares it (see job).
                "optimization_s": summary.get("optimization_s"),
                "wall_s": summary.get("wall_s"),
                "feature_capture_s": summary.get("feature_capture_s"),
                "num_steps": summary.get("num_steps_timed"),
            },
            "job": {
                "uid": self.uid,
                "slices": self.pending.names(),
                "output_dir": str(self.cfg.paths.output_dir),
                "started": _dt.datetime.fromtimestamp(self.started, _dt.UTC).isoformat(
                    timespec="seconds"
                ),
            },
            "teacher_fingerprint": identity["teacher_fingerprint"],
            "spec_hash": identity["spec_hash"],
            "features": identity["features"],
            "training_hash": self.run["training_hash"],
            "slicing": self.run["slicing"],
            "seed": int(self.cfg.seed),
            "weights": None,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "time_written": _now(),
        }

    def record_success(self, student: nn.Module, timer: Any) -> list[Path]:
        """Write every trained slice's weights, then its record (the commit marker)."""
        written = []
        for s in self.pending:
            target = slice_dir(self.directory, s.name)
            weights = target / WEIGHTS_FILE
            _atomic_save_safetensors(
                weights,
                slice_state(student, s.paths),
                {"slice": s.name, "job": self.uid, "format_version": str(FORMAT_VERSION)},
            )
            record = self._base_record(self.full_plan.names().index(s.name), s.name, "ok", timer)
            record["weights"] = {"file": WEIGHTS_FILE, "checksum": file_checksum(weights)}
            atomic_write_json(target / RECORD_FILE, record)
            written.append(target)
        log.info("slice jobs: wrote %s into %s", self.pending.names(), self.directory)
        return written

    def record_failure(self, error: BaseException, timer: Any) -> None:
        """Mark every slice of this job failed (with the error); the caller re-raises."""
        message = f"{type(error).__name__}: {error}"
        for s in self.pending:
            record = self._base_record(
                self.full_plan.names().index(s.name), s.name, "failed", timer
            )
            record["error"] = message
            try:
                atomic_write_json(slice_dir(self.directory, s.name) / RECORD_FILE, record)
            except OSError as err:  # never mask the training error with a bookkeeping one
                log.error("could not write the failure record of slice %s: %s", s.name, err)
        log.error(
            "slice jobs: %s failed (%s); recorded in %s",
            self.pending.names(),
            message,
            self.directory,
        )


# =========================================================================== checks
def _record_problems(
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
        for problem in _record_problems(
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
            if _record_problems(
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


# =========================================================================== stages
def _build_student(cfg: DictConfig) -> tuple[Any, Any, nn.Module, nn.Module, Any]:
    """Data, task, teacher and student exactly as a training stage builds them.

    Same calls in the same order after the same seeding, so the tensorized layers get the
    same random init as in the jobs.
    """
    from tnexp.run import build_datamodule, build_task, load_teacher
    from tnexp.student import build_student

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    task = build_task(cfg)
    teacher = load_teacher(cfg)
    student, report = build_student(cfg, teacher, datamodule, task)
    return datamodule, task, teacher, student, report


def _current_features(
    cfg: DictConfig, teacher: nn.Module, plan: SlicePlan, datamodule: Any, fingerprint: str
) -> dict[str, Any]:
    """Features identity of the current config, reading (never writing) the cache."""
    if cfg.method.features != "cached":
        return features_identity(cfg, datamodule, None)
    from tnexp.features import FeatureCacheError, open_feature_cache
    from tnexp.run import feature_cache_dir

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


def run_assemble(cfg: DictConfig) -> dict[str, Any]:
    """Build the full student, load every slice job's weights, evaluate, save, report."""
    from safetensors.torch import load_file

    from tnexp.callbacks import OptimizationTimer
    from tnexp.factory import count_parameters, save_tensorized
    from tnexp.features import teacher_fingerprint
    from tnexp.modules import GlobalFinetune
    from tnexp.run import (
        _finish_loggers,
        build_loggers,
        build_trainer,
        evaluate_language_model,
    )
    from tnexp.slicing import make_slice_plan

    jobs = _slice_jobs_cfg(cfg)
    if jobs is None or not jobs.get("dir"):
        raise ValueError(
            "method=assemble needs method.slice_jobs.dir: the directory the per-slice jobs "
            "wrote into."
        )
    cfg = prepare_stage(cfg)
    directory = Path(str(jobs.dir))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    started = time.time()
    datamodule, task, teacher, student, report = _build_student(cfg)
    plan = make_slice_plan(student, _plain(cfg.method.slicing))
    fingerprint = teacher_fingerprint(teacher)
    features = _current_features(cfg, teacher, plan, datamodule, fingerprint)
    current = _run_file_content(cfg, plan, report, fingerprint, features)
    records = check_slice_outputs(directory, plan, current)

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
    log.info("assembled %d slices from %s", len(plan), directory)

    module = GlobalFinetune(student, task)
    run_name = f"assemble-cr{cfg.tensorize.get('cr', report.model_cr)}"
    loggers = build_loggers(cfg, out, run_name)
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
    results = {
        "method": "assemble",
        "experiment": cfg.experiment_name,
        "task": {"monitor": task.monitor, "mode": task.mode},
        "metrics": {
            "final": final,
            "best": {task.monitor: final.get(task.monitor)},
            **extra,
        },
        "time": {
            # Serial equivalent, so tables compare it with one all-slices local run.
            "optimization_s": times["sum_optimization_s"],
            "slice_jobs": times,
            "run_wall_s": time.time() - started,
        },
        "params": {
            "student": count_parameters(student),
            "teacher": count_parameters(teacher),
        },
        "tensorize": report.to_dict(),
        "weights": {"student": str(out / "student")},
        "slice_jobs": {
            "dir": str(directory),
            "slices": plan.names(),
            "features": features,
            "spec_hash": current["identity"]["spec_hash"],
        },
        "runtime": runtime_record(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_json(out / "results.json", results)
    log.info(
        "assembled student: %s; slice jobs: %.1f s serial, %.1f s ideal parallel",
        ", ".join(f"{k}={v:.4g}" for k, v in final.items()),
        times["sum_optimization_s"],
        times["max_optimization_s"],
    )
    _finish_loggers(loggers, results)
    return results


def run_capture(cfg: DictConfig) -> dict[str, Any]:
    """Write the feature cache for the full slice plan once; print the sweep to run."""
    from tnexp.factory import tensorize
    from tnexp.run import (
        build_datamodule,
        build_feature_cache,
        feature_cache_dir,
        load_teacher,
    )
    from tnexp.slicing import make_slice_plan
    from tnexp.student import tensorize_spec

    cfg = prepare_stage(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    teacher = load_teacher(cfg)
    spec = tensorize_spec(cfg)
    # The plan needs only which layers are tensorized: skip SVD / data-aware inits and
    # layout choices (no calibration), keep the RNG intact.
    spec = dataclasses.replace(
        spec,
        rules=[dataclasses.replace(r, init="random", layout="balanced") for r in spec.rules],
        allocation="uniform",
    )
    with torch.random.fork_rng(devices=[]):
        student, _ = tensorize(teacher, spec)
    plan = make_slice_plan(student, _plain(cfg.method.slicing))
    group = int(OmegaConf.select(cfg, "method.slice_jobs.group", default=1) or 1)
    summary: dict[str, Any] = {
        "method": "capture",
        "slices": [{"index": i, **s.to_dict()} for i, s in enumerate(plan)],
        "sweep": sweep_hint(len(plan), group),
        "jobs": job_count(len(plan), group),
        "runtime": runtime_record(),
    }
    if not cfg.method.get("plan_only", False):
        holder = _CaptureTarget(teacher=teacher, student=student, plan=plan)
        cache = build_feature_cache(cfg, holder, datamodule, out)
        summary["cache"] = {
            "dir": str(feature_cache_dir(cfg, cache.manifest.teacher_fingerprint)),
            "manifest_hash": cache.manifest.hash(),
            "dtype": cache.manifest.dtype,
            "num_samples": cache.manifest.num_samples,
        }
    atomic_write_json(out / "capture.json", summary)
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


@dataclasses.dataclass
class _CaptureTarget:
    """What build_feature_cache reads from a module: the teacher, the student, the plan."""

    teacher: nn.Module
    student: nn.Module
    plan: SlicePlan
