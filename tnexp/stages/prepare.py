"""The checks and per-job settings at the start of every stage (multirun, threads, jobs)."""

from __future__ import annotations

import logging

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tnexp.errors import ConfigError
from tnexp.runtime import apply_thread_policy, usable_cores
from tnexp.slice_jobs.store import slice_jobs_cfg

log = logging.getLogger("tnexp")

__all__ = ["hydra_run_mode", "joblib_n_jobs", "launcher_kind", "prepare_stage"]

_DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def _hydra_config() -> DictConfig | None:
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


def joblib_n_jobs() -> int:
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
            raise ConfigError(
                f"{distributed} inside a Hydra multirun: DDP/FSDP start one process per "
                "device by re-running the command, and inside a sweep every rank would re-run "
                "the sweep. Run distributed global fine-tuning as a single run (`tnexp "
                "trainer=ddp ...` without -m; on SLURM `srun tnexp trainer=ddp_multinode ...`), "
                "and spread local slices over devices with per-slice jobs instead "
                "(method.slice_jobs.*, one device per job)."
            )
    # One thread policy for every stage (tnexp/runtime.py): torch threads from the usable
    # cores, concurrent joblib jobs and the load; data.num_workers (0 inside joblib jobs).
    jobs = joblib_n_jobs() if launcher == "joblib" else 1
    cfg, _ = apply_thread_policy(cfg, launcher=launcher, jobs=jobs * _cpu_ranks(cfg.trainer))
    jobs = slice_jobs_cfg(cfg)
    if jobs is not None:
        _validate_slice_jobs(cfg, jobs)
    return cfg


def _validate_slice_jobs(cfg: DictConfig, jobs: DictConfig) -> None:
    method = cfg.method
    selecting = jobs.get("job") is not None
    if selecting and method.get("slices") is not None:
        raise ConfigError(
            "set either method.slices (explicit slices) or method.slice_jobs.job (a job index "
            "with method.slice_jobs.group slices per job), not both."
        )
    if int(jobs.get("group") or 1) < 1:
        raise ConfigError(f"method.slice_jobs.group must be >= 1, got {jobs.group}.")
    if selecting and int(jobs.job) < 0:
        raise ConfigError(f"method.slice_jobs.job must be >= 0, got {jobs.job}.")
    if not jobs.get("dir") or method.name in ("assemble", "capture"):
        return
    if method.name != "local":
        raise ConfigError(
            f"method.slice_jobs.dir is for method=local (per-slice jobs); method={method.name} "
            "trains the whole network, so its slices are not independent. Unset "
            "method.slice_jobs.dir, or run the local phase as slice jobs and fine-tune the "
            "assembled student afterwards."
        )
    if method.local.input_source != "teacher":
        raise ConfigError(
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
