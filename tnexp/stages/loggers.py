"""The Lightning loggers of a stage, built from the ``logger`` config group.

Each entry of ``cfg.logger`` with a ``_target_`` is instantiated by :func:`build_loggers`;
the stage passes what only it knows (the run directory, whether it resumes, the run name,
the method, the resolved config) to the targets that take it. The two targets here keep
tnexp's behaviour: a CSV logger that appends on resume, and W&B (offline by default)
that continues the same W&B run on resume.
"""

from __future__ import annotations

import csv
import inspect
import uuid
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "WANDB_ID_FILE",
    "build_loggers",
    "finish_loggers",
    "resumable_csv_logger",
    "summary_metrics",
    "wandb_logger",
    "wandb_run_id",
]

WANDB_ID_FILE = "wandb_run_id.txt"
# Config entries written before the logger group had targets (a resumed old run folder).
_LEGACY_TARGETS = {
    "csv": "tnexp.stages.loggers.resumable_csv_logger",
    "wandb": "tnexp.stages.loggers.wandb_logger",
}


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows of an existing metrics.csv."""

    def _check_log_dir_exists(self) -> None:
        if not Path(self.metrics_file_path).is_file():
            return
        with open(self.metrics_file_path, newline="") as handle:
            header = next(csv.reader(handle), [])
        self.metrics_keys = list(header)  # new keys rewrite the header, keeping the rows


class _AppendingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:  # created lazily, like Lightning's
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def resumable_csv_logger(save_dir: str | Path, resuming: bool = False) -> CSVLogger:
    """Lightning's CSVLogger in ``<save_dir>/csv``; when ``resuming``, it appends.

    Lightning's writer deletes an existing metrics.csv when it starts, so a resumed run
    would lose the rows of the epochs before the interruption.
    """
    cls = _AppendingCSVLogger if resuming else CSVLogger
    return cls(save_dir=str(save_dir), name="csv", version="")


def wandb_run_id(out: Path, resuming: bool) -> str:
    """The W&B run id of this run directory: reused on resume, so W&B continues one run."""
    path = Path(out) / WANDB_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def wandb_logger(
    save_dir: str | Path,
    *,
    enabled: bool = True,
    mode: str = "offline",
    project: str = "tnexp",
    entity: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    resuming: bool = False,
    run_name: str | None = None,
    method: str | None = None,
    config: dict[str, Any] | None = None,
) -> WandbLogger | None:
    """W&B (``mode`` offline | online | disabled), one W&B run per run directory.

    None when ``enabled`` is false or ``mode`` is disabled. The W&B run is named
    ``name`` or the stage's run name and tagged with ``tags`` plus the method.
    """
    if not enabled or mode == "disabled":
        return None
    logger = WandbLogger(
        id=wandb_run_id(Path(save_dir), resuming),
        resume="allow",
        project=project,
        entity=entity,
        group=group,
        job_type=job_type,
        name=name or run_name,
        tags=[str(t) for t in (tags or [])] + ([method] if method else []),
        save_dir=str(save_dir),
        offline=mode == "offline",
        config=config,
    )
    # Lightning always passes anonymous=None, which recent wandb answers with a
    # deprecation warning on stderr for every run; the setting does nothing.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def call_with_context(node: Any, context: dict[str, Any]) -> Any:
    """Instantiate ``node``, passing the ``context`` values its target takes and it lacks."""
    factory = instantiate(node, _partial_=True)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read: pass nothing extra
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = set(node) if isinstance(node, dict | DictConfig) else set()
    extra = {k: v for k, v in context.items() if (k in params or takes_any) and k not in given}
    return factory(**extra)


def build_loggers(
    cfg: DictConfig, out: Path, run_name: str, resuming: bool = False
) -> list[Logger]:
    """The loggers of ``cfg.logger`` (entries set to null or false are dropped)."""
    context = {
        "save_dir": out,
        "resuming": resuming,
        "run_name": run_name,
        "method": str(cfg.method.name),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    loggers: list[Logger] = []
    for key, node in (cfg.get("logger") or {}).items():
        node = _with_target(str(key), node)
        if node is None:
            continue
        logger = call_with_context(node, context)
        if logger is not None:
            loggers.append(logger)
    return loggers


def _with_target(key: str, node: Any) -> dict[str, Any] | None:
    """The entry as a plain dict with a ``_target_`` (older configs: ``csv: true``)."""
    if node is None or node is False:
        return None
    if node is True and key in _LEGACY_TARGETS:
        return {"_target_": _LEGACY_TARGETS[key]}
    if not isinstance(node, DictConfig):
        return None  # a plain setting, not a logger
    plain = OmegaConf.to_container(node, resolve=True)
    if "_target_" not in plain:
        if key not in _LEGACY_TARGETS:
            return None
        plain["_target_"] = _LEGACY_TARGETS[key]
    return plain


def summary_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The flat metrics that W&B's run summary shares with results.json."""
    flat: dict[str, Any] = {}
    for kind in ("final", "best"):
        for key, value in results["metrics"][kind].items():
            flat[f"{kind}/{key}"] = value
    for key in ("optimization_s", "wall_s", "time_to_best_s", "best_value"):
        if key in results["time"]:
            flat[f"time/{key}"] = results["time"][key]
    if results.get("tensorize"):
        flat["params/model_cr"] = results["tensorize"]["totals"]["model_cr"]
    flat["params/student"] = results["params"]["student"]
    for stage in ("before", "final_eval", "teacher"):
        for key, value in (results["metrics"].get(stage) or {}).items():
            if isinstance(value, int | float):
                flat[f"{stage}/{key}"] = value
    return flat


def finish_loggers(loggers: list[Logger], results: dict[str, Any]) -> None:
    """Put the results into W&B's run summary and close the W&B run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary_metrics(results))
            logger.experiment.finish()
