"""The Lightning Trainer of a stage and its callbacks, from the trainer / callbacks groups.

``cfg.trainer`` is a ``_target_`` node (``lightning.Trainer``); each entry of
``cfg.callbacks`` with a ``_target_`` is a callback (``callbacks.progress_bar`` is a plain
setting: the progress display). The stage adds what only it knows: the run directory,
the task's monitored metric (to callbacks that take ``monitor`` / ``mode``), the loggers,
its :class:`~tnexp.callbacks.OptimizationTimer` (first, so it times everything) and the
progress callbacks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from tnexp.callbacks import OptimizationTimer
from tnexp.console import progress_callbacks
from tnexp.errors import InputFileError
from tnexp.runtime import DEFAULT_TINY_STEP_GFLOP
from tnexp.stages.build import Task
from tnexp.stages.loggers import call_with_context

log = logging.getLogger("tnexp")

__all__ = ["build_callbacks", "build_trainer", "resolve_resume"]

_TRAINER_TARGET = "lightning.Trainer"
# Callback entries of configs written before the callbacks group had targets.
_LEGACY_CALLBACKS = {
    "checkpoint": {
        "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
        "filename": "best",
    },
}


def build_callbacks(cfg: DictConfig, out: Path, task: Task) -> list[L.Callback]:
    """The callbacks of ``cfg.callbacks`` (entries set to null are dropped)."""
    context = {"dirpath": str(out / "checkpoints"), "monitor": task.monitor, "mode": task.mode}
    nodes: dict[str, Any] = {}
    for key, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, DictConfig):
            continue  # plain settings (progress_bar)
        plain = OmegaConf.to_container(node, resolve=True)
        if "_target_" not in plain and key in _LEGACY_CALLBACKS:
            plain = {**_LEGACY_CALLBACKS[key], **plain}
        if "_target_" in plain:
            nodes[str(key)] = plain
    if "thread_policy" not in (cfg.get("callbacks") or {}):  # configs before the group
        tiny = OmegaConf.select(cfg, "runtime.tiny_step_gflop", default=DEFAULT_TINY_STEP_GFLOP)
        nodes = {
            "thread_policy": {
                "_target_": "tnexp.runtime.ThreadPolicyCallback",
                "tiny_step_gflop": tiny,
            },
            **nodes,
        }
    return [call_with_context(node, context) for node in nodes.values()]


def build_trainer(
    cfg: DictConfig,
    out: Path,
    loggers: list[Logger],
    timer: OptimizationTimer,
    task: Task,
    reload: bool,
) -> L.Trainer:
    """``cfg.trainer`` with the stage's callbacks and loggers (``reload``: every epoch)."""
    progress = progress_callbacks(cfg.callbacks.progress_bar)
    callbacks = [timer, *build_callbacks(cfg, out, task), *progress]
    node = {
        k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None
    }
    node.setdefault("_target_", _TRAINER_TARGET)  # configs before the trainer had a target
    return call_with_context(
        node,
        {
            "logger": loggers or False,
            "callbacks": callbacks,
            "enable_progress_bar": any(isinstance(c, ProgressBar) for c in progress),
            "default_root_dir": str(out),
            "reload_dataloaders_every_n_epochs": 1 if reload else 0,
        },
    )


def resolve_resume(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint to resume from: ``resume`` null | auto | a .ckpt path."""
    if cfg.resume in (None, False):
        return None
    if cfg.resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        log.info("resume=auto: no checkpoint in %s, starting fresh", last.parent)
        return None
    path = Path(cfg.resume)
    if not path.is_file():
        raise InputFileError(
            f"resume checkpoint {path} does not exist; give an existing .ckpt, resume=auto "
            "(the run directory's last.ckpt), or resume=null to start fresh."
        )
    return str(path)
