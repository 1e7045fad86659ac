"""Optimisation-time accounting, as reported in the paper's timing comparisons.

"Optimisation time" is the time spent in training steps proper: forward, backward and
optimizer step. It excludes data loading (and host-to-device transfer, which Lightning
does before ``on_train_batch_start``), validation, checkpointing and - so that local
distillation with online teacher features is comparable with cached features - the time
the LightningModule reports as teacher feature capture.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["OptimizationTimer"]


def _sync(pl_module: L.LightningModule) -> None:
    # CUDA kernels run asynchronously; without a sync the clock would stop before the
    # backward/step work has actually finished (and bill it to the next data load).
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def _capture_seconds(pl_module: L.LightningModule) -> float:
    return float(getattr(pl_module, "feature_capture_seconds", 0.0) or 0.0)


class OptimizationTimer(L.Callback):
    """Accumulate optimisation time, wall time and the time at which the best metric occurred.

    Per training batch it measures ``on_train_batch_start`` -> ``on_train_batch_end`` with
    ``time.perf_counter`` and subtracts the increase of ``pl_module.feature_capture_seconds``
    (a float the module increments around its teacher forward; the module must synchronise
    CUDA itself inside that region for the number to be exact). After every validation
    run during fitting, the ``monitor``-ed metric is appended to ``history`` and the best
    value (by ``mode``) with its optimisation time is kept.

    Logs ``time/optimization_s`` and ``time/wall_s`` every step. The accumulated state is
    saved in checkpoints, so times and best values continue across a resume.
    """

    def __init__(self, monitor: str = "val/top1", mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.optimization_s = 0.0
        self.feature_capture_s = 0.0  # total capture time excluded (for reporting)
        self.num_steps_timed = 0
        self.best_value: float | None = None
        self.time_to_best_s: float | None = None
        self.wall_to_best_s: float | None = None
        self.step_at_best: int | None = None
        self.epoch_at_best: int | None = None
        self.history: list[dict[str, Any]] = []
        # Wall time accumulated by earlier fits / runs (restored from checkpoints).
        self._wall_base = 0.0
        self._fit_start: float | None = None
        self._batch_start: float | None = None
        self._capture_at_start = 0.0

    @property
    def state_key(self) -> str:
        # Two timers with different monitors must not overwrite each other's checkpoint state.
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def wall_s(self) -> float:
        """Wall-clock seconds since the start of fitting (summed over resumed runs)."""
        if self._fit_start is None:
            return self._wall_base
        return self._wall_base + (time.perf_counter() - self._fit_start)

    # ----------------------------------------------------------------------------- hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Freeze the wall clock so summary() after training is stable, and a later fit
        # with the same callback keeps accumulating instead of restarting from zero.
        self._wall_base = self.wall_s
        self._fit_start = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _sync(pl_module)
        self._capture_at_start = _capture_seconds(pl_module)
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._batch_start is None:  # e.g. resumed exactly between the two hooks
            return
        _sync(pl_module)
        elapsed = time.perf_counter() - self._batch_start
        self._batch_start = None
        captured = max(_capture_seconds(pl_module) - self._capture_at_start, 0.0)
        self.optimization_s += max(elapsed - captured, 0.0)
        self.feature_capture_s += captured
        self.num_steps_timed += 1
        # batch_size=1: these are scalars per step; stops Lightning inferring it from `batch`.
        pl_module.log(
            "time/optimization_s",
            self.optimization_s,
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
        pl_module.log("time/wall_s", self.wall_s, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only validation inside fit counts (not the sanity check, not trainer.validate()).
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        value = None if value is None else float(value)
        entry = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "optimization_s": self.optimization_s,
            "wall_s": self.wall_s,
            "value": value,
            # every validation metric, so tables can report e.g. top-5 at the best top-1
            "metrics": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
            },
        }
        self.history.append(entry)
        if value is not None and self._is_better(value):
            self.best_value = value
            self.time_to_best_s = entry["optimization_s"]
            self.wall_to_best_s = entry["wall_s"]
            self.step_at_best = entry["step"]
            self.epoch_at_best = entry["epoch"]

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        # Strict improvement: ties keep the earlier (cheaper) time-to-best.
        return value > self.best_value if self.mode == "max" else value < self.best_value

    # ------------------------------------------------------------------------ state/report

    def state_dict(self) -> dict[str, Any]:
        """Accumulated times, best value and history (saved in Lightning checkpoints)."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "optimization_s": self.optimization_s,
            "feature_capture_s": self.feature_capture_s,
            "num_steps_timed": self.num_steps_timed,
            "wall_s": self.wall_s,
            "best_value": self.best_value,
            "time_to_best_s": self.time_to_best_s,
            "wall_to_best_s": self.wall_to_best_s,
            "step_at_best": self.step_at_best,
            "epoch_at_best": self.epoch_at_best,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict` (on checkpoint resume)."""
        self.optimization_s = float(state_dict["optimization_s"])
        self.feature_capture_s = float(state_dict.get("feature_capture_s", 0.0))
        self.num_steps_timed = int(state_dict.get("num_steps_timed", 0))
        self._wall_base = float(state_dict.get("wall_s", 0.0))
        if self._fit_start is not None:  # restored after on_fit_start: restart the clock
            self._fit_start = time.perf_counter()
        self.best_value = state_dict.get("best_value")
        self.time_to_best_s = state_dict.get("time_to_best_s")
        self.wall_to_best_s = state_dict.get("wall_to_best_s")
        self.step_at_best = state_dict.get("step_at_best")
        self.epoch_at_best = state_dict.get("epoch_at_best")
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable report (for results.json and accuracy-vs-time plots)."""
        return self.state_dict()
