"""LightningModules: local (slice-wise feature distillation), global, hybrid, pretrain.

All of them are one class, :class:`TensorizationModule`, driven by a schedule of phases:
``local`` trains every selected slice of the tensorized student to reproduce the teacher
slice's output from the teacher slice's input (paper eq. 1); ``global`` fine-tunes the
whole student on the task loss. ``LocalDistillation``, ``GlobalFinetune`` and ``Hybrid``
(local for N epochs, then global) are that class with fixed schedules, and ``Pretrain``
is global training of a dense model that has no teacher.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from tnexp.features import FeatureCapture
from tnexp.modules.guard import DivergenceGuard, NonFiniteLossError, TrainingDivergedError
from tnexp.modules.losses import attention_mask, get_distillation_loss, squared_error_sums
from tnexp.modules.objective import (
    TRAINABLE,
    FeaturePair,
    LocalLosses,
    LocalObjective,
    cached_pairs,
    feature_pairs,
)
from tnexp.modules.optim import OptimizerConfig, build_optimizer, build_scheduler
from tnexp.schema import GlobalSettings, LocalSettings
from tnexp.slicing import SlicePlan, first_tensor
from tnexp.tn.mpo import MPOLinear
from tnexp.tn.tucker import TuckerConv2d

__all__ = ["NonFiniteLossError", "TrainingDivergedError"]  # re-exported from guard.py


@dataclass
class LocalConfig(LocalSettings):
    """Settings of the local phase: ``LocalSettings`` (tnexp/schema.py, the fields and
    defaults of ``method.local``), checked, with the optimizer as an ``OptimizerConfig``."""

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, dict) or not isinstance(self.optimizer, OptimizerConfig):
            self.optimizer = OptimizerConfig.from_config(self.optimizer)
        get_distillation_loss(self.loss)
        if self.input_source not in ("teacher", "student"):
            raise ValueError(
                f"local.input_source must be 'teacher' or 'student', got {self.input_source!r}."
            )
        if self.trainable not in TRAINABLE:
            raise ValueError(
                f"local.trainable must be 'slice' or 'tensorized', got {self.trainable!r}."
            )


@dataclass
class GlobalConfig(GlobalSettings):
    """Settings of a global phase: ``GlobalSettings`` (tnexp/schema.py, ``method.global``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, OptimizerConfig):
            self.optimizer = OptimizerConfig.from_config(self.optimizer)


@dataclass(frozen=True)
class Phase:
    method: str  # "local" | "global"
    epochs: int | None  # None: until the trainer stops


class TensorizationModule(L.LightningModule):
    """Trains a (tensorized) student by a schedule of local and global phases."""

    def __init__(
        self,
        student: nn.Module,
        task: Any,
        schedule: Sequence[Phase],
        *,
        teacher: nn.Module | None = None,
        plan: SlicePlan | None = None,
        local: LocalConfig | None = None,
        global_: GlobalConfig | None = None,
        guard: DivergenceGuard | None = None,
    ):
        super().__init__()
        self.guard = guard or DivergenceGuard()
        self.student = student
        self.task = task
        self.schedule = list(schedule)
        self.local_cfg = local or LocalConfig()
        self.global_cfg = global_ or GlobalConfig()
        self.plan = plan
        # The teacher is frozen and must not end up in checkpoints: keep it outside the
        # registered module tree and move it to the device by hand.
        object.__setattr__(self, "_teacher", teacher)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if hasattr(task, "bind_teacher"):  # a task measured against the teacher
                task.bind_teacher(teacher)
        if any(p.method == "local" for p in self.schedule) and (teacher is None or plan is None):
            raise ValueError("a local phase needs a teacher and a slice plan.")
        self._objective: LocalObjective | None = None
        self.feature_capture_seconds = 0.0
        self.val_metrics = task.make_metrics()
        self._teacher_capture: FeatureCapture | None = None
        self._student_capture: FeatureCapture | None = None
        self._optim_phase: str | None = None
        # Local steps: the last per-slice losses (detached tensors, for callbacks) and the
        # epoch's (names, batch-size-weighted sums, samples); see _record_slice_losses.
        self.last_slice_losses: dict[str, torch.Tensor] = {}
        self._slice_loss_sums: tuple[list[str], torch.Tensor, int] | None = None

    # ------------------------------------------------------------------ schedule
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    @property
    def objective(self) -> LocalObjective:
        """The local objective over the current ``plan`` (slice jobs narrow it after init)."""
        if self.plan is None:
            raise ValueError("this module has no slice plan, hence no local objective.")
        if self._objective is None or self._objective.plan is not self.plan:
            self._objective = LocalObjective(
                self.plan, self.local_cfg.loss, trainable=self.local_cfg.trainable, guard=self.guard
            )
        return self._objective

    def phase_at(self, epoch: int) -> Phase:
        start = 0
        for phase in self.schedule:
            if phase.epochs is None or epoch < start + phase.epochs:
                return phase
            start += phase.epochs
        return self.schedule[-1]

    @property
    def phase(self) -> Phase:
        return self.phase_at(self.current_epoch if self._trainer is not None else 0)

    def batch_size_for(self, method: str) -> int | None:
        return (self.local_cfg if method == "local" else self.global_cfg).batch_size

    # ------------------------------------------------------------------ parameters
    def local_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the local phase: those of the selected slices."""
        return self.objective.parameters(self.student)

    def configure_optimizers(self):
        # One optimizer, two parameter groups (local-trainable, the rest): the groups are
        # the same in every phase, so a checkpoint taken in either phase resumes cleanly.
        # Phase changes only set the learning rates (see on_train_epoch_start).
        local_ids = {id(p) for p in self.local_parameters()} if self.plan is not None else set()
        all_params = [p for p in self.student.parameters()]
        first = [p for p in all_params if id(p) in local_ids] or all_params
        rest = [p for p in all_params if id(p) not in {id(q) for q in first}]
        phase = self.phase
        # Lightning builds the first training loader here (estimating the steps) and keeps
        # it, so the phase's batch size must be on the datamodule before that.
        self._sync_datamodule()
        cfg = self._optimizer_cfg(phase.method)
        groups = [{"params": first, "name": "slices" if local_ids else "all"}]
        if rest:
            groups.append({"params": rest, "name": "rest"})
        optimizer = build_optimizer(groups, cfg)
        self._apply_phase_lrs(optimizer, phase.method)
        scheduled = cfg.scheduler != "none" or cfg.warmup_steps > 0
        total = self._estimated_total_steps() if scheduled else None
        scheduler = build_scheduler(optimizer, cfg, total) if total else None
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _optimizer_cfg(self, method: str) -> OptimizerConfig:
        return self.local_cfg.optimizer if method == "local" else self.global_cfg.optimizer

    def _apply_phase_lrs(self, optimizer: torch.optim.Optimizer, method: str) -> None:
        cfg = self._optimizer_cfg(method)
        for group in optimizer.param_groups:
            frozen = method == "local" and group["name"] == "rest"
            group["lr"] = 0.0 if frozen else cfg.lr
            group["initial_lr"] = group["lr"]
            group["weight_decay"] = cfg.weight_decay
        self._optim_phase = method

    def _estimated_total_steps(self) -> int | None:
        try:
            return int(self.trainer.estimated_stepping_batches)
        except Exception:  # no trainer attached (e.g. unit tests calling the hook directly)
            return None

    # ------------------------------------------------------------------ hooks
    def setup(self, stage: str) -> None:
        if self.teacher is not None and self.plan is not None:
            # stop_after_last: the teacher's forward ends at the last slice's output; its
            # head (a classifier, an LM head over the vocabulary) is never needed here.
            self._teacher_capture = FeatureCapture(self.teacher, self.plan, stop_after_last=True)
            if self.local_cfg.input_source == "student":
                self._student_capture = FeatureCapture(
                    self.student, self.plan, capture_outputs=False, stop_after_last=True
                )

    def teardown(self, stage: str) -> None:
        for capture in (self._teacher_capture, self._student_capture):
            if capture is not None:
                capture.close()
        self._teacher_capture = self._student_capture = None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        self._sync_datamodule()

    def on_validation_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_train_epoch_start(self) -> None:
        method = self.phase.method
        if method != self._optim_phase:
            for optimizer in self.trainer.optimizers:
                # A new phase starts from fresh optimizer moments, as a separate run would.
                optimizer.state.clear()
                self._apply_phase_lrs(optimizer, method)
        self._set_train_modes(method)
        self._slice_loss_sums = None

    def on_train_epoch_end(self) -> None:
        for name, value in self.slice_loss_epoch_means().items():
            self.log(f"train/slice/{name}_epoch", value, on_step=False, on_epoch=True)
        # Dataloaders are rebuilt before the next epoch starts, so set its batch size now.
        self._sync_datamodule(self.current_epoch + 1)

    def _sync_datamodule(self, epoch: int | None = None) -> None:
        if self._trainer is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        phase = self.phase_at(self.current_epoch if epoch is None else epoch)
        if datamodule is not None and hasattr(datamodule, "set_phase"):
            datamodule.set_phase(phase.method, self.batch_size_for(phase.method))

    def _set_train_modes(self, method: str) -> None:
        if method == "global":
            self.student.train()
            self.student.requires_grad_(True)
            return
        # Local phase: batch statistics would tie a slice's output to its batch-mates and
        # drift the BatchNorm running stats away from the teacher's, so the whole student
        # runs in eval mode; the slice parameters still train.
        self.student.eval()
        self.objective.freeze_others(self.student)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.phase.method == "local" and self.student.training:
            self.student.eval()  # Lightning puts the module back in train mode after validation

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.phase.method == "local":
            return self._local_step(batch)
        return self._global_step(batch)

    def _global_step(self, batch: Any) -> torch.Tensor:
        outputs = self.task.forward(self.student, batch)
        loss = self.task.loss(outputs, batch)
        self._check_loss(loss, "global task loss")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if self._is_logging_step():
            self.log("train/phase", 1.0, on_step=True)
        return loss

    def _is_logging_step(self) -> bool:
        """Whether the logger writes this step's values (every ``log_every_n_steps``).

        Values logged on other steps never reach the logger, and every ``self.log`` call
        costs about a millisecond on the CPU (docs/benchmarks.md), so constant and per-slice
        values are logged on these steps only.
        """
        if self._trainer is None:
            return True
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        return (self.global_step + 1) % every == 0 or self.global_step == 0

    def _timed_capture(self, capture: FeatureCapture, inputs: Any) -> dict[str, Any]:
        start = time.perf_counter()
        features = capture(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.feature_capture_seconds += time.perf_counter() - start
        return features

    def _local_step(self, batch: Any) -> torch.Tensor:
        mask = None
        if _is_cached_batch(batch):
            pairs = cached_pairs(batch[0])
            # A cache of text batches stores their attention masks (the third element).
            mask = batch[2] if len(batch) > 2 else None
        else:
            inputs = self.task.model_inputs(batch)
            mask = attention_mask(inputs)  # padded tokens are left out of the slice losses
            teacher = self._timed_capture(self._teacher_capture, inputs)
            student = (
                self._timed_capture(self._student_capture, inputs)
                if self._student_capture is not None
                else None
            )
            pairs = feature_pairs(teacher, student)
        losses = self.objective(
            self.student, pairs, step=self.global_step, epoch=self.current_epoch, mask=mask
        )
        self.log("train/loss", losses.total, on_step=True, on_epoch=True, prog_bar=True)
        self._record_slice_losses(losses, batch_size=_batch_size(pairs))
        if self._is_logging_step():
            for name, value in self.last_slice_losses.items():
                self.log(f"train/slice/{name}_step", value, on_step=True, on_epoch=False)
            self.log("train/phase", 0.0, on_step=True)
        return losses.total

    def _record_slice_losses(self, losses: LocalLosses, *, batch_size: int) -> None:
        """Keep this step's per-slice losses and add them to the epoch sums, on the device
        and without a host sync (one stack and one add per step, not a log call per slice)."""
        values = torch.stack([v.detach() for v in losses.per_slice.values()])
        names = list(losses.per_slice)
        self.last_slice_losses = dict(zip(names, values.unbind()))
        if self._slice_loss_sums is None or self._slice_loss_sums[0] != names:
            self._slice_loss_sums = (names, torch.zeros_like(values), 0)
        _, sums, count = self._slice_loss_sums
        sums.add_(values, alpha=batch_size)
        self._slice_loss_sums = (names, sums, count + batch_size)

    def slice_loss_epoch_means(self) -> dict[str, float]:
        """Each slice's mean loss over this epoch's local steps so far (weighted by batch
        size, as Lightning's epoch means are); empty before the first local step."""
        if self._slice_loss_sums is None or self._slice_loss_sums[2] == 0:
            return {}
        names, sums, count = self._slice_loss_sums
        return dict(zip(names, (sums / count).tolist()))

    def _check_loss(self, loss: torch.Tensor, what: str) -> None:
        self.guard.check(
            loss,
            phase=self.phase.method,
            what=what,
            step=self.global_step,
            epoch=self.current_epoch,
        )

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # The slices are already plugged into the student, so local runs are measured on the
        # task exactly like global ones (accuracy-vs-time curves for every method).
        outputs = self.task.forward(self.student, batch)
        loss = self.task.loss(outputs, batch)
        self.task.update_metrics(self.val_metrics, outputs, batch, loss)
        if self._teacher_capture is not None and self.local_cfg.log_slice_errors:
            self._accumulate_slice_errors(batch)

    @torch.no_grad()
    def _accumulate_slice_errors(self, batch: Any) -> None:
        """Sum ``||Y' - Y||^2`` and ``||Y||^2`` per slice, each slice fed the teacher's input;
        padded tokens (the batch's attention mask) are left out, as in the slice losses."""
        assert self.plan is not None
        inputs = self.task.model_inputs(batch)
        mask = attention_mask(inputs)
        teacher = self._teacher_capture(inputs)
        dtype = next(self.student.parameters()).dtype
        sums = self.__dict__.setdefault("_slice_error_sums", {})
        for s in self.plan:
            f = teacher[s.name]
            target = first_tensor(f.output).to(dtype)
            prediction = first_tensor(s.forward(self.student, f.input.to(dtype), **f.kwargs))
            err, ref = squared_error_sums(prediction, target, mask)
            total_err, total_ref = sums.get(s.name, (0.0, 0.0))
            sums[s.name] = (total_err + err, total_ref + ref)

    def on_validation_epoch_end(self) -> None:
        values = self.task.finalize(self.val_metrics.compute())
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name in ("top1", "ppl"), sync_dist=True)
        sums = self.__dict__.pop("_slice_error_sums", None)
        if sums:
            errors = {n: (e / r) ** 0.5 if r > 0 else 0.0 for n, (e, r) in sums.items()}
            for name, value in errors.items():
                self.log(f"val/slice_rel_err/{name}", value)
            self.log("val/slice_rel_err_mean", sum(errors.values()) / len(errors))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        values = self.task.finalize(self.val_metrics.compute())
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(f"test/{name}", value, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tnexp"] = {"schedule": [p.__dict__ for p in self.schedule]}


def _batch_size(pairs: Mapping[str, FeaturePair]) -> int:
    """Samples in a local step: the leading dimension of the slices' inputs."""
    first = next(iter(pairs.values())).input
    return int(first.shape[0]) if first.dim() > 0 else 1


def _is_cached_batch(batch: Any) -> bool:
    """A feature-cache batch: ``(features, labels)`` or ``(features, labels, mask)``."""
    return isinstance(batch, tuple | list) and len(batch) in (2, 3) and isinstance(batch[0], dict)


def count_tensorized(model: nn.Module) -> int:
    return sum(isinstance(m, TuckerConv2d | MPOLinear) for m in model.modules())


class LocalDistillation(TensorizationModule):
    """Slice-wise feature distillation for the whole run."""

    def __init__(
        self,
        student,
        task,
        *,
        teacher,
        plan,
        local: LocalConfig | None = None,
        guard: DivergenceGuard | None = None,
    ):
        super().__init__(
            student,
            task,
            [Phase("local", None)],
            teacher=teacher,
            plan=plan,
            local=local,
            guard=guard,
        )


class GlobalFinetune(TensorizationModule):
    """End-to-end training on the task loss (fine-tuning a student, or pretraining a teacher)."""

    def __init__(
        self,
        student,
        task,
        *,
        global_: GlobalConfig | None = None,
        guard: DivergenceGuard | None = None,
    ):
        super().__init__(student, task, [Phase("global", None)], global_=global_, guard=guard)


class Hybrid(TensorizationModule):
    """Local for ``local_epochs`` epochs, then global, in one run (paper table 4)."""

    def __init__(
        self,
        student,
        task,
        *,
        teacher,
        plan,
        local_epochs: int,
        local: LocalConfig | None = None,
        global_: GlobalConfig | None = None,
        guard: DivergenceGuard | None = None,
    ):
        if local_epochs < 1:
            raise ValueError(f"hybrid needs local_epochs >= 1, got {local_epochs}.")
        super().__init__(
            student,
            task,
            [Phase("local", local_epochs), Phase("global", None)],
            teacher=teacher,
            plan=plan,
            local=local,
            global_=global_,
            guard=guard,
        )
