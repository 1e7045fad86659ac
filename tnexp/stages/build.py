"""The one set-up step of every stage: seed, data, task, teacher, tensorized student, plan.

Every stage that needs them (train, slice jobs and assemble, capture, profiling, the
memory-bounded local run, analysis) gets them from :func:`build`, so the same calls run
in the same order after the same seeding: slice jobs and an all-slices run draw the
same random initialisation because there is only one copy of this sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_model

from tnexp import tasks
from tnexp.config import plain
from tnexp.errors import ConfigError, InputFileError
from tnexp.factory import TensorizeReport
from tnexp.models.hf import carries_weights
from tnexp.slicing import SlicePlan, make_slice_plan
from tnexp.stages.student import build_student
from tnexp.tasks import Task

__all__ = [
    "TEACHER_FILE",
    "StageParts",
    "Task",
    "build",
    "build_datamodule",
    "build_model",
    "build_task",
    "data_summary",
    "is_language_model",
    "load_teacher",
    "resolve_teacher_path",
    "tied_names",
]

TEACHER_FILE = "teacher.safetensors"


@dataclass
class StageParts:
    """What :func:`build` made for a stage (the parts a stage did not ask for are None)."""

    seed: int
    datamodule: L.LightningDataModule
    task: Task
    teacher: torch.nn.Module | None = None
    student: torch.nn.Module | None = None  # the tensorized student (pretrain: the model)
    report: TensorizeReport | None = None  # the factory's report (None for pretrain)
    plan: SlicePlan | None = None  # the full slice plan of the student (method.slicing)


def build(
    cfg: DictConfig,
    *,
    teacher: bool = True,
    student: bool = True,
    progress: bool = True,
) -> StageParts:
    """Seed, then build the data, the task, the teacher and the student, in this order.

    ``method=pretrain`` builds the dense model as its "student" (no teacher). With
    ``teacher=False`` neither teacher nor student is built (data and task only); with
    ``student=False`` only the teacher. The plan is the student's full slice plan when
    the method slices (``method.slicing``).
    """
    seed = int(cfg.seed)
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    task = build_task(cfg)
    parts = StageParts(seed=seed, datamodule=datamodule, task=task)
    if cfg.method.name == "pretrain":
        parts.student = build_model(cfg) if student else None
        return parts
    if not teacher:
        return parts
    parts.teacher = load_teacher(cfg)
    if student:
        parts.student, parts.report = build_student(
            cfg, parts.teacher, datamodule, task, progress=progress
        )
        slicing = cfg.method.get("slicing")
        if slicing is not None:
            parts.plan = make_slice_plan(parts.student, plain(slicing))
    return parts


# ------------------------------------------------------------------ the parts
def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module of ``cfg.data`` (its ``info`` entry is not an argument)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("info", None)  # description of the data set, not a constructor argument
    return instantiate(data_cfg)


def build_task(cfg: DictConfig) -> Task:
    """The task of the run: ``task=auto`` (``data.info.task``) or ``task=features``."""
    return tasks.build_task(cfg)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The dense model of ``cfg.model`` (random init, or the hub weights of an LM)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return instantiate(model_cfg)


def is_language_model(cfg: DictConfig) -> bool:
    return tasks.task_kind(cfg) == "causal_lm"


def resolve_teacher_path(path: str | None) -> Path:
    """The teacher.safetensors of ``teacher.path`` (a file, or a pretrain run's folder)."""
    if not path:
        raise ConfigError(
            "this method needs a pretrained teacher: set teacher.path to the teacher.safetensors "
            "written by `tnexp method=pretrain` (or to that run's output directory)."
        )
    p = Path(path)
    if p.is_dir():
        p = p / TEACHER_FILE
    if not p.is_file():
        raise InputFileError(
            f"teacher checkpoint {p} does not exist; run `tnexp method=pretrain` first and "
            "point teacher.path at its output."
        )
    return p


def load_teacher(cfg: DictConfig) -> torch.nn.Module:
    """The pretrained dense model: a pretrain run's safetensors, or an LM's own weights."""
    if not cfg.teacher.path and (is_language_model(cfg) or carries_weights(cfg.model)):
        return build_model(cfg).eval()  # hub / GGUF weights are the teacher
    path = resolve_teacher_path(cfg.teacher.path)
    model = build_model(cfg)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types on corrupt files
        raise ConfigError(
            f"cannot read teacher checkpoint {path} ({err}): it is truncated or not a "
            "safetensors file; point teacher.path at the teacher.safetensors of a finished "
            "pretrain run (or rerun it)."
        ) from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Tied weights (GPT-2's lm_head / wte) are stored once; any one name of a tie counts.
    tied = tied_names(model)
    missing = sorted(k for k in set(own) - set(shapes) if not (tied.get(k, set()) & set(shapes)))
    unexpected = sorted(set(shapes) - set(own))
    mismatched = [
        f"{k}: checkpoint {shapes[k]} vs model {own[k]}"
        for k in own
        if k in shapes and shapes[k] != own[k]
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {mismatched[:3]}" if mismatched else "",
            )
            if part
        )
        raise ConfigError(
            f"teacher checkpoint {path} does not match model {cfg.model._target_} "
            f"({details}). Use the same model and data settings as the pretrain run."
        )
    load_model(model, str(path), strict=True)
    return model.eval()


def tied_names(model: torch.nn.Module) -> dict[str, set[str]]:
    """For each state-dict name of a tied tensor, the other names of that tensor."""
    by_tensor: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), set()).add(name)
    return {n: names - {n} for names in by_tensor.values() if len(names) > 1 for n in names}


def data_summary(cfg: DictConfig, datamodule: Any = None) -> dict[str, Any]:
    """Data set name and number of training samples (the paper's 50k / 30k / 10k rows)."""
    base = getattr(datamodule, "base", datamodule)
    train_set = getattr(base, "train_set", None)
    try:
        samples = len(train_set) if train_set is not None else None
    except TypeError:  # iterable data sets have no length
        samples = None
    return {"name": cfg.data.info.get("name"), "train_samples": samples}
