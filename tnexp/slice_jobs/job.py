"""One local stage's share of a slice-job run: its loss recorder, records and weights."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from safetensors.torch import save
from torch import nn

from tnexp.config import plain as _plain
from tnexp.features import FeatureCacheDataset, teacher_fingerprint
from tnexp.integrity import atomic_write_bytes, atomic_write_json, file_checksum
from tnexp.results import Results, plain_config
from tnexp.slice_jobs.store import (
    FORMAT_VERSION,
    RECORD_FILE,
    WEIGHTS_FILE,
    features_identity,
    now_iso,
    read_slice_records,
    record_problems,
    run_file_content,
    slice_dir,
    slice_jobs_cfg,
    slice_state,
    write_run_file,
)
from tnexp.slicing import SlicePlan, make_slice_plan

log = logging.getLogger("tnexp")

__all__ = ["SliceJobOutput", "SliceLossRecorder"]


def _atomic_save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    atomic_write_bytes(path, save(tensors, metadata=metadata))


class SliceLossRecorder(L.Callback):
    """Each trained slice's loss: epoch means and a log-spaced sample of steps.

    Reads the module's per-slice losses (:attr:`~tnexp.modules.TensorizationModule.
    last_slice_losses` every step, :meth:`~tnexp.modules.TensorizationModule.
    slice_loss_epoch_means` at epoch end), so it sees every step, not only the logger's.
    Steps kept: the first five, then powers of two, then the last one; a loss is read to
    the host only at the kept steps (and once for the last one).
    """

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.epochs: dict[str, list[dict[str, float]]] = {n: [] for n in self.names}
        self.steps: dict[str, list[list[float]]] = {n: [] for n in self.names}
        self.last: dict[str, list[float]] = {}
        self._last_step: tuple[int, dict[str, torch.Tensor]] | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        step = int(trainer.global_step)
        losses = getattr(pl_module, "last_slice_losses", {})
        current = {n: losses[n] for n in self.names if n in losses}
        if not current:
            return
        self._last_step = (step, current)
        if step <= 5 or (step & (step - 1)) == 0:
            for name, value in current.items():
                self.steps[name].append([step, float(value)])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        means = (
            pl_module.slice_loss_epoch_means()
            if hasattr(pl_module, "slice_loss_epoch_means")
            else {}
        )
        for name in self.names:
            if name in means:
                self.epochs[name].append({"epoch": int(trainer.current_epoch), "loss": means[name]})
        self._flush_last()

    def _flush_last(self) -> None:
        """Read the latest step's losses to the host (``last``)."""
        if self._last_step is not None:
            step, values = self._last_step
            self.last.update({n: [step, float(v)] for n, v in values.items()})
            self._last_step = None

    def curve(self, name: str) -> dict[str, Any]:
        self._flush_last()
        steps = list(self.steps.get(name, []))
        last = self.last.get(name)
        if last is not None and (not steps or steps[-1][0] != last[0]):
            steps.append(last)
        final = steps[-1][1] if steps else None
        return {"epochs": list(self.epochs.get(name, [])), "steps": steps, "final_step": final}

    def state_dict(self) -> dict[str, Any]:
        self._flush_last()
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
        jobs = slice_jobs_cfg(cfg)
        if jobs is None or not jobs.get("dir"):
            return None
        directory = Path(str(jobs.dir))
        full_plan = make_slice_plan(module.student, _plain(cfg.method.slicing))
        features = features_identity(cfg, datamodule, feature_cache)
        content = run_file_content(
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
                if not record_problems(
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
                feature_cache = FeatureCacheDataset(
                    feature_cache.directory, feature_cache.manifest, slices=names
                )
        return cls(cfg, directory, full_plan, run, selected, pending, feature_cache)

    @property
    def done(self) -> bool:
        return len(self.pending) == 0

    def skipped_results(self) -> dict[str, Any]:
        """The results of a job with nothing left to train (returned, not written: the
        output directory may hold the results of the run that trained these slices)."""
        return Results(
            status="skipped",
            skipped=True,
            method=str(self.cfg.method.name),
            experiment=self.cfg.get("experiment_name"),
            config=plain_config(self.cfg),
            slice_jobs={"dir": str(self.directory), "slices": self.selected.names()},
        ).to_dict()

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
            "time_written": now_iso(),
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
